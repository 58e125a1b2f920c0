"""A training recipe derived from the dataset's fingerprint (after nnU-Net's "rule-based" half).

`fingerprint(folder)` measures what the recipe depends on: image sizes and channels,
intensity statistics, class frequencies, the scale of the structures in the masks and
whether the scenes have an up and a down. `recipe(fp, ...)` turns it into settings, each
with the reason it was chosen; `resolve(settings, folder)` fills in every setting left
`null` (auto) in params.yaml and keeps every one given explicitly. Pure numpy/scipy:
no torch here, so `segloop plan` answers in a second.

The rules (docs/recipe.md says why each one holds):
- crop: the smallest multiple of 32 that holds 4 structure widths of context (and 64 px),
  capped by the median image side and by the memory budget at batch 2;
- batch: as many crops as the memory budget holds, 2 to 8 (more, on a CPU, means fewer
  optimiser steps in the same minutes);
- normalisation: grayscale -> clip to the 0.5/99.5 percentiles, then z-score with the
  dataset's mean/std (robust to a few saturated pixels, as nnU-Net does for CT); colour ->
  per-channel z-score with the dataset's statistics (ImageNet's with pretrained encoder weights);
- augmentation: flips and 90-degree turns unless the masks show an up and a down (a class
  far more frequent in the top third than the bottom, as sky over road); brightness,
  contrast, gamma always; noise for grayscale;
- rare classes (< 5 % of pixels): a third of the crops centred on a pixel of one of them;
- epoch length: one pass over the training folder but at least `MIN_ITERS` optimiser steps,
  so a folder of 20 images still gets a validation every so many steps, not every 3.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

MIN_ITERS = 25  # optimiser steps per epoch, at least
MAX_BATCH = 8
BYTES_PER_PIXEL = 3000  # training memory of a resnet18 U-Net per input pixel (fp32 activations + grads), measured
RARE = 0.05  # classes below this pixel share get foreground oversampling
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SAMPLE_IMAGES = 64  # images read for the fingerprint (a seeded sample of larger folders)


@dataclass
class Fingerprint:
    images: int
    channels: int  # 1 when every image is grayscale (or RGB with equal channels), else 3
    median_size: tuple[int, int]
    min_size: tuple[int, int]
    max_size: tuple[int, int]
    mean: list[float]  # per channel, intensities in [0, 1]
    std: list[float]
    p005: list[float]  # 0.5th / 99.5th percentiles per channel
    p995: list[float]
    class_share: dict[int, float]  # pixel share of each class id (ignore excluded)
    structure_px: float  # width of the widest class's regions (median over its regions' ridges), px
    thinnest_px: float  # the same for the thinnest class
    object_px: float  # median equivalent diameter of the connected regions, px
    vertical_layout: float  # max over classes of |share of the top third - share of the bottom third|, all images


def iters_per_epoch(images: int, batch_size: int) -> int:
    """The planned epoch: one pass over `images`, at least MIN_ITERS optimiser steps."""
    return max(MIN_ITERS, math.ceil(images / batch_size))


def count_images(folder: Path) -> int:
    return len(_dataset_files(folder))


def _dataset_files(folder: Path) -> list[tuple[Path, Path | None]]:
    """(image, mask or None) pairs of a dataset folder, read without the torch-side loader."""
    images = folder / "images"
    if not images.is_dir():
        raise FileNotFoundError(f"{folder}: not a dataset folder (no images/ inside)")
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not files:
        raise ValueError(f"{images}: no images")
    masks = folder / "masks"
    return [(p, m if (m := masks / f"{p.stem}.png").is_file() else None) for p in files]


def fingerprint(folder: Path, channels: int | None = None, sample: int = SAMPLE_IMAGES, seed: int = 0) -> Fingerprint:
    """Measure `folder` (a dataset folder: images/ and masks/); at most `sample` images are read.

    Intensities are measured as the model will see them: converted to `channels` (1: luminance,
    as the loader converts), or as stored when None."""
    from scipy import ndimage

    files = _dataset_files(folder)
    rng = np.random.default_rng(seed)
    picked = [files[i] for i in sorted(rng.choice(len(files), min(sample, len(files)), replace=False))]
    sizes: list[tuple[int, ...]] = []
    pixels: list[np.ndarray] = []
    color = False
    shares: dict[int, int] = {}
    widths: dict[int, list[float]] = {}
    diameters: list[float] = []
    top: dict[int, int] = {}
    bottom: dict[int, int] = {}
    third_px = 0
    for image_path, mask_path in picked:
        with Image.open(image_path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
            gray = np.asarray(img.convert("L"), dtype=np.float32)[..., None] / 255.0 if channels == 1 else None
        sizes.append(arr.shape[:2])
        color |= bool(np.abs(arr[..., 0] - arr[..., 1]).max() > 0.02 or np.abs(arr[..., 1] - arr[..., 2]).max() > 0.02)
        flat = (arr if gray is None else gray).reshape(-1, 1 if gray is not None else 3)
        pixels.append(flat[rng.choice(len(flat), min(len(flat), 20000), replace=False)])
        if mask_path is None:
            continue
        with Image.open(mask_path) as m:
            mask = np.asarray(m)
        h = mask.shape[0]
        thirds = (mask[: h // 3], mask[h - h // 3 :])
        third_px += thirds[0].size
        for k in np.unique(mask):
            if k == 255:
                continue
            region = mask == k
            shares[int(k)] = shares.get(int(k), 0) + int(region.sum())
            top[int(k)] = top.get(int(k), 0) + int((thirds[0] == k).sum())
            bottom[int(k)] = bottom.get(int(k), 0) + int((thirds[1] == k).sum())
            labels, n = ndimage.label(region)
            if n:
                areas = np.bincount(labels.ravel())[1:]
                diameters.extend(np.sqrt(4 * areas[areas >= 4] / np.pi).tolist())
            # Width: twice the distance from a region's skeleton-ish interior to its edge.
            dist = ndimage.distance_transform_edt(region)
            ridge = dist[(dist > 0) & (dist >= ndimage.maximum_filter(dist, size=3))]
            if ridge.size:
                widths.setdefault(int(k), []).append(2 * float(np.median(ridge)))
    px = np.concatenate(pixels)
    if channels is None and not color:
        px = px[:, :1]
    total = max(1, sum(shares.values()))
    hw = np.array(sizes)
    class_widths = [float(np.median(v)) for v in widths.values()]
    return Fingerprint(
        images=len(files),
        channels=3 if color else 1,
        median_size=_hw(np.median(hw, 0)),
        min_size=_hw(hw.min(0)),
        max_size=_hw(hw.max(0)),
        mean=_r(px.mean(0)),
        std=_r(px.std(0)),
        p005=_r(np.percentile(px, 0.5, 0)),
        p995=_r(np.percentile(px, 99.5, 0)),
        class_share={k: round(v / total, 4) for k, v in sorted(shares.items())},
        structure_px=round(max(class_widths), 1) if class_widths else 0.0,
        thinnest_px=round(min(class_widths), 1) if class_widths else 0.0,
        object_px=round(float(np.median(diameters)), 1) if diameters else 0.0,
        vertical_layout=round(max((abs(top[k] - bottom[k]) / third_px for k in top), default=0.0), 3),
    )


def _hw(values: np.ndarray) -> tuple[int, int]:
    return int(values[0]), int(values[1])


def _r(values) -> list[float]:
    return [round(float(v), 4) for v in np.atleast_1d(values)]


def _up32(v: float) -> int:
    return int(math.ceil(v / 32) * 32)


def _down32(v: float) -> int:
    return max(32, int(v // 32 * 32))


@dataclass
class Recipe:
    """Planned settings (dotted keys as in params.yaml) and why each was chosen."""

    settings: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def set(self, key: str, value: Any, why: str) -> None:
        self.settings[key], self.reasons[key] = value, why


def recipe(
    fp: Fingerprint,
    channels: int,
    num_classes: int,
    memory_mb: float,
    pretrained: bool = False,
    batch_size: int | None = None,
) -> Recipe:
    """Settings for a dataset with fingerprint `fp`, trained with `channels` input channels
    (`batch_size`: the one params.yaml sets, which the epoch length then follows)."""
    r = Recipe()
    budget_px = memory_mb * 2**20 / BYTES_PER_PIXEL
    side = min(fp.median_size)
    context = max(4 * fp.structure_px, 64)
    memory_cap = _down32(math.sqrt(budget_px / 2))
    crop = min(_up32(context), _down32(side), memory_cap)
    r.set(
        "data.crop_size",
        crop,
        f"4 structure widths ({fp.structure_px:.0f} px) of context, a multiple of 32, "
        f"at most the median image side ({side}) and what memory holds at batch 2 ({memory_cap})",
    )
    batch = int(max(2, min(MAX_BATCH, budget_px // (crop * crop))))
    r.set(
        "train.batch_size", batch, f"{crop}x{crop} crops in {memory_mb:g} MB at ~{BYTES_PER_PIXEL} B/px, 2..{MAX_BATCH}"
    )
    r.set(
        "train.iters_per_epoch",
        iters_per_epoch(fp.images, batch_size or batch),
        f"one pass over {fp.images} images, at least {MIN_ITERS} steps",
    )
    if channels == 1:
        lo, hi = fp.p005[0], fp.p995[0]
        clipped = min(max(fp.mean[0], lo), hi)
        r.set(
            "model.norm",
            {"kind": "zscore", "mean": [clipped], "std": [max(fp.std[0], 1e-3)], "clip": [lo, hi]},
            "grayscale: clip to the 0.5/99.5 percentiles, z-score with the dataset's mean/std",
        )
    elif pretrained:
        r.set(
            "model.norm",
            {"kind": "zscore", "mean": list(IMAGENET[0]), "std": list(IMAGENET[1]), "clip": None},
            "colour, pretrained encoder: ImageNet's per-channel mean/std",
        )
    else:
        mean = fp.mean if len(fp.mean) == 3 else fp.mean * 3
        std = fp.std if len(fp.std) == 3 else fp.std * 3
        r.set(
            "model.norm",
            {"kind": "zscore", "mean": mean, "std": [max(s, 1e-3) for s in std], "clip": None},
            "colour: per-channel z-score with the dataset's mean/std",
        )
    upright = fp.vertical_layout > 0.2
    aug = {
        "hflip": 0.5,
        "vflip": 0.0 if upright else 0.5,
        "rot90": 0.0 if upright else 0.5,
        "brightness": 0.2,
        "contrast": 0.2,
        "gamma": 0.2,
        "noise_sigma": 0.03 if channels == 1 else 0.0,
    }
    r.set(
        "train.augment",
        aug,
        "scenes with an up and a down: horizontal flips only"
        if upright
        else f"no up/down in the masks (layout {fp.vertical_layout:.2f} <= 0.2): flips and 90-degree turns"
        + ("; noise for grayscale" if channels == 1 else ""),
    )
    rare = [k for k, v in fp.class_share.items() if v < RARE and k < num_classes]
    r.set(
        "train.foreground",
        {"classes": rare, "share": 0.33 if rare else 0.0},
        f"classes {rare} below {RARE:.0%} of pixels: a third of the crops centred on them"
        if rare
        else f"no class below {RARE:.0%} of pixels: plain random crops",
    )
    return r


# The settings a plan fills in when params.yaml leaves them null.
PLANNED = (
    "data.crop_size",
    "train.batch_size",
    "train.iters_per_epoch",
    "model.norm",
    "train.augment",
    "train.foreground",
)


def _get(raw: dict, key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _put(raw: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def resolve(settings, folder: Path, fp: Fingerprint | None = None):
    """`settings` with every planned key that is null filled from `folder`'s recipe.

    Returns (resolved settings, the recipe's planned part (empty when everything was given), fingerprint)."""
    from segloop.config import settings_from_dict

    raw = settings.model_dump(mode="json")
    auto = [k for k in PLANNED if _get(raw, k) is None]
    fp = fp or fingerprint(folder, settings.data.channels)
    r = recipe(
        fp,
        settings.data.channels,
        settings.num_classes,
        settings.train.memory_mb,
        settings.model.encoder_weights is not None,
        settings.train.batch_size,
    )
    applied = Recipe({k: r.settings[k] for k in auto}, {k: r.reasons[k] for k in auto})
    for key in auto:
        _put(raw, key, r.settings[key])
    return settings_from_dict(raw, f"plan of {folder}"), applied, fp


def write_plan(path: Path, folder: Path, fp: Fingerprint, r: Recipe) -> None:
    doc = {"data": str(folder), "fingerprint": asdict(fp), "settings": r.settings, "reasons": r.reasons}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def describe(fp: Fingerprint, r: Recipe) -> str:
    lines = [
        f"{fp.images} images, {fp.channels} channel(s), median {fp.median_size[0]}x{fp.median_size[1]} "
        f"(min {fp.min_size[0]}x{fp.min_size[1]}, max {fp.max_size[0]}x{fp.max_size[1]})",
        f"intensity mean {fp.mean} std {fp.std} p0.5 {fp.p005} p99.5 {fp.p995}",
        f"class pixel share {fp.class_share}",
        f"structure width {fp.structure_px} px (thinnest {fp.thinnest_px} px), region diameter {fp.object_px} px, "
        f"vertical layout {fp.vertical_layout}",
        "recipe:",
    ]
    for key, value in r.settings.items():
        lines.append(f"  {key} = {value}\n      because {r.reasons[key]}")
    return "\n".join(lines)
