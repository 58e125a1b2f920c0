"""Two datasets unlike the loop's synthetic textures, for the recipe benchmark (benchmarks/recipe.py).

- `membranes`: grayscale 512x512 "electron microscopy" of cells: Voronoi cells with wavy
  walls 2-5 px thick (class 1, ~20% of pixels) on textured cytoplasm (class 0), with dark
  vesicles that are not membrane, walls that fade in places, blur, uneven illumination and
  noise. Thin structures whose context (the cell) is 10x wider than they are.
- `scenes`: RGB 320x448 outdoor scenes with an up and a down: sky (0) over buildings (1)
  and ground (2), with small objects (3, ~3% of pixels) on the ground.

Both are written in the dataset contract (images/, masks/), seeded: (seed, i) fixes image i.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

MEMBRANE_CLASSES = ["cell", "membrane"]
SCENE_CLASSES = ["sky", "building", "ground", "object"]


def _field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1] (a random grid upsampled bicubically)."""
    grid = Image.fromarray(rng.random((cells, cells)).astype(np.float32), mode="F").resize((w, h), Image.BICUBIC)
    f = np.asarray(grid)
    return (f - f.min()) / max(float(np.ptp(f)), 1e-6)


def _spread_seeds(rng: np.random.Generator, tries: int, extent: tuple[int, int], min_dist: float) -> np.ndarray:
    """Random points at least `min_dist` apart (dart throwing): no sliver cells, whose walls would merge."""
    kept: list[np.ndarray] = []
    for p in rng.random((tries, 2)) * extent:
        if not kept or np.min(np.hypot(*(np.array(kept) - p).T)) >= min_dist:
            kept.append(p)
    return np.array(kept)


def membrane_pair(rng: np.random.Generator, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W) uint8, mask (H, W) uint8 in {0, 1})."""
    h = w = size
    cell = rng.uniform(38, 60)
    seeds = _spread_seeds(rng, int(1.6 * h * w / cell**2), (h + 40, w + 40), 0.6 * cell) - 20
    n = len(seeds)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    amp = rng.uniform(3, 7)
    wy = yy + amp * (_field(rng, h, w, 7) - 0.5) * 2
    wx = xx + amp * (_field(rng, h, w, 7) - 0.5) * 2
    dist, idx = cKDTree(seeds).query(np.stack([wy.ravel(), wx.ravel()], 1), k=2)
    gap = (dist[:, 1] - dist[:, 0]).reshape(h, w)
    thickness = 2.0 + 3.0 * _field(rng, h, w, 5)
    mask = (gap < thickness).astype(np.uint8)
    owner = idx[:, 0].reshape(h, w)
    # Cytoplasm: per-cell brightness, smooth texture and fine grain.
    cell_level = rng.uniform(0.55, 0.75, n)[owner]
    img = cell_level + 0.08 * (_field(rng, h, w, 24) - 0.5) + 0.05 * (rng.random((h, w)) - 0.5)
    # Vesicles: dark round blobs inside cells, as dark as the walls (the hard negatives).
    for _ in range(int(rng.integers(25, 60))):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2.5, 6)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        img[blob & (mask == 0)] = rng.uniform(0.22, 0.4)
    # Mitochondria: elongated dark-rimmed ovals inside cells, wall-like but not wall.
    for _ in range(int(rng.integers(6, 16))):
        cy, cx, a, b, t = (
            rng.uniform(0, h),
            rng.uniform(0, w),
            rng.uniform(8, 18),
            rng.uniform(3, 6),
            rng.uniform(0, np.pi),
        )
        u, v = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t), -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        inside = (r < 1.15) & (mask == 0)
        img[inside & (r > 0.75)] = rng.uniform(0.2, 0.35)
        img[inside & (r <= 0.75)] = rng.uniform(0.4, 0.55)
    # Walls: dark, fading where a smooth field is low (the gaps a model must bridge).
    contrast = 0.05 + 0.95 * np.clip(_field(rng, h, w, 6) * 1.6 - 0.1, 0, 1)
    wall = rng.uniform(0.18, 0.3)
    img = np.where(mask == 1, img + contrast * (wall - img), img)
    img = ndimage.gaussian_filter(img, rng.uniform(0.8, 1.4))
    img = img * (0.8 + 0.4 * _field(rng, h, w, 3)) * rng.uniform(0.8, 1.15) + rng.uniform(-0.08, 0.08)
    img = img + rng.normal(0, rng.uniform(0.06, 0.12), (h, w))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), mask


def scene_pair(rng: np.random.Generator, size: tuple[int, int] = (320, 448)) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, mask (H, W) uint8 in {0..3})."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    horizon = h * rng.uniform(0.35, 0.55) + h * 0.06 * (_field(rng, 1, w, 5)[0] - 0.5)
    mask = np.where(yy < horizon[None, :], 0, 2).astype(np.uint8)
    # Buildings: boxes standing on the horizon.
    for _ in range(int(rng.integers(2, 6))):
        bw, bh = rng.uniform(0.08, 0.25) * w, rng.uniform(0.1, 0.3) * h
        x0 = rng.uniform(-0.1 * w, w)
        base = float(np.median(horizon[int(max(0, x0)) : int(min(w, x0 + bw)) + 1])) if x0 < w else h / 2
        mask[(xx >= x0) & (xx < x0 + bw) & (yy >= base - bh) & (yy < base + 4)] = 1
    # Objects: small ellipses on the ground, the rare class.
    for _ in range(int(rng.integers(3, 9))):
        cy = rng.uniform(horizon.mean() + 10, h - 5)
        cx, ry = rng.uniform(0, w), rng.uniform(4, 12) * (0.5 + cy / h)
        mask[((yy - cy) / ry) ** 2 + ((xx - cx) / (ry * rng.uniform(1, 2.5))) ** 2 < 1] = 3
    img = np.zeros((h, w, 3), np.float32)
    sky = np.array([0.45, 0.6, 0.85]) * rng.uniform(0.7, 1.1) + 0.25 * _field(rng, h, w, 4)[..., None]
    brick = rng.uniform(0.3, 0.7, 3)
    windows = ((np.floor(xx / rng.uniform(6, 12)) + np.floor(yy / rng.uniform(8, 14))) % 3 == 0)[..., None] * -0.2
    building = brick + windows + 0.1 * _field(rng, h, w, 30)[..., None]
    grass = np.array([0.3, 0.5, 0.2]) * rng.uniform(0.6, 1.2) + 0.25 * (_field(rng, h, w, 40)[..., None] - 0.5)
    objects = rng.uniform(0.1, 0.95, 3) + 0.1 * _field(rng, h, w, 20)[..., None]
    for k, layer in enumerate((sky, building, grass, objects)):
        img = np.where((mask == k)[..., None], layer, img)
    img = img * (0.7 + 0.5 * _field(rng, h, w, 3)[..., None]) + rng.normal(0, 0.03, img.shape)
    img = ndimage.gaussian_filter(img, (0.7, 0.7, 0))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), mask


KINDS = {"membranes": (membrane_pair, MEMBRANE_CLASSES, 1), "scenes": (scene_pair, SCENE_CLASSES, 3)}


def generate(out: Path, kind: str, n: int, seed: int) -> Path:
    """Write n pairs of `kind` to out/images, out/masks (skipped when already there)."""
    make, _, channels = KINDS[kind]
    if (out / "masks").is_dir() and len(list((out / "masks").iterdir())) == n:
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, mask = make(np.random.default_rng([seed, i]))
        Image.fromarray(image, mode="L" if channels == 1 else "RGB").save(out / "images" / f"{kind}-{seed}-{i:04d}.png")
        Image.fromarray(mask, mode="L").save(out / "masks" / f"{kind}-{seed}-{i:04d}.png")
    return out
