"""The Prefect flows on tiny data through real Prefect (test harness), MLflow, DVC, git and Evidently.

One workspace + store is bootstrapped per module (a champion trained on `base`); each test
works on its own copy of it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import move_store
from prefect.testing.utilities import prefect_test_harness

from flows.continual import continual_flow
from flows.monitor import monitor_flow
from segloop import loop, registry
from segloop.config import load_settings
from segloop.data.synthetic import generate
from segloop.registry import DECISION_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _params(root: Path, raw: dict) -> Path:
    raw = json.loads(json.dumps(raw))
    raw["tracking"] = {"enabled": True, "uri": f"sqlite:///{root}/store/mlflow.db", "experiment": "loop"}
    raw["flows"] = {"workspace": str(root / "ws"), "retries": 0}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def arrive(root: Path, name: str, domain: str, n: int, seed: int) -> Path:
    out = root / "ws" / "incoming" / name
    generate(out, domain, n=n, seed=seed, size=(72, 80))
    (out / "batch.json").write_text(json.dumps({"domain": domain}))
    return out


@pytest.fixture(scope="module")
def loop_raw(tmp_path_factory) -> dict:
    from conftest import ROOT, TINY, _merge

    raw = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    # alpha 0.01: a false alarm on a base batch is a 5% event per batch at 0.05 (a CI run saw
    # one at p 0.026, on a tiny model's embedding); fog drifts at p ~1e-10 and far below.
    raw["drift"] |= {"min_images": 8, "reference_size": 32, "model_crop": 64, "mmd_permutations": 200, "alpha": 0.01}
    raw["continual"] |= {"epochs": 10, "lr": 0.003}
    # A tiny champion's mIoU (~0.2) moves by more than the default 0.05 between two base batches
    # (a CI run saw a base batch "drift" on it); test_drift checks performance drift itself.
    raw["drift"]["max_quality_drop"] = 0.5
    # The flows' plumbing, not learning: every update passes (whether a tiny model's update
    # gains depends on the CPU's float rounding; benchmarks/ measure learning); the
    # bootstrap floor is low. Rejection is forced per test with registry.gate.min_gain=1.0.
    raw["registry"] = {"model_name": "loop", "gate": {"min_gain": -1.0, "max_forgetting": 1.0, "floor_miou": 0.05}}
    return raw


@pytest.fixture(scope="module")
def bootstrapped(tmp_path_factory, loop_raw):
    root = tmp_path_factory.mktemp("loop")
    params = _params(root, loop_raw)
    batch = arrive(root, "00-base", "base", 40, 1)
    rec = continual_flow(str(batch), str(params))
    return root, rec


@pytest.fixture
def copy(tmp_path, bootstrapped, loop_raw):
    """A private copy of the bootstrapped workspace and store."""
    root = tmp_path / "root"
    shutil.copytree(bootstrapped[0], root, symlinks=True)
    move_store(root / "store" / "mlflow.db", bootstrapped[0], root)
    # MLflow caches each run's artifact repository by run id for the process; the copy has
    # the original's run ids, so without this its artifacts would be written to the original.
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tracking_utils._artifact_repos_cache.clear()
    params = _params(root, loop_raw)
    settings = load_settings(params)
    return root, params, settings, loop.Workspace.of(settings)


def _champion(settings) -> str:
    client, _ = registry.registry_client(settings)
    return str(client.get_model_version_by_alias(settings.registry.model_name, "champion").version)


def test_bootstrap_trains_gates_on_floors_and_records_the_step(bootstrapped):
    root, rec = bootstrapped
    ws = root / "ws"
    assert rec["drift"] is None and rec["updated"] and rec["promoted"] and rec["champion_version"] == "1"
    assert rec["miou_before"] == {} and rec["miou_after"]["base"] >= 0.05
    assert json.loads((ws / "processed" / "00-base.json").read_text())["batch"] == "00-base"
    state = json.loads((ws / "state.json").read_text())
    assert state["champion"] == "1" and state["trained_domains"] == {"base": "batches/00-base/split/train"}
    assert json.loads((ws / state["replay"] / "manifest.json").read_text())["seen"] == 28  # 40 - 4 val - 8 test
    assert "train-00-base" in yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    assert (ws / "batches" / "00-base.dvc").exists()


def test_shifted_batch_drifts_updates_and_is_promoted(copy):
    root, params, settings, ws = copy
    rec = continual_flow(str(arrive(root, "01-fog", "fog", 30, 3)), str(params))
    assert rec["drift"]["data_drift"] and rec["drift"]["closest_domain"] == "base"
    assert rec["updated"] and rec["promoted"] and rec["champion_version"] == rec["candidate_version"] == "2"
    assert _champion(settings) == "2"
    assert set(rec["miou_before"]) == set(rec["miou_after"]) == {"base", "fog"}
    assert any(r.startswith("PASS fog") and "registry.gate.min_gain" in r for r in rec["reasons"])
    # the version points at the workspace commit holding its DVC stage; the tree is clean
    client, _ = registry.registry_client(settings)
    tags = registry.version_tags(client.get_model_version("loop", "2"))
    assert tags["segloop.loop.commit"] == loop.git(ws, "rev-parse", "HEAD") == rec["commit"]
    assert tags["segloop.batch"] == "01-fog"  # the rest of the loop's record is on the version's run
    assert (
        client.get_run(client.get_model_version("loop", "2").run_id).data.tags["segloop.loop.stage"] == "update-01-fog"
    )
    # the drift check is an MLflow run of its own, with its report
    drift_exp = client.get_experiment_by_name("loop-drift")
    runs = client.search_runs([drift_exp.experiment_id], "tags.`segloop.batch` = '01-fog'")
    assert len(runs) == 1 and runs[0].data.tags["segloop.drift"] == "true"
    # runs are named as the README says: drift:<batch> (vs the reference domain), update:<out>
    assert runs[0].info.run_name == "drift:01-fog vs base"
    assert client.get_run(client.get_model_version("loop", "2").run_id).info.run_name == "update:01-fog"
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} >= {"drift.json", "drift.html"}
    assert loop.git(ws, "status", "--porcelain") == ""
    # every model step is a committed DVC stage: a repro on the unchanged tree runs nothing
    out = loop.dvc(ws, "repro")
    assert (
        "Running stage" not in out and "update-01-fog" in yaml.safe_load((ws.root / "dvc.yaml").read_text())["stages"]
    )
    state = loop.read_state(ws)
    assert state.replay == "replay/01-fog" and set(state.trained_domains) == {"base", "fog"}


def test_gate_rejection_keeps_the_champion(copy):
    root, params, settings, ws = copy
    # The rule a candidate cannot meet: the target must gain a full mIoU point of 1.0.
    rec = continual_flow(str(arrive(root, "01-fog", "fog", 30, 3)), str(params), ["registry.gate.min_gain=1.0"])
    assert rec["updated"] and not rec["promoted"] and rec["champion_version"] == "1"
    assert any(r.startswith("FAIL fog") and "registry.gate.min_gain" in r for r in rec["reasons"])
    assert _champion(settings) == "1"
    assert rec["miou_after"] == rec["miou_before"]
    state = loop.read_state(ws)
    assert state.replay == "replay/00-base" and set(state.trained_domains) == {"base"}
    assert set(state.heldout) == {"base", "fog"}  # the new domain is checked from now on


def test_monitor_processes_each_batch_once_and_never_overlaps(copy):
    root, params, settings, ws = copy
    arrive(root, "01-base", "base", 24, 5)
    arrive(root, "02-base", "base", 24, 6)
    # another process holds the loop: this run does nothing and loses nothing
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import fcntl,time; f=open({str(ws.root / '.lock')!r},'w'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert monitor_flow(str(params)) == []
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in loop.pending_batches(ws)] == ["01-base", "02-base"]
    records = monitor_flow(str(params))
    assert [r["batch"] for r in records] == ["01-base", "02-base"]
    assert all(not r["drift"]["drift"] and not r["updated"] and r["champion_version"] == "1" for r in records)
    assert monitor_flow(str(params)) == []
    assert sorted(p.name for p in (ws.root / "processed").iterdir()) == ["00-base.json", "01-base.json", "02-base.json"]


def test_bad_files_are_quarantined_and_the_rest_proceeds(copy):
    root, params, settings, ws = copy
    batch = arrive(root, "01-base", "base", 24, 7)
    (batch / "images" / "broken.png").write_bytes(b"not a png")
    shutil.copy(next((batch / "masks").iterdir()), batch / "masks" / "broken.png")
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((72, 80), 9, np.uint8)).save(batch / "masks" / "badclass.png")
    shutil.copy(next((batch / "images").glob("*.png")), batch / "images" / "badclass.png")
    rec = continual_flow(str(batch), str(params))
    assert rec["accepted"] == 24 and rec["quarantined"] == 4  # files: two pairs
    reasons = [
        json.loads(line) for line in (ws.root / "quarantine" / "01-base" / "reasons.jsonl").read_text().splitlines()
    ]
    assert {Path(r["file"]).stem for r in reasons} == {"broken", "badclass"}
    assert any("out of range: [9]" in r["reason"] for r in reasons) and any(
        "unreadable" in r["reason"] for r in reasons
    )
    assert rec["drift"] is not None and (ws.root / "processed" / "01-base.json").exists()


def test_a_crash_leaves_champion_and_batch_pending_and_the_next_run_completes_it(copy, monkeypatch):
    root, params, settings, ws = copy
    arrive(root, "01-fog", "fog", 30, 3)

    def crash(where):
        def boom(*args, **kwargs):
            raise RuntimeError(f"injected failure in {where}")

        return boom

    # 1. inside the update step: the candidate is trained and registered, then the step dies
    monkeypatch.setattr(loop, "registered_version", crash("update"))
    with pytest.raises(RuntimeError, match="injected failure in update"):
        monitor_flow(str(params))
    monkeypatch.undo()
    assert _champion(settings) == "1" and [p.name for p in loop.pending_batches(ws)] == ["01-fog"]
    assert loop.read_state(ws).champion == "1"
    # 2. after the gate promoted, before the step was committed. DVC's run cache restores
    #    the model the first attempt trained and registered (same stage, same inputs): v2.
    monkeypatch.setattr(loop, "new_replay", crash("replay"))
    with pytest.raises(RuntimeError, match="injected failure in replay"):
        monitor_flow(str(params))
    monkeypatch.undo()
    assert _champion(settings) == "2"  # the alias moved, the step did not finish
    assert [p.name for p in loop.pending_batches(ws)] == ["01-fog"]
    # 3. the next run puts the champion back (recorded), redoes the step and completes it
    records = monitor_flow(str(params))
    assert [r["batch"] for r in records] == ["01-fog"] and records[0]["promoted"]
    assert _champion(settings) == records[0]["champion_version"] == "2"
    kinds = [(e["kind"], e["from"], e["to"]) for e in registry.history(settings)]
    assert kinds == [("gate", None, "1"), ("gate", "1", "2"), ("rollback", "2", "1"), ("gate", "1", "2")]
    client, _ = registry.registry_client(settings)
    assert len(client.search_model_versions("name = 'loop'")) == 2  # trained once, never twice
    assert monitor_flow(str(params)) == [] and loop.git(ws, "status", "--porcelain") == ""


def test_a_drifted_batch_the_champion_keeps_its_quality_on_is_pooled_not_trained_on(copy):
    root, params, settings, ws = copy
    rec = continual_flow(str(arrive(root, "01-fog", "fog", 30, 3)), str(params), ["continual.covered_drop=0.5"])
    # max_quality_drop 0.5 here: whatever a tiny champion's drop on fog, it is covered
    assert rec["drift"]["data_drift"] and rec["drift"]["performance_drift"] is False
    assert rec["drift"]["quality_drop"] <= 0.5
    assert not rec["updated"] and rec["update_reason"] == "" and rec["kept_in_pool"]
    assert "no update: the champion keeps its quality" in rec["summary"] and _champion(settings) == "1"
    state = loop.read_state(ws)
    assert state.pool == {"fog": ["batches/01-fog/split/train"]} and "fog" in state.heldout
    assert len(registry.registry_client(settings)[0].search_model_versions("name = 'loop'")) == 1


def test_a_refused_batch_stays_in_its_domain_pool_and_the_next_update_trains_on_it(copy):
    from segloop.checkpoint import load_checkpoint
    from segloop.records import StepRecord

    root, params, settings, ws = copy
    first = continual_flow(str(arrive(root, "01-fog", "fog", 30, 3)), str(params), ["registry.gate.min_gain=1.0"])
    assert first["updated"] and not first["promoted"] and first["kept_in_pool"]
    assert "kept in the fog pool" in first["summary"]
    assert loop.read_state(ws).pool == {"fog": ["batches/01-fog/split/train"]}
    # the next fog batch, through the core step alone (no Prefect): it trains on both batches
    rec = loop.process_batch(ws, arrive(root, "02-fog", "fog", 30, 4), settings)
    assert rec.updated and rec.pooled == ["batches/01-fog/split/train"]
    assert rec.trained_on == ["batches/02-fog/split/train", "batches/01-fog/split/train"]
    stage = yaml.safe_load((ws.root / "dvc.yaml").read_text())["stages"]["update-02-fog"]
    assert "--data batches/01-fog/split/train" in stage["cmd"] and "batches/01-fog/split/train" in stage["deps"]
    # fog is validated and gated on the splits of both its batches, each pooled into one set
    assert "--val batches/02-fog/split/val:batches/01-fog/split/val " in stage["cmd"]
    tests = ["batches/01-fog/split/test", "batches/02-fog/split/test"]
    gated = json.loads((ws.root / "steps" / "02-fog" / "gate" / DECISION_FILE).read_text())["data"]["fog"]
    assert gated["path"] == [str(ws.root / t) for t in tests] and len(gated["md5"]) == 2
    assert loop.read_state(ws).heldout["fog"] == tests
    assert set(load_checkpoint(ws.root / "models" / "02-fog" / "best.pt")["data_md5"]) == set(rec.trained_on)
    # no resume state in a stage's outputs (dvc repro reruns from scratch): not cached every step
    assert sorted((ws.root / "models").glob("*/last.pt")) == []
    assert StepRecord.read(ws.marker("02-fog")).pooled == rec.pooled  # the record on disk says so too
    state = loop.read_state(ws)
    assert rec.promoted and state.pool == {} and "fog" in state.trained_domains  # learnt: the pool is in the champion
    assert loop.git(ws, "status", "--porcelain") == ""


def test_monitor_moves_a_failing_or_misnamed_batch_to_failed_and_goes_on(copy):
    root, params, settings, ws = copy
    bad = arrive(root, "01-bad", "base", 4, 8)
    (bad / "batch.json").write_text(json.dumps({"domain": "not a domain"}))  # fails on every attempt
    misnamed = ws.incoming / "site A"
    shutil.copytree(bad, misnamed)
    (misnamed / "batch.json").write_text(json.dumps({"domain": "base"}))
    (ws.incoming / "02-empty").mkdir()
    (ws.incoming / "02-empty" / loop.READY).write_text("")
    records = monitor_flow(str(params), ["flows.max_attempts=1"])
    assert [(r["batch"], bool(r["skipped"])) for r in records] == [("02-empty", True)]
    kinds = {p.name: json.loads((p / loop.FAILED_INFO).read_text())["kind"] for p in (ws.root / "failed").iterdir()}
    assert kinds == {"01-bad": "failed", "site A": "refused"}
    assert loop.pending_batches(ws) == [] and loop.git(ws, "status", "--porcelain") == ""
    assert loop.read_state(ws).champion == _champion(settings) == "1"


@pytest.mark.slow
def test_demo_s_unlabelled_batch_gets_a_request_stand_in_labels_and_an_update(copy, tmp_path, capsys):
    """`make demo`'s unlabelled round with tiny settings, on the bootstrapped workspace (its stream's
    first batch, 00-base, is processed already): drift -> label request -> the demo's stand-in
    labels dropped into labels/done/ -> monitor_flow imports them -> update -> promotion."""
    from flows import demo
    from segloop.drift.history import history

    root, params, settings, ws = copy
    evidently = tmp_path / "evidently"
    # A drop for a batch that asked for nothing is left alone.
    (ws.labels_drop("00-base") / "masks").mkdir(parents=True)
    (ws.labels_drop("00-base") / loop.READY).write_text("")
    assert loop.pending_labels(ws) == []
    out = tmp_path / "demo"
    args = ["--params", str(params), "--stream", "base:40", "--unlabelled", "fog:32", "--out", str(out)]
    # Two update epochs: the plumbing, not learning (the gate passes every candidate here).
    sets = ["--set", f"drift.evidently_workspace={evidently}", "--set", "continual.epochs=2"]
    assert demo.main([*args, *sets]) == 0
    printed = capsys.readouterr().out
    assert "the demo stands in for a person here" in printed and "8 requested images" in printed

    asked = json.loads(ws.marker("01-fog").read_text())
    assert asked["status"] == "awaiting-labels" and asked["drift"]["drift"] and not asked["updated"]
    done = json.loads(ws.labelled_marker("01-fog").read_text())
    assert done["status"] == "labelled" and done["labels"]["quarantined"] == 0 and done["accepted"] == 8
    assert done["updated"] and done["promoted"] and _champion(settings) == done["champion_version"] == "2"
    stems = sorted(i["stem"] for i in json.loads((ws.request("01-fog") / "request.json").read_text())["images"])
    assert sorted(p.stem for p in (ws.labels_drop("01-fog") / "masks").iterdir()) == stems
    assert loop.pending_labels(ws) == [] and loop.git(ws, "status", "--porcelain") == ""  # drops are ignored by git
    summary = (out / "summary.md").read_text()
    assert "| 01-fog | yes" in summary and "| label request |" in summary and "| 01-fog (its labels) |" in summary
    assert [(p["batch"], p["drift"]) for p in history(evidently, "loop")] == [("01-fog", 1.0)]
