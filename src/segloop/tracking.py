"""MLflow tracking: where the store is, whether it answers, and what each run records.

The store URI comes from `tracking.uri`, else `$MLFLOW_TRACKING_URI`, else the
project's own `mlruns/mlflow.db` (artifacts in `mlruns/artifacts/`). `open_store`
checks that the store answers before any work starts, so an unreachable server
fails in seconds instead of after an hour of training. A run records the resolved
settings (flattened params), what it read (DVC-style md5 of each input folder),
which code (git commit, segloop version), and its metrics and files.

This module must not train, evaluate or decide anything; importing it touches
nothing (no folders, no connections).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from segloop import __version__
from segloop.config import DEFAULT_MLRUNS, Settings, TrackingSettings, settings_record
from segloop.redaction import redact

EPOCH_METRICS = ("loss", "val_miou", "lr", "img_per_s")


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message says which store and what to do."""


@dataclass(frozen=True)
class Store:
    uri: str
    artifact_root: str | None  # where new experiments keep their files; None: the server decides


def resolve_store(cfg: TrackingSettings, env: Mapping[str, str] | None = None, mlruns: Path = DEFAULT_MLRUNS) -> Store:
    """The store to use: tracking.uri > $MLFLOW_TRACKING_URI > sqlite:///<mlruns>/mlflow.db."""
    env = os.environ if env is None else env
    uri = cfg.uri or env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{mlruns / 'mlflow.db'}"
    db = sqlite_path(uri)
    if db is None:
        return Store(uri, None)
    # Absolute, so a later chdir (DVC, Prefect workers) still finds the same store; files
    # live beside the db so a temporary store never spills into the current folder.
    db = db.resolve()
    return Store(f"sqlite:///{db}", str(db.parent / "artifacts"))


def sqlite_path(uri: str) -> Path | None:
    """`sqlite:///rel/x.db` -> rel/x.db, `sqlite:////abs/x.db` -> /abs/x.db; None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


def open_store(store: Store, timeout_s: float = 5.0):
    """An MlflowClient on `store`, or TrackingError if the store does not answer."""
    # This machine class has no network; MLflow 3 would otherwise try to send usage telemetry.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # Per-file download bars would drown the CLI's own output (refs download a checkpoint).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if redact(store.uri) != store.uri:  # MLflow prints "View run at: <uri>/#/..." with the password in it
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    from mlflow import MlflowClient

    hint = "set tracking.uri / MLFLOW_TRACKING_URI to a reachable store, or tracking.enabled: false"
    db = sqlite_path(store.uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(
                f"tracking store {redact(store.uri)}: cannot create {db.parent} ({err.strerror}); {hint}"
            ) from None
        if not os.access(db.parent, os.W_OK):
            raise TrackingError(f"tracking store {redact(store.uri)}: {db.parent} is not writable; {hint}")
    elif urlparse(store.uri).scheme in ("http", "https"):
        # MLflow's own client retries for minutes; one short probe of /health answers at once.
        # (urllib takes no user:password@ in a URL: the probe goes without; /health needs no login.)
        parts = urlparse(store.uri)
        probe = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        try:
            with urllib.request.urlopen(probe.rstrip("/") + "/health", timeout=timeout_s):
                pass
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(
                f"tracking server {redact(store.uri)} did not answer within {timeout_s:g}s ({reason}); {hint}"
            ) from None
    client = MlflowClient(tracking_uri=store.uri, registry_uri=store.uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as err:  # any backend failure means: do not start work
        raise TrackingError(
            redact(f"tracking store {store.uri}: {type(err).__name__}: {str(err)[:300]}; {hint}")
        ) from None
    return client


# MLflow 3's UI asks what an experiment is for (popup) and opens untagged ones on a GenAI
# traces view; this tag makes it open segloop's experiments on their training runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(client, store: Store, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if "mlflow.experimentKind" not in (exp.tags or {}):  # made by an older segloop
            client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return exp.experiment_id
    location = f"{store.artifact_root}/{name}" if store.artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except Exception:  # created meanwhile by a concurrent run
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{'train': {'lr': 0.1}} -> {'train.lr': '0.1'}; lists and null as JSON."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_md5(path: Path) -> str:
    """The md5 DVC 3 gives a folder (`<md5>.dir` in a .dvc file / dvc.lock); a file's plain md5.

    DVC hashes the JSON list of {"md5", "relpath"} of every file, sorted by relpath.
    """
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: dataset folder not found")
    entries = [
        {"md5": file_md5(Path(root) / name), "relpath": (Path(root) / name).relative_to(path).as_posix()}
        for root, _, files in os.walk(path)
        for name in files
    ]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def _git(*args: str, cwd: Path | None = None) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _installed_commit() -> str | None:
    """The commit pip recorded at install (PEP 610 direct_url.json), e.g. `pip install git+URL@rev`."""
    from importlib import metadata

    try:
        raw = metadata.distribution("segloop").read_text("direct_url.json")
        return (json.loads(raw or "{}").get("vcs_info") or {}).get("commit_id")
    except (metadata.PackageNotFoundError, ValueError):
        return None


def code_tags() -> dict[str, str]:
    """segloop's version and the commit of the code that is running: the git checkout the
    imported `segloop` package lives in (never the current folder: a loop stage runs in the
    workspace, a data repo), else the commit recorded when it was installed from git."""
    tags = {"segloop.version": __version__}
    package = Path(__file__).resolve().parent
    # The package's own files must be tracked there: a copy installed into a venv that sits
    # inside some other checkout is not that checkout's code.
    tracked = _git("ls-files", "--", "__init__.py", cwd=package)
    if tracked:
        commit = _git("rev-parse", "HEAD", cwd=package)
        dirty = _git("status", "--porcelain", "--untracked-files=no", cwd=package)
    else:
        commit, dirty = _installed_commit(), None
    if commit:
        tags["segloop.git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit  # shown in the MLflow UI's Source column
        if dirty is not None:
            tags["segloop.git_dirty"] = "true" if dirty else "false"
    return tags


def data_tags(inputs: Mapping[str, Path]) -> dict[str, str]:
    """`segloop.data.<role>.md5` / `.path` for each input dataset folder."""
    tags: dict[str, str] = {}
    for role, path in inputs.items():
        tags[f"segloop.data.{role}.md5"] = dir_md5(Path(path))
        tags[f"segloop.data.{role}.path"] = str(path)
    return tags


def eval_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flat MLflow metrics from an `evaluate` result: mIoU, Dice, accuracy, then per class."""
    out = {f"{prefix}{k}": float(metrics[k]) for k in ("miou", "dice", "pixel_accuracy") if metrics.get(k) is not None}
    for group, name in (("per_class_iou", "iou"), ("per_class_dice", "dice")):
        for cls, value in (metrics.get(group) or {}).items():
            if value is not None:  # class absent from truth and prediction: no score, not zero
                out[f"{prefix}{name}.{cls}"] = float(value)
    return out


@dataclass
class TrackedRun:
    """One MLflow run, written through an explicit client (no hidden active-run state)."""

    client: Any
    run_id: str
    store: Store
    experiment_id: str

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        """Per-epoch curve points, logged as the epoch ends (step = epoch)."""
        self.log_metrics({k: record[k] for k in EPOCH_METRICS if k in record}, step=int(record["epoch"]))

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            if v is not None:
                self.client.set_tag(self.run_id, k, str(v))

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_folder(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path)


@contextmanager
def tracked_run(
    settings: Settings,
    kind: str,
    inputs: Mapping[str, Path] | None = None,
    tags: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    experiment: str | None = None,
) -> Iterator[TrackedRun | None]:
    """An MLflow run around one segloop step; yields None when tracking.enabled is false.

    The run goes to `experiment` (default tracking.experiment). The store is checked and
    the run opened before the body runs, so a bad store fails before any training. The
    run ends FINISHED, or FAILED if the body raises.
    """
    if not settings.tracking.enabled:
        yield None
        return
    store = resolve_store(settings.tracking)
    client = open_store(store, settings.tracking.connect_timeout_s)
    exp_id = ensure_experiment(client, store, experiment or settings.tracking.experiment)
    all_tags = {"segloop.command": kind, **code_tags(), **data_tags(inputs or {})}
    all_tags.update({k: str(v) for k, v in (tags or {}).items() if v is not None})
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    tracked = TrackedRun(client, run.info.run_id, store, exp_id)
    status = "FAILED"
    try:
        tracked.log_params(flatten(settings_record(settings)))
        yield tracked
        status = "FINISHED"
    finally:
        client.set_terminated(tracked.run_id, status)


def drift_experiment(settings: Settings) -> str:
    """Drift checks are grouped apart from training: `<tracking.experiment>-drift`."""
    return f"{settings.tracking.experiment}-drift"


def _verdict(value: bool | None) -> str | None:
    return None if value is None else str(bool(value)).lower()


def log_drift(run: TrackedRun, record: Mapping[str, Any], out_dir: Path) -> None:
    """One drift check's result on its run: headline metrics, verdict tags, drift.json + drift.html.

    `record` is the drift.json payload (segloop.drift.detect.detect_drift); a labelled
    batch's champion evaluation (`out_dir/quality/`) is logged too when present.
    """
    metrics = {
        "score": record["score"],
        "share_drifted": record["share_drifted"],
        "n_reference": record["n_reference"],
        "n_current": record["n_current"],
        "n_drifted": len(record["drifted_features"]),
    }
    if (record.get("embeddings") or {}).get("p_value") is not None:
        metrics["embeddings_p_value"] = record["embeddings"]["p_value"]
    quality = record.get("quality") or {}
    if quality.get("batch_miou") is not None:
        metrics |= {"quality.batch_miou": quality["batch_miou"], "quality.drop": quality["drop"]}
    run.log_metrics(metrics)
    run.set_tags(
        {
            "segloop.drift": _verdict(record["drift"]),
            "segloop.drift.data": _verdict(record["data_drift"]),
            "segloop.drift.performance": _verdict(record["performance_drift"]),  # None: not checked
            # MLflow tag values are short strings: the strongest few, the full list is in drift.json
            "segloop.drift.features": ", ".join(record["drifted_features"][:10]) or "-",
            "segloop.drift.method": record["method"],
        }
    )
    for name in ("drift.json", "drift.html"):
        run.log_file(Path(out_dir) / name)
    if quality.get("batch_miou") is not None:  # evaluated in this check (not a stale folder of an earlier one)
        run.log_folder(Path(out_dir) / "quality", "quality")
