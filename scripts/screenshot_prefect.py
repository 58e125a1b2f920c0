"""Screenshot the Prefect UI on the project's Prefect database with headless Chromium
(`make screenshot`): the flow runs list and the newest `continual-*` flow run that
updated the model, with its task runs.

Starts `prefect server start` on a free loopback port with PREFECT_HOME (default
.prefect, where `make demo` keeps its runs), waits until the API answers, finds the flow
runs through the API, and renders each page once its DOM shows the expected run names
(never a spinner). Writes <out>/prefect_runs.png and <out>/prefect_flow_run.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from screenshot_ui import (  # noqa: E402
    ScreenshotError,
    find_browser,
    free_port,
    shoot_pages,
    start_server,
    stop_ui,
    wait_until_up,
)


def post_json(url: str, payload: dict) -> list | dict:
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def updated_run(api: str, continual: list[dict]) -> dict:
    """The newest continual run that updated the model (its page shows drift, update and gate
    tasks), else the newest; with its task run names under "tasks"."""
    first = None
    for run in continual:
        tasks = post_json(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}, "limit": 50})
        run = run | {"tasks": [t["name"] for t in tasks]}
        if any(t.startswith("gate-") for t in run["tasks"]):
            return run
        first = first or run
    return first


def shoot_runs(browser: str, base: str, api: str, args, where: str) -> None:
    """The flow runs list and the newest continual run that updated the model, with its tasks."""
    runs = post_json(f"{api}/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 50})
    continual = [r for r in runs if r["name"].startswith("continual-") and r["state_type"] == "COMPLETED"]
    if not continual:
        raise ScreenshotError(f"no completed continual-* flow runs in {where} (run `make demo`)")
    newest, shown = continual[0], updated_run(api, continual)
    tasks = [t for t in shown["tasks"] if t.startswith(("update-", "gate-"))]
    pages = [
        (f"{base}/runs", [newest["name"], "monitor-"], args.out / "prefect_runs.png"),
        (f"{base}/runs/flow-run/{shown['id']}", [shown["name"], *tasks], args.out / "prefect_flow_run.png"),
    ]
    shoot_pages(browser, pages, args.budget_ms, tuple(args.size))
    print(f"{len(runs)} flow runs; flow run shown: {shown['name']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--home", type=Path, default=Path(".prefect"), help="PREFECT_HOME holding prefect.db (default .prefect)"
    )
    ap.add_argument("--out", type=Path, default=Path("reports/ui"))
    ap.add_argument("--size", type=int, nargs=2, default=[1500, 950], metavar=("WIDTH", "HEIGHT"))
    ap.add_argument(
        "--budget-ms", type=int, default=10000, help="virtual time Chromium gives the app to load (doubled on retry)"
    )
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the server")
    ap.add_argument("--api", help="shoot this running Prefect server's UI (e.g. the stack's .../api) instead")
    args = ap.parse_args(argv)
    try:
        browser = find_browser()
        args.out.mkdir(parents=True, exist_ok=True)
        if args.api:
            api = args.api.rstrip("/")
            shoot_runs(browser, api.removesuffix("/api"), api, args, args.api)
            return 0
        home = args.home.resolve()
        if not (home / "prefect.db").is_file():
            raise ScreenshotError(f"{home / 'prefect.db'}: no Prefect database here (run `make demo` first)")
        port = free_port()
        base, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
        log = args.out / "prefect_server.log"
        env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_API_URL": api,
            "PREFECT_API_URL": api,
        }
        prefect = Path(sys.executable).parent / "prefect"
        cmd = [
            str(prefect) if prefect.exists() else "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        proc = start_server(cmd, env, log)
        try:
            up_s = wait_until_up(f"{api}/health", proc, args.timeout, log, "prefect server")
            print(f"Prefect API answered after {up_s:.1f} s")
            shoot_runs(browser, base, api, args, str(home / "prefect.db"))
        finally:
            stop_ui(proc)
    except ScreenshotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
