"""Run every benchmark in benchmarks/ and summarise reports/bench/*.json in reports/bench/README.md.

    python benchmarks/run_all.py [--only NAME ...] [--skip NAME ...] [--quick] [--summary-only]

Each benchmark runs alone in its own process (`python benchmarks/NAME.py`, as one would run
it by hand), its output kept in reports/bench/logs/NAME.log; a progress line shows which one
runs, for how long, and its latest output line. `--quick` and `--out` are passed to the
benchmarks that accept them. Then every reports/bench/*.json becomes one row of a table: a benchmark may put
`headline` ({label: figure}) and `goals` ({name: true | false | null}) at the top level of
its json; for one that does not, a few of its top-level numbers are shown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
SKIP_KEYS = {"settings", "machine", "model", "what"}


def benchmarks() -> list[Path]:
    return sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_"))


def run_one(script: Path, log_path: Path, args: list[str], bar: tqdm | None) -> tuple[int, float]:
    """Run `script`, output to `log_path`; the bar shows elapsed time and the latest line."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    started, last = time.monotonic(), [""]
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )

        def pump() -> None:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if line.strip():
                    last[0] = line.strip()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        while proc.poll() is None:
            if bar is not None:
                elapsed = int(time.monotonic() - started)
                bar.set_description(f"{script.stem} {elapsed // 60}:{elapsed % 60:02d}")
                bar.set_postfix_str(last[0][-70:])
            time.sleep(0.5)
        reader.join()
    return proc.returncode, time.monotonic() - started


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _drift(r: dict) -> dict:
    full = [by["1.0"]["rate"] for by in r["detection"].values() if "1.0" in by]
    out = {"false alarms": f"{r['false_alarm']['rate']:.0%}"}
    if full:
        out["detection at full strength (min)"] = f"{min(full):.0%}"
    if r.get("timing"):
        out["featurise + decide img/s"] = r["timing"]["images_per_s"]
    return out


# Benchmarks written before the `headline` convention: their figures, picked here.
LEGACY = {"drift": _drift}


def headline(name: str, report: dict) -> dict:
    """The figures a benchmark names itself, else its top-level numbers (a few)."""
    if isinstance(report.get("headline"), dict):
        return report["headline"]
    if name in LEGACY:
        try:
            return LEGACY[name](report)
        except (KeyError, TypeError, ValueError):
            pass  # its format changed: fall back to the generic figures
    numbers = {
        k: v
        for k, v in report.items()
        if k not in SKIP_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    return dict(list(numbers.items())[:6])


def goals_cell(goals) -> str:
    if not isinstance(goals, dict) or not goals:
        return "-"
    # a goal is true / false / null (not measured), or a dict saying so in "met"
    goals = {k: v.get("met") if isinstance(v, dict) else v for k, v in goals.items()}
    unmet = [k for k, v in goals.items() if v is False]
    unknown = [k for k, v in goals.items() if v is None]
    cell = f"NOT met: {', '.join(unmet)}" if unmet else "met"
    return cell + (f" (not measured: {', '.join(unknown)})" if unknown else "")


def summary(bench_dir: Path, failed: dict[str, int]) -> str:
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (benchmarks/run_all.py) from reports/bench/*.json; each benchmark's",
        "docstring says what it measures, its log is in logs/.",
        "",
        "| benchmark | headline figures | goals | wall s | written |",
        "|---|---|---|---|---|",
    ]
    for path in sorted(bench_dir.glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            lines.append(f"| {path.stem} | unreadable json ({err}) | - | - | - |")
            continue
        if not isinstance(report, dict):
            continue
        figures = (
            "<br>".join(f"{k}: {_fmt(v)}" for k, v in headline(path.stem, report).items()).replace("|", "\\|") or "-"
        )
        wall = report.get("wall_s", report.get("total_wall_s", "-"))
        written = datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
        lines.append(f"| {path.stem} | {figures} | {goals_cell(report.get('goals'))} | {_fmt(wall)} | {written} |")
    if failed:
        lines += [
            "",
            "Failed this run (their json, if listed, is from an earlier run): "
            + ", ".join(f"{name} (exit {rc}, logs/{name}.log)" for name, rc in failed.items()),
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", type=Path, default=ROOT / "reports" / "bench", help="where the benchmarks and the summary write"
    )
    ap.add_argument("--only", nargs="*", default=None, help="benchmark names (file stems) to run")
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--quick", action="store_true", help="pass --quick to the benchmarks that accept it")
    ap.add_argument("--summary-only", action="store_true", help="only rewrite README.md from the json files")
    args = ap.parse_args(argv)
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    scripts = [s for s in benchmarks() if (args.only is None or s.stem in args.only) and s.stem not in args.skip]
    failed: dict[str, int] = {}
    if not args.summary_only:
        interactive = sys.stderr.isatty()
        bar = tqdm(total=len(scripts), unit="bench", dynamic_ncols=True) if interactive else None
        for i, script in enumerate(scripts, 1):
            text = script.read_text()
            extra = (["--quick"] if args.quick and '"--quick"' in text else []) + (
                ["--out", str(args.out)] if '"--out"' in text else []
            )
            if bar is None:
                print(
                    f"[{i}/{len(scripts)}] {script.name} {' '.join(extra)}... (log: "
                    f"{args.out / 'logs' / script.stem}.log)",
                    flush=True,
                )
            rc, seconds = run_one(script, args.out / "logs" / f"{script.stem}.log", extra, bar)
            if rc:
                failed[script.stem] = rc
            message = f"{script.name}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in {seconds:.0f} s"
            if bar is not None:
                bar.write(message)
                bar.update(1)
            else:
                print(message, flush=True)
        if bar is not None:
            bar.close()
    table = summary(args.out, failed)
    (args.out / "README.md").write_text(table)
    print("\n" + table)
    print(f"wrote {args.out / 'README.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
