"""The recipe from the dataset fingerprint (segloop.plan) and the budgeted training it drives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segloop.config import settings_from_dict
from segloop.plan import fingerprint, recipe, resolve


def _write(folder: Path, images: list[np.ndarray], masks: list[np.ndarray]) -> Path:
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i, (img, mask) in enumerate(zip(images, masks)):
        Image.fromarray(img).save(folder / "images" / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8)).save(folder / "masks" / f"{i:03d}.png")
    return folder


def _grid_lines(size: int, cell: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Grayscale: thin dark walls (class 1) every `cell` px around bright cells (class 0)."""
    mask = np.zeros((size, size), np.uint8)
    off = int(rng.integers(0, cell))
    for k in range(off, size, cell):
        mask[k : k + 3, :] = 1
        mask[:, k : k + 3] = 1
    img = np.where(mask == 1, 60, 190) + rng.normal(0, 10, mask.shape)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def _blobs(size: int, radius: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """RGB: one large disc (class 1) on a background (class 0), random place and colours."""
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.integers(radius, size - radius, 2)
    mask = (((yy - cy) ** 2 + (xx - cx) ** 2) < radius**2).astype(np.uint8)
    img = np.where(mask[..., None] == 1, rng.integers(0, 255, 3), rng.integers(0, 255, 3))
    return img.astype(np.uint8), mask


@pytest.fixture
def thin(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    pairs = [_grid_lines(256, 24, rng) for _ in range(6)]
    return _write(tmp_path / "thin", [p[0] for p in pairs], [p[1] for p in pairs])


@pytest.fixture
def blobs(tmp_path) -> Path:
    rng = np.random.default_rng(1)
    pairs = [_blobs(320, 70, rng) for _ in range(6)]
    return _write(tmp_path / "blobs", [p[0] for p in pairs], [p[1] for p in pairs])


def test_fingerprint_measures_thin_walls_and_grayscale(thin):
    fp = fingerprint(thin)
    assert fp.channels == 1 and fp.median_size == (256, 256) and fp.images == 6
    assert 2 <= fp.thinnest_px <= 5  # the 3-px walls
    assert 15 <= fp.structure_px <= 30  # the ~21-px cells between them
    assert 0.15 < fp.class_share[1] < 0.3
    assert fp.p005[0] < fp.mean[0] < fp.p995[0]


def test_thin_walls_get_a_small_crop_and_percentile_zscore(thin):
    r = recipe(fingerprint(thin), channels=1, num_classes=2, memory_mb=1536)
    crop = r.settings["data.crop_size"]
    assert crop % 32 == 0 and 64 <= crop <= 128  # 4 cell widths of context, not the whole image
    norm = r.settings["model.norm"]
    assert norm["kind"] == "zscore" and norm["clip"] is not None and len(norm["mean"]) == 1
    assert r.settings["train.augment"]["rot90"] > 0 and r.settings["train.augment"]["noise_sigma"] > 0
    assert all(r.reasons[k] for k in r.settings)


def test_large_blobs_get_a_large_crop_and_channel_zscore(blobs):
    fp = fingerprint(blobs)
    assert fp.channels == 3
    r = recipe(fp, channels=3, num_classes=2, memory_mb=1536)
    assert r.settings["data.crop_size"] >= 256  # 4 x ~140-px discs, capped by the 320-px images
    assert r.settings["model.norm"]["clip"] is None and len(r.settings["model.norm"]["mean"]) == 3
    # A smaller memory budget means fewer (or smaller) crops, never more.
    small = recipe(fp, channels=3, num_classes=2, memory_mb=256)
    assert (
        small.settings["data.crop_size"] ** 2 * small.settings["train.batch_size"]
        < r.settings["data.crop_size"] ** 2 * r.settings["train.batch_size"]
    )


def test_up_down_layout_and_rare_classes(tmp_path):
    rng = np.random.default_rng(2)
    masks, images = [], []
    for _ in range(4):
        mask = np.zeros((128, 128), np.uint8)
        mask[64:] = 1  # ground under sky
        y, x = rng.integers(70, 120), rng.integers(0, 120)
        mask[y : y + 4, x : x + 4] = 2  # a rare object on the ground
        masks.append(mask)
        images.append(rng.integers(0, 255, (128, 128, 3)).astype(np.uint8))
    r = recipe(fingerprint(_write(tmp_path / "scene", images, masks)), channels=3, num_classes=3, memory_mb=1536)
    assert r.settings["train.augment"]["vflip"] == 0 and r.settings["train.augment"]["rot90"] == 0
    assert r.settings["train.foreground"] == {"classes": [2], "share": 0.33}


def test_explicit_settings_override_the_plan(thin, tiny_raw):
    tiny_raw["data"]["crop_size"] = 96
    tiny_raw["train"]["augment"] = {"hflip": 0.0, "vflip": 0.0}
    tiny_raw["data"]["channels"] = 1
    tiny_raw["model"]["norm"] = None
    tiny_raw["train"]["batch_size"] = None
    s, applied, _ = resolve(settings_from_dict(tiny_raw), thin)
    assert s.data.crop_size == 96 and s.train.augment.hflip == 0.0  # kept
    assert "data.crop_size" not in applied.settings and "train.augment" not in applied.settings
    assert s.train.batch_size == applied.settings["train.batch_size"]  # planned
    assert s.model.norm.kind == "zscore" and s.model.norm.clip is not None


def test_an_epoch_over_several_training_folders_is_one_pass_over_all_of_them(thin, blobs, tiny_raw, tmp_path):
    from segloop.train import TrainJob, planned_settings

    tiny_raw["train"] |= {"batch_size": 2, "iters_per_epoch": None}
    extra = _write(tmp_path / "more", *zip(*[_grid_lines(256, 24, np.random.default_rng(i)) for i in range(50)]))
    settings = settings_from_dict(tiny_raw)
    one, _ = planned_settings(settings, TrainJob([thin], tmp_path / "a", [thin]), None)
    both, _ = planned_settings(settings, TrainJob([thin, extra], tmp_path / "b", [thin]), None)
    assert one.train.iters_per_epoch == 25  # 6 images: the minimum
    assert both.train.iters_per_epoch == 28  # (6 + 50) / 2: joint training on a stream's batches


@pytest.mark.slow
def test_training_uses_its_time_budget_and_writes_the_plan(thin, tiny_raw, tmp_path, one_torch_thread):
    from segloop.train import train

    tiny_raw["data"] |= {"channels": 1, "classes": ["cell", "wall"], "crop_size": None}
    tiny_raw["train"] |= {
        "epochs": 10_000,
        "max_minutes": 0.25,
        "patience": 10_000,
        "batch_size": 2,
        "iters_per_epoch": 4,
    }
    result = train(settings_from_dict(tiny_raw), thin, tmp_path / "out", thin)
    assert result.stopped == "time_budget"
    assert result.seconds >= 0.9 * 15
    planned = (tmp_path / "out" / "plan.yaml").read_text()
    assert "data.crop_size" in planned and "model.norm" in planned
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    # The schedule ends where the budget ends: the last epoch ran at (nearly) the final lr.
    assert history[-1]["lr"] <= 0.1 * tiny_raw["train"]["lr"]


def test_foreground_crops_hold_the_rare_class_and_quarter_turns_keep_masks_aligned():
    import torch
    from torchvision import tv_tensors

    from segloop.config import AugmentSettings, ForegroundSettings
    from segloop.data.dataset import train_transform

    mask = torch.zeros(256, 256, dtype=torch.int64)
    mask[200:204, 10:14] = 2  # 16 rare pixels in a corner
    image = mask.float().expand(3, -1, -1) / 2  # the image shows the mask: alignment is checkable
    still = AugmentSettings(hflip=0, vflip=0, brightness=0, contrast=0, gamma=0)
    always = train_transform(64, still.model_copy(update={"rot90": 1.0}), ForegroundSettings(classes=[2], share=1.0))
    plain = train_transform(64, still, ForegroundSettings())
    torch.manual_seed(0)
    hits = 0
    for _ in range(20):
        img, m = always(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert (m == 2).any() and torch.equal(img[0] * 2, m.float())
        hits += int((plain(tv_tensors.Image(image), tv_tensors.Mask(mask))[1] == 2).any())
    assert hits < 10  # plain random crops seldom see the corner
