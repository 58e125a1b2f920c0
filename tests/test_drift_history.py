"""Drift over time: points written into a real Evidently workspace are read back through its own
API (snapshots, dashboard), and the same figures come out of /metrics in Prometheus' text format.
The loop writing them on a real drift check is tested in test_labels.py (fixture `awaiting`)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from segloop.drift import history as drift_history
from segloop.drift.history import FIGURES, LATEST, DriftPoint, history, open_project, read_latest, record_point
from segloop.serve import Metrics


def point(batch: str, time: str, score: float, drift: bool, confidence: float | None = 0.9) -> DriftPoint:
    return DriftPoint(
        model="loop",
        batch=batch,
        domain="fog" if drift else "base",
        time=time,
        score=score,
        share_drifted=0.4 if drift else 0.0,
        confidence=confidence,
        reference_confidence=0.95,
        drift=drift,
        closest_domain="base",
        model_version="3",
        alpha=0.01,
    )


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_points_are_snapshots_the_evidently_workspace_reads_back_with_a_dashboard(tmp_path):
    ws = tmp_path / "evidently"
    record_point(ws, point("01-base", "2026-12-03T10:00:00+00:00", 0.8, False))
    record_point(ws, point("02-fog", "2026-12-03T11:00:00+00:00", 1e-4, True, confidence=0.61))
    # A retried step writes its batch again: replaced, not doubled.
    record_point(ws, point("02-fog", "2026-12-03T11:05:00+00:00", 2e-4, True, confidence=0.62))

    rows = history(ws, "loop")
    assert [r["batch"] for r in rows] == ["01-base", "02-fog"]
    fog = rows[1]
    assert fog["score"] == pytest.approx(2e-4) and fog["share_drifted"] == pytest.approx(0.4)
    assert fog["confidence"] == pytest.approx(0.62) and fog["reference_confidence"] == pytest.approx(0.95)
    assert fog["drift"] == 1.0 and rows[0]["drift"] == 0.0
    assert fog["evidence"] == pytest.approx(-math.log10(2e-4)) and fog["threshold"] == pytest.approx(2.0)
    assert fog["model_version"] == "3" and "drift" in fog["tags"] and "domain:fog" in fog["tags"]
    assert history(ws, "other-model") == []
    record_point(ws, point("03-base", "2026-12-03T12:00:00+00:00", 0.5, False, confidence=None))
    assert "confidence" not in history(ws, "loop")[-1]  # unknown: left out, never NaN

    # One project per model, found again (not duplicated); its dashboard plots every figure.
    evidently, project = open_project(ws, "loop")
    assert [p.name for p in evidently.list_projects()] == ["loop"]
    dashboard = evidently.get_dashboard(project.id)
    titles = {p.title for p in dashboard.panels}
    assert {"Drift score", "Share of drifted features", "Champion's mean confidence", "Verdict"} <= titles
    plotted = {v.metric_labels["column"] for p in dashboard.panels for v in p.values if "column" in v.metric_labels}
    assert plotted == set(FIGURES) - {"score"}  # the score is plotted as its -log10 (evidence)
    assert [t.title for t in dashboard.tabs] == ["Drift"]


def test_a_batch_rewritten_after_a_write_died_midway_is_held_once_and_checks_do_not_scan(tmp_path, monkeypatch):
    ws = tmp_path / "evidently"
    record_point(ws, point("01-base", "2026-12-03T10:00:00+00:00", 0.8, False))
    real_write = drift_history.write_json
    calls = {"n": 0}

    def die_after_adding(path, data):  # the second write of the index: after the snapshot was added
        calls["n"] += 1
        if path.name == drift_history.INDEX and calls["n"] == 2:
            raise OSError("injected: died after adding the snapshot")
        real_write(path, data)

    monkeypatch.setattr(drift_history, "write_json", die_after_adding)
    with pytest.raises(OSError, match="injected"):
        record_point(ws, point("02-fog", "2026-12-03T11:00:00+00:00", 1e-4, True))
    monkeypatch.undo()
    assert [r["batch"] for r in history(ws, "loop")] == ["01-base", "02-fog"]  # added, but not indexed
    record_point(ws, point("02-fog", "2026-12-03T11:05:00+00:00", 2e-4, True))  # the step's retry
    rows = history(ws, "loop")
    assert [r["batch"] for r in rows] == ["01-base", "02-fog"] and rows[1]["score"] == pytest.approx(2e-4)

    # An ordinary check (a new batch, or a retried one the index knows) reads no earlier snapshot.
    read = []
    evidently, _ = open_project(ws, "loop")
    monkeypatch.setattr(type(evidently), "get_run", lambda self, *a: read.append(a))
    record_point(ws, point("03-base", "2026-12-03T12:00:00+00:00", 0.5, False))
    record_point(ws, point("03-base", "2026-12-03T12:05:00+00:00", 0.6, False))
    assert read == []
    monkeypatch.undo()
    assert [r["batch"] for r in history(ws, "loop")] == ["01-base", "02-fog", "03-base"]


def test_the_service_metrics_carry_each_model_s_latest_point(tmp_path):
    ws = tmp_path / "evidently"
    assert "segloop_drift_score" not in samples(generate_latest(Metrics(ws).registry).decode())  # nothing yet
    record_point(ws, point("01-base", "2026-12-03T10:00:00+00:00", 0.8, False))
    record_point(ws, point("02-fog", "2026-12-03T11:00:00+00:00", 1e-4, True, confidence=None))
    record_point(ws, replace(point("01-base", "2026-12-03T10:30:00+00:00", 0.7, False), model="other"))

    m = samples(generate_latest(Metrics(ws).registry).decode())
    loop, other = (("model", "loop"),), (("model", "other"),)
    assert m[("segloop_drift_score", loop)] == pytest.approx(1e-4)
    assert m[("segloop_drift_share_drifted", loop)] == pytest.approx(0.4)
    assert m[("segloop_drift_verdict", loop)] == 1.0
    assert ("segloop_drift_champion_confidence", loop) not in m  # unknown: no sample rather than a made-up one
    assert m[("segloop_drift_check_timestamp_seconds", loop)] == 1796295600.0  # 2026-12-03T11:00Z
    assert m[("segloop_drift_score", other)] == pytest.approx(0.7) and m[("segloop_drift_verdict", other)] == 0.0
    assert m[("segloop_drift_champion_confidence", other)] == pytest.approx(0.9)
    assert "segloop_drift_score" not in samples(generate_latest(Metrics(None).registry).decode())


def test_a_corrupt_latest_file_names_itself(tmp_path):
    (tmp_path / LATEST).write_text("{not json")
    with pytest.raises(ValueError, match=LATEST):
        read_latest(tmp_path)
    assert read_latest(tmp_path / "none") == {}


WRITER = """
import sys
from pathlib import Path
from segloop.drift.history import DriftPoint, record_point
ws, name = Path(sys.argv[1]), sys.argv[2]
for i in range(8):
    batch = f"{name}-{i:02d}"
    record_point(ws, DriftPoint("loop", batch, "fog", f"2026-12-03T10:{i:02d}:00+00:00", 1e-4, 0.4, 0.6, 0.9,
                                True, "base", "2", 0.01))
"""


def test_two_loops_writing_one_evidently_workspace_at_once_lose_no_point(tmp_path):
    """Loops of different workspaces (or parallel benchmark seeds) share drift.evidently_workspace;
    Evidently's local storage is not safe for two writers (one crashed reading a snapshot the
    other was replacing), so record_point holds a lock on the workspace."""
    import subprocess
    import sys

    ws = tmp_path / "evidently"
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(ws), name], stderr=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert sorted(r["batch"] for r in history(ws, "loop")) == [f"{n}-{i:02d}" for n in "ab" for i in range(8)]
