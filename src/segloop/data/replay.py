"""The replay buffer: a bounded dataset folder of past samples, with a manifest.

A buffer is an ordinary dataset folder (`images/`, `masks/`) plus
`manifest.json`: which sample came from which batch, and how many samples the
buffer has seen in total (reservoir sampling needs it). A sample is keyed by
(batch, file): it is stored as `<batch>.<file>` (a batch id has no dot), so two
batches with the same file names never overwrite each other, and files are
copied by their exact names (never looked up by a pattern). It is filled by
reservoir sampling (every sample ever offered equally likely to be kept) or
balanced (every source batch keeps an equal share). Updating never edits a
buffer in place: it writes a new folder, so every version can be kept by DVC.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler

from segloop.data.files import IMAGES, MASKS, list_samples

MANIFEST = "manifest.json"
BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def read_manifest(buffer: Path) -> dict:
    """The manifest of `buffer`, checked against the files it holds: the same samples, each
    exactly once (counted, so a duplicate on either side is a mismatch too)."""
    manifest = json.loads((buffer / MANIFEST).read_text())
    listed = Counter(item["stem"] for item in manifest["items"])
    images = [p for p in (buffer / IMAGES).iterdir()] if (buffer / IMAGES).is_dir() else []
    present = Counter(p.stem for p in images)
    masks = Counter(p.stem for p in (buffer / MASKS).iterdir()) if (buffer / MASKS).is_dir() else Counter()
    if listed != present or listed != masks:
        diff = sorted(set((listed - present) | (present - listed) | (listed - masks) | (masks - listed)))[:5]
        raise ValueError(
            f"{buffer / MANIFEST}: lists {sum(listed.values())} samples, folder holds "
            f"{sum(present.values())} images and {sum(masks.values())} masks (mismatch, e.g. {diff})"
        )
    return manifest


SAMPLINGS = ("reservoir", "balanced")


def update_buffer(
    buffer: Path | None,
    batch_dir: Path,
    batch_id: str,
    size: int,
    seed: int,
    out: Path,
    sampling: str = "reservoir",
    domain: str | None = None,
) -> dict:
    """Write `out`: `buffer` (None = empty) updated with the samples of `batch_dir` (of `domain`,
    when known).

    `reservoir`: every sample ever offered has the same chance size / seen of
    being in the buffer, whatever batch it came from (so a batch's share varies).
    `balanced`: every domain (a batch of unknown domain: every source batch) keeps the same
    number of samples (a seeded random subset; one with fewer leaves its share to the others).
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"continual.replay.sampling: unknown {sampling!r}; valid: {list(SAMPLINGS)}")
    if not BATCH_ID.fullmatch(batch_id):
        raise ValueError(
            f"batch id {batch_id!r}: letters, digits, '_' and '-' only (it prefixes the buffer's file names)"
        )
    if out.exists():
        raise FileExistsError(f"{out}: exists; a buffer version is never overwritten")
    # Each item carries its source files (`src`, dropped from the manifest) by exact path.
    if buffer is not None:
        manifest = read_manifest(buffer)
        by_stem = {p.stem: p for p in (buffer / IMAGES).iterdir()}
        items = [
            dict(item, src=(by_stem[item["stem"]], buffer / MASKS / f"{item['stem']}.png"))
            for item in manifest["items"]
        ]
        seen = manifest["seen"]
    else:
        items, seen = [], 0
    rng = np.random.default_rng([seed, seen])
    candidates = [
        {"stem": f"{batch_id}.{s.stem}", "source_batch": batch_id, "file": s.image.name, "src": (s.image, s.mask)}
        | ({"domain": domain} if domain else {})
        for s in list_samples(batch_dir)
    ]
    if sampling == "balanced":
        items, seen = _balanced(items + candidates, size, rng), seen + len(candidates)
    for candidate in candidates if sampling == "reservoir" else []:
        seen += 1
        if len(items) < size:
            items.append(candidate)
        else:
            j = int(rng.integers(0, seen))
            if j < size:
                items[j] = candidate
    for sub in (IMAGES, MASKS):
        (out / sub).mkdir(parents=True)
    taken = Counter(item["stem"] for item in items)
    if max(taken.values(), default=0) > 1:  # only an old manifest (bare stems) could collide
        raise ValueError(f"{out}: samples {sorted(s for s, n in taken.items() if n > 1)[:5]} would share a name")
    for item in items:
        image, mask = item.pop("src")
        shutil.copy2(image, out / IMAGES / f"{item['stem']}{image.suffix}")
        shutil.copy2(mask, out / MASKS / f"{item['stem']}.png")
    manifest = {"size": size, "seen": seen, "items": sorted(items, key=lambda i: i["stem"])}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def group_of(item: dict) -> str:
    """What `balanced` shares the buffer between: the item's domain, else its source batch."""
    return item.get("domain") or f"batch:{item['source_batch']}"


def _balanced(items: list[dict], size: int, rng: np.random.Generator) -> list[dict]:
    """At most `size` of `items`, an equal share per group (water-filling: smaller groups first)."""
    groups: dict[str, list[dict]] = {}
    for item in items:
        groups.setdefault(group_of(item), []).append(item)
    kept, left = [], size
    ordered = sorted(groups.items(), key=lambda kv: (len(kv[1]), kv[0]))
    for i, (_, group) in enumerate(ordered):
        quota = min(len(group), left // (len(ordered) - i))
        kept += [group[j] for j in sorted(rng.choice(len(group), quota, replace=False))]
        left -= quota
    return kept


class MixedBatchSampler(Sampler[list[int]]):
    """Batches of a ConcatDataset([new, replay]) holding round(ratio * batch) replay samples each,
    the last `k` of every batch.

    An epoch is `batches` batches (default: one pass over the new data); new and replay
    samples are each drawn without replacement while they last, then reshuffled.
    """

    def __init__(
        self,
        n_new: int,
        n_replay: int,
        batch_size: int,
        ratio: float,
        generator: torch.Generator,
        batches: int | None = None,
    ):
        self.n_new, self.n_replay = n_new, n_replay
        self.k = min(batch_size - 1, round(ratio * batch_size)) if n_replay else 0
        self.per_batch_new = batch_size - self.k
        self.generator = generator
        self.batches = batches if batches is not None else n_new // self.per_batch_new

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[list[int]]:
        new: list[int] = []
        replay: list[int] = []
        for _ in range(len(self)):
            batch = []
            for _ in range(self.per_batch_new):
                if not new:
                    new = torch.randperm(self.n_new, generator=self.generator).tolist()
                batch.append(new.pop())
            for _ in range(self.k):
                if not replay:
                    replay = (torch.randperm(self.n_replay, generator=self.generator) + self.n_new).tolist()
                batch.append(replay.pop())
            yield batch
