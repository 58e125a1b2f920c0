"""Screenshot the Evidently UI's dashboard of the loop's drift checks over time with headless
Chromium (`make screenshot`): the project of the registered model, as `make evidently-ui` serves it.

Starts `evidently ui` on the workspace (drift.evidently_workspace, default evidently/) on a free
loopback port, waits until its API answers, finds the model's project and its snapshots through
the API, and renders the project's dashboard once its DOM shows every panel title (never a
spinner). Writes <out>/evidently_dashboard.png.
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
    ROOT,
    ScreenshotError,
    find_browser,
    shoot_pages,
    start_server,
    stop_ui,
    wait_until_up,
)

HOST = "127.0.0.1"
PANELS = ["Drift score", "Share of drifted features", "Champion's mean confidence", "Verdict"]


def get_json(url: str) -> list | dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def settings_of(params: Path) -> tuple[Path, str]:
    """(Evidently workspace, registered model name) from params.yaml."""
    sys.path.insert(0, str(ROOT / "src"))
    from segloop.config import load_settings

    settings = load_settings(params)
    if settings.drift.evidently_workspace is None:
        raise ScreenshotError(f"{params}: drift.evidently_workspace is null, so the loop writes no drift history")
    return settings.drift.evidently_workspace, settings.registry.model_name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--workspace", type=Path, help="Evidently workspace (default drift.evidently_workspace)")
    ap.add_argument("--model", help="registered model name (default registry.model_name)")
    ap.add_argument("--out", type=Path, default=Path("reports/ui"))
    ap.add_argument("--size", type=int, nargs=2, default=[1500, 1700], metavar=("WIDTH", "HEIGHT"))
    ap.add_argument(
        "--budget-ms", type=int, default=10000, help="virtual time Chromium gives the app to load (doubled on retry)"
    )
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the UI server")
    args = ap.parse_args(argv)
    try:
        browser = find_browser()
        workspace, model = args.workspace, args.model
        if workspace is None or model is None:
            default_workspace, default_model = settings_of(args.params)
            workspace, model = workspace or default_workspace, model or default_model
        if not workspace.is_dir():
            raise ScreenshotError(f"{workspace}: no Evidently workspace here (run `make demo` first)")
        port, evidently = free_port(), Path(sys.executable).parent / "evidently"
        base = f"http://{HOST}:{port}"
        args.out.mkdir(parents=True, exist_ok=True)
        log = args.out / "evidently_ui.log"
        cmd = [str(evidently), "ui", "--workspace", str(workspace), "--host", HOST, "--port", str(port)]
        proc = start_server(cmd, {**os.environ, "DO_NOT_TRACK": "1"}, log)
        try:
            up_s = wait_until_up(f"{base}/api/version", proc, args.timeout, log, "evidently ui")
            projects = [p for p in get_json(f"{base}/api/projects") if p["name"] == model]
            if not projects:
                raise ScreenshotError(f"{workspace}: no project {model!r} (no drift check written yet)")
            pid = projects[0]["id"]
            pages = [(f"{base}/projects/{pid}", PANELS, args.out / "evidently_dashboard.png")]
            shoot_pages(browser, pages, args.budget_ms, tuple(args.size))
            print(f"Evidently UI answered after {up_s:.1f} s; project {model} ({pid})")
        finally:
            stop_ui(proc)
    except ScreenshotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
