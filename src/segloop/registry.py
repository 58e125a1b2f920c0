"""Model registry: register trained models, resolve `models:/` refs, move aliases with an
auditable history, roll back (the promotion gate that moves `champion` is segloop.gate).

A registered version is a real MLflow PyTorch model (torch.export "pt2" format, with
signature and input example) that also carries the segloop checkpoint it came from
(`extra_files/best.pt`, loadable with `weights_only=True`) and its settings, so
`models:/<name>@champion` resolves to a local checkpoint that every segloop command
already reads.

MLflow keeps only the current alias -> version map. Every alias change made here is
also written down: tags on the versions involved and one immutable JSON file per change
in the artifacts of a per-model history run. `champion` moves only after the promotion
decision and its evidence are logged; if the history cannot be written the alias is
put back. Nothing here trains models or imports Prefect.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# torch (through segloop.checkpoint) and numpy are imported where a model is touched:
# `segloop models list|history` and ref resolution by path must answer in about a second.
from segloop.config import Settings, redact_settings
from segloop.tracking import (
    Store,
    TrackedRun,
    ensure_experiment,
    open_store,
    resolve_store,
)

CHAMPION, CHALLENGER = "champion", "challenger"
CHECKPOINT_FILE = "best.pt"  # the segloop checkpoint, inside the logged model's extra_files/
MODEL_CACHE_KEEP = 16  # downloaded checkpoints always kept in the temp folder (download_checkpoint) ...
MODEL_CACHE_IDLE_S = 6 * 3600  # ... and any other used within this time (a caller may still hold its path)
MODEL_ARTIFACT = "model"
HISTORY_FOLDER = "alias_history"
DECISION_FILE = "promotion_decision.json"
MODEL_DESCRIPTION = (
    "segloop semantic-segmentation model. Alias `champion` is the model in use: it moves only through "
    "`segloop gate` (candidate vs champion on every domain's held-out set), `segloop models promote` "
    "(manual, recorded) or `segloop models rollback`; `segloop models history` lists every change. "
    "Each version's description states its parent, data, code and gate result."
)
# MLflow's model page lists every tag of every version on its own line, so a version keeps
# one JSON tag, `segloop`, with what segloop reads back (lineage, quality, interface,
# integrity), plus one JSON record per alias it held (`segloop.champion`): every version and
# its alias fit on a screen. Everything else a step records (data md5s and paths, git commit,
# segloop version, loop stage, gate decision file and reasons) goes to the version's run; the
# version's description restates both in words. `version_tags` reads them back flat.
RECORD_TAG = "segloop"
RECORD_KEYS = frozenset(
    {
        "domain",
        "strategy",
        "parent",
        "parent_version",
        "batch",
        "val_miou",
        "classes",
        "channels",
        "sha256",
        "gate.promoted",
        "loop.commit",
        "miou",
    }
)  # miou: {domain: held-out mIoU} of the latest gates
_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))$")


def is_model_ref(text: str | Path) -> bool:
    return str(text).startswith("models:/")


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`models:/name@alias` -> (name, alias, None); `models:/name/3` -> (name, None, "3")."""
    m = _REF.match(ref)
    if not m:
        raise ValueError(f"{ref}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return m["name"], m["alias"], m["version"]


def registry_client(settings: Settings) -> tuple[Any, Store]:
    """A client on the configured store (also when tracking.enabled is false: refs need it)."""
    store = resolve_store(settings.tracking)
    return open_store(store, settings.tracking.connect_timeout_s), store


def set_version_tags(client, name: str, version: str, tags: Mapping[str, Any]) -> None:
    """Record `segloop.<key>` tags about a version: RECORD_KEYS into its `segloop` JSON tag, the rest on its run."""
    mv = client.get_model_version(name, str(version))
    record = {
        k.removeprefix("segloop."): v
        for k, v in tags.items()
        if v is not None and k.removeprefix("segloop.") in RECORD_KEYS
    }
    if record:
        merged = json.loads((mv.tags or {}).get(RECORD_TAG) or "{}") | record
        client.set_model_version_tag(name, str(version), RECORD_TAG, json.dumps(merged, separators=(",", ":")))
    for k, v in tags.items():
        if v is not None and k.removeprefix("segloop.") not in RECORD_KEYS and mv.run_id:  # no run: registered by hand
            client.set_tag(mv.run_id, k, str(v))


def version_tags(mv) -> dict[str, str]:
    """A version's tags with its `segloop` record spread out as `segloop.<key>` strings
    (lists, dicts as JSON; booleans as true/false), as the run's tags look."""
    tags = dict(mv.tags or {})
    for k, v in json.loads(tags.pop(RECORD_TAG, None) or "{}").items():
        tags[f"segloop.{k}"] = (
            str(v).lower() if isinstance(v, bool) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        )
    return tags


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------- logging a model


def _pip_requirements() -> list[str]:
    # Explicit pins: MLflow's inference of requirements re-imports the model in a subprocess
    # (slow here) and can guess wrong for a CUDA torch build.
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "segmentation-models-pytorch", "numpy", "timm")]


def log_model(run: TrackedRun, checkpoint: Path, model_name: str, extra_tags: Mapping[str, Any] = {}) -> str:
    """Log `checkpoint` as an MLflow PyTorch model in `run`, register it; return the version.

    Input: images (N, C, H, W) float32 in [0, 1], H and W multiples of 32;
    output: logits (N, K, H, W) float32.
    """
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from segloop.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(checkpoint)
    model, settings = model_from_checkpoint(ckpt, str(checkpoint))
    channels, classes = ckpt["channels"], list(ckpt["classes"])
    size = settings.data.crop_size
    if size is None:  # a checkpoint's settings are resolved: planned values are filled in
        raise ValueError(f"{checkpoint}: its settings have no data.crop_size")
    # Batch 2: torch.export specializes size-1 dims, and the batch dim must stay dynamic.
    example = np.random.default_rng(0).random((2, channels, size, size), dtype=np.float32)
    # Unnamed specs: a named tensor makes MLflow's serving example a dict, which the
    # PyTorch pyfunc rejects; unnamed, `mlflow.models.predict` accepts the example as is.
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(classes), -1, -1))]),
    )
    mlflow.set_tracking_uri(run.store.uri)
    mlflow.set_registry_uri(run.store.uri)
    # log_model only attaches to the fluent active run; resume ours for the call.
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run.run_id):
        settings_file = Path(tmp) / "settings.yaml"
        settings_file.write_text(json.dumps(redact_settings(ckpt["settings"]), indent=1))  # JSON is valid YAML
        info = mlflow.pytorch.log_model(
            pytorch_model=model,
            name=MODEL_ARTIFACT,
            # pt2 (torch.export): loading runs no pickled code; H, W and N stay dynamic.
            serialization_format="pt2",
            signature=signature,
            input_example=example,
            extra_files=[str(checkpoint), str(settings_file)],
            pip_requirements=_pip_requirements(),
            metadata={
                "segloop_checkpoint": f"extra_files/{CHECKPOINT_FILE}",
                "classes": classes,
                "channels": channels,
                "input": "images (N, C, H, W) float32 in [0, 1], H and W multiples of 32",
            },
            registered_model_name=model_name,
        )
    version = str(info.registered_model_version)
    if not run.client.get_registered_model(model_name).description:
        run.client.update_registered_model(model_name, MODEL_DESCRIPTION)
    # The version shows its lineage at a glance (the run keeps the rest: data md5s, code...);
    # sha256 is the registered checkpoint file's, so a copy anywhere can be checked against it.
    run_tags = run.client.get_run(run.run_id).data.tags
    tags = {k: v for k, v in run_tags.items() if k.removeprefix("segloop.") in RECORD_KEYS}
    tags |= {
        "segloop.classes": classes,
        "segloop.channels": channels,
        "segloop.val_miou": ckpt.get("val_miou"),
        "segloop.sha256": file_sha256(checkpoint),
        **extra_tags,
    }
    set_version_tags(run.client, model_name, version, tags)
    describe_version(run.client, model_name, version)
    return version


def describe_version(client, name: str, version: str) -> str:
    """Write the version's description (Markdown, shown on its MLflow UI page) from its tags:
    parent, strategy, data, code, validation mIoU, last gate result, champion record.

    Called whenever segloop changes those tags, so the UI alone tells the lineage.
    """
    mv = client.get_model_version(name, str(version))
    run_tags = client.get_run(mv.run_id).data.tags if mv.run_id else {}
    tags = {**run_tags, **version_tags(mv), "segloop.run_id": mv.run_id}
    parent_ref, parent_version = tags.get("segloop.parent"), tags.get("segloop.parent_version")
    parent = f"v{parent_version}" if parent_version else parent_ref or "none"
    gate = {"true": "promoted", "false": "NOT promoted"}.get(tags.get("segloop.gate.promoted", ""), "not gated yet")
    # Plain first line: the UI's versions table shows only its first few words.
    lines = [
        f"{tags.get('segloop.domain') or 'unknown'} model: {tags.get('segloop.strategy', '-')}, parent {parent}; "
        f"gate: {gate}",
        "",
        f"- parent: `{parent_ref}`" if parent_ref else "- parent: none (trained from scratch)",
    ]
    roles = sorted({k.split(".")[2] for k in tags if k.startswith("segloop.data.") and k.endswith(".md5")})
    for role in roles:
        lines.append(
            f"- data `{role}`: `{tags.get(f'segloop.data.{role}.path', '?')}` (md5 "
            f"`{tags[f'segloop.data.{role}.md5']}`)"
        )
    commit = tags.get("segloop.git_commit")
    code = f"git `{commit[:10]}`{' (dirty)' if tags.get('segloop.git_dirty') == 'true' else ''}, " if commit else ""
    lines.append(f"- code: {code}segloop {tags.get('segloop.version', '?')}; run `{tags.get('segloop.run_id', '?')}`")
    if tags.get("segloop.val_miou"):
        lines.append(f"- validation mIoU at training: {float(tags['segloop.val_miou']):.4f}")
    miou = version_miou(tags)
    if miou:  # set by every gate this version took part in, as candidate or as champion
        lines.append(
            f"- held-out mIoU (latest gate evaluations): {', '.join(f'{d} {float(v):.3f}' for d, v in miou.items())}"
        )
    if "segloop.gate.promoted" in tags:
        lines.append(f"- its last gate as candidate: **{gate.upper()}**")
        lines += [f"  - {r}" for r in tags.get("segloop.gate.reasons", "").splitlines()]
        lines.append(f"  - decision: `{tags.get('segloop.gate.decision', '?')}`")
    record = alias_record(tags, CHAMPION)
    if record.get("since"):
        since, until = record["since"], record.get("until")
        lines.append(
            f"- champion since {since} ({record.get('kind')}: {(record.get('reason') or '')[:300]})"
            + (f", replaced {until}" if until and until >= since else "")
        )
    text = "\n".join(lines)
    client.update_model_version(name, str(version), description=text)
    return text


def version_miou(tags: Mapping[str, str]) -> dict[str, float]:
    """{domain: held-out mIoU} a version's gates recorded (tag segloop.miou, JSON)."""
    return {d: float(v) for d, v in sorted(json.loads(tags.get("segloop.miou") or "{}").items())}


def alias_record(tags: Mapping[str, str], alias: str) -> dict:
    """The version's record of holding `alias` (tag segloop.<alias>, JSON: since, kind,
    reason, decision, replaced, until)."""
    return json.loads(tags.get(f"segloop.{alias}") or "{}")


def log_training(run: TrackedRun, result, out_dir: Path, model_name: str | None) -> str | None:
    """Final metrics and files of one finished `train` call; with `model_name`, the model is
    logged and registered as a new version of it (returned), else nothing is registered."""
    from segloop.checkpoint import load_checkpoint

    run.log_metrics({f"train.{k}": v for k, v in asdict(result).items() if isinstance(v, (int, float))})
    best = load_checkpoint(out_dir / CHECKPOINT_FILE)
    # per-class validation IoU of the kept (best) epoch; NaN = class absent, not logged
    run.log_metrics({f"val_iou.{c}": v for c, v in zip(best["classes"], best.get("val_per_class_iou", [])) if v == v})
    run.set_tags({"segloop.stopped": result.stopped})
    for name in ("settings.yaml", "history.json", "train_metrics.json"):
        run.log_file(out_dir / name)
    return log_model(run, out_dir / CHECKPOINT_FILE, model_name) if model_name else None


# ---------------------------------------------------------------- resolving refs


def get_version(client, ref: str):
    name, alias, version = parse_ref(ref)
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        raise ValueError(f"{ref}: no such registered model version") from None


def download_checkpoint(client, store: Store, mv) -> Path:
    """The segloop checkpoint of model version `mv`, as a local file.

    A registered version's files never change, so copies are cached per store and version
    in the temp folder instead of piling up one download per command; the cache keeps the
    MODEL_CACHE_KEEP most recently used and whatever was used in the last MODEL_CACHE_IDLE_S
    (every test run's and benchmark's fresh stores add new keys: unbounded, it had grown to
    19 GB and filled this machine's disk; pruned by count alone, it deleted files that other
    processes had just been handed).
    """
    import hashlib
    import os

    import mlflow

    from segloop.checkpoint import load_checkpoint

    # The key includes what a recreated store would not repeat (run id, source, creation time),
    # so a fresh store's "version 1" never resolves to an old store's cached file.
    identity = f"{store.uri}|{mv.name}|{mv.version}|{mv.run_id}|{mv.source}|{mv.creation_timestamp}"
    key = hashlib.md5(identity.encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"segloop-models-{getpass.getuser()}"
    cached = cache / key / CHECKPOINT_FILE
    if cached.is_file():
        os.utime(cached)  # recently used: kept by the pruning below
        return cached
    # MLflow 3 versions point at a LoggedModel; the sqlite store fills `source`
    # (models:/m-<id>) but may leave `model_id` empty.
    model_id = mv.model_id or (mv.source.removeprefix("models:/") if str(mv.source).startswith("models:/m-") else None)
    location = client.get_logged_model(model_id).artifact_location if model_id else mv.source
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{location}/extra_files/{CHECKPOINT_FILE}",
            dst_path=tmp,
            tracking_uri=store.uri,
        )
        expected = version_tags(mv).get("segloop.sha256")  # the registered file's hash (versions registered with one)
        if expected and file_sha256(Path(path)) != expected:
            raise ValueError(
                f"models:/{mv.name}/{mv.version}: downloaded {CHECKPOINT_FILE} does not match the version's "
                f"sha256 {expected[:12]}...: the registered file was changed; refusing to use it"
            )
        load_checkpoint(path)  # a torn or foreign file must not enter the cache
        os.replace(path, cached)
    prune_model_cache(cache, MODEL_CACHE_KEEP, MODEL_CACHE_IDLE_S)
    return cached


def prune_model_cache(cache: Path, keep: int, idle_s: float) -> None:
    """Delete the download cache's checkpoints beyond the `keep` most recently used that were
    not used for `idle_s` seconds."""
    import shutil
    import time

    def used(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except FileNotFoundError:  # pruned by another process meanwhile
            return 0.0

    idle_since = time.time() - idle_s
    by_use = sorted(((used(p), p) for p in cache.glob(f"*/{CHECKPOINT_FILE}")), reverse=True)
    for last_used, old in by_use[keep:]:
        if last_used < idle_since:
            shutil.rmtree(old.parent, ignore_errors=True)  # another process pruning at once: fine


def resolve_model(ref: str | Path, settings: Settings) -> tuple[Path, str, Any]:
    """(local checkpoint path, label, model version or None) for a path or a `models:/` ref."""
    if not is_model_ref(ref):
        return Path(ref), str(ref), None
    client, store = registry_client(settings)
    mv = get_version(client, str(ref))
    return download_checkpoint(client, store, mv), f"{ref} (version {mv.version})", mv


# ---------------------------------------------------------------- alias history


def _history_run(client, settings: Settings, store: Store, name: str, create: bool = True) -> str | None:
    """The run whose artifacts hold `name`'s alias history (created on first write)."""
    exp_id = ensure_experiment(client, store, settings.tracking.experiment)
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`segloop.kind` = 'alias_history' and tags.`segloop.model_name` = '{name}'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    if not create:
        return None
    run = client.create_run(
        exp_id, run_name=f"alias-history:{name}", tags={"segloop.kind": "alias_history", "segloop.model_name": name}
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def move_alias(
    settings: Settings,
    alias: str,
    version: str,
    kind: str,
    reason: str,
    decision: str | None = None,
    extra: Mapping[str, Any] = {},
) -> dict:
    """Point `alias` at `version` and record the change (time, from -> to, kind, reason, decision, `extra`).

    kind: "gate" | "manual" | "rollback". Returns the history entry.
    """
    client, store = registry_client(settings)
    name = settings.registry.model_name
    mv = get_version(client, f"models:/{name}/{version}")  # a ValueError naming the ref if absent
    previous = _alias_version(client, name, alias)
    record = alias_record(version_tags(mv), alias)
    if previous == str(version) and record.get("kind") == kind and record.get("reason") == reason:
        # Already done and recorded (a retry): no second history entry; finish the descriptions.
        for v in {r for r in (record.get("replaced"), str(version)) if r is not None}:
            describe_version(client, name, v)
        return {
            "time": record.get("since"),
            "model": name,
            "alias": alias,
            "from": record.get("replaced"),
            "to": str(version),
            "kind": kind,
            "reason": reason,
            "decision": record.get("decision"),
            "user": getpass.getuser(),
            **extra,
        }
    entry = {
        "time": _now(),
        "model": name,
        "alias": alias,
        "from": previous,
        "to": str(version),
        "kind": kind,
        "reason": reason,
        "decision": decision,
        "user": getpass.getuser(),
        **extra,
    }
    client.set_registered_model_alias(name, alias, str(version))
    try:
        run_id = _history_run(client, settings, store, name)
        with tempfile.TemporaryDirectory() as tmp:
            # One immutable file per change (never rewritten): the log is append-only.
            stamp = f"{time.time_ns():020d}"
            path = Path(tmp) / f"{stamp}-{alias}-v{version}.json"
            path.write_text(json.dumps(entry, indent=1))
            client.log_artifact(run_id, str(path), HISTORY_FOLDER)
        # One JSON tag per alias on each version (the model page stays one row per version).
        record = {
            "since": entry["time"],
            "kind": kind,
            "reason": reason,
            "decision": decision,
            "replaced": previous,
            **extra,
        }
        client.set_model_version_tag(name, str(version), f"segloop.{alias}", json.dumps(record))
        if previous and previous != str(version):
            old = alias_record(client.get_model_version(name, previous).tags or {}, alias)
            client.set_model_version_tag(
                name, previous, f"segloop.{alias}", json.dumps({**old, "until": entry["time"]})
            )
    except BaseException:
        # An alias change without a record is worse than no change: put it back.
        if previous:
            client.set_registered_model_alias(name, alias, previous)
        else:
            client.delete_registered_model_alias(name, alias)
        raise
    # Descriptions only restate the tags (not evidence): written after the record.
    for v in {r for r in (previous, str(version)) if r is not None}:
        describe_version(client, name, v)
    return entry


def interface(client, store: Store, name: str, version: str) -> dict:
    """What a consumer of `models:/name@alias` relies on: class names, input channels, MLflow signature."""
    import mlflow

    mv = client.get_model_version(name, str(version))
    tags = version_tags(mv)
    if "segloop.classes" in tags and "segloop.channels" in tags:
        classes, channels = json.loads(tags["segloop.classes"]), int(tags["segloop.channels"])
    else:  # registered without segloop's tags: its checkpoint says
        from segloop.checkpoint import load_checkpoint

        ckpt = load_checkpoint(download_checkpoint(client, store, mv))
        classes, channels = list(ckpt["classes"]), int(ckpt["channels"])
    mlflow.set_tracking_uri(store.uri)
    mlflow.set_registry_uri(store.uri)
    try:
        signature = mlflow.models.get_model_info(f"models:/{name}/{version}").signature
    except Exception:  # no MLmodel (not an MLflow model): nothing to compare
        signature = None
    return {"classes": classes, "channels": channels, "signature": signature.to_dict() if signature else None}


def incompatibilities(mine: dict, theirs: dict) -> list[str]:
    """How interface `mine` differs from `theirs`, one phrase each (empty: compatible)."""
    out = [f"{k} {mine[k]} vs {theirs[k]}" for k in ("classes", "channels") if mine[k] != theirs[k]]
    if mine["signature"] != theirs["signature"]:  # the full specs are long: the MLmodel files show them
        out.append("MLflow signature differs")
    return out


def promote(settings: Settings, alias: str, version: str, reason: str, force: bool = False) -> dict:
    """`segloop models promote`: point `alias` at `version` by hand, recorded as manual.

    Refused (ValueError) when the version's classes, channels or signature differ from the
    current champion's: whoever loads `models:/<name>@<alias>` would get a model that answers
    in other classes or wants other images. `force` does it anyway; the differences are
    recorded in the history entry and the alias tag with `reason`.
    """
    client, store = registry_client(settings)
    name = settings.registry.model_name
    get_version(client, f"models:/{name}/{version}")  # a ValueError naming the ref if absent
    champion = _alias_version(client, name, CHAMPION)
    differences = []
    if champion is not None and champion != str(version):
        differences = incompatibilities(
            interface(client, store, name, version), interface(client, store, name, champion)
        )
    if differences and not force:
        raise ValueError(
            f"models:/{name}/{version} does not fit champion v{champion} ({'; '.join(differences)}); "
            f"refusing to point {alias} at it (pass --force with a --reason for a deliberate change)"
        )
    return move_alias(
        settings, alias, str(version), "manual", reason, extra={"forced": differences} if differences else {}
    )


def _alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def history(settings: Settings) -> list[dict]:
    """Every recorded alias change of registry.model_name, oldest first."""
    from segloop import registry_sqlite

    try:  # a local sqlite store answers without importing MLflow
        files = registry_sqlite.history_files(
            resolve_store(settings.tracking), settings.tracking.experiment, settings.registry.model_name, HISTORY_FOLDER
        )
        return [json.loads(f.read_text()) for f in files]
    except registry_sqlite.Unsupported:
        return _history_mlflow(settings)


def _history_mlflow(settings: Settings) -> list[dict]:
    client, store = registry_client(settings)
    import mlflow

    run_id = _history_run(client, settings, store, settings.registry.model_name, create=False)
    files = sorted(a.path for a in client.list_artifacts(run_id, HISTORY_FOLDER)) if run_id else []
    if not files:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=HISTORY_FOLDER, dst_path=tmp, tracking_uri=store.uri
            )
        )
        return [json.loads((local / Path(f).name).read_text()) for f in files]


def rollback(settings: Settings, reason: str | None = None) -> dict:
    """Move `champion` back to the version it replaced when it was last promoted."""
    client, _ = registry_client(settings)
    current = _alias_version(client, settings.registry.model_name, CHAMPION)
    if current is None:
        raise ValueError(f"{settings.registry.model_name}: no champion to roll back")
    # Replay the history as a stack of champions: a promotion (gate or manual) pushes,
    # a rollback pops. So repeated rollbacks walk back through earlier champions and
    # never ping-pong between the last two.
    stack: list[str] = []
    for e in history(settings):
        if e["alias"] != CHAMPION:
            continue
        if e["kind"] == "rollback":
            if stack:
                stack.pop()
        else:
            if not stack and e["from"]:
                stack.append(e["from"])
            stack.append(e["to"])
    if not stack or stack[-1] != current:  # alias moved outside segloop: start from what is there
        stack.append(current)
    previous = stack[-2] if len(stack) >= 2 else None
    if previous is None:
        raise ValueError(
            f"{settings.registry.model_name}: no champion before v{current} in the alias history; nothing to roll "
            "back to"
        )
    return move_alias(settings, CHAMPION, previous, "rollback", reason or f"rollback: v{current} -> v{previous}")


def list_versions(settings: Settings) -> list[dict]:
    """One row per registered version: aliases, domain metrics, parent, created."""
    from segloop import registry_sqlite

    name = settings.registry.model_name
    try:  # a local sqlite store answers without importing MLflow
        found = registry_sqlite.versions(resolve_store(settings.tracking), name)
    except registry_sqlite.Unsupported:
        found = _versions_mlflow(settings, name)
    if found is None:
        return []
    aliases, mvs = found
    rows = []
    for mv in mvs:
        tags = version_tags(mv)
        rows.append(
            {
                "version": int(mv.version),
                "aliases": sorted(aliases.get(str(mv.version), [])),
                "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
                "domain": tags.get("segloop.domain"),
                "val_miou": float(tags["segloop.val_miou"]) if tags.get("segloop.val_miou") else None,
                "miou": version_miou(tags),
                "parent": tags.get("segloop.parent_version") or tags.get("segloop.parent"),
                "strategy": tags.get("segloop.strategy"),
                "run_id": mv.run_id,
            }
        )
    return sorted(rows, key=lambda r: r["version"])


def _versions_mlflow(settings: Settings, name: str) -> tuple[dict[str, list[str]], list] | None:
    from mlflow.exceptions import MlflowException

    client, _ = registry_client(settings)
    # search results leave `aliases` empty; the registered model has the alias map.
    aliases: dict[str, list[str]] = {}
    try:
        for alias, version in client.get_registered_model(name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
    except MlflowException:
        return None
    return aliases, client.search_model_versions(f"name = '{name}'")


def log_export(settings, mv, files: list[Path]) -> str:
    """Attach exported files to registered version `mv`'s run (folder `export/`); tag the version.

    Returns the artifact URI of the folder.
    """
    client, _ = registry_client(settings)
    for path in files:
        client.log_artifact(mv.run_id, str(path), "export")
    uri = f"{client.get_run(mv.run_id).info.artifact_uri}/export"
    client.set_model_version_tag(mv.name, mv.version, "segloop.export", uri)
    return uri
