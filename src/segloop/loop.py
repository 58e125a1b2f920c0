"""The continual loop's steps, as plain functions over a workspace (flows/ only orchestrates).

One batch = one step (`process_batch`, which flows/ wraps): ingest (validate, quarantine,
split) -> version with DVC -> drift check against the champion's references -> bootstrap
or update (`should_update`) -> gate (protecting the domains the champion has learnt) -> on
promotion, new replay buffer; on refusal, the batch's training split stays in its domain's
pool for the next update of that domain -> step record, state and marker committed together.

The workspace is the loop's own git + DVC repository (`flows.workspace`):

    incoming/<batch>/          batches arrive here (images/, masks/, optional batch.json {"domain": ...})
    batches/<batch>/           accepted files and their train/val/test split (tracked by batches/<batch>.dvc)
    quarantine/<batch>/        rejected files with reasons.jsonl
    models/<batch>/            the model trained on the batch (out of DVC stage train-/update-<batch>)
    replay/<batch>/            replay buffer version after the batch (stage replay-<batch>)
    reference/v<N>/<domain>/   drift reference of champion v<N> for each domain it was trained on
    steps/<batch>/             drift and gate reports of the step
    processed/<batch>.json     the step record; its presence means "done, never again"
    params.yaml, dvc.yaml, dvc.lock, state.json (segloop.records.LoopState)

Training and updates are DVC stages (train-/update-<batch>) that the loop runs with
`dvc repro -s`; the replay buffer step is written to dvc.yaml and `dvc commit`ted. So
`dvc repro` finds everything up to date and `git checkout <commit> && dvc checkout &&
dvc repro -s -f <stage>` rebuilds a step. The git
commit made at the end of a step is the only thing that makes it count: a crash before
it leaves the batch pending and the next run starts the batch again from that commit.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import yaml

from segloop.config import Settings
from segloop.records import BatchInfo, LoopState, StepRecord, write_json

STATE, MARKER_DIR, BATCH_INFO = "state.json", "processed", "batch.json"
# What a model step's output depends on (where it is logged and registered does not).
STAGE_PARAMS = ["data", "model", "train", "continual"]


@dataclass(frozen=True)
class Workspace:
    root: Path
    incoming: Path

    @classmethod
    def of(cls, settings: Settings) -> "Workspace":
        f = settings.flows
        return cls(f.workspace.resolve(), f.incoming_dir.resolve())

    def batch(self, b: str) -> Path:
        return self.root / "batches" / b

    def split(self, b: str, part: str) -> Path:
        return self.batch(b) / "split" / part

    def marker(self, b: str) -> Path:
        return self.root / MARKER_DIR / f"{b}.json"

    def rel(self, path: Path) -> str:
        return os.path.relpath(path, self.root)

    def per_batch(self, b: str) -> list[Path]:
        """Everything a step on batch `b` writes: removed before a retry."""
        r = self.root
        return [self.batch(b), r / "batches" / f"{b}.dvc", r / "quarantine" / b, r / "models" / b,
                r / "replay" / b, r / "steps" / b]


# ---------------------------------------------------------------- workspace repo

def _env() -> dict[str, str]:
    """Stages DVC runs call `segloop` (and we call `dvc`): the ones installed beside this Python."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def _run(ws: Workspace, *cmd: str) -> str:
    proc = subprocess.run(cmd, cwd=ws.root, capture_output=True, text=True, env=_env())
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} (in {ws.root}) failed:\n{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def git(ws: Workspace, *args: str) -> str:
    return _run(ws, "git", "-c", "user.name=segloop", "-c", "user.email=segloop@localhost", *args)


def dvc(ws: Workspace, *args: str) -> str:
    return _run(ws, "dvc", *args)


def init_workspace(ws: Workspace, settings: Settings) -> None:
    """Create the workspace repo on first use; always refresh params.yaml from `settings`."""
    ws.root.mkdir(parents=True, exist_ok=True)
    ws.incoming.mkdir(parents=True, exist_ok=True)
    if not (ws.root / ".git").exists():
        git(ws, "init", "-q", "-b", "main")
    if not (ws.root / ".dvc").exists():
        dvc(ws, "init", "-q")
        dvc(ws, "config", "core.analytics", "false")
    ignore = ws.root / ".gitignore"
    if not ignore.exists():
        # incoming/ is the operator's drop box; steps/ holds reports (also logged to MLflow)
        ignore.write_text("/incoming/\n/steps/\n/.cache/\n/.lock\n")
    raw = settings.model_dump(mode="json")
    # The store as an absolute URI: stages run from the workspace must log to the same one.
    from segloop.tracking import resolve_store

    raw["tracking"]["uri"] = resolve_store(settings.tracking).uri if settings.tracking.enabled else None
    (ws.root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    if not (ws.root / STATE).exists():
        write_state(ws, LoopState())
    commit(ws, "workspace: params")


def commit(ws: Workspace, message: str) -> str:
    """Commit everything tracked or new (data itself is in DVC); returns HEAD."""
    git(ws, "add", "-A")
    if git(ws, "status", "--porcelain"):
        git(ws, "commit", "-q", "-m", message)
    return git(ws, "rev-parse", "HEAD")


def read_state(ws: Workspace) -> LoopState:
    return LoopState.read(ws.root / STATE)


def write_state(ws: Workspace, state: LoopState) -> None:
    state.write(ws.root / STATE)


def pending_batches(ws: Workspace) -> list[Path]:
    """Batch folders in incoming/ without a marker, oldest first (modification time, then name)."""
    if not ws.incoming.is_dir():
        return []
    batches = [p for p in ws.incoming.iterdir() if p.is_dir() and not p.name.startswith(".") and not ws.marker(p.name).exists()]
    return sorted(batches, key=lambda p: (p.stat().st_mtime, p.name))


_held_locks: dict[Path, int] = {}


@contextmanager
def workspace_lock(ws: Workspace):
    """One loop run at a time per workspace (re-entrant within a process: monitor -> continual).

    An OS lock on <workspace>/.lock: released by the kernel if the process dies, so a crash
    never leaves the loop locked. A second process gets a clear error instead of waiting."""
    if ws.root in _held_locks:
        _held_locks[ws.root] += 1
        try:
            yield
        finally:
            _held_locks[ws.root] -= 1
        return
    ws.root.mkdir(parents=True, exist_ok=True)
    with open(ws.root / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LoopBusy(f"{ws.root}: another loop run holds {ws.root / '.lock'}; runs never overlap") from None
        _held_locks[ws.root] = 1
        try:
            yield
        finally:
            del _held_locks[ws.root]
            fcntl.flock(fh, fcntl.LOCK_UN)


class LoopBusy(RuntimeError):
    """Another process is running the loop on this workspace."""


def undo_unfinished_promotion(ws: Workspace, settings: Settings, batch: str) -> None:
    """A crash after the gate moved `champion` but before the step was committed: put the
    alias back to the champion state.json knows (recorded as a rollback), so the redo
    starts from the same champion as the crashed attempt."""
    from segloop.registry import CHAMPION, _alias_version, move_alias, registry_client, version_tags

    client, _ = registry_client(settings)
    name, known = settings.registry.model_name, read_state(ws).champion
    current = _alias_version(client, name, CHAMPION)
    if current is None or current == known:
        return
    if version_tags(client.get_model_version(name, current)).get("segloop.batch") != batch:
        return  # moved by a person or another tool: the loop takes it as the champion
    reason = f"step on batch {batch} crashed after promoting v{current}; back to v{known} to redo the step"
    if known is None:
        client.delete_registered_model_alias(name, CHAMPION)
        print(reason, flush=True)
    else:
        move_alias(settings, CHAMPION, known, "rollback", reason)


def reset_batch(ws: Workspace, batch: str) -> None:
    """Undo a crashed attempt on `batch`: tracked files back to the last completed step, the batch's outputs gone."""
    if ws.marker(batch).exists():
        raise ValueError(f"batch {batch}: already processed ({ws.marker(batch)}); a batch is processed once")
    git(ws, "reset", "-q", "--hard", "HEAD")
    for path in ws.per_batch(batch):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _stage_add(ws: Workspace, name: str, cmd: str, deps: list[Path], outs: list[Path], params: list[str]) -> None:
    args = ["stage", "add", "--force", "-n", name]
    for d in deps:
        args += ["-d", ws.rel(d)]
    for o in outs:
        args += ["-o", ws.rel(o)]
    if params:
        args += ["-p", ",".join(params)]
    dvc(ws, *args, cmd)


# DVC's hints after `repro` (git add, autostage, dvc push) do not apply here: the step's
# commit adds everything, and pushing is the operator's choice (see the README).
_DVC_ADVICE = re.compile(r"^\s*$|^To track the changes with git|^\s*git add |^To enable auto staging|"
                         r"^\s*dvc config core.autostage|^Use `dvc push`")


def run_stage(ws: Workspace, name: str, cmd: str, deps: list[Path], outs: list[Path], params: list[str]) -> None:
    """Write stage `name` to dvc.yaml and run it (`dvc repro -s`), its output shown as it comes."""
    _stage_add(ws, name, cmd, deps, outs, params)
    proc = subprocess.Popen(["dvc", "repro", "-s", name], cwd=ws.root, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail: list[str] = []
    for line in proc.stdout:
        if not _DVC_ADVICE.match(line):
            print(line.rstrip(), flush=True)
        tail = (tail + [line])[-30:]
    if proc.wait():
        raise RuntimeError(f"stage {name} failed (dvc repro -s {name} in {ws.root}):\n{''.join(tail)}")


def record_stage(ws: Workspace, name: str, cmd: str, deps: list[Path], outs: list[Path], params: list[str]) -> None:
    """Write `name` to dvc.yaml as the command that produced `outs` here, and commit their hashes to dvc.lock."""
    _stage_add(ws, name, cmd, deps, outs, params)
    dvc(ws, "commit", "--force", name)


# ---------------------------------------------------------------- the step

def batch_domain(batch_dir: Path) -> str:
    """The domain a batch claims in batch.json, else "default"."""
    info = batch_dir / BATCH_INFO
    if not info.exists():
        return "default"
    try:
        domain = json.loads(info.read_text()).get("domain")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{info}: expected a JSON object like {{\"domain\": \"fog\"}}") from None
    if not isinstance(domain, str) or not domain.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"{info}: 'domain' must be a name of letters, digits, - or _ (got {domain!r})")
    return domain


def ingest(ws: Workspace, batch_dir: Path, settings: Settings) -> BatchInfo:
    """Validate the batch (bad files to quarantine/ with reasons), split what is accepted."""
    from segloop.data.split import split_dataset
    from segloop.data.validate import validate_folder

    b = batch_dir.name
    domain = batch_domain(batch_dir)
    result = validate_folder(batch_dir, ws.batch(b) / "accepted", ws.root / "quarantine" / b, settings.num_classes)
    if len(result.accepted) < settings.drift.min_images:
        raise ValueError(f"batch {b}: {len(result.accepted)} files accepted ({len(result.rejected)} quarantined, "
                         f"see {ws.root / 'quarantine' / b / 'reasons.jsonl'}); a step needs at least "
                         f"{settings.drift.min_images} (drift.min_images)")
    counts = split_dataset(ws.batch(b) / "accepted", ws.batch(b) / "split", settings.split)
    return BatchInfo(b, domain, len(result.accepted), len(result.rejected), counts)


def version_batch(ws: Workspace, batch: str) -> str:
    """`dvc add` the accepted batch and commit its .dvc file; returns the commit."""
    dvc(ws, "add", "-q", ws.rel(ws.batch(batch)))
    return commit(ws, f"batch {batch}: accepted data")


def champion(settings: Settings) -> tuple[str, Path] | None:
    """(version, local checkpoint) of models:/<name>@champion, or None when there is none yet."""
    from segloop.registry import CHAMPION, _alias_version, download_checkpoint, registry_client

    client, store = registry_client(settings)
    name = settings.registry.model_name
    version = _alias_version(client, name, CHAMPION)
    if version is None:
        return None
    return version, download_checkpoint(client, store, client.get_model_version(name, version))


def _reference(ws: Workspace, state: LoopState, version: str, domain: str, model: Path, settings: Settings) -> Path:
    """Champion v`version`'s reference for `domain`: a seeded sample of the domain's training split."""
    from segloop.drift.features import file_sha256
    from segloop.drift.reference import build_reference

    out = ws.root / "reference" / f"v{version}" / domain
    if not (out / "reference.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        d = settings.drift
        build_reference(ws.root / state.trained_domains[domain], d.reference_size, d.reference_seed, out,
                        file_sha256(model)[:16], f"models:/{settings.registry.model_name}/{version}")
    return out


def check_drift(ws: Workspace, batch: BatchInfo, champ: tuple[str, Path], settings: Settings) -> dict:
    """Drift of the batch against each domain the champion was trained on.

    Data drift only if the batch differs from every one of them (it looks like none of
    the champion's data); the closest reference (largest adjusted p-value) is reported.
    Performance drift: the champion's mIoU on the batch vs its held-out mIoU on the
    batch's domain (the best of its domains for a domain it never saw).
    """
    from segloop.drift.features import load_champion
    from segloop.runs import drift_step

    state = read_state(ws)
    trained = state.trained_domains
    if not trained:  # a champion made outside the loop: its training data is unknown here
        return {"drift": True, "data_drift": None, "performance_drift": None, "score": None, "closest_domain": None,
                "drifted_features": [], "quality": "not checked", "report": None, "per_reference": {},
                "reason": "no reference: the loop has not seen the champion's training data; updating on this batch"}
    version, path = champ
    model = load_champion(path)
    scores = state.scores.get(version, {})
    held_out = scores.get(batch.domain) if batch.domain in trained else max(scores.values(), default=None)
    results = {}
    for domain in trained:
        ref = _reference(ws, state, version, domain, path, settings)
        results[domain], _ = drift_step(
            settings, ref, ws.batch(batch.batch) / "accepted", ws.root / "steps" / batch.batch / "drift" / domain,
            model, ws.root / ".cache" / "drift", held_out,
            {"segloop.batch": batch.batch, "segloop.reference_domain": domain, "segloop.model_version": version},
            name=f"{batch.batch} vs {domain}",
        )
    closest = max(results, key=lambda d: results[d]["score"])
    r = results[closest]
    data_drift = all(x["data_drift"] for x in results.values())
    return {
        "drift": bool(data_drift or r["performance_drift"]), "data_drift": data_drift,
        "performance_drift": r["performance_drift"], "score": r["score"], "closest_domain": closest,
        "drifted_features": r["drifted_features"], "quality": r["quality"]["reason"],
        "report": ws.rel(ws.root / "steps" / batch.batch / "drift" / closest / "drift.html"),
        "per_reference": {d: {"data_drift": x["data_drift"], "score": x["score"]} for d, x in results.items()},
    }


def should_update(champ: tuple[str, Path] | None, drift: dict | None) -> bool:
    """The loop's policy for training: bootstrap when there is no champion, update the
    champion when the batch drifted (its data looks like none of the champion's domains,
    or the champion's quality on it dropped); otherwise the champion already serves it."""
    return champ is None or bool(drift and drift["drift"])


@dataclass(frozen=True)
class Candidate:
    """A model trained by a step: its registered version and what it was trained on."""

    version: str
    trained_on: list[str]  # training folders, relative to the workspace
    pooled: list[str]  # of those, splits of earlier refused batches of the domain
    images_seen: int | None


def train_model(ws: Workspace, batch: BatchInfo, champ: tuple[str, Path] | None, settings: Settings) -> Candidate:
    """Bootstrap (no champion: train from scratch) or update the champion on the batch.

    An update trains on the batch and on the domain's pool (training splits of its
    earlier refused batches), starting from the champion. The step is DVC stage
    train-/update-<batch>, run by `dvc repro` in its own process (what ran is exactly
    what dvc.yaml says; a crash in training cannot take the flow down with it).
    """
    b, domain = batch.batch, batch.domain
    state = read_state(ws)
    train, val, out = ws.split(b, "train"), ws.split(b, "val"), ws.root / "models" / b
    pooled = [ws.root / p for p in state.pool.get(domain, [])] if champ is not None else []
    # The loop's stages are the ones that register into the loop's model (ad-hoc runs register nowhere).
    data = ("".join(f"--data {ws.rel(x)} " for x in [train, *pooled])
            + f"--val {ws.rel(val)} --out {ws.rel(out)} --domain {domain} --register {settings.registry.model_name}")
    if champ is None:
        run_stage(ws, f"train-{b}", f"segloop train --params params.yaml {data}", [train, val], [out], STAGE_PARAMS)
        return Candidate(registered_version(ws, settings, out, {"segloop.batch": b}), [ws.rel(train)], [], _images_seen(out))
    parent = _parent_checkpoint(ws, state, champ)
    replay = ws.root / state.replay if state.replay else None
    joint = settings.continual.strategy == "joint"  # the only strategy that retrains on earlier batches
    seen = [ws.root / p for p in state.trained_domains.values()] if joint else []
    # The new batch's validation split first, then every learnt domain's: the update keeps
    # the epoch that passes the gate's rules on them (continual.select), not one that
    # forgot the old domains for the new one.
    old_vals = [ws.root / Path(p).parent / "val" for d, p in state.trained_domains.items() if d != domain]
    cmd = (f"segloop update --params params.yaml --parent {ws.rel(parent)} {data}" + "".join(f" --val {ws.rel(v)}" for v in old_vals)
           + (f" --replay {ws.rel(replay)}" if replay else "") + "".join(f" --seen {ws.rel(x)}" for x in seen))
    deps = [parent, train, *pooled, val, *old_vals, *([replay] if replay else []), *seen]
    run_stage(ws, f"update-{b}", cmd, deps, [out], STAGE_PARAMS)
    version = registered_version(ws, settings, out, {"segloop.batch": b, "segloop.parent_version": champ[0]})
    return Candidate(version, [ws.rel(x) for x in [train, *pooled]], [ws.rel(x) for x in pooled], _images_seen(out))


def _images_seen(out: Path) -> int | None:
    metrics = out / "train_metrics.json"
    return json.loads(metrics.read_text())["images_seen"] if metrics.exists() else None


def registered_version(ws: Workspace, settings: Settings, out: Path, tags: dict[str, Any]) -> str:
    """The version the stage registered (its registered.json), tagged with `tags`."""
    from segloop.runs import REGISTERED

    path = out / REGISTERED
    if not path.exists():
        raise ValueError(f"{path}: missing; the loop needs tracking.enabled: true (models are promoted through the registry)")
    version = json.loads(path.read_text())["version"]
    tag_version(settings, version, tags)
    return version


def _parent_checkpoint(ws: Workspace, state: LoopState, champ: tuple[str, Path]) -> Path:
    """The champion's checkpoint inside the workspace (a DVC dependency of the update)."""
    batch = state.champion_batch
    if batch and state.champion == champ[0] and (ws.root / "models" / batch / "best.pt").exists():
        return ws.root / "models" / batch / "best.pt"
    # A champion made outside the loop: bring its checkpoint in, versioned by DVC.
    out = ws.root / "models" / f"champion-v{champ[0]}" / "best.pt"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(champ[1], out)
        dvc(ws, "add", "-q", ws.rel(out.parent))
    return out


def held_out_sets(ws: Workspace, batch: BatchInfo) -> dict[str, Path]:
    """Every domain's held-out set so far, plus this batch's test split for a new domain."""
    state = read_state(ws)
    sets = {d: ws.root / p for d, p in state.heldout.items()}
    sets.setdefault(batch.domain, ws.split(batch.batch, "test"))
    return sets


def learnt_domains(state: LoopState) -> list[str] | None:
    """The domains the gate protects: those a promoted champion was trained on. None (protect
    every domain) for a champion made outside the loop, whose training data is unknown here."""
    return list(state.trained_domains) if state.trained_domains else None


def gate_candidate(ws: Workspace, batch: BatchInfo, version: str, settings: Settings) -> dict:
    from segloop.registry import gate

    out = ws.root / "steps" / batch.batch / "gate"
    learnt = learnt_domains(read_state(ws))
    d = gate(settings, version, held_out_sets(ws, batch), batch.domain, out, learnt=learnt)
    return {"promoted": d["promoted"], "reasons": d["reasons"], "decision": d["decision_uri"],
            "learnt": d["learnt"], "before": {k: v["champion"] for k, v in d["metrics"].items()},
            "after": {k: v["candidate"] for k, v in d["metrics"].items()}}


def champion_scores(ws: Workspace, batch: BatchInfo, champ: tuple[str, Path], settings: Settings) -> dict[str, float]:
    """The champion's mIoU on every held-out set (cached in state.json per version)."""
    from segloop.evaluate import evaluate

    cached = read_state(ws).scores.get(champ[0], {})
    out = {}
    for domain, folder in held_out_sets(ws, batch).items():
        if domain not in cached:
            cached[domain] = evaluate(champ[1], folder, ws.root / "steps" / batch.batch / "eval" / domain, settings.eval)["miou"]
        out[domain] = cached[domain]
    return out


def new_replay(ws: Workspace, batch: BatchInfo, settings: Settings) -> str:
    """The replay buffer after a promotion: the previous one plus the batch's training split (reservoir)."""
    from segloop.data.replay import update_buffer

    b, state = batch.batch, read_state(ws)
    prev = ws.root / state.replay if state.replay else None
    out, train = ws.root / "replay" / b, ws.split(b, "train")
    r = settings.continual.replay
    update_buffer(prev, train, b, r.size, settings.split.seed, out, r.sampling)
    cmd = (f"segloop replay-update --params params.yaml --batch {ws.rel(train)} --batch-id {b} --out {ws.rel(out)}"
           + (f" --buffer {ws.rel(prev)}" if prev else ""))
    record_stage(ws, f"replay-{b}", cmd, [train, *([prev] if prev else [])], [out], ["continual.replay", "split.seed"])
    return ws.rel(out)


def fold_step(state: LoopState, ws: Workspace, record: StepRecord, replay: str | None) -> LoopState:
    """state.json after the step: the domain's held-out set known; a promotion makes the domain
    learnt (its pool is now in the champion); a refusal keeps the batch's training split in
    its domain's pool for the next update of that domain."""
    b, domain, train = record.batch, record.domain, ws.rel(ws.split(record.batch, "train"))
    state.heldout.setdefault(domain, ws.rel(ws.split(b, "test")))
    if record.promoted:
        state.trained_domains.setdefault(domain, train)
        state.champion_batch, state.replay = b, replay
        state.pool.pop(domain, None)
    elif record.kept_in_pool:
        state.pool.setdefault(domain, []).append(train)
    if record.champion_version is not None:
        state.champion = record.champion_version
        state.scores.setdefault(record.champion_version, {}).update(record.miou_after)
    return state


def finish(ws: Workspace, record: StepRecord, replay: str | None) -> str:
    """Fold the step into state.json, write the marker and commit both: the step is now done."""
    write_state(ws, fold_step(read_state(ws), ws, record, replay))
    ws.marker(record.batch).parent.mkdir(exist_ok=True)
    write_json(ws.marker(record.batch), record.to_dict())
    return commit(ws, f"batch {record.batch}: {record.summary}")


def summary_line(rec: StepRecord) -> str:
    d = rec.drift
    if d is None:
        parts = ["bootstrap"]
    elif d["score"] is None:
        parts = ["drift (no reference yet)"]
    else:
        parts = [f"{'drift' if d['drift'] else 'no drift'} (score {d['score']:.2g}, closest {d['closest_domain']}"
                 + (", performance drop" if d["performance_drift"] else "") + ")"]
    if rec.updated:
        pooled = f" (+{len(rec.pooled)} pooled batch{'es' if len(rec.pooled) > 1 else ''})" if rec.pooled else ""
        parts.append(f"v{rec.candidate_version}{pooled} " + ("promoted" if rec.promoted else "rejected"))
        failed = [r for r in rec.reasons if r.startswith("FAIL")]
        if failed:
            parts.append(failed[0])
        if rec.kept_in_pool:
            parts.append(f"training split kept in the {rec.domain} pool")
    else:
        parts.append("no update")
    return " -> ".join(parts)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def tag_version(settings: Settings, version: str, tags: dict[str, Any]) -> None:
    """Record `tags` about a version: the few a reviewer reads on the version, the rest on its run."""
    from segloop.registry import registry_client, set_version_tags

    client, _ = registry_client(settings)
    set_version_tags(client, settings.registry.model_name, version, tags)


# ---------------------------------------------------------------- one transactional step

def direct(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a sub-step as a plain call (tests, benchmarks); a flow passes a Prefect task wrapper."""
    return fn(*args)


def prepare(ws: Workspace, settings: Settings, batch: str) -> None:
    """Workspace repo ready; leftovers of a crashed attempt on this batch undone."""
    init_workspace(ws, settings)
    undo_unfinished_promotion(ws, settings, batch)
    reset_batch(ws, batch)


def process_batch(ws: Workspace, batch_dir: Path, settings: Settings,
                  call: Callable[..., Any] = direct) -> StepRecord:
    """One batch through the whole step; returns its record (also processed/<batch>.json).

    prepare (undo a crashed attempt) -> ingest -> version -> champion -> drift -> update
    if `should_update` -> gate -> replay on promotion -> state, marker, commit -> tags.
    `call(name, fn, *args)` runs each sub-step: `direct` here, a Prefect task with retries
    on I/O in continual_flow. The commit in `finish` is what makes the step count.
    """
    b = batch_dir.name
    with workspace_lock(ws):
        call("prepare", prepare, ws, settings, b)
        info = call("ingest", ingest, ws, batch_dir, settings)
        call("version", version_batch, ws, b)
        champ = call("champion", champion, settings)
        rec = StepRecord(b, info.domain, now(), info.accepted, info.quarantined)
        if champ is not None:
            rec.drift = call("drift", check_drift, ws, info, champ, settings)
        candidate = None
        if should_update(champ, rec.drift):
            candidate = call("update", train_model, ws, info, champ, settings)
            decision = call("gate", gate_candidate, ws, info, candidate.version, settings)
            rec.updated, rec.candidate_version, rec.promoted = True, candidate.version, decision["promoted"]
            rec.reasons, rec.decision, rec.learnt = decision["reasons"], decision["decision"], decision["learnt"] or []
            rec.trained_on, rec.pooled, rec.images_seen = candidate.trained_on, candidate.pooled, candidate.images_seen
            rec.candidate_miou, rec.kept_in_pool = decision["after"], not decision["promoted"]
            before, after = decision["before"], decision["after"] if decision["promoted"] else decision["before"]
        else:
            before = after = call("evaluate-champion", champion_scores, ws, info, champ, settings)
        rec.champion_version = rec.candidate_version if rec.promoted else (champ[0] if champ else None)
        rec.miou_before = {} if champ is None else before
        rec.miou_after = {} if rec.champion_version is None else after
        replay = call("replay", new_replay, ws, info, settings) if rec.promoted else None
        rec.summary = summary_line(rec)
        commit_sha = call("record", finish, ws, rec, replay)
        if candidate is not None:
            stage = ("train-" if champ is None else "update-") + b
            call("tag", tag_version, settings, candidate.version,
                 {"segloop.loop.commit": commit_sha, "segloop.loop.stage": stage, "segloop.loop.workspace": str(ws.root),
                  "segloop.loop.params_md5": _md5(ws.root / "params.yaml")})
        rec.commit = commit_sha
    return rec


def _md5(path: Path) -> str:
    from segloop.tracking import file_md5

    return file_md5(path)
