"""Typed records of the continual loop that cross a boundary or hit the disk.

`LoopState` is the workspace's state.json, `StepRecord` a batch's step record
(processed/<batch>.json, also what `continual_flow` returns), `BatchInfo` what ingest
found. Each file carries `schema`: a file of an unknown schema fails to load with its
path and both versions instead of being half-read as a dict. Nothing here does I/O
beyond reading and writing these files.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# 3: state.heldout lists every test split of a domain (2 and earlier: the first one's path).
# 2: step records of unlabelled batches (status, labelled, label_request, labels); 1 and 0
# (written before records were typed) have the same keys, fewer of them.
SCHEMA = 3
STATUSES = ("done", "awaiting-labels", "labelled")  # StepRecord.status


def _load(cls, path: Path, raw: dict[str, Any]):
    schema = raw.get("schema", 0)
    if schema not in range(SCHEMA + 1):
        raise ValueError(f"{path}: schema {schema}, this segloop reads schemas 0 to {SCHEMA}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown} for a {cls.__name__} of schema {SCHEMA}")
    return cls(**{**raw, "schema": SCHEMA})


def write_json(path: Path, payload: dict) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


@dataclass
class BatchInfo:
    batch: str
    domain: str
    accepted: int
    quarantined: int
    split: dict[str, int]
    labelled: bool = True  # False: images only (a label request if it drifted)


@dataclass
class LoopState:
    """What the loop knows between steps.

    `trained_domains`: the domains the loop has *learnt*: some promoted champion was
    trained on them (domain -> the training split its drift reference is drawn from).
    The gate protects these only. `weak`: those of them where the champion's held-out mIoU
    is under `continual.learnt_ratio` of its best domain's (set at each promotion): learnt
    a little, so the next labelled batch of the domain is trained on, drift or not.
    `covered`: domains never trained on where the champion's held-out mIoU already reaches
    that bar (it generalises there): protected by the gate like learnt ones, and not
    trained on without drift.
    `heldout`: every domain's held-out set, learnt or not: the test splits of each of its
    labelled batches so far, scored as one set (their validation splits are the domain's
    validation set). One batch's 19 test images decide a 2-point rule with about a point
    of noise (docs/loop_stream.md); every batch of the domain adds its split.
    `pool`: labelled training splits of batches whose update was refused (or that drifted
    but were not trained on, the champion keeping its quality on them), per domain;
    the next update on that domain trains on them too, so no labelled data is wasted.
    """

    schema: int = SCHEMA
    champion: str | None = None
    champion_batch: str | None = None
    trained_domains: dict[str, str] = field(default_factory=dict)
    weak: list[str] = field(default_factory=list)
    covered: list[str] = field(default_factory=list)
    heldout: dict[str, list[str]] = field(default_factory=dict)
    replay: str | None = None
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    pool: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:  # schema <= 2 kept one test split per domain
        self.heldout = {d: [p] if isinstance(p, str) else list(p) for d, p in self.heldout.items()}

    def add_heldout(self, domain: str, test: str) -> None:
        """A batch's test split joins its domain's held-out set; the domain's cached scores,
        made on the smaller set, are dropped (a repeated call changes nothing)."""
        tests = self.heldout.setdefault(domain, [])
        if test not in tests:
            tests.append(test)
            for scores in self.scores.values():
                scores.pop(domain, None)

    @classmethod
    def read(cls, path: Path) -> LoopState:
        return _load(cls, path, json.loads(path.read_text()))

    def write(self, path: Path) -> None:
        write_json(path, asdict(self))


@dataclass
class StepRecord:
    """One batch's step: what was found, trained, decided and why."""

    batch: str
    domain: str
    time: str
    accepted: int
    quarantined: int
    schema: int = SCHEMA
    drift: dict | None = None  # check_drift's report; None: bootstrap (no champion)
    updated: bool = False
    candidate_version: str | None = None
    promoted: bool = False
    reasons: list[str] = field(default_factory=list)
    decision: str | None = None  # URI of the gate's promotion_decision.json
    champion_version: str | None = None
    miou_before: dict[str, float] = field(default_factory=dict)  # champion before the step, held-out sets
    miou_after: dict[str, float] = field(default_factory=dict)  # champion after the step
    candidate_miou: dict[str, float] = field(default_factory=dict)  # what the candidate reached, promoted or not
    learnt: list[str] = field(default_factory=list)  # domains the gate protected (learnt by the champion)
    update_reason: str = ""  # why the step trained: bootstrap, drift, or the batch's domain not learnt yet
    trained_on: list[str] = field(default_factory=list)  # training folders of the update (pooled ones included)
    pooled: list[str] = field(default_factory=list)  # of those, earlier refused batches' splits
    kept_in_pool: bool = False  # refused or covered: the training split waits for its domain's next update
    images_seen: int | None = None  # training images the update processed (replayed ones included)
    summary: str = ""
    commit: str | None = None
    skipped: str | None = None  # why the batch was recorded without a step (too few accepted pairs)
    # done; awaiting-labels: an unlabelled batch that drifted, its label request out (label_request);
    # labelled: the step that imported those labels (labelled/<batch>.json) and trained on them.
    status: str = "done"
    labelled: bool = True
    label_request: str | None = None  # the request folder, relative to the workspace
    labels: dict | None = None  # the import: {"from", "missing": [stems], "quarantined": n}

    @classmethod
    def read(cls, path: Path) -> StepRecord:
        return _load(cls, path, json.loads(path.read_text()))

    def to_dict(self) -> dict:
        return asdict(self)
