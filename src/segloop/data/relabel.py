"""Relabel a dataset's masks into a new folder: how a class-incremental stream sees a batch.

In a class-incremental stream each step's batch labels only that step's classes;
pixels of every other class, past or future, are background (the MiB protocol).
`relabel` derives such a batch from a fully labelled folder (e.g. the synthetic
generator's) and leaves the source untouched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from segloop.data.files import IGNORE_INDEX, IMAGES, MASKS, list_samples, read_mask


def relabel(src: Path, out: Path, mapping: dict[int, int]) -> int:
    """Copy the dataset `src` to `out`, mask values mapped by `mapping`; returns the number of pairs.

    Values not in `mapping` keep their id; 255 (ignore) can be neither mapped nor a target.
    """
    if IGNORE_INDEX in mapping or IGNORE_INDEX in mapping.values():
        raise ValueError(f"relabel {src}: {IGNORE_INDEX} (ignore) cannot be mapped or mapped to")
    if any(not 0 <= v < 256 for v in (*mapping, *mapping.values())):
        raise ValueError(f"relabel {src}: class ids must be in 0..254, got {mapping}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; refusing to overwrite")
    lut = np.arange(256, dtype=np.uint8)
    for old, new in mapping.items():
        lut[old] = new
    samples = list_samples(src)
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    (out / MASKS).mkdir(parents=True, exist_ok=True)
    for sample in samples:
        shutil.copy2(sample.image, out / IMAGES / sample.image.name)
        Image.fromarray(lut[read_mask(sample.labels)], mode="L").save(out / MASKS / f"{sample.stem}.png")
    return len(samples)
