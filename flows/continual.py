"""`continual_flow`: one incoming batch through the whole loop.

validate + quarantine -> version (DVC) -> drift vs the champion's references -> bootstrap
or update when drifted -> gate -> promote or not -> new replay buffer -> step record (an
unlabelled batch that drifted: a label request instead of the update, see `segloop labels import`).
The step itself is `segloop.loop.process_batch` (the same code a benchmark or test runs
without Prefect); this flow runs each of its sub-steps as a Prefect task, and only the
sub-steps whose I/O can fail transiently (git/DVC, the MLflow store) retry.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from segloop import lifeline, loop
from segloop.config import Settings, load_settings
from segloop.loop import Workspace

# Sub-steps that only do I/O that can fail transiently and are safe to run again.
RETRIED = frozenset({"prepare", "version", "champion", "gate", "record", "tag"})


def _run_name() -> str:
    return f"continual-{Path(flow_run.parameters['batch_dir']).name}"


def tasks_for(settings: Settings, b: str) -> Callable[..., Any]:
    """The `call` a loop step runs its sub-steps with: each a Prefect task of batch `b`, retried
    only if it is in RETRIED."""
    io = {"retries": settings.flows.retries, "retry_delay_seconds": settings.flows.retry_delay_s}

    def as_task(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        # Inputs are settings and paths, not cacheable values: every run computes.
        t = task(fn, name=name, task_run_name=f"{name}-{b}", cache_policy=NO_CACHE, **(io if name in RETRIED else {}))
        return t(*args)

    return as_task


@flow(flow_run_name=_run_name, log_prints=True)
def continual_flow(batch_dir: str, params: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Process one batch folder; returns the step record (also written to processed/<batch>.json)."""
    lifeline.guard()  # Prefect's temporary server, DVC and training die with this process, even killed
    settings = load_settings(params, overrides or [])
    ws, path = Workspace.of(settings), Path(batch_dir).resolve()
    b, log = path.name, get_run_logger()
    rec = loop.process_batch(ws, path, settings, tasks_for(settings, b))
    log.info("batch %s: %s", b, rec.summary)
    return rec.to_dict()
