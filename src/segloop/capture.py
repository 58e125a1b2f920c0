"""Capture: a sampled share of the images `segloop serve` answers, handed to the loop as
unlabelled batch folders.

Captures collect in a hidden folder inside the loop's incoming folder (the loop skips names
starting with "."): `images/<stem>.png` (the image as the model saw it) and one line of
`captures.jsonl` per image (model version, confidence, entropy, class areas). Every
`capture.batch_size` images (or once the oldest is `capture.max_age_s` old and there are at
least `min_images`) the folder gets its `batch.json` (`CapturedBatch`, written last) and is
renamed into place as `incoming/serve-<UTC time>-<n>`: one rename, so the loop sees a whole
batch or none. Pending captures are bounded by `capture.max_pending_mb`; beyond it new
captures are dropped and counted, never blocking a request. Nothing here serves, labels or
trains.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segloop.config import CaptureSettings

PENDING = ".serve-capture"  # inside incoming/: hidden from the loop until rolled
CAPTURES = "captures.jsonl"
BATCH_INFO = "batch.json"  # the loop's batch file (segloop.loop.BATCH_INFO)
SCHEMA = 1


@dataclass
class CapturedBatch:
    """`batch.json` of a batch the service captured: unlabelled, and where it came from."""

    batch: str
    images: int
    first: str  # UTC time of the first and last capture
    last: str
    model: str  # the ref the service follows (models:/name@alias)
    versions: dict[str, int]  # model version -> images it answered
    domain: str  # capture.domain: what the loop files it under ("default": no claim; drift tells what it is)
    labelled: bool = False
    source: str = "segloop serve"
    captures: str = CAPTURES
    schema: int = SCHEMA


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


class Capture:
    """Keeps `cfg.rate` of the images it is offered; rolls them into batches in `incoming`.

    Thread-safe: `offer` and `roll_if_due` may be called from any thread.
    """

    def __init__(self, cfg: CaptureSettings, incoming: Path, model_ref: str, min_images: int):
        self.cfg, self.incoming, self.model_ref = cfg, Path(incoming), model_ref
        self.min_images = min(min_images, cfg.batch_size)
        self.pending = self.incoming / PENDING
        self._lock = threading.Lock()
        self._random = random.Random(cfg.seed)
        self.captured = self.dropped = self.batches = 0
        self.on_capture = self.on_drop = self.on_batch = lambda *a: None  # metrics hooks
        self._count, self._bytes, self._first = self._scan()

    @property
    def enabled(self) -> bool:
        return self.cfg.rate > 0

    def wants(self) -> bool:
        """Draw whether the next image is kept (the share `rate`)."""
        return self.enabled and self._random.random() < self.cfg.rate

    def _scan(self) -> tuple[int, int, float | None]:
        """Pending captures left by an earlier run (count, bytes, time of the first)."""
        images = self.pending / "images"
        files = sorted(images.glob("*.png")) if images.is_dir() else []
        if not files:
            return 0, 0, None
        return len(files), sum(f.stat().st_size for f in files), min(f.stat().st_mtime for f in files)

    def offer(self, image: np.ndarray, summary: dict[str, Any]) -> str | None:
        """Keep `image` (H, W, C) uint8 with its prediction `summary`; the rolled batch's name if this filled one."""
        with self._lock:
            if self._bytes >= self.cfg.max_pending_mb * 2**20:
                self.dropped += 1
                self.on_drop()
                return None
            now = time.time()
            stem = f"{datetime.fromtimestamp(now, UTC).strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:8]}"
            images = self.pending / "images"
            path = images / f"{stem}.png"
            tmp = images / f".{stem}.png.tmp"
            try:
                images.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp, format="PNG")
                os.replace(tmp, path)
                with open(self.pending / CAPTURES, "a") as log:
                    log.write(json.dumps({"image": f"images/{path.name}", "time": _utc(now), **summary}) + "\n")
            except OSError:  # a full or read-only disk loses the capture, never the request
                tmp.unlink(missing_ok=True)
                path.unlink(missing_ok=True)
                self.dropped += 1
                self.on_drop()
                return None
            self._count += 1
            self._bytes += path.stat().st_size
            self._first = self._first or now
            self.captured += 1
            self.on_capture()
            return self._roll_if_due_locked(now)

    def roll_if_due(self) -> str | None:
        """Roll the pending captures if a batch is full or old enough (the service calls this on its poll)."""
        with self._lock:
            return self._roll_if_due_locked(time.time())

    def _roll_if_due_locked(self, now: float) -> str | None:
        full = self._count >= self.cfg.batch_size
        old = self._first is not None and now - self._first >= self.cfg.max_age_s and self._count >= self.min_images
        return self._roll_locked(now) if full or old else None

    def _roll_locked(self, now: float) -> str:
        records = [json.loads(line) for line in (self.pending / CAPTURES).read_text().splitlines() if line.strip()]
        versions: dict[str, int] = {}
        for r in records:
            versions[str(r.get("version"))] = versions.get(str(r.get("version")), 0) + 1
        name = f"serve-{datetime.fromtimestamp(now, UTC).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"
        info = CapturedBatch(
            batch=name,
            images=self._count,
            first=records[0]["time"] if records else _utc(now),
            last=records[-1]["time"] if records else _utc(now),
            model=self.model_ref,
            versions=versions,
            domain=self.cfg.domain,
        )
        # batch.json last, then one rename: the loop never sees a batch without it, or half of one.
        tmp = self.pending / f".{BATCH_INFO}.tmp"
        tmp.write_text(json.dumps(asdict(info), indent=1) + "\n")
        os.replace(tmp, self.pending / BATCH_INFO)
        target = self.incoming / name
        os.rename(self.pending, target)
        self._count, self._bytes, self._first = 0, 0, None
        self.batches += 1
        self.on_batch()
        return name


def read_captured_batch(folder: Path) -> CapturedBatch:
    """The `batch.json` of a captured batch, checked against its schema and its images."""
    path = Path(folder) / BATCH_INFO
    raw = json.loads(path.read_text())
    if raw.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {raw.get('schema')}, this segloop reads schema {SCHEMA}")
    info = CapturedBatch(**raw)
    found = len(list((Path(folder) / "images").glob("*.png")))
    if found != info.images:
        raise ValueError(f"{path}: says {info.images} images, the folder has {found}")
    return info
