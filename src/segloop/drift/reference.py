"""The drift reference: a fixed, seeded sample of the images the champion was trained on.

The sample is copied into its own folder (so `segloop drift --reference DIR` reads it
like any dataset) with `reference.json`: source folder, seed, model version and every
file's stem and hash, so anyone can check what the champion is compared against. When
the champion changes, a new reference is built from its training data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from segloop.data.files import IMAGES, list_samples
from segloop.drift.features import file_sha256

REFERENCE_FILE = "reference.json"


def build_reference(
    train_dir: Path, n: int, seed: int, out: Path, model_id: str | None = None, model_path: str | None = None
) -> dict:
    """Copy a seeded sample of min(n, available) images of `train_dir` to `out/images/`
    and write `out/reference.json`. The same (files, n, seed) always gives the same sample.
    Refuses a non-empty `out` (a reference is never silently replaced)."""
    train_dir, out = Path(train_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; refusing to overwrite a reference")
    samples = list_samples(train_dir, require_masks=False)
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(samples), size=min(n, len(samples)), replace=False).tolist())
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    files = []
    for i in picked:
        src = samples[i].image
        shutil.copy2(src, out / IMAGES / src.name)
        files.append({"stem": samples[i].stem, "file": src.name, "sha256": file_sha256(src)})
    record = {
        "source": str(train_dir),
        "n_requested": n,
        "n": len(files),
        "n_available": len(samples),
        "seed": seed,
        "model_id": model_id,
        "model": model_path,
        "files": files,
    }
    (out / REFERENCE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record


def read_reference(folder: Path) -> dict | None:
    """The reference.json of `folder`, or None for a plain folder used as reference."""
    path = Path(folder) / REFERENCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None
