"""The continual loop's steps, as plain functions over a workspace (flows/ only orchestrates).

One batch = one step (`process_batch`, which flows/ wraps): ingest (validate, quarantine,
split) -> version with DVC -> drift check against the champion's references -> bootstrap
or update (`update_reason`) -> gate (protecting the domains the champion has learnt) -> on
promotion, new replay buffer; on refusal, the batch's training split stays in its domain's
pool for the next update of that domain -> step record, state and marker committed together.

The workspace is the loop's own git + DVC repository (`flows.workspace`):

    incoming/<batch>/          batches arrive here (images/, masks/, batch.json {"domain": ...} or READY, written last)
    batches/<batch>/           accepted files and their train/val/test split (tracked by batches/<batch>.dvc)
    quarantine/<batch>/        rejected files (ignored by git) and reasons.jsonl (tracked: reason and sha256 of each)
    models/<batch>/            the model trained on the batch (out of DVC stage train-/update-<batch>)
    replay/<batch>/            replay buffer version after the batch (stage replay-<batch>)
    reference/v<N>/<domain>/   drift reference of champion v<N> for each domain it was trained on (tracked by its .dvc)
    steps/<batch>/             drift and gate reports of the step
    params/<batch>.yaml        the settings the step ran with: its stages' params (a later run's
                               settings never touch them)
    processed/<batch>.json     the step record; committed (in HEAD), it means "done, never again"
    labels/requests/<batch>/   label request of a drifted unlabelled batch (tracked by its .dvc):
                               images, drafts, tasks.json (Label Studio), request.json
    labels/done/<batch>/       labels dropped for a request: masks/<stem>.png, then READY written
                               last (ignored by git; `pending_labels`, imported by monitor_flow)
    labelled/<batch>.json      the record of the step that imported its labels (`import_labels`):
                               committed, the batch's labels are in and trained on, never again
    failed/<batch>/            dead letters: a batch refused or failing flows.max_attempts times,
                               with FAILED.json (ignored by git)
    .attempts/<batch>.json     attempts and errors of a pending batch (ignored by git: survives the reset of a retry)
    params.yaml, dvc.yaml, dvc.lock, state.json (segloop.records.LoopState); params.yaml holds the
                               latest run's settings, for reading: no stage depends on it

The batch contract: a batch folder's name is `[A-Za-z0-9][A-Za-z0-9_-]*` (it names DVC stages
and paths in their commands; another name is refused into failed/ at once), and a batch is
ready, so picked up, only once it holds `READY` or `batch.json`, written after everything
else (a half-copied folder is left alone). Folders starting with "." are never batches.

Training and updates are DVC stages (train-/update-<batch>) that the loop runs with
`dvc repro -s`; the replay buffer step is written to dvc.yaml and `dvc commit`ted. So
`dvc repro` finds everything up to date and `git checkout <commit> && dvc checkout &&
dvc repro -s -f <stage>` rebuilds a step. The git
commit made at the end of a step is the only thing that makes it count: a crash before
it leaves the batch pending and the next run starts the batch again from that commit.
Recovery first resets the workspace to that commit and only then reads state.json.
Every command the loop runs (git, dvc, the training under `dvc repro`) dies with the
process that runs the loop, even under `kill -9` (`segloop.lifeline`).
With `flows.git_remote` and `flows.dvc_remote` the workspace lives on its remotes too: a
step pulls at its start and pushes after its commit (`pull_workspace`, `push_workspace`),
and a model stage's run cache is pushed as soon as it ran (`push_run_cache`), so any host
can run the next step or redo a step whose host died, without training it twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from segloop import lifeline
from segloop.config import Settings
from segloop.records import BatchInfo, LoopState, StepRecord, write_json
from segloop.redaction import redact

STATE, MARKER_DIR, BATCH_INFO, READY = "state.json", "processed", "batch.json", "READY"
FAILED_DIR, FAILED_INFO, ATTEMPTS_DIR = "failed", "FAILED.json", ".attempts"
BATCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
# What the loop writes at the top of the workspace: a reset to the last step commit cleans these.
LABELLED_DIR = "labelled"
AWAITING, LABELLED = "awaiting-labels", "labelled"  # StepRecord.status of an unlabelled batch, then of its labels' step
LOOP_FOLDERS = (
    "batches",
    "quarantine",
    "models",
    "replay",
    "reference",
    "steps",
    "params",
    MARKER_DIR,
    "labels",
    LABELLED_DIR,
)
IGNORED = (
    "/incoming/",
    "/steps/",
    "/.cache/",
    "/.lock",
    f"/{FAILED_DIR}/",
    f"/{ATTEMPTS_DIR}/",
    "/quarantine/*/*",
    "!/quarantine/*/reasons.jsonl",
    "/labels/done/",  # people's drops: versioned once imported (batches/<batch>/labelled), never cleaned by a reset
)
# What a model step's output depends on (where it is logged and registered does not).
STAGE_PARAMS = ["data", "model", "train", "continual"]


@dataclass(frozen=True)
class Workspace:
    root: Path
    incoming: Path
    # The resolved store, given to the stages DVC runs in their environment when it holds a
    # secret (never written to the workspace's params.yaml); None: params.yaml names it.
    tracking_uri: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, settings: Settings) -> Workspace:
        f = settings.flows
        uri = None
        if settings.tracking.enabled:
            from segloop.tracking import resolve_store

            uri = resolve_store(settings.tracking).uri
        return cls(f.workspace.resolve(), f.incoming_dir.resolve(), uri)

    def batch(self, b: str) -> Path:
        return self.root / "batches" / b

    def split(self, b: str, part: str) -> Path:
        return self.batch(b) / "split" / part

    def marker(self, b: str) -> Path:
        return self.root / MARKER_DIR / f"{b}.json"

    def request(self, b: str) -> Path:
        return self.root / "labels" / "requests" / b

    @property
    def labels_done(self) -> Path:
        return self.root / "labels" / "done"

    def labels_drop(self, b: str) -> Path:
        return self.labels_done / b

    def labelled_marker(self, b: str) -> Path:
        return self.root / LABELLED_DIR / f"{b}.json"

    def step_params(self, b: str) -> Path:
        return self.root / "params" / f"{b}.yaml"

    def failed(self, b: str) -> Path:
        return self.root / FAILED_DIR / b

    def attempts(self, b: str) -> Path:
        return self.root / ATTEMPTS_DIR / f"{b}.json"

    def rel(self, path: Path) -> str:
        return os.path.relpath(path, self.root)

    def per_batch(self, b: str) -> list[Path]:
        """Everything a step on batch `b` writes: removed before a retry."""
        r = self.root
        return [
            self.batch(b),
            r / "batches" / f"{b}.dvc",
            r / "quarantine" / b,
            r / "models" / b,
            r / "replay" / b,
            r / "steps" / b,
            self.step_params(b),
            self.marker(b),
            self.request(b),
            Path(f"{self.request(b)}.dvc"),
        ]


# ---------------------------------------------------------------- workspace repo


def _env(ws: Workspace) -> dict[str, str]:
    """Stages DVC runs call `segloop` (and we call `dvc`): the ones installed beside this Python.
    A store URI with a secret reaches them as $MLFLOW_TRACKING_URI (params.yaml says null)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if ws.tracking_uri and redact(ws.tracking_uri) != ws.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = ws.tracking_uri
    return env


def _run(ws: Workspace, *cmd: str) -> str:
    proc = lifeline.run(list(cmd), cwd=ws.root, env=_env(ws))
    if proc.returncode:
        raise RuntimeError(
            redact(f"{shlex.join(cmd)} (in {ws.root}) failed:\n{proc.stderr.strip() or proc.stdout.strip()}")
        )
    return proc.stdout.strip()


def git(ws: Workspace, *args: str) -> str:
    return _run(ws, "git", "-c", "user.name=segloop", "-c", "user.email=segloop@localhost", *args)


def dvc(ws: Workspace, *args: str) -> str:
    return _run(ws, "dvc", *args)


def init_workspace(ws: Workspace, settings: Settings) -> None:
    """Create the workspace repo on first use; always refresh params.yaml from `settings`
    (the latest run's settings, for reading: a step's stages read params/<batch>.yaml).

    Commits only its own files (params, state, git/DVC config): anything else in the tree
    is a crashed step's leftovers, which `reset_to_last_step` removes, never commits."""
    ws.root.mkdir(parents=True, exist_ok=True)
    ws.incoming.mkdir(parents=True, exist_ok=True)
    if not (ws.root / ".git").exists():
        git(ws, "init", "-q", "-b", "main")
    if not (ws.root / ".dvc").exists():
        dvc(ws, "init", "-q")
        dvc(ws, "config", "core.analytics", "false")
    ignore = ws.root / ".gitignore"
    # incoming/ is the operator's drop box; steps/ holds reports (also logged to MLflow);
    # failed/ holds dead-lettered batches (raw images) and .attempts/ must survive a reset.
    # Git holds text only: of quarantine/<batch>/, reasons.jsonl (each file's reason and sha256);
    # the rejected files themselves may be anything (a link, a huge image) and stay beside it.
    lines = ignore.read_text().splitlines() if ignore.exists() else []
    missing = [x for x in IGNORED if x not in lines]
    if missing:
        ignore.write_text("".join(f"{x}\n" for x in lines + missing))
    _write_params(settings, ws.root / "params.yaml")
    if not (ws.root / STATE).exists():
        write_state(ws, LoopState())
    own = [".gitignore", "params.yaml", STATE, ".dvc/config", ".dvc/.gitignore", ".dvcignore"]
    git(ws, "add", "--", *[x for x in own if (ws.root / x).exists()])
    if git(ws, "diff", "--cached", "--name-only"):
        git(ws, "commit", "-q", "-m", "workspace: params")


def _write_params(settings: Settings, path: Path) -> None:
    """`settings` as a params file for the stages run in the workspace."""
    raw = settings.model_dump(mode="json")
    # The store as an absolute URI: stages run from the workspace must log to the same one.
    # One with a password or token is never written: the stages get it in their environment.
    from segloop.tracking import resolve_store

    uri = resolve_store(settings.tracking).uri if settings.tracking.enabled else None
    raw["tracking"]["uri"] = uri if uri is None or redact(uri) == uri else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def write_step_params(ws: Workspace, settings: Settings, batch: str) -> None:
    """params/<batch>.yaml: the settings this step runs with, the only params file its stages
    read and depend on. Written once per step and committed with it, so a later run with
    other settings (which rewrites the workspace's params.yaml) leaves `dvc status` clean.
    No resume state (last.pt, 4x best.pt): `dvc repro` reruns a stage from scratch, and its
    outputs go to the DVC cache (and remote) every step."""
    train = settings.train.model_copy(update={"resume_every_s": None})
    _write_params(settings.model_copy(update={"train": train}), ws.step_params(batch))


def commit(ws: Workspace, message: str) -> str:
    """Commit everything tracked or new (data itself is in DVC); returns HEAD."""
    git(ws, "add", "-A")
    if git(ws, "status", "--porcelain"):
        git(ws, "commit", "-q", "-m", message)
    return git(ws, "rev-parse", "HEAD")


# ---------------------------------------------------------------- remotes (flows.git_remote, flows.dvc_remote)

GIT_REMOTE, DVC_REMOTE = "origin", "shared"


def _remotes(ws: Workspace, settings: Settings) -> None:
    """Point the workspace at the configured remotes (DVC's in .dvc/config.local: per host, never committed)."""
    urls = git(ws, "remote").split()
    git(ws, "remote", "set-url" if GIT_REMOTE in urls else "add", GIT_REMOTE, str(settings.flows.git_remote))
    if (ws.root / ".dvc").exists():
        dvc(ws, "remote", "add", "--local", "--force", "--default", DVC_REMOTE, str(settings.flows.dvc_remote))


def pull_workspace(ws: Workspace, settings: Settings) -> None:
    """Start of a step on any host: the workspace at the remote's last step, its DVC outputs and
    run cache pulled. A local step commit the remote lacks (pushing it failed) is pushed first.
    No-op without remotes."""
    if settings.flows.git_remote is None:
        return
    ws.root.mkdir(parents=True, exist_ok=True)
    if not (ws.root / ".git").exists():
        git(ws, "init", "-q", "-b", "main")
    _remotes(ws, settings)
    git(ws, "fetch", "-q", GIT_REMOTE)
    remote = f"refs/remotes/{GIT_REMOTE}/main"
    if subprocess.run(["git", "rev-parse", "-q", "--verify", remote], cwd=ws.root, capture_output=True).returncode:
        return  # nothing pushed yet: this host's step makes the first commit
    if not has_head(ws) or _is_ancestor(ws, "HEAD", remote):
        git(ws, "reset", "-q", "--hard", remote)
        _remotes(ws, settings)  # .dvc/ may only now exist
    elif _is_ancestor(ws, remote, "HEAD"):
        push_workspace(ws, settings)
    else:
        raise RuntimeError(
            f"{ws.root}: its history and {settings.flows.git_remote}'s have diverged (two hosts ran a step at "
            "once?); one loop run at a time is the deployment's concurrency limit"
        )
    dvc(ws, "pull", "-q", "--run-cache", "-r", DVC_REMOTE)


def _is_ancestor(ws: Workspace, a: str, b: str) -> bool:
    return subprocess.run(["git", "merge-base", "--is-ancestor", a, b], cwd=ws.root).returncode == 0


def push_workspace(ws: Workspace, settings: Settings) -> None:
    """After a step's commit: its DVC outputs and run cache, then the commit (so the remote's
    history never names data the DVC remote lacks). No-op without remotes."""
    if settings.flows.git_remote is None:
        return
    push_run_cache(ws, settings)
    git(ws, "push", "-q", GIT_REMOTE, "HEAD:refs/heads/main")


def push_run_cache(ws: Workspace, settings: Settings) -> None:
    """Right after a model stage, before the step commits: its outputs and DVC's run cache to
    the DVC remote. A host that redoes the step after this one died restores the model, and
    the version it registered (registered.json), from the run cache instead of training and
    registering again. No-op without remotes."""
    if settings.flows.dvc_remote is None:
        return
    _remotes(ws, settings)
    dvc(ws, "push", "-q", "--run-cache", "-r", DVC_REMOTE)


def read_state(ws: Workspace) -> LoopState:
    return LoopState.read(ws.root / STATE)


def write_state(ws: Workspace, state: LoopState) -> None:
    state.write(ws.root / STATE)


def has_head(ws: Workspace) -> bool:
    if not (ws.root / ".git").exists():
        return False
    return (
        subprocess.run(["git", "rev-parse", "-q", "--verify", "HEAD"], cwd=ws.root, capture_output=True).returncode == 0
    )


def processed(ws: Workspace) -> set[str]:
    """Batches whose step is committed: their marker is in HEAD (a marker on disk only is a crashed step's)."""
    return _committed(ws, MARKER_DIR)


def labels_imported(ws: Workspace) -> set[str]:
    """Batches whose labels were imported and trained on: labelled/<batch>.json is in HEAD."""
    return _committed(ws, LABELLED_DIR)


def _committed(ws: Workspace, folder: str) -> set[str]:
    if not has_head(ws):
        return set()
    names = git(ws, "ls-tree", "-z", "--name-only", "HEAD", f"{folder}/").split("\0")
    return {Path(n).name.removesuffix(".json") for n in names if n.endswith(".json")}


def pending_labels(ws: Workspace) -> list[Path]:
    """Label drops to import, oldest first: labels/done/<batch>/ holding `READY` (written after its
    masks/, as for batches) for a batch whose label request waits (status awaiting-labels, labels
    not imported at HEAD). A drop for any other batch is left alone; `segloop labels import` says why."""
    done_dir = ws.labels_done
    if not done_dir.is_dir():
        return []
    asked, imported = processed(ws), labels_imported(ws)
    drops = [
        p
        for p in done_dir.iterdir()
        if p.is_dir()
        and not p.is_symlink()
        and (p / READY).is_file()
        and p.name in asked
        and p.name not in imported
        and StepRecord.read(ws.marker(p.name)).status == AWAITING
    ]
    return sorted(drops, key=lambda p: ((p / READY).stat().st_mtime, p.name))


def is_ready(batch_dir: Path) -> bool:
    """The readiness rule: `READY` or `batch.json` is written last, once every file is in place."""
    return (batch_dir / READY).is_file() or (batch_dir / BATCH_INFO).is_file()


def pending_batches(ws: Workspace) -> list[Path]:
    """Ready batch folders in incoming/ not processed at HEAD, oldest first (modification time, then name).

    Not ready (no READY/batch.json yet) and hidden folders wait; names are checked by
    `process_batch`, which refuses a bad one into failed/ (so it is listed, once)."""
    if not ws.incoming.is_dir():
        return []
    done = processed(ws)
    batches = [
        p
        for p in ws.incoming.iterdir()
        if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and p.name not in done and is_ready(p)
    ]
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


def reset_to_last_step(ws: Workspace) -> None:
    """The workspace back to its last commit (a step's, or init's): tracked files reset, and
    whatever a crashed step left untracked in the loop's folders removed (ignored files,
    e.g. earlier steps' DVC outputs, the DVC cache and incoming/, stay)."""
    if not has_head(ws):
        return
    git(ws, "reset", "-q", "--hard", "HEAD")
    git(ws, "clean", "-q", "-d", "-f", "--", *LOOP_FOLDERS, f".{STATE}.tmp")


def reset_batch(ws: Workspace, batch: str) -> None:
    """Undo a crashed attempt on `batch`: back to the last completed step, the batch's outputs gone."""
    if batch in processed(ws):
        raise ValueError(f"batch {batch}: already processed ({ws.marker(batch)} committed); a batch is processed once")
    reset_to_last_step(ws)
    for path in ws.per_batch(batch):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()


def _stage_add(
    ws: Workspace,
    name: str,
    cmd: str,
    deps: list[Path],
    outs: list[Path],
    params: list[str],
    params_file: Path | None = None,
) -> None:
    args = ["stage", "add", "--force", "-n", name]
    for d in deps:
        args += ["-d", ws.rel(d)]
    for o in outs:
        args += ["-o", ws.rel(o)]
    if params:  # keys of `params_file` (a step's params/<batch>.yaml), else of params.yaml
        args += ["-p", (f"{ws.rel(params_file)}:" if params_file else "") + ",".join(params)]
    dvc(ws, *args, cmd)


# DVC's hints after `repro` (git add, autostage, dvc push) do not apply here: the step's
# commit adds everything, and `push_workspace` pushes when the workspace has remotes.
_DVC_ADVICE = re.compile(
    r"^\s*$|^To track the changes with git|^\s*git add |^To enable auto staging|"
    r"^\s*dvc config core.autostage|^Use `dvc push`"
)


def run_stage(
    ws: Workspace,
    name: str,
    cmd: str,
    deps: list[Path],
    outs: list[Path],
    params: list[str],
    params_file: Path | None = None,
    pull: bool = False,
) -> None:
    """Write stage `name` to dvc.yaml and run it (`dvc repro -s`), its output shown as it comes.
    `pull`: a run another host pushed to the DVC remote's run cache is restored from there."""
    _stage_add(ws, name, cmd, deps, outs, params, params_file)
    tail: list[str] = []
    # Its own process group (with the training it starts), killed if this process dies or gives up.
    with lifeline.child(
        ["dvc", "repro", *(["--pull"] if pull else []), "-s", name],
        cwd=ws.root,
        env=_env(ws),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as proc:
        assert proc.stdout is not None  # stdout=PIPE
        for line in proc.stdout:
            line = redact(line)
            if not _DVC_ADVICE.match(line):
                print(line.rstrip(), flush=True)
            tail = (tail + [line])[-30:]
        proc.wait()
    if proc.returncode:
        raise RuntimeError(redact(f"stage {name} failed (dvc repro -s {name} in {ws.root}):\n{''.join(tail)}"))


def record_stage(
    ws: Workspace,
    name: str,
    cmd: str,
    deps: list[Path],
    outs: list[Path],
    params: list[str],
    params_file: Path | None = None,
) -> None:
    """Write `name` to dvc.yaml as the command that produced `outs` here, and commit their hashes to dvc.lock."""
    _stage_add(ws, name, cmd, deps, outs, params, params_file)
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
        raise ValueError(f'{info}: expected a JSON object like {{"domain": "fog"}}') from None
    if not isinstance(domain, str) or not domain.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"{info}: 'domain' must be a name of letters, digits, - or _ (got {domain!r})")
    return domain


def batch_labelled(batch_dir: Path) -> bool:
    """Labelled unless batch.json says `"labelled": false` or the batch has no masks/ folder."""
    info = batch_dir / BATCH_INFO
    said = json.loads(info.read_text()).get("labelled", True) if info.is_file() else True
    if not isinstance(said, bool):
        raise ValueError(f"{info}: 'labelled' must be true or false (got {said!r})")
    return said and os.path.lexists(batch_dir / "masks")


def ingest(ws: Workspace, batch_dir: Path, settings: Settings) -> BatchInfo:
    """Validate the batch (bad files to quarantine/ with reasons), split what is accepted.

    Fewer accepted pairs than a step needs (an empty or wholly rejected batch): nothing is
    split (`BatchInfo.split` empty) and the step records the batch as skipped. An unlabelled
    batch: its images validated and kept (accepted/images), never split."""
    from segloop.data.split import split_dataset
    from segloop.data.validate import SizeLimits, validate_folder, validate_images

    b = batch_dir.name
    domain = batch_domain(batch_dir)
    limits = SizeLimits(settings.data.min_side, settings.data.max_pixels)
    if not batch_labelled(batch_dir):
        found = validate_images(batch_dir, ws.batch(b) / "accepted", ws.root / "quarantine" / b, limits)
        if len(found.images) < settings.drift.min_images:
            shutil.rmtree(ws.batch(b), ignore_errors=True)
        return BatchInfo(b, domain, len(found.images), len(found.rejected), {}, labelled=False)
    result = validate_folder(
        batch_dir, ws.batch(b) / "accepted", ws.root / "quarantine" / b, settings.num_classes, limits, allow_empty=True
    )
    if len(result.accepted) < settings.drift.min_images:
        shutil.rmtree(ws.batch(b), ignore_errors=True)
        return BatchInfo(b, domain, len(result.accepted), len(result.rejected), {})
    counts = split_dataset(ws.batch(b) / "accepted", ws.batch(b) / "split", settings.split)
    return BatchInfo(b, domain, len(result.accepted), len(result.rejected), counts)


def version_batch(ws: Workspace, batch: str) -> None:
    """`dvc add` the accepted batch; its .dvc file is committed with the step (a commit here
    would be a step commit without a marker: recovery resets to step commits only)."""
    dvc(ws, "add", "-q", ws.rel(ws.batch(batch)))


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
        build_reference(
            ws.root / state.trained_domains[domain],
            d.reference_size,
            d.reference_seed,
            out,
            file_sha256(model)[:16],
            f"models:/{settings.registry.model_name}/{version}",
        )
    # Its images in DVC, not git (committed with the step). Checked apart from the build: a
    # crashed attempt's reset removes the untracked .dvc file but leaves the built (ignored) folder.
    if not Path(f"{out}.dvc").exists():
        if git(ws, "ls-files", "--", ws.rel(out)):  # a workspace from before: its git copy moves to DVC
            git(ws, "rm", "-r", "-q", "--cached", "--", ws.rel(out))
        dvc(ws, "add", "-q", ws.rel(out))
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
        return {
            "drift": True,
            "data_drift": None,
            "performance_drift": None,
            "score": None,
            "closest_domain": None,
            "drifted_features": [],
            "quality": "not checked",
            "report": None,
            "per_reference": {},
            "reason": "no reference: the loop has not seen the champion's training data; updating on this batch",
        }
    version, path = champ
    model = load_champion(path)
    scores = state.scores.get(version, {})
    held_out = scores.get(batch.domain) if batch.domain in trained else max(scores.values(), default=None)
    results = {}
    for domain in trained:
        ref = _reference(ws, state, version, domain, path, settings)
        results[domain], _ = drift_step(
            settings,
            ref,
            ws.batch(batch.batch) / "accepted",
            ws.root / "steps" / batch.batch / "drift" / domain,
            model,
            ws.root / ".cache" / "drift",
            held_out,
            {"segloop.batch": batch.batch, "segloop.reference_domain": domain, "segloop.model_version": version},
            name=f"{batch.batch} vs {domain}",
        )
    closest = max(results, key=lambda d: results[d]["score"])
    r = results[closest]
    data_drift = all(x["data_drift"] for x in results.values())
    verdict = {
        "drift": bool(data_drift or r["performance_drift"]),
        "data_drift": data_drift,
        "performance_drift": r["performance_drift"],
        "score": r["score"],
        "closest_domain": closest,
        "drifted_features": r["drifted_features"],
        "quality": r["quality"]["reason"],
        "quality_drop": r["quality"]["drop"],  # champion's held-out mIoU minus its mIoU on the batch
        "report": ws.rel(ws.root / "steps" / batch.batch / "drift" / closest / "drift.html"),
        "per_reference": {d: {"data_drift": x["data_drift"], "score": x["score"]} for d, x in results.items()},
    }
    record_drift_point(settings, batch, version, verdict, r)  # drift over time, where people look (if on)
    return verdict


def record_drift_point(settings: Settings, batch: BatchInfo, version: str, verdict: dict, closest: dict) -> None:
    """The batch's verdict into the Evidently workspace and latest.json (segloop.drift.history);
    `closest`: the drift.json of the closest reference (share drifted, confidences)."""
    from segloop.drift.history import DriftPoint, record_point

    workspace = settings.drift.evidently_workspace
    if workspace is None:
        return
    confidence = closest.get("confidence") or {}
    point = DriftPoint(
        model=settings.registry.model_name,
        batch=batch.batch,
        domain=batch.domain,
        time=now(),
        score=verdict["score"],
        share_drifted=closest["share_drifted"],
        confidence=confidence.get("current"),
        reference_confidence=confidence.get("reference"),
        drift=verdict["drift"],
        closest_domain=verdict["closest_domain"],
        model_version=version,
        alpha=settings.drift.alpha,
    )
    record_point(workspace, point)


def update_reason(
    champ: tuple[str, Path] | None, drift: dict | None, state: LoopState, domain: str, covered_drop: float | None = None
) -> str:
    """The loop's policy for training ("" = no update): bootstrap when there is no champion;
    update the champion when the batch drifted (its data looks like none of the champion's
    domains, or the champion's quality on it dropped), or when the batch is labelled data of
    a domain the champion is known to be poor at: met but never learnt (its update was
    refused) or weak (LoopState.weak). Otherwise the champion already serves it; so it does
    a drifted batch it covers (`covered`: an update there has next to nothing to gain)."""
    if champ is None:
        return "bootstrap"
    if drift and drift["drift"] and not covered(drift, covered_drop):
        return "drift"
    if domain in state.weak:
        return f"domain {domain} weak (under continual.learnt_ratio of the best domain)"
    if domain in state.heldout and domain not in state.trained_domains and domain not in state.covered:
        return f"domain {domain} not learnt yet (its last update was refused)"
    return ""


def covered(drift: dict | None, within: float | None) -> bool:
    """The batch's data drifted, but the champion's mIoU on its labels is at most `within`
    below its held-out mIoU (continual.covered_drop; None: never)."""
    drop = (drift or {}).get("quality_drop")
    return within is not None and bool(drift and drift["drift"]) and drop is not None and drop <= within


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
    shared = settings.flows.dvc_remote is not None  # a run another host pushed is pulled, not redone
    pooled = [ws.root / p for p in state.pool.get(domain, [])] if champ is not None else []
    # An update validates the new domain on this batch's split and its earlier batches' (one set;
    # state.heldout holds this batch only from its fold on). `segloop train` takes one folder.
    extra = validation_set(ws, state, domain) if champ is not None else []
    # The loop's stages are the ones that register into the loop's model (ad-hoc runs register nowhere).
    q = shlex.quote  # a stage's command runs through a shell: every path and name quoted
    params = ws.step_params(b)
    data = (
        "".join(f"--data {q(ws.rel(x))} " for x in [train, *pooled])
        + f"--val {q(os.pathsep.join(ws.rel(v) for v in [val, *extra]))} --out {q(ws.rel(out))} "
        f"--domain {q(domain)} --register {q(settings.registry.model_name)}"
    )
    if champ is None:
        run_stage(
            ws,
            f"train-{b}",
            f"segloop train --params {q(ws.rel(params))} {data}",
            [train, val],
            [out],
            STAGE_PARAMS,
            params,
            pull=shared,
        )
        push_run_cache(ws, settings)
        return Candidate(
            registered_version(ws, settings, out, {"segloop.batch": b}), [ws.rel(train)], [], _images_seen(out)
        )
    parent = _parent_checkpoint(ws, state, champ)
    replay = ws.root / state.replay if state.replay else None
    joint = settings.continual.strategy == "joint"  # the only strategy that retrains on earlier batches
    seen = [ws.root / p for p in state.trained_domains.values()] if joint else []
    # The new domain's validation set first, then every domain the gate protects (each pooled
    # over its batches): the update keeps the epoch that passes the gate's rules on them
    # (continual.select), not one that forgot the old domains for the new one.
    protected = learnt_domains(state) or state.heldout
    old_vals = [v for d in protected if d != domain and (v := validation_set(ws, state, d))]
    cmd = (
        f"segloop update --params {q(ws.rel(params))} --parent {q(ws.rel(parent))} {data}"
        + "".join(f" --val {q(os.pathsep.join(ws.rel(f) for f in v))}" for v in old_vals)
        + (f" --replay {q(ws.rel(replay))}" if replay else "")
        + "".join(f" --seen {q(ws.rel(x))}" for x in seen)
    )
    deps = [
        parent,
        train,
        *pooled,
        val,
        *extra,
        *(f for v in old_vals for f in v),
        *([replay] if replay else []),
        *seen,
    ]
    run_stage(ws, f"update-{b}", cmd, deps, [out], STAGE_PARAMS, params, pull=shared)
    push_run_cache(ws, settings)
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
        raise ValueError(
            f"{path}: missing; the loop needs tracking.enabled: true (models are promoted through the registry)"
        )
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


def state_with_batch(ws: Workspace, batch: BatchInfo) -> LoopState:
    """state.json as the step sees it before its fold: the batch's test split already in its
    domain's held-out set (LoopState.add_heldout; `fold_step` writes it)."""
    state = read_state(ws)
    state.add_heldout(batch.domain, ws.rel(ws.split(batch.batch, "test")))
    return state


def held_out_sets(ws: Workspace, state: LoopState) -> dict[str, list[Path]]:
    """Every domain's held-out set (LoopState.heldout), as folders."""
    return {d: [ws.root / p for p in tests] for d, tests in state.heldout.items()}


def validation_set(ws: Workspace, state: LoopState, domain: str) -> list[Path]:
    """A domain's validation set: the validation splits of the batches of its held-out set
    (empty ones, from batches too small to give one, left out)."""
    from segloop.data.files import IMAGES

    vals = [ws.root / Path(p).parent / "val" for p in state.heldout.get(domain, [])]
    return [v for v in vals if any((v / IMAGES).iterdir())]


def learnt_domains(state: LoopState) -> list[str] | None:
    """The domains the gate protects: those a promoted champion was trained on, and those it
    covers untrained (LoopState.covered). None (protect every domain) for a champion made
    outside the loop, whose training data is unknown here."""
    return [*state.trained_domains, *state.covered] if state.trained_domains else None


def gate_candidate(ws: Workspace, batch: BatchInfo, version: str, settings: Settings) -> dict:
    from segloop.gate import gate

    out = ws.root / "steps" / batch.batch / "gate"
    state = state_with_batch(ws, batch)
    d = gate(settings, version, held_out_sets(ws, state), batch.domain, out, learnt=learnt_domains(state))
    return {
        "promoted": d["promoted"],
        "reasons": d["reasons"],
        "decision": d["decision_uri"],
        "learnt": d["learnt"],
        "before": {k: v["champion"] for k, v in d["metrics"].items()},
        "after": {k: v["candidate"] for k, v in d["metrics"].items() if v["candidate"] is not None},
    }  # None: not servable


def champion_scores(ws: Workspace, batch: BatchInfo, champ: tuple[str, Path], settings: Settings) -> dict[str, float]:
    """The champion's mIoU on every held-out set (cached in state.json per version, for the
    sets as they were: a set this batch grows is scored again)."""
    from segloop.evaluate import evaluate

    state = state_with_batch(ws, batch)
    cached = state.scores.get(champ[0], {})
    out = {}
    for domain, folder in held_out_sets(ws, state).items():
        if domain not in cached:
            cached[domain] = evaluate(
                champ[1], folder, ws.root / "steps" / batch.batch / "eval" / domain, settings.eval
            )["miou"]
        out[domain] = cached[domain]
    return out


def new_replay(ws: Workspace, batch: BatchInfo, settings: Settings) -> str:
    """The replay buffer after a promotion: the previous one plus the batch's training split."""
    from segloop.data.replay import update_buffer

    b, state = batch.batch, read_state(ws)
    prev = ws.root / state.replay if state.replay else None
    out, train = ws.root / "replay" / b, ws.split(b, "train")
    r = settings.continual.replay
    update_buffer(prev, train, b, r.size, settings.split.seed, out, r.sampling, batch.domain)
    q = shlex.quote  # a stage's command runs through a shell
    cmd = (
        f"segloop replay-update --params {q(ws.rel(ws.step_params(b)))} --batch {q(ws.rel(train))} "
        f"--batch-id {q(b)} --domain {q(batch.domain)} --out {q(ws.rel(out))}"
        + (f" --buffer {q(ws.rel(prev))}" if prev else "")
    )
    record_stage(
        ws,
        f"replay-{b}",
        cmd,
        [train, *([prev] if prev else [])],
        [out],
        ["continual.replay", "split.seed"],
        ws.step_params(b),
    )
    return ws.rel(out)


def fold_step(
    state: LoopState, ws: Workspace, record: StepRecord, replay: str | None, learnt_ratio: float
) -> LoopState:
    """state.json after the step: the domain's held-out set known; a promotion makes the domain
    learnt (its pool is now in the champion) and marks weak every learnt domain under
    `learnt_ratio` of the best one's held-out mIoU; a refusal (or a covered batch, not trained
    on) keeps the batch's training split in its domain's pool for the next update of that
    domain. Every step re-marks covered the untrained domains the champion reaches that bar on.
    The batch's test split joins its domain's held-out set (LoopState.add_heldout)."""
    b, domain, train = record.batch, record.domain, ws.rel(ws.split(record.batch, "train"))
    state.add_heldout(domain, ws.rel(ws.split(b, "test")))
    if record.promoted:
        state.trained_domains.setdefault(domain, train)
        state.champion_batch, state.replay = b, replay
        state.pool.pop(domain, None)
    elif record.kept_in_pool:
        state.pool.setdefault(domain, []).append(train)
    scores = record.miou_after
    if scores and state.trained_domains:  # the bar, from the champion's scores after this step
        best = max((scores[d] for d in state.trained_domains if d in scores), default=0.0)
        bar = learnt_ratio * best
        if record.promoted:
            state.weak = [d for d in state.trained_domains if d in scores and scores[d] < bar]
        untrained = [d for d in state.heldout if d not in state.trained_domains and d in scores]
        state.covered = [d for d in untrained if scores[d] >= bar]
    if record.champion_version is not None:
        state.champion = record.champion_version
        state.scores.setdefault(record.champion_version, {}).update(record.miou_after)
    return state


def write_marker(ws: Workspace, record: StepRecord, marker: Path | None = None) -> None:
    """processed/<batch>.json (or `marker`), atomically; it counts once committed."""
    path = marker or ws.marker(record.batch)
    path.parent.mkdir(exist_ok=True)
    write_json(path, record.to_dict())


def finish(
    ws: Workspace, record: StepRecord, replay: str | None, settings: Settings, marker: Path | None = None
) -> str:
    """Fold the step into state.json, write the marker and commit both: the step is now done.
    A skipped or unlabelled batch leaves state.json as it was (nothing held out, nothing trained)."""
    state = read_state(ws)
    if not record.skipped and record.labelled:
        state = fold_step(state, ws, record, replay, settings.continual.learnt_ratio)
    write_state(ws, state)
    write_marker(ws, record, marker)
    head = commit(ws, f"batch {record.batch}: {record.summary}")
    push_workspace(ws, settings)  # the step counts once committed; a failed push is redone by the next pull
    return head


def summary_line(rec: StepRecord) -> str:
    d = rec.drift
    if d is None:
        parts = ["bootstrap"]
    elif d["score"] is None:
        parts = ["drift (no reference yet)"]
    else:
        parts = [
            f"{'drift' if d['drift'] else 'no drift'} (score {d['score']:.2g}, closest {d['closest_domain']}"
            + (", performance drop" if d["performance_drift"] else "")
            + ")"
        ]
    if rec.update_reason.startswith("domain"):  # trained without drift
        parts.append(rec.update_reason)
    if rec.status == LABELLED:
        missing = (rec.labels or {}).get("missing", [])
        counts = f"{rec.accepted} masks, {rec.quarantined} quarantined, {len(missing)} missing"
        parts.insert(0, f"labels imported ({counts})")
    if not rec.labelled:
        parts.append(f"label request: {rec.label_request}" if rec.label_request else "unlabelled, no update")
    elif rec.updated:
        pooled = f" (+{len(rec.pooled)} pooled batch{'es' if len(rec.pooled) > 1 else ''})" if rec.pooled else ""
        parts.append(f"v{rec.candidate_version}{pooled} " + ("promoted" if rec.promoted else "rejected"))
        failed = [r for r in rec.reasons if r.startswith("FAIL")]
        if failed:
            parts.append(failed[0])
        if rec.kept_in_pool:
            parts.append(f"training split kept in the {rec.domain} pool")
    elif rec.kept_in_pool and d is not None:  # drifted but covered (continual.covered_drop)
        parts.append(
            f"no update: the champion keeps its quality on the batch (mIoU drop {d['quality_drop']:+.4f} <= "
            "continual.covered_drop); split kept in the pool"
        )
    else:
        parts.append("no update")
    return " -> ".join(parts)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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
    """Workspace repo ready; leftovers of a crashed attempt on this batch undone.

    Order matters: first back to the last step commit (so nothing a crashed attempt
    wrote is committed or read), then init (commits only its own files), and only then
    state.json is read to put back a champion the crashed attempt promoted."""
    reset_to_last_step(ws)
    pull_workspace(ws, settings)  # another host may have run steps since (flows.git_remote)
    init_workspace(ws, settings)
    if batch in processed(ws):
        raise ValueError(f"batch {batch}: already processed ({ws.marker(batch)} committed); a batch is processed once")
    undo_unfinished_promotion(ws, settings, batch)
    reset_batch(ws, batch)


class BatchRefused(ValueError):
    """A batch folder that breaks the contract (name, link): refused into failed/ at once."""


class DeadLettered(RuntimeError):
    """The batch was moved to failed/<batch>/ (refused, or failed flows.max_attempts times)."""


def check_batch(batch_dir: Path) -> None:
    """The batch contract: a safe name (it names DVC stages and paths in their commands), a real folder, ready."""
    name = batch_dir.name
    if not BATCH_NAME.fullmatch(name):
        raise BatchRefused(
            f"{batch_dir}: batch folder name {name!r} is not allowed; a batch name is letters, "
            f"digits, '_' and '-' ({BATCH_NAME.pattern}), as it names the batch's DVC stages. "
            f"Rename the folder (e.g. {re.sub(r'[^A-Za-z0-9_-]+', '-', name).strip('-_') or 'batch'!r})"
        )
    if batch_dir.is_symlink():
        raise BatchRefused(f"{batch_dir}: a symbolic link; a batch must be a real folder (links are never followed)")
    if not batch_dir.is_dir():
        raise FileNotFoundError(f"{batch_dir}: batch folder does not exist")
    if not is_ready(batch_dir):
        raise ValueError(
            f"{batch_dir}: not ready; a batch is picked up once it holds {READY} or {BATCH_INFO} "
            "(written after every other file)"
        )


def _attempts(ws: Workspace, b: str) -> dict:
    path = ws.attempts(b)
    return json.loads(path.read_text()) if path.exists() else {"batch": b, "attempts": 0, "errors": []}


def dead_letter(ws: Workspace, batch_dir: Path, kind: str, error: str, attempts: int = 0) -> Path:
    """Move the batch folder to failed/<batch>/ with FAILED.json (kind, error, attempts); returns where."""
    dest = ws.failed(batch_dir.name)
    k = 1
    while os.path.lexists(dest):  # a batch of the same name failed before: keep both
        dest, k = ws.failed(f"{batch_dir.name}.{k}"), k + 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(batch_dir), dest)
    write_json(
        dest / FAILED_INFO,
        {
            "batch": batch_dir.name,
            "kind": kind,
            "error": error,
            "attempts": attempts,
            "time": now(),
            "from": str(batch_dir),
        },
    )
    if ws.attempts(batch_dir.name).exists():
        ws.attempts(batch_dir.name).unlink()
    return dest


@contextmanager
def batch_attempt(ws: Workspace, batch_dir: Path, settings: Settings, call: Callable[..., Any] = direct):
    """One counted attempt at a batch, under the batch contract.

    A bad name is refused into failed/ at once (`DeadLettered`). Each attempt is counted
    before it starts (in .attempts/, so a process that dies counts too); the attempt that
    would exceed `flows.max_attempts`, or a failure on the last one, undoes the step and
    moves the batch to failed/<batch>/ with its error (`DeadLettered`): the loop goes on
    with the next batch, and `segloop batches retry` puts it back.
    """
    b = batch_dir.name
    try:
        check_batch(batch_dir)
    except BatchRefused as err:
        ws.root.mkdir(parents=True, exist_ok=True)
        dest = dead_letter(ws, batch_dir, "refused", str(err))
        raise DeadLettered(f"{err}\nmoved to {dest}") from err
    done = processed(ws)
    if b in done:
        raise ValueError(f"batch {b}: already processed ({ws.marker(b)} committed); a batch is processed once")
    for stale in (ws.root / ATTEMPTS_DIR).glob("*.json"):  # a step that died right after its commit
        if stale.stem in done:
            stale.unlink()
    record, limit = _attempts(ws, b), settings.flows.max_attempts
    if record["attempts"] >= limit:  # every attempt died without a word (killed, out of memory)
        call("prepare", prepare, ws, settings, b)
        error = record["errors"][-1]["error"] if record["errors"] else "the process died during the attempt"
        dest = dead_letter(ws, batch_dir, "failed", error, record["attempts"])
        raise DeadLettered(
            f"batch {b}: {record['attempts']} attempts (flows.max_attempts {limit}) did not finish; "
            f"moved to {dest}: {error}"
        )
    record["attempts"] += 1
    record["errors"].append(
        {"attempt": record["attempts"], "time": now(), "error": "the process died during the attempt"}
    )
    ws.attempts(b).parent.mkdir(parents=True, exist_ok=True)
    write_json(ws.attempts(b), record)
    try:
        yield
    except Exception as err:
        if b in processed(ws):  # failed after its commit (tagging the version): the step counts
            ws.attempts(b).unlink()
            raise
        error = record["errors"][-1]["error"] = redact(f"{type(err).__name__}: {err}")
        write_json(ws.attempts(b), record)
        if record["attempts"] < limit:
            raise
        call("prepare", prepare, ws, settings, b)  # undo the attempt before the batch leaves
        dest = dead_letter(ws, batch_dir, "failed", error, record["attempts"])
        raise DeadLettered(
            f"batch {b}: failed {record['attempts']} times (flows.max_attempts {limit}); moved to {dest}: {error}"
        ) from err
    ws.attempts(b).unlink()


def process_batch(ws: Workspace, batch_dir: Path, settings: Settings, call: Callable[..., Any] = direct) -> StepRecord:
    """One batch through the whole step; returns its record (also processed/<batch>.json).

    A counted attempt (`batch_attempt`: contract, dead letters) of: prepare (undo a crashed
    attempt) -> the step's settings (params/<batch>.yaml) -> ingest -> [too few accepted:
    recorded as skipped] -> version -> champion -> drift -> update if `update_reason` ->
    gate -> replay on promotion -> state, marker, commit -> tags. An unlabelled batch stops
    after drift: drifted, a label request instead of an update (status awaiting-labels; its
    labels continue it later, `import_labels`). `call(name, fn, *args)` runs each sub-step:
    `direct` here, a Prefect task with retries on I/O in continual_flow. The commit in
    `finish` is what makes the step count.
    """
    b = batch_dir.name
    lifeline.guard()  # from now on, nothing this process starts outlives it
    with workspace_lock(ws), batch_attempt(ws, batch_dir, settings, call):
        call("prepare", prepare, ws, settings, b)
        call("settings", write_step_params, ws, settings, b)
        info = call("ingest", ingest, ws, batch_dir, settings)
        if info.accepted < settings.drift.min_images:  # empty or wholly rejected: recorded and skipped
            rec = StepRecord(
                b, info.domain, now(), info.accepted, info.quarantined, champion_version=read_state(ws).champion
            )
            what = "pair(s)" if info.labelled else "image(s)"
            rec.labelled, rec.skipped = (
                info.labelled,
                (
                    f"{info.accepted} {what} accepted, {info.quarantined} file(s) quarantined; a step needs "
                    f"at least {settings.drift.min_images} (drift.min_images)"
                ),
            )
            rec.summary = f"skipped: {rec.skipped}"
            rec.commit = call("record", finish, ws, rec, None, settings)
            return rec
        call("version", version_batch, ws, b)
        champ = call("champion", champion, settings)
        rec = StepRecord(b, info.domain, now(), info.accepted, info.quarantined, labelled=info.labelled)
        if not info.labelled:
            return unlabelled_step(ws, info, champ, rec, settings, call)
        if champ is not None:
            rec.drift = call("drift", check_drift, ws, info, champ, settings)
        rec.update_reason = update_reason(
            champ, rec.drift, read_state(ws), info.domain, settings.continual.covered_drop
        )
        return update_step(ws, info, champ, rec, settings, call)


def update_step(
    ws: Workspace,
    info: BatchInfo,
    champ: tuple[str, Path] | None,
    rec: StepRecord,
    settings: Settings,
    call: Callable[..., Any],
    marker: Path | None = None,
) -> StepRecord:
    """The rest of a labelled step, given its drift and `rec.update_reason`: update if there
    is a reason -> gate -> replay on promotion -> state, marker (default processed/<batch>.json),
    commit -> tags. Shared by a batch's own step and the step its imported labels make."""
    b = info.batch
    candidate = None
    if rec.update_reason:
        candidate = call("update", train_model, ws, info, champ, settings)
        decision = call("gate", gate_candidate, ws, info, candidate.version, settings)
        rec.updated, rec.candidate_version, rec.promoted = True, candidate.version, decision["promoted"]
        rec.reasons, rec.decision, rec.learnt = decision["reasons"], decision["decision"], decision["learnt"] or []
        rec.trained_on, rec.pooled, rec.images_seen = candidate.trained_on, candidate.pooled, candidate.images_seen
        rec.candidate_miou, rec.kept_in_pool = decision["after"], not decision["promoted"]
        before, after = decision["before"], decision["after"] if decision["promoted"] else decision["before"]
    else:
        before = after = call("evaluate-champion", champion_scores, ws, info, champ, settings)
        rec.kept_in_pool = covered(rec.drift, settings.continual.covered_drop)  # waits for the domain's next update
    rec.champion_version = rec.candidate_version if rec.promoted else (champ[0] if champ else None)
    rec.miou_before = {} if champ is None else before
    rec.miou_after = {} if rec.champion_version is None else after
    replay = call("replay", new_replay, ws, info, settings) if rec.promoted else None
    rec.summary = summary_line(rec)
    commit_sha = call("record", finish, ws, rec, replay, settings, marker)
    if candidate is not None:
        stage = ("train-" if champ is None else "update-") + b
        call(
            "tag",
            tag_version,
            settings,
            candidate.version,
            {
                "segloop.loop.commit": commit_sha,
                "segloop.loop.stage": stage,
                "segloop.loop.workspace": str(ws.root),
                "segloop.loop.params_md5": _md5(ws.step_params(b)),
            },
        )
    rec.commit = commit_sha
    return rec


def unlabelled_step(
    ws: Workspace,
    info: BatchInfo,
    champ: tuple[str, Path] | None,
    rec: StepRecord,
    settings: Settings,
    call: Callable[..., Any],
) -> StepRecord:
    """An unlabelled batch after versioning: drift-checked like any other; drifted, a label
    request instead of an update (status awaiting-labels), else recorded as served well.
    Nothing is trained, so the next batch is never held up by this one's labels."""
    rec.champion_version = champ[0] if champ else None
    if champ is None:
        rec.skipped = "unlabelled, and no champion yet to check drift against or draft labels with"
    else:
        rec.drift = call("drift", check_drift, ws, info, champ, settings)
        scores = read_state(ws).scores.get(champ[0], {})
        rec.miou_before, rec.miou_after = dict(scores), dict(scores)
        if rec.drift["drift"]:
            rec.label_request = call("label-request", request_labels, ws, info, champ, settings)
            rec.status = AWAITING
    rec.summary = f"skipped: {rec.skipped}" if rec.skipped else summary_line(rec)
    rec.commit = call("record", finish, ws, rec, None, settings)
    return rec


def request_labels(ws: Workspace, info: BatchInfo, champ: tuple[str, Path], settings: Settings) -> str:
    """The label request of a drifted unlabelled batch: `settings.labels` picks the images, the
    champion drafts their masks; written to labels/requests/<batch>/, logged to MLflow (run
    `labels:<batch>`, artifacts under label_request/) and versioned by DVC. Returns its folder."""
    from segloop.labels import LOCAL_FILES, LabelRequest, champion_uncertainty, select, write_request
    from segloop.tracking import tracked_run

    b, out = info.batch, ws.request(info.batch)
    accepted = ws.batch(b) / "accepted"
    u, drafts = champion_uncertainty(champ[1], accepted, settings, ws.root / ".cache" / "drift")
    chosen = select(u, settings.labels)
    cfg = settings.labels
    tags = {"segloop.batch": b, "segloop.model_version": champ[0], "segloop.labels.strategy": cfg.strategy}
    with tracked_run(settings, "label-request", {"batch": accepted}, tags, run_name=f"labels:{b}") as run:
        request = LabelRequest(
            b, info.domain, champ[0], cfg.strategy, cfg.budget, list(settings.data.classes), [], len(u.stems)
        )
        request.mlflow_run = run.run_id if run else None
        write_request(out, accepted / "images", u, chosen, drafts, request, f"{LOCAL_FILES}{ws.rel(out)}/")
        if run:
            run.log_metrics({"labels.requested": len(chosen), "labels.batch_images": len(u.stems)})
            for name in ("request.json", "tasks.json", "label_config.xml"):
                run.log_file(out / name, "label_request")
            run.log_folder(out / "drafts", "label_request/drafts")
    dvc(ws, "add", "-q", ws.rel(out))
    print(f"batch {b}: label request for {len(chosen)} of {len(u.stems)} images ({cfg.strategy}) in {out}", flush=True)
    return ws.rel(out)


def awaiting_labels(ws: Workspace, batch: str) -> StepRecord:
    """The committed record of `batch`, whose label request waits for its labels; a clear
    error if its labels were imported already or it never asked for any."""
    if batch in labels_imported(ws):
        raise ValueError(
            f"batch {batch}: labels already imported ({ws.labelled_marker(batch)} committed); "
            "a batch's labels are imported and trained on once"
        )
    if batch not in processed(ws):
        raise ValueError(f"batch {batch}: not processed by the loop yet, so no label request (`segloop batches list`)")
    rec = StepRecord.read(ws.marker(batch))
    if rec.status != AWAITING or not rec.label_request:
        raise ValueError(f"batch {batch}: not awaiting labels (status {rec.status}: {rec.summary})")
    return rec


def prepare_labels(ws: Workspace, settings: Settings, batch: str) -> StepRecord:
    """Like `prepare`, for the step of a batch's imported labels: back to the last step commit,
    a champion a crashed import promoted put back, that import's outputs removed. Returns the
    batch's record (awaiting labels)."""
    reset_to_last_step(ws)
    init_workspace(ws, settings)
    asked = awaiting_labels(ws, batch)
    undo_unfinished_promotion(ws, settings, batch)
    r = ws.root
    # Ignored by git, so a reset leaves them: the batch's folder goes back to its images only.
    for path in (
        ws.batch(batch) / "labelled",
        ws.batch(batch) / "split",
        r / "models" / batch,
        r / "replay" / batch,
        r / "steps" / batch / "gate",
        r / "steps" / batch / "eval",
        r / "quarantine" / batch / "labels",
        ws.labelled_marker(batch),
    ):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
    return asked


def ingest_labels(ws: Workspace, asked: StepRecord, folder: Path, settings: Settings) -> tuple[BatchInfo, dict]:
    """Check the masks in `folder` against the batch's request (bad ones to quarantine/<batch>/labels/
    with reasons), pair the good ones with their images in batches/<batch>/labelled/ and split
    them. Returns the labelled batch and what the import found; too few to split is an error."""
    from segloop.data.split import SPLITS, split_dataset
    from segloop.data.validate import quarantine_files
    from segloop.labels import check_labels

    b = asked.batch
    assert asked.label_request is not None  # awaiting_labels checked it
    found = check_labels(ws.root / asked.label_request, folder, settings.num_classes)
    quarantine_files(found.rejected, ws.root / "quarantine" / b, "labels")
    data = ws.batch(b) / "labelled"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
    for image, mask in found.accepted:
        shutil.copy2(image, data / "images" / image.name)
        shutil.copy2(mask, data / "masks" / f"{mask.stem}.png")
    counts = split_dataset(data, ws.batch(b) / "split", settings.split) if found.accepted else {}
    if any(counts.get(part, 0) == 0 for part in SPLITS):
        reasons = "; ".join(f"{Path(r['file']).name}: {r['reason']}" for r in found.rejected[:3])
        raise ValueError(
            f"{folder}: {len(found.accepted)} mask(s) for batch {b} passed the checks, too few to split into "
            f"train/val/test ({counts or 'nothing'}); {len(found.rejected)} rejected{': ' + reasons if reasons else ''}"
        )
    labels = {"from": str(folder), "missing": found.missing, "quarantined": len(found.rejected)}
    return BatchInfo(b, asked.domain, len(found.accepted), len(found.rejected), counts), labels


def import_labels(
    ws: Workspace, settings: Settings, batch: str, folder: Path, call: Callable[..., Any] = direct
) -> StepRecord:
    """Labels for a batch awaiting them: checked against its request (bad masks quarantined with
    reasons, the rest go on), versioned with the batch, and the batch continues as a labelled
    one from the then-current champion and settings: update, gate, promotion, replay. Recorded in
    labelled/<batch>.json; once that is committed a second import of the batch is refused.
    A crash before the commit leaves the batch awaiting labels: the import can be run again."""
    lifeline.guard()
    folder = Path(folder).resolve()
    with workspace_lock(ws):
        asked = call("prepare", prepare_labels, ws, settings, batch)
        # This step's settings (the earlier step of the batch ran no stage that reads them).
        call("settings", write_step_params, ws, settings, batch)
        info, labels = call("labels", ingest_labels, ws, asked, folder, settings)
        call("version", version_batch, ws, batch)
        champ = call("champion", champion, settings)
        if champ is None:
            raise ValueError(f"batch {batch}: no champion in the registry to update with its labels")
        rec = StepRecord(batch, info.domain, now(), info.accepted, info.quarantined, drift=asked.drift)
        rec.status, rec.label_request, rec.labels = LABELLED, asked.label_request, labels
        rec.update_reason = f"labels imported for drifted batch {batch}"
        return update_step(ws, info, champ, rec, settings, call, ws.labelled_marker(batch))


def _md5(path: Path) -> str:
    from segloop.tracking import file_md5

    return file_md5(path)


# ---------------------------------------------------------------- batches (segloop batches)


def list_batches(ws: Workspace) -> list[dict]:
    """Every batch the loop knows: pending (ready or not), failed (dead letters) and processed, by name."""
    rows: dict[str, dict] = {}
    done = processed(ws)
    imported = labels_imported(ws)
    for b in sorted(done):
        rec = StepRecord.read(ws.marker(b)) if ws.marker(b).exists() else None
        if b in imported and ws.labelled_marker(b).exists():
            rec = StepRecord.read(ws.labelled_marker(b))
        waiting = rec is not None and rec.status == AWAITING
        rows[b] = {"batch": b, "status": AWAITING if waiting else "processed", "detail": rec.summary if rec else ""}
    if ws.incoming.is_dir():
        for p in sorted(ws.incoming.iterdir()):
            if p.is_dir() and not p.name.startswith(".") and p.name not in done:
                tries = _attempts(ws, p.name)
                detail = (
                    "not ready (no READY or batch.json yet)"
                    if not is_ready(p)
                    else f"{tries['attempts']} attempt(s), last error: {tries['errors'][-1]['error']}"
                    if tries["errors"]
                    else ""
                )
                rows[p.name] = {"batch": p.name, "status": "pending", "detail": detail}
    if (ws.root / FAILED_DIR).is_dir():
        for p in sorted((ws.root / FAILED_DIR).iterdir()):
            info = json.loads((p / FAILED_INFO).read_text()) if (p / FAILED_INFO).is_file() else {}
            rows[f"failed/{p.name}"] = {
                "batch": p.name,
                "status": info.get("kind", "failed"),
                "detail": info.get("error", ""),
                "attempts": info.get("attempts"),
            }
    return list(rows.values())


def retry_batch(ws: Workspace, name: str) -> Path:
    """A dead letter back into incoming/ with a fresh attempt count; returns its folder there."""
    src = ws.failed(name)
    if not (src / FAILED_INFO).is_file():
        raise ValueError(f"{src}: no failed batch of that name (see `segloop batches list`)")
    info = json.loads((src / FAILED_INFO).read_text())
    original = info.get("batch", name)
    if original in processed(ws):
        raise ValueError(f"batch {original}: already processed; a batch is processed once")
    dest = ws.incoming / original
    if os.path.lexists(dest):
        raise FileExistsError(f"{dest}: exists; move it away before retrying {src}")
    with workspace_lock(ws):
        (src / FAILED_INFO).unlink()
        ws.incoming.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), dest)
        if ws.attempts(original).exists():
            ws.attempts(original).unlink()
    return dest


def skip_batch(ws: Workspace, name: str, reason: str) -> Path:
    """A pending batch out of the loop's way, into failed/ as skipped (with `reason`); returns where."""
    src = ws.incoming / name
    if name in processed(ws):
        raise ValueError(f"batch {name}: already processed; nothing to skip")
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no pending batch of that name (see `segloop batches list`)")
    with workspace_lock(ws):
        ws.root.mkdir(parents=True, exist_ok=True)
        return dead_letter(ws, src, "skipped", reason, _attempts(ws, name)["attempts"])
