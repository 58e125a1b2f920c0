"""`continual_flow`: one incoming batch through the whole loop.

validate + quarantine -> version (DVC) -> drift vs the champion's references -> bootstrap
or update when drifted -> gate -> promote or not -> new replay buffer -> step record.
Every task is a thin wrapper over a function of `segloop.loop`; only the tasks that do
I/O that can fail transiently (git/DVC, the MLflow store) retry.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from segloop import loop
from segloop.config import Settings, load_settings
from segloop.loop import Workspace
from segloop.tracking import file_md5

# Inputs are settings and paths, not cacheable values: every run computes.
step = task(cache_policy=NO_CACHE)


@step(task_run_name="prepare-{batch}")
def prepare(ws: Workspace, settings: Settings, batch: str) -> None:
    """Workspace repo ready; leftovers of a crashed attempt on this batch undone."""
    loop.init_workspace(ws, settings)
    loop.undo_unfinished_promotion(ws, settings, batch)
    loop.reset_batch(ws, batch)


@step(task_run_name="ingest-{batch}")
def ingest(ws: Workspace, batch_dir: Path, settings: Settings, batch: str) -> dict:
    return loop.ingest(ws, batch_dir, settings)


@step(task_run_name="version-{batch}")
def version(ws: Workspace, batch: str) -> str:
    return loop.version_batch(ws, batch)


@step(task_run_name="champion-{batch}")
def champion(settings: Settings, batch: str):
    return loop.champion(settings)


@step(task_run_name="drift-{batch}")
def drift(ws: Workspace, info: dict, champ, settings: Settings, batch: str) -> dict:
    return loop.check_drift(ws, info, champ, settings)


@step(task_run_name="update-{batch}")
def update(ws: Workspace, info: dict, champ, settings: Settings, batch: str) -> str:
    return loop.train_model(ws, info, champ, settings)


@step(task_run_name="gate-{batch}")
def gate(ws: Workspace, info: dict, candidate: str, settings: Settings, batch: str) -> dict:
    return loop.gate_candidate(ws, info, candidate, settings)


@step(task_run_name="evaluate-champion-{batch}")
def evaluate_champion(ws: Workspace, info: dict, champ, settings: Settings, batch: str) -> dict:
    return loop.champion_scores(ws, info, champ, settings)


@step(task_run_name="replay-{batch}")
def replay(ws: Workspace, info: dict, settings: Settings, batch: str) -> str:
    return loop.new_replay(ws, info, settings)


@step(task_run_name="record-{batch}")
def record(ws: Workspace, info: dict, rec: dict, champion_version, scores: dict, promoted: bool, replay_dir, batch: str) -> str:
    return loop.finish(ws, info, rec, champion_version, scores, promoted, replay_dir)


@step(task_run_name="tag-{batch}")
def tag(settings: Settings, version: str, tags: dict, batch: str) -> None:
    loop.tag_version(settings, version, tags)


def _run_name() -> str:
    return f"continual-{Path(flow_run.parameters['batch_dir']).name}"


@flow(flow_run_name=_run_name, log_prints=True)
def continual_flow(batch_dir: str, params: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Process one batch folder; returns the step record (also written to processed/<batch>.json)."""
    settings = load_settings(params, overrides or [])
    ws, path = Workspace.of(settings), Path(batch_dir).resolve()
    b, log = path.name, get_run_logger()
    io = {"retries": settings.flows.retries, "retry_delay_seconds": settings.flows.retry_delay_s}
    with loop.workspace_lock(ws):
        prepare.with_options(**io)(ws, settings, b)
        info = ingest(ws, path, settings, b)
        version.with_options(**io)(ws, b)
        champ = champion.with_options(**io)(settings, b)
        rec = {"batch": b, "domain": info["domain"], "time": loop.now(), "accepted": info["accepted"],
               "quarantined": info["quarantined"], "drift": None, "updated": False, "candidate_version": None,
               "promoted": False, "reasons": []}
        if champ is not None:
            rec["drift"] = drift(ws, info, champ, settings, b)
        if champ is None or rec["drift"]["drift"]:
            candidate = update(ws, info, champ, settings, b)
            decision = gate.with_options(**io)(ws, info, candidate, settings, b)
            rec |= {"updated": True, "candidate_version": candidate, "promoted": decision["promoted"],
                    "reasons": decision["reasons"], "decision": decision["decision"]}
            before, after = decision["before"], decision["after"] if decision["promoted"] else decision["before"]
        else:
            before = after = evaluate_champion(ws, info, champ, settings, b)
        champion_version = rec["candidate_version"] if rec["promoted"] else (champ[0] if champ else None)
        replay_dir = replay(ws, info, settings, b) if rec["promoted"] else None
        rec |= {"champion_version": champion_version, "miou_before": {} if champ is None else before,
                "miou_after": {} if champion_version is None else after, "summary": loop.summary_line(rec)}
        commit = record.with_options(**io)(ws, info, rec, champion_version, after, rec["promoted"], replay_dir, b)
        if rec["candidate_version"]:
            stage = ("train-" if champ is None else "update-") + b
            tag.with_options(**io)(settings, rec["candidate_version"],
                                   {"segloop.loop.commit": commit, "segloop.loop.stage": stage,
                                    "segloop.loop.workspace": str(ws.root),
                                    "segloop.loop.params_md5": file_md5(ws.root / "params.yaml")}, b)
        rec["commit"] = commit
    log.info("batch %s: %s", b, rec["summary"])
    return rec
