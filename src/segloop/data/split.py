"""Deterministic train/val/test split of a validated dataset folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from segloop.config import SplitSettings
from segloop.data.files import IMAGES, MASKS, list_samples

SPLITS = ("train", "val", "test")


def split_dataset(src: Path, out: Path, cfg: SplitSettings) -> dict[str, int]:
    """Copy the pairs of `src` into out/{train,val,test}; returns the counts.

    The order is a seeded permutation of the sorted stems, so the split depends
    only on the file names and `split.seed`.
    """
    samples = list_samples(src)
    order = np.random.default_rng(cfg.seed).permutation(len(samples))
    n_test = int(round(cfg.test_fraction * len(samples)))
    n_val = int(round(cfg.val_fraction * len(samples)))
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    for name in SPLITS:
        if (out / name).exists():
            raise FileExistsError(f"{out / name}: exists; refusing to overwrite")
    for name, idx in parts.items():
        for sub in (IMAGES, MASKS):
            (out / name / sub).mkdir(parents=True)
        for i in idx:
            s = samples[i]
            shutil.copy2(s.image, out / name / IMAGES / s.image.name)
            shutil.copy2(s.mask, out / name / MASKS / s.mask.name)
    return {name: len(idx) for name, idx in parts.items()}
