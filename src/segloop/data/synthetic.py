"""Synthetic segmentation scenes with named domain shifts.

A scene is a textured background with overlapping textured shapes. Every class
(background included) draws its colours from the same distribution, so colour
alone does not separate classes; texture and shape do. A domain is a
parameterised change of image statistics applied to the same scene: with the
same seed, `base` and `fog` hold the same masks and the same layout.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import numpy as np
from PIL import Image, ImageFilter

from segloop.config import Domain
from segloop.data.files import IMAGES, MASKS

CLASSES = ("background", "stripes", "checker", "speckle")


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random grid upsampled bicubically."""
    grid = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC)
    field = np.asarray(img)
    return (field - field.min()) / max(float(np.ptp(field)), 1e-6)


def _pattern(kind: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A texture in [0, 1] for class `kind` over the full canvas."""
    h, w = yy.shape
    if kind == 0:  # background: blotchy low-frequency noise
        return _smooth_field(rng, h, w, cells=int(rng.integers(4, 9)))
    if kind == 1:  # stripes: fine oriented sine grating
        theta, freq = rng.uniform(0, np.pi), rng.uniform(0.1, 0.17)
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)))
    if kind == 2:  # checker: rotated square lattice
        theta, period = rng.uniform(0, np.pi / 2), rng.uniform(5.0, 8.0)
        u = xx * np.cos(theta) + yy * np.sin(theta)
        v = -xx * np.sin(theta) + yy * np.cos(theta)
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    # speckle: binary grains a few pixels wide (blurred noise, thresholded at its median)
    noise = Image.fromarray((rng.random((h, w)) * 255).astype(np.uint8))
    grains = np.asarray(noise.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
    return (grains > np.median(grains)).astype(np.float32)


# Hue centre of each foreground class (degrees). Foreground hues spread +-HUE_SPREAD around
# it, so neighbouring classes overlap and the background takes any hue: colour is a hint,
# never a threshold that separates classes.
CLASS_HUES = {1: 30.0, 2: 150.0, 3: 270.0}
HUE_SPREAD = 80.0


def _colours(rng: np.random.Generator, kind: int) -> tuple[np.ndarray, np.ndarray]:
    """Two colours of one hue with enough brightness contrast for the texture to show."""
    hue = rng.uniform(0, 360) if kind == 0 else CLASS_HUES[kind] + rng.uniform(-HUE_SPREAD, HUE_SPREAD)
    sat = rng.uniform(0.35, 0.9)
    v1 = rng.uniform(0.3, 0.55)
    v2 = v1 + rng.uniform(0.3, 0.45)
    a = colorsys.hsv_to_rgb((hue % 360) / 360, sat, v1)
    b = colorsys.hsv_to_rgb((hue % 360) / 360, sat * rng.uniform(0.6, 1.0), min(v2, 1.0))
    pair = [np.array(a, dtype=np.float32), np.array(b, dtype=np.float32)]
    rng.shuffle(pair)
    return pair[0], pair[1]


def _shape_mask(kind: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    h, w = yy.shape
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    r = rng.uniform(0.08, 0.3) * min(h, w)
    theta = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    aspect = rng.uniform(0.5, 1.0)
    if kind == 1:  # ellipse
        return (u / r) ** 2 + (v / (r * aspect)) ** 2 <= 1.0
    if kind == 2:  # rotated rectangle
        return (np.abs(u) <= r) & (np.abs(v) <= r * aspect)
    # triangle: intersection of three half-planes
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
        a = theta + 2 * np.pi * k / 3
        inside &= (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a) <= r * 0.6
    return inside


def make_scene(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One scene. Returns image (H, W, 3) float32 in [0, 1] and mask (H, W) uint8 class ids."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    lo, hi = _colours(rng, 0)
    t = _pattern(0, rng, yy, xx)[..., None]
    image = lo * (1 - t) + hi * t
    mask = np.zeros((h, w), dtype=np.uint8)
    for _ in range(rng.integers(3, 8)):
        kind = int(rng.integers(1, len(CLASSES)))
        region = _shape_mask(kind, rng, yy, xx)
        lo, hi = _colours(rng, kind)
        t = _pattern(kind, rng, yy, xx)[..., None]
        image = np.where(region[..., None], lo * (1 - t) + hi * t, image)
        mask[region] = kind
    grain = rng.normal(0, 0.015, image.shape).astype(np.float32)
    return np.clip(image + grain, 0, 1), mask


# Domain shifts: (image (H, W, 3) in [0, 1], rng, strength) -> image. strength 0 = identity.
def _base(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    return img


def _lowlight(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """Underexposure: gamma crush, low gain, and the shot noise of a dark sensor."""
    gain = 1.0 - 0.75 * s
    dark = gain * img ** (1.0 + 0.8 * s)
    return dark + rng.normal(0, 0.03 * s, img.shape) * np.sqrt(dark + 1e-3)


def _fog(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """Atmospheric scattering I = J t + A (1 - t), with depth growing towards the top."""
    h, w = img.shape[:2]
    depth = np.linspace(1.0, 0.3, h)[:, None] + 0.4 * _smooth_field(rng, h, w, cells=4)
    transmission = np.exp(-1.6 * s * depth)[..., None]
    blurred = (
        np.asarray(
            Image.fromarray((img * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2 * s)),
            dtype=np.float32,
        )
        / 255.0
    )
    return blurred * transmission + 0.85 * (1 - transmission)


def _noise(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """Sensor noise: Gaussian plus salt-and-pepper."""
    out = img + rng.normal(0, 0.15 * s, img.shape)
    flips = rng.random(img.shape[:2]) < 0.03 * s
    out[flips] = rng.integers(0, 2, (int(flips.sum()), 1))
    return out


def _colorshift(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """A different camera / white balance: hue rotation, tint and desaturation."""
    angle = 2 * np.pi / 3 * s
    c, sn = np.cos(angle), np.sin(angle)
    k = np.ones(3) / np.sqrt(3)  # rotate around the grey axis (Rodrigues' formula)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot = c * np.eye(3) + sn * cross + (1 - c) * np.outer(k, k)
    out = img @ rot.T.astype(np.float32)
    grey = out.mean(axis=2, keepdims=True)
    out = grey + (1 - 0.5 * s) * (out - grey)
    return out * (1 + s * np.array([0.25, 0.05, -0.3], dtype=np.float32))


DOMAINS: dict[str, Callable[[np.ndarray, np.random.Generator, float], np.ndarray]] = {
    "base": _base,
    "lowlight": _lowlight,
    "fog": _fog,
    "noise": _noise,
    "colorshift": _colorshift,
}
# config validates generate.domains against its Literal (without importing this module): one list of names.
assert set(DOMAINS) == set(get_args(Domain)), f"segloop.config.Domain {get_args(Domain)} != DOMAINS {list(DOMAINS)}"


def apply_domain(image: np.ndarray, domain: str, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Shift an image (H, W, 3) float in [0, 1] into `domain`; returns uint8 (H, W, 3)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid: {sorted(DOMAINS)}")
    shifted = DOMAINS[domain](image, rng, strength)
    return (np.clip(shifted, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def generate(
    out: Path, domain: str, n: int, seed: int, size: tuple[int, int] = (144, 144), strength: float = 1.0
) -> list[str]:
    """Write `n` image/mask pairs of `domain` to `out` (dataset contract). Returns the stems.

    Scene i depends only on (seed, i): every domain with the same seed shares masks.
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid: {sorted(DOMAINS)}")
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    (out / MASKS).mkdir(parents=True, exist_ok=True)
    stems = []
    for i in range(n):
        image, mask = make_scene(np.random.default_rng([seed, i, 0]), size)
        pixels = apply_domain(image, domain, np.random.default_rng([seed, i, 1]), strength)
        stem = f"{domain}-s{seed}-{i:05d}"
        Image.fromarray(pixels, mode="RGB").save(out / IMAGES / f"{stem}.png")
        Image.fromarray(mask, mode="L").save(out / MASKS / f"{stem}.png")
        stems.append(stem)
    return stems


def parse_stream(text: str) -> list[tuple[str, int]]:
    """A stream of synthetic batches, "DOMAIN:N,DOMAIN:N,..." -> [(domain, n), ...] (demo, benchmarks)."""
    out = []
    for item in text.split(","):
        domain, _, n = item.partition(":")
        if not n.isdigit():
            raise ValueError(f"--stream {item!r}: expected DOMAIN:N (e.g. fog:120)")
        out.append((domain, int(n)))
    return out
