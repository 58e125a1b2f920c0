"""Deploy `monitor_flow` on the cron schedule in params.yaml (`flows.schedule`): served by this
process (one machine), or to a work pool whose workers run it (many machines).

    prefect server start                 # terminal 1: the API and UI (http://127.0.0.1:4200)
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.deploy   # terminal 2: serves the schedule
    prefect deployment run 'monitor-flow/segloop-monitor'              # a run by hand, any time

    make stack && source .stack/env      # or any Prefect server with a process work pool and workers
    python -m flows.deploy --pool segloop [--source GIT_URL_OR_SHARED_PATH]

The served process polls for scheduled runs and executes them; Ctrl-C stops it. With
`--pool` this exits once the deployment is registered: the pool's workers fetch the code
from `--source` (default: this checkout, for workers that see the same path) and run it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from uuid import UUID

from flows.monitor import monitor_flow
from segloop.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/monitor.py:monitor_flow"  # relative to the source's root


def deploy_to_pool(
    name: str,
    pool: str,
    parameters: dict,
    source: str | Path = ROOT,
    cron: str | None = None,
    description: str | None = None,
) -> UUID:
    """Register `monitor_flow` as deployment `name` on work pool `pool`; returns its id.

    `source`: a git URL or a folder every worker can read. A plain `monitor_flow.deploy(...)`
    has neither an image nor a code location for a process worker and is refused by Prefect.
    One loop run at a time across all workers and machines: a second run of the deployment
    while one is running is cancelled (CANCEL_NEW), it does not queue; the workspace's file
    lock still guards runs on one host that do not go through the deployment.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    return monitor_flow.from_source(source=str(source), entrypoint=ENTRYPOINT).deploy(
        name=name,
        work_pool_name=pool,
        cron=cron,
        parameters=parameters,
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        description=description,
        print_next_steps=False,
        ignore_warnings=True,  # "process pool: consider .serve": a process pool is the point here
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--name", default="segloop-monitor")
    parser.add_argument("--pool", help="deploy to this work pool (its workers run the flow) instead of serving here")
    parser.add_argument("--source", default=str(ROOT), help="with --pool: git URL or shared folder of this code")
    args = parser.parse_args(argv)
    settings = load_settings(args.params, args.set)
    params = str(Path(args.params).resolve())
    parameters = {"params": params, "overrides": args.set}
    description = f"segloop continual loop over {settings.flows.incoming_dir} ({params})"
    if args.pool:
        deployment = deploy_to_pool(args.name, args.pool, parameters, args.source, settings.flows.schedule, description)
        print(f"deployment monitor-flow/{args.name} ({deployment}) on work pool {args.pool}, code from {args.source}")
        return
    monitor_flow.serve(name=args.name, cron=settings.flows.schedule, parameters=parameters, description=description)


if __name__ == "__main__":
    main()
