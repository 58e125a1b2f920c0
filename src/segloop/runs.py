"""Tracked steps: `train` or `update` inside an MLflow run with the result registered, and
drift checks as runs of their own.

The CLI (`segloop train|update|drift`) and the continual loop call these, so a step run
by hand, by DVC or by a Prefect flow is recorded the same way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

from segloop.config import Settings
from segloop.data.files import Folders, folders
from segloop.train import TrainResult

REGISTERED = "registered.json"  # beside the checkpoint: which registered version it became
# Split folders are named by role; a run named after one ("drift:test") would tell nothing apart.
_GENERIC = {"train", "val", "test", "accepted", "images"}


def folder_label(path: Path) -> str:
    """A short name for a data folder in run names: `fog` for data/fog, `fog/test` for data/split/fog/test."""
    path = Path(path)
    return "/".join(path.parts[-2:]) if path.name in _GENERIC and len(path.parts) > 1 else path.name


def prepare_out(out: Path, resume: bool = False, overwrite: bool = False, remove_stale: bool = True) -> None:
    """Refuse to train into a non-empty `out` unless resuming or told to overwrite.

    Called before any run is opened or file written. An earlier run's registered.json is
    removed first: it names the version that run became, not the one this run will.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise FileExistsError(
            f"--out {out}: exists and is not empty (an earlier model?); refusing to overwrite it "
            "(pass --resume to continue it, --overwrite to replace it, or choose a new folder)"
        )
    if remove_stale:
        (out / REGISTERED).unlink(missing_ok=True)


def _parent(ref: str, settings: Settings) -> tuple[Path, str, dict[str, Any]]:
    from segloop.registry import resolve_model

    path, label, mv = resolve_model(ref, settings)
    return path, label, {"segloop.parent": str(ref), "segloop.parent_version": mv.version if mv else None}


def train_step(
    settings: Settings,
    data: Path,
    out: Path,
    val: Path | None = None,
    init: str | None = None,
    resume: bool = False,
    domain: str | None = None,
    register: str | None = None,
    overwrite: bool = False,
) -> tuple[TrainResult, str | None]:
    """Train (from scratch, or from `init`: a path or models:/ ref); returns (result, registered version or None).

    `register`: the registered model to add the result to as a new version; None registers nothing.
    """
    from segloop.distributed import world_from_env
    from segloop.tracking import tracked_run
    from segloop.train import train

    # Under torchrun every rank checks (all refuse alike, before any rank writes); rank 0 alone removes.
    primary = world_from_env().primary
    prepare_out(out, resume, overwrite, remove_stale=primary)
    init_path, label = None, None
    run_tags: dict[str, str | None] = {"segloop.strategy": "resume" if resume else "scratch"}
    if init:
        init_path, label, parent_tags = _parent(init, settings)
        run_tags |= {"segloop.strategy": "transfer", **parent_tags}
    run_tags["segloop.domain"] = domain
    inputs = {"train": data, **({"val": val} if val else {})}
    # The store is checked here, before any training starts. Under torchrun only rank 0 tracks.
    with (
        tracked_run(settings, "train", inputs, run_tags, run_name=f"train:{out.name}")
        if primary
        else nullcontext() as run
    ):
        result = train(
            settings, data, out, val, init_path, resume, on_epoch=run.log_epoch if run else None, init_label=label
        )
        return result, _register(run, result, out, register)


def update_step(
    settings: Settings,
    parent: str,
    data: Path | Sequence[Path],
    out: Path,
    val: Path | Sequence[Folders] | None = None,
    seen: Sequence[Path] = (),
    replay: Path | None = None,
    domain: str | None = None,
    register: str | None = None,
    overwrite: bool = False,
) -> tuple[TrainResult, str | None]:
    """Update `parent` (a path or models:/ ref) with a new batch (one folder or several) by
    `continual.strategy`; returns (result, version or None).

    `register`: the registered model to add the result to as a new version; None registers nothing.
    """
    from segloop.continual import update
    from segloop.tracking import tracked_run

    prepare_out(out, overwrite=overwrite)
    path, label, parent_tags = _parent(parent, settings)
    run_tags = {"segloop.strategy": settings.continual.strategy, "segloop.domain": domain, **parent_tags}
    vals = [val] if isinstance(val, (str, Path)) else list(val or [])
    datas = [data] if isinstance(data, (str, Path)) else list(data)
    inputs = {
        **{f"train{i}" if i else "train": d for i, d in enumerate(datas)},
        **{  # a pooled set's folders: val<i>.<j>
            f"val{i or ''}" + (f".{j}" if j else ""): f for i, v in enumerate(vals) for j, f in enumerate(folders(v))
        },
        **({"replay": replay} if replay else {}),
    }
    with tracked_run(settings, "update", inputs, run_tags, run_name=f"update:{out.name}") as run:
        result = update(
            settings, path, datas, out, val, seen, replay, on_epoch=run.log_epoch if run else None, init_label=label
        )
        return result, _register(run, result, out, register)


def compress_step(
    settings: Settings,
    kind: Literal["distill", "prune"],
    source: str,
    data: Path,
    out: Path,
    val: Path | None = None,
    ratio: float | None = None,
    register: str | None = None,
    overwrite: bool = False,
) -> tuple[TrainResult, str | None]:
    """`distill` (`source`: the teacher) or `prune` (`source`: the model pruned, by `ratio`) inside a
    tracked run, the result registered like `train_step`'s; `source` is a path or models:/ ref."""
    from segloop.compress import distill, prune
    from segloop.tracking import tracked_run

    prepare_out(out, overwrite=overwrite)
    path, label, parent_tags = _parent(source, settings)
    inputs = {"train": data, **({"val": val} if val else {})}
    with tracked_run(
        settings, kind, inputs, {"segloop.strategy": kind, **parent_tags}, run_name=f"{kind}:{out.name}"
    ) as run:
        if kind == "distill":
            result = distill(settings, path, data, out, val, label, on_epoch=run.log_epoch if run else None)
        else:
            result = prune(settings, path, data, out, val, ratio, label, on_epoch=run.log_epoch if run else None)
        return result, _register(run, result, out, register)


def _register(run, result: TrainResult, out: Path, model_name: str | None) -> str | None:
    if run is None:
        return None
    from segloop.registry import log_training

    version = log_training(run, result, out, model_name)
    if version is None:
        print(f"MLflow run {run.run_id}; not registered (--register NAME adds it to a registered model)", flush=True)
        return None
    (out / REGISTERED).write_text(json.dumps({"model": model_name, "version": version, "run_id": run.run_id}) + "\n")
    print(f"MLflow run {run.run_id}; registered models:/{model_name}/{version}", flush=True)
    return version


def drift_step(
    settings: Settings,
    reference: Path,
    current: Path,
    out: Path,
    champion=None,
    cache: Path | None = None,
    champion_miou: float | None = None,
    tags: Mapping[str, Any] = {},
    name: str | None = None,
) -> tuple[dict, str | None]:
    """`detect_drift` inside an MLflow run of `<experiment>-drift` named `drift:<name>` (default: the
    current folder's label); returns (drift.json payload, run id or None)."""
    from segloop.drift.detect import detect_drift
    from segloop.tracking import drift_experiment, log_drift, tracked_run

    tags = {"segloop.model_id": champion.model_id if champion else None, **tags}
    inputs = {"reference": reference, "current": current}
    with tracked_run(
        settings,
        "drift",
        inputs,
        tags,
        run_name=f"drift:{name or folder_label(current)}",
        experiment=drift_experiment(settings),
    ) as run:
        r = detect_drift(
            reference,
            current,
            out,
            settings.drift,
            settings.data.channels,
            champion,
            cache,
            settings.eval,
            champion_miou,
        )
        if run:
            log_drift(run, r, out)
    return r, run.run_id if run else None
