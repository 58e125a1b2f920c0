"""Screenshot the Prometheus graph page of `make monitor` with headless Chromium: the
service's request rate by status and version, and its mean confidence per version.

    python scripts/screenshot_monitor.py [--prometheus http://127.0.0.1:9090] [--out reports/ui] [--range 15m]

Run it while `make monitor` runs and the service has had traffic. The page's DOM is checked
for both expressions before the screenshot is kept (see scripts/screenshot_ui.py).
Writes <out>/prometheus_serve.png. Needs Debian's chromium.
"""

from __future__ import annotations

import argparse
import sys
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from screenshot_ui import ScreenshotError, find_browser, get_json, shoot  # noqa: E402

EXPRESSIONS = (
    "sum by (status, version) (rate(segloop_serve_requests_total[1m]))",
    "segloop:confidence:mean_5m",
)


def graph_url(base: str, range_: str) -> str:
    params = {}
    for i, expr in enumerate(EXPRESSIONS):
        params |= {f"g{i}.expr": expr, f"g{i}.tab": "0", f"g{i}.range_input": range_, f"g{i}.stacked": "0"}
    return f"{base.rstrip('/')}/graph?{urllib.parse.urlencode(params)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--out", type=Path, default=Path("reports/ui"))
    parser.add_argument("--range", default="15m", help="graph range (Prometheus duration)")
    args = parser.parse_args(argv)
    try:
        browser = find_browser()
        found = get_json(f"{args.prometheus}/api/v1/query?{urllib.parse.urlencode({'query': EXPRESSIONS[0]})}")
        if not found["data"]["result"]:
            raise ScreenshotError(
                f"{args.prometheus} has no segloop_serve_requests_total yet: send the service requests first"
            )
        args.out.mkdir(parents=True, exist_ok=True)
        png = args.out / "prometheus_serve.png"
        shoot(
            browser,
            graph_url(args.prometheus, args.range),
            ["segloop_serve_requests_total", "segloop:confidence:mean_5m"],
            png,
            budget_ms=8000,
            size=(1400, 1300),
        )
    except ScreenshotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
