"""`make bench`'s summary table (benchmarks/run_all.py): an unmet goal reads NOT met, in either shape."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_marks_unmet_goals_given_as_booleans_or_dicts(tmp_path):
    reports = {
        "plain": {"goals": {"fast": False, "small": True}, "wall_s": 1.0},
        "dicts": {"goals": {"fp32": {"target": 1.5, "measured": 1.35, "met": False}}, "headline": {"fp32": "1.35x"}},
        "partly": {"goals": {"x": {"met": True}, "y": None}},
    }
    for name, report in reports.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(report))

    lines = run_all().summary(tmp_path, {}).splitlines()
    rows = {name: next(line for line in lines if line.startswith(f"| {name} |")) for name in reports}
    assert "NOT met: fast" in rows["plain"] and "small" not in rows["plain"]
    assert "NOT met: fp32" in rows["dicts"] and "fp32: 1.35x" in rows["dicts"]
    assert "| met (not measured: y) |" in rows["partly"]
