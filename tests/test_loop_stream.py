"""benchmarks/loop_stream.py on a tiny stream: the loop's core step without Prefect, real
MLflow, DVC and git; its audit sets are scored but never reach the loop or its gate."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def loop_stream():
    spec = importlib.util.spec_from_file_location("loop_stream", ROOT / "benchmarks" / "loop_stream.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_audit_sets_never_reach_the_gate(tmp_path):
    bench = loop_stream()
    overrides = [
        *bench.QUICK,
        "train.epochs=2",
        "continual.epochs=1",
        "registry.gate.min_gain=0.0",
        "registry.gate.max_forgetting=1.0",
    ]
    result = bench.run_seed(
        0, [("base", 24), ("fog", 24)], tmp_path / "seed", overrides, n_audit=12, log=lambda _: None, joint=False
    )
    audit = {Path(p).resolve() for p in result["audit_dirs"].values()}
    ws = tmp_path / "seed" / "ws"
    decisions = sorted(ws.glob("steps/*/gate/promotion_decision.json"))
    assert len(decisions) == 2  # the bootstrap and the fog update were both gated
    for path in decisions:
        gated = {Path(d["path"]).resolve() for d in json.loads(path.read_text())["data"].values()}
        assert gated and not gated & audit and all(ws.resolve() in p.parents for p in gated)
    # nor does the loop know them anywhere else: state, DVC stages, step records
    audit_root = str(tmp_path / "seed" / "audit")
    for text in [
        (ws / "state.json").read_text(),
        (ws / "dvc.yaml").read_text(),
        *(p.read_text() for p in (ws / "processed").glob("*.json")),
    ]:
        assert audit_root not in text
    # ... while every champion was scored on them
    assert result["final_audit"] is not None and set(result["final_audit"]) == {"base", "fog"}
    metrics = bench.seed_metrics(result)
    assert [x["domain"] for x in metrics["shifted"]] == ["fog"] and metrics["loop_images"] > 0
    # joint added afterwards (--resume without --no-joint): the loop's figures stand, joint is
    # trained from scratch on the loop's workspace and scored on the same audit sets
    joined = bench.add_joint(result, tmp_path / "seed", overrides, log=lambda _: None)
    assert {k: joined[k] for k in result if not k.startswith("joint")} == {
        k: v for k, v in result.items() if not k.startswith("joint")
    }
    assert set(joined["joint_audit"]) == {"base", "fog"} and joined["joint_images"] > 0
    # the images counted without training joint are what training counts: joint's, the bootstrap's
    # (a model from scratch on the first batch), and their sum, retraining at each of the two updates
    assert result["joint_images"] == joined["joint_images"]
    assert result["retrain_images"] == result["steps"][0]["images_seen"] + joined["joint_images"]
    assert (tmp_path / "seed" / "joint" / "best.pt").is_file()
