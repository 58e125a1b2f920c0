"""Label-free per-image features: what the drift test compares.

Every image becomes one row of named columns:
- image statistics (always): per-channel mean and std of intensity, contrast (luma
  5-95 % range), colourfulness (Hasler & Suesstrunk), sharpness (log10 variance of the
  Laplacian), noise (Immerkaer's estimate), luma entropy;
- the champion's own view (with a model): predicted class-area fractions, mean
  softmax confidence and mean normalised pixel entropy;
plus, with a model, an embedding per image: the deepest encoder features, average
pooled ((N, D) float32; the PCA that reduces them is fitted on the reference later).

Tables are cached per dataset under a key made of every file's hash, the model
version and the feature settings, so the reference is featurised once per champion.
Masks are never read. No Evidently here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from segloop.data.files import list_samples, read_image

# Bump when a feature's definition changes: old cache entries then miss instead of lying.
FEATURE_VERSION = 1
STRIDE = 32  # an SMP encoder of depth 5 needs sides that are multiples of 32
CHANNEL_NAMES = {1: ("gray",), 3: ("r", "g", "b")}


@dataclass(frozen=True)
class Champion:
    """The model whose view of the images is featurised, and what identifies it."""

    model: nn.Module  # in eval mode
    classes: tuple[str, ...]
    channels: int
    model_id: str  # content hash of the checkpoint: the cache key's model version
    path: Path | None = None
    held_out_miou: float | None = None  # the checkpoint's validation mIoU, if recorded


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_champion(path: Path | str) -> Champion:
    """Load a segloop checkpoint as the champion whose view drift is measured in."""
    from segloop.checkpoint import load_checkpoint, model_from_checkpoint

    path = Path(path)
    ckpt = load_checkpoint(path)
    model, _ = model_from_checkpoint(ckpt, str(path))
    model.to(memory_format=torch.channels_last)  # see champion_view
    miou = ckpt.get("val_miou")
    return Champion(
        model=model,
        classes=tuple(ckpt["classes"]),
        channels=int(ckpt["channels"]),
        model_id=file_sha256(path)[:16],
        path=path,
        held_out_miou=None if miou is None else float(miou),
    )


def _second_differences(luma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Laplacian and Immerkaer's noise mask of (N, H, W) float32, each (N, H-2, W-2).

    Both 3x3 kernels are sums of 1-D second differences ([1, -2, 1] along rows and
    columns; Immerkaer's mask is their outer product, so it cancels smooth structure
    and leaves mostly noise). A few shifted subtractions are several times cheaper on
    a CPU than conv2d with a 1-channel input, and give the same values up to rounding.
    """
    dxx = luma[:, :, :-2] - 2 * luma[:, :, 1:-1] + luma[:, :, 2:]  # (N, H, W-2)
    dyy = luma[:, :-2, 1:-1] - 2 * luma[:, 1:-1, 1:-1] + luma[:, 2:, 1:-1]  # (N, H-2, W-2)
    laplacian = dyy.add_(dxx[:, 1:-1])
    noise_mask = dxx[:, :-2] - 2 * dxx[:, 1:-1] + dxx[:, 2:]
    return laplacian, noise_mask


def _var_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased variance and mean over the last dim, like torch.var_mean (same values to
    ~1e-7), in plain passes: torch's Welford reduction is about 4x slower on this CPU.

    Corrected two-pass algorithm: the sum of the deviations from the first mean removes
    that mean's rounding error, so a constant image has a variance of (almost) exactly 0.
    """
    n = x.shape[-1]
    mean = x.mean(-1)
    d = x - mean.unsqueeze(-1)
    s = d.sum(-1)
    var = d.mul_(d).sum(-1).sub_(s * s / n).div_(n - 1).clamp_min_(0.0)
    return var, mean.add_(s / n)


def _std_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = _var_mean(x)
    return var.sqrt_(), mean


def image_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Statistics of a batch (N, H, W, C) uint8, C in {1, 3}; each column (N,) float64.

    Intensities are in [0, 1]. Vectorised over the batch (one size per call); computed
    in float32 (histograms in float64), returned as float64.
    """
    n, h, w, c = images.shape
    if min(h, w) < 3:
        raise ValueError(f"images must be at least 3x3 pixels, got {h}x{w}")
    # (N, C, H*W): every per-image reduction below runs over one contiguous last dim.
    u8 = torch.from_numpy(np.ascontiguousarray(images)).reshape(n, h * w, c).transpose(1, 2)
    x = u8.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
    cols: dict[str, torch.Tensor] = {}
    std, mean = _std_mean(x)
    for i, name in enumerate(CHANNEL_NAMES[c]):
        cols[f"mean_{name}"], cols[f"std_{name}"] = mean[:, i], std[:, i]
    if c == 3:
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        luma = 0.299 * r + 0.587 * g + 0.114 * b
        rg_std, rg_mean = _std_mean(r - g)
        yb_std, yb_mean = _std_mean(0.5 * (r + g) - b)
        cols["colourfulness"] = torch.sqrt(rg_std**2 + yb_std**2) + 0.3 * torch.sqrt(rg_mean**2 + yb_mean**2)
    else:
        luma = x[:, 0]
    # One 256-bin histogram per image (offset bins so a single bincount serves the batch)
    # gives both the entropy and robust percentiles without sorting every pixel.
    bins = (luma * 255.0).round_().long().clamp_(0, 255).add_(256 * torch.arange(n)[:, None])
    hist = torch.bincount(bins.reshape(-1), minlength=256 * n).reshape(n, 256).double()
    p = hist / hist.sum(1, keepdim=True)
    cols["entropy"] = -(p * torch.log2(p.clamp_min(1e-12))).sum(1)
    cdf = p.cumsum(1)
    cols["contrast"] = ((cdf < 0.95).sum(1) - (cdf < 0.05).sum(1)).double() / 255.0
    laplacian, noise_mask = _second_differences(luma.reshape(n, h, w))
    # log10: the variance of the Laplacian spans orders of magnitude between blur and noise.
    cols["sharpness"] = torch.log10(_var_mean(laplacian.reshape(n, -1))[0] + 1e-8)
    cols["noise"] = math.sqrt(math.pi / 2) / 6 * noise_mask.abs_().reshape(n, -1).mean(1)  # Immerkaer (1996)
    return {k: v.double().numpy() for k, v in cols.items()}


def _centre_crop(x: torch.Tensor, crop: int | None) -> torch.Tensor:
    if crop is None:
        return x
    h, w = x.shape[-2:]
    ch, cw = min(crop, h), min(crop, w)
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top : top + ch, left : left + cw]


def _pad_to_stride(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % STRIDE, (-w) % STRIDE
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    return x


@torch.inference_mode()
def champion_view(champion: Champion, images: np.ndarray, crop: int | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The champion on a batch (N, H, W, C) uint8 (one size).

    Returns embeddings (N, D) float32 (deepest encoder features, average pooled) and
    columns (N,) float64: `area_<class>` (predicted fraction of pixels), `confidence`
    (mean max softmax), `pred_entropy` (mean pixel entropy / log K, in [0, 1]).
    """
    model = champion.model
    # Crop before converting: only the pixels the model sees become float.
    u8 = _centre_crop(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2), crop)
    n, _, h, w = u8.shape
    # channels_last: oneDNN's convolutions run faster on NHWC inputs on this CPU (the
    # champion's weights are converted once, in load_champion); same values up to rounding.
    x = u8.to(torch.float32, memory_format=torch.channels_last).div_(255.0)
    # Calling encoder, decoder and head ourselves (every SMP model has the three) gives the
    # pooled embedding and the logits from one forward pass (input_norm: the model's first step).
    encoder, decoder, head, norm = (
        model.get_submodule(name) for name in ("encoder", "decoder", "segmentation_head", "input_norm")
    )
    features = encoder(_pad_to_stride(norm(x)))
    embeddings = features[-1].mean(dim=(2, 3))
    logits = head(decoder(features))[..., :h, :w].float()
    probs = logits.softmax(1)
    k = probs.shape[1]
    confidence, predicted = probs.max(1)  # (N, h, w): max softmax and its class (the argmax)
    # Class areas from one offset bincount instead of a (N, h, w, K) one-hot.
    counts = torch.bincount((predicted + k * torch.arange(n)[:, None, None]).reshape(-1), minlength=n * k)
    area = counts.reshape(n, k).double() / (h * w)
    cols = {f"area_{name}": area[:, i] for i, name in enumerate(champion.classes)}
    cols["confidence"] = confidence.mean(dim=(1, 2))
    cols["pred_entropy"] = -(probs * probs.clamp_min(1e-12).log()).sum(1).mean(dim=(1, 2)) / math.log(k)
    return embeddings.float().numpy(), {k: v.double().numpy() for k, v in cols.items()}


@dataclass
class FeatureTable:
    """Features of one dataset: rows follow `stems`."""

    stems: list[str]
    columns: dict[str, np.ndarray]  # name -> (N,) float64
    embeddings: np.ndarray | None  # (N, D) float32, None without a champion
    model_id: str | None
    key: str = ""
    from_cache: bool = False
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.stems)

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.columns, index=self.stems)


def featurise_arrays(
    images: list[np.ndarray], champion: Champion | None, crop: int | None
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Features of in-memory images (H, W, C) uint8 (sizes may differ).

    Returns (columns name -> (N,) float64, embeddings (N, D) float32 or None).
    """
    n = len(images)
    by_shape: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(img.shape, []).append(i)
    columns: dict[str, np.ndarray] = {}
    embeddings = None
    for idx in by_shape.values():
        batch = np.stack([images[i] for i in idx])
        parts = image_statistics(batch)
        if champion is not None:
            emb, view = champion_view(champion, batch, crop)
            parts.update(view)
            if embeddings is None:
                embeddings = np.zeros((n, emb.shape[1]), dtype=np.float32)
            embeddings[idx] = emb
        for name, values in parts.items():
            columns.setdefault(name, np.zeros(n, dtype=np.float64))[idx] = values
    return columns, embeddings


def _read(path: Path, channels: int) -> np.ndarray:
    try:
        return read_image(path, channels)
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three on bad files
        raise ValueError(f"{path}: unreadable image ({type(err).__name__}: {err})") from None


def _decoded(chunks: list[list], channels: int) -> Iterator[list[np.ndarray]]:
    """The images of each chunk of samples, decoded one chunk ahead in a thread.

    PIL releases the GIL while it decodes, so the next batch's PNG/JPEG decoding overlaps
    this batch's features (a thread, not DataLoader worker processes: nothing to pickle
    or start). At most two chunks are in memory; a read error surfaces in order.
    """

    def read(chunk):
        return [_read(s.image, channels) for s in chunk]

    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="segloop-decode") as pool:
        pending = pool.submit(read, chunks[0])
        for i in range(len(chunks)):
            images = pending.result()
            if i + 1 < len(chunks):
                pending = pool.submit(read, chunks[i + 1])
            yield images


def _cache_key(files: list[tuple[str, str]], model_id: str | None, channels: int, crop: int | None) -> str:
    spec = {
        "version": FEATURE_VERSION,
        "model": model_id,
        "channels": channels,
        "crop": crop if model_id else None,
        "files": files,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def _save(path: Path, table: FeatureTable) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    arrays = {f"col:{k}": v for k, v in table.columns.items()}
    if table.embeddings is not None:
        arrays["embeddings"] = table.embeddings
    meta = {"stems": table.stems, "model_id": table.model_id, "key": table.key, **table.meta}
    try:
        with os.fdopen(fd, "wb") as f:
            # numpy's stub reads **arrays as maybe allow_pickle (a bool): names here are "col:*"/"embeddings"
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)  # atomic: a crash never leaves a torn cache entry
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path) -> FeatureTable:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        columns = {k[4:]: z[k] for k in z.files if k.startswith("col:")}
        emb = z["embeddings"] if "embeddings" in z.files else None
    stems, model_id, key = meta.pop("stems"), meta.pop("model_id"), meta.pop("key")
    return FeatureTable(stems, columns, emb, model_id, key, from_cache=True, meta=meta)


def featurise_folder(
    folder: Path,
    channels: int,
    champion: Champion | None = None,
    cache_dir: Path | None = None,
    crop: int | None = None,
    batch_size: int = 32,
    min_images: int = 1,
    progress: bool = True,
) -> FeatureTable:
    """Features of every image in `folder` (a dataset folder or a plain folder of images).

    With `cache_dir`, a table computed before for the same files (by content hash), model
    version and settings is loaded instead of recomputed (`from_cache` tells which).
    Raises FileNotFoundError / ValueError naming the folder or file for bad input.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: folder not found")
    samples = list_samples(folder, require_masks=False)
    if len(samples) < min_images:
        raise ValueError(
            f"{folder}: {len(samples)} images, drift detection needs at least {min_images} (drift.min_images)"
        )
    if champion is not None and champion.channels != channels:
        raise ValueError(f"champion expects {champion.channels} channels, features asked for {channels}")
    files = [(s.stem, file_sha256(s.image)) for s in samples]
    model_id = champion.model_id if champion is not None else None
    key = _cache_key(files, model_id, channels, crop)
    cache_path = None if cache_dir is None else Path(cache_dir) / f"{key}.npz"
    if cache_path is not None and cache_path.is_file():
        return _load(cache_path)

    columns: dict[str, list[np.ndarray]] = {}
    embeddings: list[np.ndarray] = []
    chunks = [samples[start : start + batch_size] for start in range(0, len(samples), batch_size)]
    batches = _decoded(chunks, channels)
    for images in tqdm(batches, total=len(chunks), desc=f"features {folder.name}", disable=not progress, leave=False):
        cols, emb = featurise_arrays(images, champion, crop)
        for name, values in cols.items():
            columns.setdefault(name, []).append(values)
        if emb is not None:
            embeddings.append(emb)
    table = FeatureTable(
        stems=[s.stem for s in samples],
        columns={k: np.concatenate(v) for k, v in columns.items()},
        embeddings=np.concatenate(embeddings) if embeddings else None,
        model_id=model_id,
        key=key,
        meta={"folder": str(folder), "channels": channels, "crop": crop, "feature_version": FEATURE_VERSION},
    )
    if cache_path is not None:
        _save(cache_path, table)
    return table
