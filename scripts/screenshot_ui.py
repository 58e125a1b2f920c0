"""Screenshot the MLflow UI's landing page, the experiment's runs, the registered-model page
and its champion's version page with headless Chromium (`make screenshot`), as `make ui`
serves them (127.0.0.2, model-training view).

Starts `mlflow ui` on a store (as `make ui` does) on a free loopback port, waits until
it answers and the model is registered, then renders each page in headless Chromium.
The UI is a React app that fetches its data after the first paint, so Chromium gets a
virtual-time budget, and the page's DOM is dumped first and checked for the model name
and the `champion` alias: a spinner or an error page is never saved as a screenshot.
Writes <out>/mlflow_home.png, mlflow_runs.png, mlflow_model.png and mlflow_model_version.png.

Needs Debian's chromium (chromium-driver too if you drive it with Selenium):
    apt-get install -y chromium chromium-driver
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
APT_HINT = "install Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver"


class ScreenshotError(RuntimeError):
    pass


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise ScreenshotError(f"no headless browser found (looked for {', '.join(BROWSERS)} on PATH); {APT_HINT}")


# A loopback address other than 127.0.0.1: the MLflow 3 UI opens its GenAI assistant
# side panel (a third of the page) only for localhost / 127.0.0.1 / ::1 hostnames.
HOST = "127.0.0.2"
# The UI's GenAI / model-training switch as a URL parameter (the links `make ui` prints).
VIEW = "workflowType=machine_learning"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_ui(db: Path, artifacts: Path, port: int, log: Path) -> subprocess.Popen:
    """`mlflow ui` on the store, loopback only, in its own process group (stopped as one)."""
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [
        str(mlflow) if mlflow.exists() else "mlflow",
        "ui",
        "--backend-store-uri",
        f"sqlite:///{db}",
        "--artifacts-destination",
        str(artifacts),
        "--host",
        HOST,
        "--port",
        str(port),
        "--allowed-hosts",
        f"{HOST}:{port}",
        "--cors-allowed-origins",
        f"http://{HOST}:{port}",
    ]
    # (without the origin, MLflow's CORS guard refuses the UI's own POSTs: runs pages show "Request error")
    # Job execution (huey workers) serves MLflow's GenAI features, not segloop (as in `make ui`).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return start_server(cmd, env, log)


def start_server(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A UI server in its own process group (stopped as one by stop_ui), its output in `log`."""
    with log.open("wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_ui(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the group this script started: server and its workers
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_until_up(
    health_url: str, proc: subprocess.Popen, timeout_s: float, log: Path, what: str = "mlflow ui"
) -> float:
    """Seconds until `health_url` answered; ScreenshotError if the server died or never answered."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            raise ScreenshotError(
                f"{what} exited with status {proc.returncode}; its log: {log}\n{log.read_text()[-2000:]}"
            )
        try:
            with urllib.request.urlopen(health_url, timeout=2):
                return time.monotonic() - started
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise ScreenshotError(f"{what} did not answer on {health_url} within {timeout_s:g}s; its log: {log}")


def registered_model(base: str, name: str) -> dict:
    try:
        return get_json(f"{base}/ajax-api/2.0/mlflow/registered-models/get?name={urllib.parse.quote(name)}")[
            "registered_model"
        ]
    except urllib.error.HTTPError as err:
        raise ScreenshotError(
            f"no registered model {name!r} in this store (HTTP {err.code}); "
            "train and register one first (e.g. `make demo`)"
        ) from None


def chromium(browser: str, url: str, budget_ms: int, size: tuple[int, int], *mode: str) -> subprocess.CompletedProcess:
    """One headless Chromium run on `url`: a fresh profile, no network but the loopback UI."""
    with tempfile.TemporaryDirectory(prefix="segloop-chromium-") as profile:
        cmd = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--window-size={size[0]},{size[1]}",
            "--hide-scrollbars",
            f"--virtual-time-budget={budget_ms}",
            *mode,
            url,
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=budget_ms / 1000 + 120)


def shoot(
    browser: str, url: str, expect: list[str], png: Path, budget_ms: int, size: tuple[int, int], tries: int = 3
) -> int:
    """Screenshot `url` once its DOM shows every string in `expect`; returns the budget used."""
    for _ in range(tries):
        dom = chromium(browser, url, budget_ms, size, "--dump-dom").stdout
        missing = [text for text in expect if text not in dom]
        if not missing:
            break
        budget_ms *= 2  # a slow (shared) machine: give the app more virtual time
    else:
        raise ScreenshotError(f"{url}: page never showed {missing} (spinner or error page?) within {budget_ms // 2} ms")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    proc = chromium(browser, url, budget_ms, size, f"--screenshot={png}")
    if not png.is_file():
        raise ScreenshotError(f"chromium wrote no screenshot for {url}:\n{proc.stderr[-2000:]}")
    return budget_ms


def shoot_pages(browser: str, pages: list[tuple[str, list[str], Path]], budget_ms: int, size: tuple[int, int]) -> None:
    """Screenshot each (url, expected strings, png), saying where each came from and how long it took."""
    for url, expect, png in pages:
        t0 = time.monotonic()
        used = shoot(browser, url, expect, png, budget_ms, size)
        print(f"{png}  <- {url}  ({time.monotonic() - t0:.1f} s, virtual time {used} ms)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--store", type=Path, default=Path("mlruns/mlflow.db"), help="MLflow sqlite db (default mlruns/mlflow.db)"
    )
    ap.add_argument("--artifacts", type=Path, help="artifact folder (default: artifacts/ beside the db)")
    ap.add_argument("--model", help="registered model name (default registry.model_name of --params)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--experiment", default="segloop", help="experiment whose runs page is shot (default segloop)")
    ap.add_argument("--out", type=Path, default=Path("reports/ui"))
    # A laptop screen: what a reviewer sees without scrolling.
    ap.add_argument("--size", type=int, nargs=2, default=[1400, 900], metavar=("WIDTH", "HEIGHT"))
    ap.add_argument(
        "--budget-ms", type=int, default=8000, help="virtual time Chromium gives the app to load (doubled on retry)"
    )
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the UI server")
    ap.add_argument("--url", help="shoot this running MLflow server (e.g. the stack's) instead of one on --store")
    args = ap.parse_args(argv)
    try:
        browser = find_browser()
        name = args.model
        if name is None:
            sys.path.insert(0, str(ROOT / "src"))
            from segloop.config import load_settings

            name = load_settings(args.params).registry.model_name
        args.out.mkdir(parents=True, exist_ok=True)
        base, proc, log = (args.url or "").rstrip("/"), None, args.out / "mlflow_ui.log"
        if not args.url:
            db = args.store.resolve()
            if not db.is_file():
                raise ScreenshotError(f"{db}: no MLflow store here (run `make demo`, or pass --store PATH/mlflow.db)")
            port = free_port()
            base = f"http://{HOST}:{port}"
            proc = start_ui(db, (args.artifacts or db.parent / "artifacts").resolve(), port, log)
        try:
            up_s = wait_until_up(f"{base}/health", proc, args.timeout, log) if proc else 0.0
            model = registered_model(base, name)
            aliases = {a["alias"]: a["version"] for a in model.get("aliases", [])}
            if "champion" not in aliases:
                raise ScreenshotError(
                    f"{name} has no champion alias yet (aliases: {aliases or 'none'}); run `segloop gate` first"
                )
            size = tuple(args.size)
            exp = get_json(
                f"{base}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name="
                f"{urllib.parse.quote(args.experiment)}"
            )["experiment"]
            pages = [
                (f"{base}/#/?{VIEW}", [args.experiment], args.out / "mlflow_home.png"),
                (f"{base}/#/experiments/{exp['experiment_id']}/runs?{VIEW}", ["train:"], args.out / "mlflow_runs.png"),
                (
                    f"{base}/#/models/{urllib.parse.quote(name)}?{VIEW}",
                    [name, "champion"],
                    args.out / "mlflow_model.png",
                ),
                (
                    f"{base}/#/models/{urllib.parse.quote(name)}/versions/{aliases['champion']}?{VIEW}",
                    [f"Version {aliases['champion']}", "champion"],
                    args.out / "mlflow_model_version.png",
                ),
            ]
            shoot_pages(browser, pages, args.budget_ms, size)
            print(f"UI answered after {up_s:.1f} s; champion is {name} v{aliases['champion']}")
        finally:
            if proc is not None:
                stop_ui(proc)
    except ScreenshotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
