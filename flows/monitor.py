"""`monitor_flow`: every batch waiting in the incoming folder, oldest first, once each.

Run once without any server (Prefect's ephemeral mode):  python -m flows.monitor
Serve it on the cron schedule of params.yaml:             python -m flows.deploy
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from prefect import flow, get_run_logger

from flows.continual import continual_flow
from flows.labels import labels_flow
from segloop import lifeline, loop
from segloop.config import load_settings
from segloop.loop import Workspace


def _run_name() -> str:
    return f"monitor-{datetime.now(UTC):%Y%m%d-%H%M%S}"


@flow(flow_run_name=_run_name, log_prints=True)
def monitor_flow(params: str = "params.yaml", overrides: list[str] | None = None) -> list[dict]:
    """Run `labels_flow` for each ready label drop (labels/done/<batch>/), then `continual_flow`
    for each pending batch; returns their step records.

    A label drop that fails to import (too few good masks, ...) is logged and left in place (fix
    it and the next run tries again); it never holds up the batches. A batch is pending until
    its step commits a marker (processed/<batch>.json): a batch whose step fails stays pending,
    and later batches wait for it (order matters), until it has failed `flows.max_attempts`
    times: then it is moved to failed/<batch>/ and this run goes on with the next batch (so
    does it for a refused batch name). A run that finds the workspace locked by another run
    does nothing. (That lock holds on one host; deployed to a work pool,
    `flows.deploy.deploy_to_pool`'s concurrency limit cancels a second run wherever it would start.)
    """
    lifeline.guard()  # Prefect's temporary server, DVC and training die with this process, even killed
    settings = load_settings(params, overrides or [])
    ws, log = Workspace.of(settings), get_run_logger()
    try:
        with loop.workspace_lock(ws):
            loop.pull_workspace(ws, settings)  # steps other hosts ran count as processed here too
            records = import_label_drops(ws, params, overrides)
            pending = loop.pending_batches(ws)
            log.info(
                "%d pending batch(es) in %s: %s", len(pending), ws.incoming, ", ".join(p.name for p in pending) or "-"
            )
            for batch in pending:
                try:
                    records.append(continual_flow(str(batch), params, overrides))
                except loop.DeadLettered as err:
                    log.warning("%s", err)
            return records
    except loop.LoopBusy as busy:
        log.warning("%s: skipping this run", busy)
        return []


def import_label_drops(ws: Workspace, params: str, overrides: list[str] | None) -> list[dict]:
    """`labels_flow` for each ready drop, oldest first; the records of those that were imported."""
    log, records = get_run_logger(), []
    drops = loop.pending_labels(ws)
    log.info("%d label drop(s) in %s: %s", len(drops), ws.labels_done, ", ".join(p.name for p in drops) or "-")
    for drop in drops:
        try:
            records.append(labels_flow(drop.name, str(drop), params, overrides))
        except Exception as err:  # the drop's own fault or a failed update: reported, the loop goes on
            log.warning(
                "labels for batch %s not imported (%s: %s); fix %s and the next run retries",
                drop.name,
                type(err).__name__,
                err,
                drop,
            )
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.monitor", description="process every pending batch once, then exit"
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args(argv)
    for rec in monitor_flow(args.params, args.set):
        print(f"{rec['batch']}: {rec['summary']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
