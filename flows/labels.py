"""`labels_flow`: the labels dropped for one batch's label request, imported and trained on.

labels/done/<batch>/ (masks/, then READY) -> checked against the request (bad masks quarantined
with reasons) -> the batch continues as a labelled one: update from the current champion, gate,
promotion (`segloop.loop.import_labels`, the same code as `segloop labels import`). monitor_flow
runs it for every ready drop (`loop.pending_labels`); each sub-step is a Prefect task as in
continual_flow.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.continual import tasks_for
from segloop import lifeline, loop
from segloop.config import load_settings
from segloop.loop import Workspace


def _run_name() -> str:
    return f"labels-{flow_run.parameters['batch']}"


@flow(flow_run_name=_run_name, log_prints=True)
def labels_flow(batch: str, folder: str, params: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Import `folder`'s masks for `batch` (awaiting labels); returns the step record (also
    labelled/<batch>.json). Once that is committed the batch's labels are never imported again."""
    lifeline.guard()
    settings = load_settings(params, overrides or [])
    ws = Workspace.of(settings)
    rec = loop.import_labels(ws, settings, batch, Path(folder), tasks_for(settings, batch))
    get_run_logger().info("batch %s (labels): %s", batch, rec.summary)
    return rec.to_dict()
