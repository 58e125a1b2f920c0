"""The dataset contract: a folder with `images/` and `masks/` whose files pair by stem.

Images are PNG/JPEG, grayscale or RGB, any size; masks are single-channel PNG of class
indices, 255 = ignore. `segloop validate` enforces it. NumPy and Pillow only: the commands
that only handle files (generate, validate, split) start without importing torch (~10 s here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGES, MASKS = "images", "masks"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
MASK_SUFFIXES = {".png"}
IGNORE_INDEX = 255
# A labelled set: one folder, or several pooled into one (the loop's held-out set of a
# domain: the test splits of every batch of it so far).
Folders = Path | Sequence[Path]


@dataclass(frozen=True)
class Sample:
    stem: str
    image: Path
    mask: Path | None

    @property
    def labels(self) -> Path:
        """The mask of a labelled sample (listed with `require_masks`, the default)."""
        if self.mask is None:
            raise FileNotFoundError(f"{self.image}: no mask")
        return self.mask


def folders(data: Folders) -> list[Path]:
    """A set's folders, as a list."""
    return [Path(data)] if isinstance(data, (str, Path)) else [Path(d) for d in data]


def samples_of(data: Folders, require_masks: bool = True) -> list[Sample]:
    """`list_samples` of every folder of a set, in order (a pooled set is their union)."""
    return [s for root in folders(data) for s in list_samples(root, require_masks)]


def list_samples(root: Path, require_masks: bool = True) -> list[Sample]:
    """Pairs of a validated dataset folder, sorted by stem.

    Without `require_masks`, a plain folder of images is accepted too (mask = None).
    """
    images_dir = root / IMAGES
    if not images_dir.is_dir():
        if require_masks or not root.is_dir():
            raise FileNotFoundError(f"{root}: not a dataset folder (no {IMAGES}/ inside)")
        images_dir = root
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{images_dir}: no images (expected {sorted(IMAGE_SUFFIXES)})")
    samples = []
    for image in images:
        mask = root / MASKS / f"{image.stem}.png"
        has_mask = mask.is_file()
        if not has_mask and require_masks:
            raise FileNotFoundError(f"{mask}: mask missing for {image} (run `segloop validate` first)")
        samples.append(Sample(image.stem, image, mask if has_mask else None))
    return samples


def read_image(path: Path, channels: int) -> np.ndarray:
    """Decode to (H, W, C) uint8 with C = channels (grayscale/RGB converted as needed)."""
    with Image.open(path) as img:
        arr = np.array(img.convert("L" if channels == 1 else "RGB"))
    return arr[..., None] if channels == 1 else arr


def read_mask(path: Path) -> np.ndarray:
    """Decode a mask to (H, W) uint8 class indices (a palette PNG gives its indices)."""
    with Image.open(path) as img:
        return np.array(img)
