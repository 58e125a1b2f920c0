"""Drift over time, where people look: each batch's drift check as a snapshot in an Evidently
workspace (the self-hosted Evidently UI, `make evidently-ui`) and as Prometheus gauges.

- One Evidently project per registered model (named after it), created on first use with its
  dashboard: drift score, share of drifted features, the champion's mean confidence (on the
  batch and on its reference) and the batch's verdict, over time.
- One snapshot per checked batch: a one-row Evidently report of those figures (MeanValue per
  column of a one-row table, so every figure is a built-in Evidently metric the UI plots;
  a custom metric class would have to be importable by the UI server). Its metadata names
  the batch, domain, closest reference and champion version. Writing a batch again (a step
  retried after a crash) replaces its snapshot, so the history holds each batch once.
- `latest.json` beside the projects holds each model's last point; `DriftGauges` turns it
  into Prometheus gauges at scrape time (the service exposes them on /metrics).

A point is the loop's verdict for the batch (several references, the MMD test), not one
Evidently report's: `loop.check_drift` writes it. Nothing here imports MLflow or Prefect.
"""

from __future__ import annotations

import fcntl
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from segloop.records import write_json

# The dashboard's figures: columns of the one-row table each snapshot is computed on.
# evidence = -log10(score) and threshold = -log10(alpha): drifted batches have p-values of
# 1e-5 to 1e-80, which a linear axis shows as one flat line at 0.
FIGURES = ("score", "evidence", "threshold", "share_drifted", "confidence", "reference_confidence", "drift")
LATEST = "latest.json"  # not a UUID: Evidently's workspace listing skips it
INDEX = "snapshots.json"  # {model: {batch: snapshot id}}: a retried batch's snapshot found without a scan
PENDING = "pending"  # the index entry while a batch's snapshot is being written
METRIC = "evidently:metric_v2:MeanValue"


@dataclass(frozen=True)
class DriftPoint:
    """One batch's drift check, as the dashboard and the gauges show it."""

    model: str  # registered model name: the Evidently project
    batch: str
    domain: str
    time: str  # ISO 8601, UTC
    score: float  # smallest Bonferroni-adjusted p-value of the closest reference (lower: stronger drift)
    share_drifted: float  # share of feature columns drifted at the corrected level
    confidence: float | None  # champion's mean max-softmax on the batch's images
    reference_confidence: float | None  # ... on the closest reference's images
    drift: bool  # the loop's verdict (data drift against every reference, or a quality drop)
    closest_domain: str
    model_version: str  # the champion checked against
    alpha: float  # drift.alpha: the batch drifts when score <= alpha

    @property
    def evidence(self) -> float:
        return -math.log10(max(self.score, 1e-300))

    @property
    def threshold(self) -> float:
        return -math.log10(self.alpha)

    def row(self) -> dict[str, float]:
        """The known figures (an unknown one is left out, not written as NaN)."""
        return {f: float(getattr(self, f)) for f in FIGURES if getattr(self, f) is not None}


def _panels() -> list:
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import bar_plot_panel, counter_panel, line_plot_panel

    def value(column: str, legend: str) -> PanelMetric:
        return PanelMetric(legend=legend, metric=METRIC, metric_labels={"column": column})

    checked = PanelMetric(legend="batches", metric="evidently:metric_v2:RowCount")
    return [
        counter_panel("Batches checked", [checked], "drift checks written here", "half", "sum"),
        counter_panel("Drifted batches", [value("drift", "drifted")], "batches whose check said drift", "half", "sum"),
        line_plot_panel(
            "Drift score",
            [value("evidence", "-log10(score)"), value("threshold", "-log10(drift.alpha)")],
            "score: smallest Bonferroni-adjusted p-value vs the closest reference; drift when the line is above the"
            " threshold",
            "half",
        ),
        line_plot_panel(
            "Share of drifted features",
            [value("share_drifted", "share")],
            "feature columns drifted at the corrected per-column level",
            "half",
        ),
        line_plot_panel(
            "Champion's mean confidence",
            [value("confidence", "batch"), value("reference_confidence", "reference")],
            "mean max-softmax of the champion on the batch and on its closest reference",
            "half",
        ),
        bar_plot_panel("Verdict", [value("drift", "drift")], "1 = the batch drifted, 0 = it did not", "half"),
    ]


def open_project(workspace: Path, model: str):
    """(Evidently Workspace, the model's project), creating either with the dashboard if missing."""
    from evidently.ui.workspace import Workspace

    workspace.mkdir(parents=True, exist_ok=True)
    ws = Workspace(str(workspace))
    found = ws.search_project(model)
    if found:
        return ws, found[0]
    project = ws.create_project(model, f"segloop drift checks of registered model {model!r}, one snapshot a batch")
    for panel in _panels():
        project.dashboard.add_panel(panel, tab="Drift")
    return ws, project


def snapshot(point: DriftPoint):
    """The Evidently snapshot of one point: MeanValue of each figure over a one-row table."""
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import MeanValue, RowCount

    row = point.row()
    table = Dataset.from_pandas(pd.DataFrame([row]), data_definition=DataDefinition(numerical_columns=list(row)))
    meta = {k: v for k, v in asdict(point).items() if k not in FIGURES and k != "alpha"}
    when = datetime.fromisoformat(point.time).replace(tzinfo=None)  # Evidently's timestamps are naive UTC
    tags = ["drift" if point.drift else "no-drift", f"domain:{point.domain}"]
    metrics = [RowCount(), *(MeanValue(column=c) for c in row)]
    return Report(metrics).run(table, None, timestamp=when, metadata=meta, tags=tags)


def record_point(workspace: Path, point: DriftPoint) -> str:
    """Write `point` into the Evidently workspace (its model's project, replacing an earlier
    snapshot of the same batch) and as the model's latest point. Returns the snapshot id.

    The batch's earlier snapshot comes from the index (no scan of the project's snapshots per
    check); only a write that died between marking the batch pending and recording its new
    snapshot makes the retry scan for the batch's snapshots. Writers queue on an OS lock
    (<workspace>/.lock): loops of other workspaces write here too, and Evidently's local
    storage is not safe for two writers (one read a snapshot file the other was writing)."""
    workspace = Path(workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    with open(workspace / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        return _record(workspace, point)


def _record(workspace: Path, point: DriftPoint) -> str:
    ws, project = open_project(workspace, point.model)
    index = snapshot_index(ws, project, workspace, point.model)
    batches = index[point.model]
    known = batches.get(point.batch)
    stale = _scan(ws, project).get(point.batch, []) if known == PENDING else [known] if known else []
    batches[point.batch] = PENDING
    write_json(workspace / INDEX, index)
    for sid in stale:
        ws.delete_run(project.id, sid)
    ref = ws.add_run(project.id, snapshot(point), name=point.batch)
    batches[point.batch] = str(ref.id)
    write_json(workspace / INDEX, index)
    latest = read_latest(workspace)
    latest[point.model] = asdict(point)
    write_json(workspace / LATEST, latest)
    return str(ref.id)


def snapshot_index(ws, project, workspace: Path, model: str) -> dict[str, dict[str, str]]:
    """The index of snapshots by model and batch; a model missing from it (a workspace written
    before the index existed) is indexed by one scan of its project."""
    path = workspace / INDEX
    try:
        index = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); delete it and the next check rebuilds it") from None
    if model not in index:
        index[model] = {batch: ids[-1] for batch, ids in _scan(ws, project).items()}
    return index


def _scan(ws, project) -> dict[str, list[str]]:
    """{batch: its snapshot ids}, reading every snapshot of the project."""
    found: dict[str, list[str]] = {}
    for sid in ws.list_runs(project.id):
        run = ws.get_run(project.id, sid)
        if run is not None and "batch" in run.metadata:
            found.setdefault(run.metadata["batch"], []).append(str(sid))
    return found


def read_latest(workspace: Path) -> dict[str, dict[str, Any]]:
    """{model: its latest point as a dict}; empty when nothing was written yet."""
    path = Path(workspace) / LATEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def history(workspace: Path, model: str) -> list[dict[str, Any]]:
    """The model's points as the Evidently workspace holds them, oldest first: each snapshot's
    metadata plus its figures read back from the MeanValue results."""
    from evidently.ui.workspace import Workspace

    ws = Workspace(str(workspace))
    found = ws.search_project(model)
    if not found:
        return []
    rows = []
    for sid in ws.list_runs(found[0].id):
        run = ws.get_run(found[0].id, sid)
        if run is None:
            continue
        values = {
            r.metric_value_location.metric.params["column"]: r.value
            for r in run.metric_results.values()
            if r.metric_value_location.metric.params.get("type") == METRIC
        }
        rows.append({**run.metadata, **values, "timestamp": run.timestamp, "tags": list(run.tags)})
    return sorted(rows, key=lambda r: r["timestamp"])


class DriftGauges:
    """A Prometheus collector: each model's latest drift point (`latest.json`), read at scrape
    time, so the figures are current without the loop and the service sharing a process."""

    def __init__(self, workspace: Path):
        self.workspace = Path(workspace)

    def describe(self) -> list:
        return []  # read at scrape time: nothing to check at registration

    def collect(self) -> Iterator:
        from prometheus_client.core import GaugeMetricFamily

        gauges = {
            "score": GaugeMetricFamily(
                "segloop_drift_score", "Last drift check: smallest adjusted p-value (lower: stronger)", labels=["model"]
            ),
            "share_drifted": GaugeMetricFamily(
                "segloop_drift_share_drifted", "Last drift check: share of drifted feature columns", labels=["model"]
            ),
            "confidence": GaugeMetricFamily(
                "segloop_drift_champion_confidence",
                "Last drift check: the champion's mean confidence on the batch",
                labels=["model"],
            ),
            "drift": GaugeMetricFamily(
                "segloop_drift_verdict", "Last drift check: 1 if the batch drifted, else 0", labels=["model"]
            ),
            "time": GaugeMetricFamily(
                "segloop_drift_check_timestamp_seconds", "Unix time of the last drift check", labels=["model"]
            ),
        }
        for model, p in read_latest(self.workspace).items():
            for key, family in gauges.items():
                if key == "time":
                    family.add_metric([model], datetime.fromisoformat(p["time"]).timestamp())
                elif p.get(key) is not None:
                    family.add_metric([model], float(p[key]))
        yield from gauges.values()
