"""Serve `monitor_flow` as a deployment on the cron schedule in params.yaml (`flows.schedule`).

    prefect server start                 # terminal 1: the API and UI (http://127.0.0.1:4200)
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.deploy   # terminal 2: serves the schedule
    prefect deployment run 'monitor-flow/segloop-monitor'              # a run by hand, any time

The served process polls for scheduled runs and executes them; Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.monitor import monitor_flow
from segloop.config import load_settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--name", default="segloop-monitor")
    args = parser.parse_args(argv)
    settings = load_settings(args.params, args.set)
    params = str(Path(args.params).resolve())
    monitor_flow.serve(
        name=args.name,
        cron=settings.flows.schedule,
        parameters={"params": params, "overrides": args.set},
        description=f"segloop continual loop over {settings.flows.incoming_dir} ({params})",
    )


if __name__ == "__main__":
    main()
