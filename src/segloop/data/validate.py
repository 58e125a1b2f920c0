"""Validate an incoming dataset folder and quarantine what breaks the contract.

Accepted pairs are copied to the destination; every rejected file is copied to
the quarantine folder with one JSON line in `reasons.jsonl` (with the copy's sha256:
a loop workspace versions that line, not the file's bytes). The source folder
is only read: nothing in it is moved, deleted or overwritten.

A symbolic link is never followed: it is rejected and quarantined as a link (its
target is neither read nor copied), dangling or not. Images are checked against
the size limits later steps need (`data.min_side`, `data.max_pixels`) from their
header, before any pixel is decoded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from segloop.data.files import IGNORE_INDEX, IMAGE_SUFFIXES, IMAGES, MASK_SUFFIXES, MASKS

MASK_MODES = {"L", "P", "I;16", "I"}  # single-channel integer modes
IMAGE_MODES = {"L", "RGB", "RGBA", "P", "LA", "I;16"}


@dataclass
class ValidationResult:
    accepted: list[tuple[Path, Path]] = field(default_factory=list)  # (image, mask)
    images: list[Path] = field(default_factory=list)  # accepted images of an unlabelled folder
    rejected: list[dict] = field(default_factory=list)  # {"file": ..., "reason": ...}

    def summary(self) -> str:
        counts = Counter(r["reason"].split(":")[0] for r in self.rejected)
        kept = f"{len(self.images)} images" if self.images else f"{len(self.accepted)} pairs"
        lines = [f"accepted {kept}, rejected {len(self.rejected)} files"]
        lines += [f"  {n:5d}  {reason}" for reason, n in counts.most_common()]
        return "\n".join(lines)


@dataclass(frozen=True)
class SizeLimits:
    """What later steps can handle: every side at least `min_side`, at most `max_pixels` pixels."""

    min_side: int = 1
    max_pixels: int | None = None


def _check_image(path: Path, limits: SizeLimits = SizeLimits()) -> tuple[str | None, tuple[int, int] | None]:
    try:
        with Image.open(path) as img:
            w, h = img.size  # from the header: an oversized image is refused before it is decoded
            if limits.max_pixels is not None and w * h > limits.max_pixels:
                return f"image too large: {w}x{h} = {w * h} pixels > data.max_pixels {limits.max_pixels}", None
            if min(w, h) < limits.min_side:
                return f"image too small: {w}x{h}, a side below data.min_side {limits.min_side}", None
            img.load()  # truncation only shows on load
            if img.mode not in IMAGE_MODES:
                return f"unsupported image mode {img.mode}", None
            return None, img.size
    except Exception as err:  # PIL raises many types for corrupt files
        return f"unreadable image: {type(err).__name__}: {err}", None


def check_mask(path: Path, size: tuple[int, int], num_classes: int) -> str | None:
    try:
        with Image.open(path) as img:
            if img.mode not in MASK_MODES:
                return f"mask not single-channel (mode {img.mode}, {len(img.getbands())} bands)"
            if img.size != size:  # from the header: a mismatched (maybe huge) mask is never decoded
                return f"image/mask size mismatch: image {size[0]}x{size[1]}, mask {img.size[0]}x{img.size[1]}"
            img.load()
            values = np.unique(np.asarray(img))
    except Exception as err:
        return f"unreadable mask: {type(err).__name__}: {err}"
    bad = [int(v) for v in values if not (0 <= v < num_classes or v == IGNORE_INDEX)]
    if bad:
        return f"mask values out of range: {bad[:10]} (valid 0..{num_classes - 1} and {IGNORE_INDEX})"
    return None


def files_by_stem(folder: Path, suffixes: set[str], result: ValidationResult, kind: str) -> dict[str, Path]:
    """Files of `folder` keyed by stem; unsupported types and duplicate stems are rejected."""
    groups: dict[str, list[Path]] = defaultdict(list)
    if folder.is_symlink():
        result.rejected.append(_link(folder))
    elif folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_symlink():
                result.rejected.append(_link(path))
                continue
            if not path.is_file():
                continue
            if path.suffix.lower() in suffixes:
                groups[path.stem].append(path)
            else:
                result.rejected.append({"file": str(path), "reason": f"unsupported {kind} file type {path.suffix!r}"})
    unique = {}
    for stem, paths in groups.items():
        if len(paths) == 1:
            unique[stem] = paths[0]
            continue
        names = ", ".join(p.name for p in paths)
        for p in paths:
            result.rejected.append({"file": str(p), "reason": f"duplicate stem {stem!r} ({names})"})
    return unique


def _link(path: Path) -> dict:
    return {"file": str(path), "reason": f"symbolic link (-> {os.readlink(path)}) not followed", "link": True}


def check_folder(
    src: Path, num_classes: int, limits: SizeLimits = SizeLimits(), allow_empty: bool = False
) -> ValidationResult:
    """Check every pair in `src` without writing anything.

    An empty folder is an error (a mistyped path, most likely) unless `allow_empty`.
    """
    if src.is_symlink():
        raise ValueError(f"{src}: a symbolic link; a dataset folder must be a real folder (links are never followed)")
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: folder does not exist")
    result = ValidationResult()
    images = files_by_stem(src / IMAGES, IMAGE_SUFFIXES, result, "image")
    masks = files_by_stem(src / MASKS, MASK_SUFFIXES, result, "mask")
    if not images and not masks and not result.rejected and not allow_empty:
        raise ValueError(f"{src}: empty folder (expected {IMAGES}/ and {MASKS}/ with files paired by stem)")
    for stem in sorted(set(masks) - set(images)):
        result.rejected.append({"file": str(masks[stem]), "reason": "image missing for mask"})
    for stem, image in sorted(images.items()):
        mask = masks.get(stem)
        reason, size = _check_image(image, limits)
        if reason is None and mask is None:
            reason = "mask missing"
        if reason is None and mask is not None and size is not None:  # no reason yet: both are there
            reason = check_mask(mask, size, num_classes)
            if reason is None:
                result.accepted.append((image, mask))
                continue
        result.rejected.append({"file": str(image), "reason": reason})
        if mask is not None:
            result.rejected.append({"file": str(mask), "reason": f"pair rejected: {reason}"})
    return result


def _copy_new(src: Path, dst: Path) -> Path:
    """Copy without ever overwriting: a taken name gets a numeric suffix. A link is copied
    as a link (its target is never read)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    candidate, k = dst, 1
    while os.path.lexists(candidate):
        candidate = dst.with_name(f"{dst.stem}.{k}{dst.suffix}")
        k += 1
    shutil.copy2(src, candidate, follow_symlinks=False)
    return candidate


def validate_folder(
    src: Path,
    out: Path,
    quarantine: Path,
    num_classes: int,
    limits: SizeLimits = SizeLimits(),
    allow_empty: bool = False,
) -> ValidationResult:
    """Copy accepted pairs of `src` to `out`, rejected files to `quarantine` with reasons."""
    src, out, quarantine = Path(src), Path(out), Path(quarantine)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: destination exists and is not empty; refusing to overwrite")
    result = check_folder(src, num_classes, limits, allow_empty)
    for image, mask in result.accepted:
        _copy_new(image, out / IMAGES / image.name)
        _copy_new(mask, out / MASKS / f"{mask.stem}.png")  # the loader expects lower-case .png
    quarantine_files(result.rejected, quarantine)
    return result


def quarantine_files(rejected: list[dict], quarantine: Path, folder: str | None = None) -> None:
    """Copy each rejected file into `quarantine` (under `folder`, default its parent folder's
    name) and append its reason and sha256 to quarantine/reasons.jsonl."""
    # The log exists even when empty: "validated, nothing rejected" is a record too.
    quarantine.mkdir(parents=True, exist_ok=True)
    with open(quarantine / "reasons.jsonl", "a") as log:
        for item in rejected:
            path = Path(item["file"])
            kept = _copy_new(path, quarantine / (folder or path.parent.name) / path.name)
            digest = {} if kept.is_symlink() else {"sha256": hashlib.sha256(kept.read_bytes()).hexdigest()}
            log.write(json.dumps({**item, "quarantined_as": str(kept), **digest}) + "\n")


def validate_images(src: Path, out: Path, quarantine: Path, limits: SizeLimits = SizeLimits()) -> ValidationResult:
    """An unlabelled folder (images/, no masks/): accepted images to out/images (`images`),
    rejected files to `quarantine` with reasons. A masks/ folder is an error: such a batch is labelled."""
    src, out, quarantine = Path(src), Path(out), Path(quarantine)
    if src.is_symlink() or not src.is_dir():
        raise FileNotFoundError(f"{src}: not a folder (links are never followed)")
    if os.path.lexists(src / MASKS):
        raise ValueError(f'{src}: has {MASKS}/ but is declared unlabelled (batch.json "labelled": false)')
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: destination exists and is not empty; refusing to overwrite")
    result = ValidationResult()
    for _, image in sorted(files_by_stem(src / IMAGES, IMAGE_SUFFIXES, result, "image").items()):
        reason, _ = _check_image(image, limits)
        if reason is None:
            result.images.append(_copy_new(image, out / IMAGES / image.name))
        else:
            result.rejected.append({"file": str(image), "reason": reason})
    quarantine_files(result.rejected, quarantine)
    return result
