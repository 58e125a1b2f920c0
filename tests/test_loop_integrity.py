"""Loop integrity: a step commits or rolls back as a whole, under a crash at any write, any
batch name and any retry. Real git, DVC, MLflow (sqlite) and Evidently; no Prefect (the
core step function, `loop.process_batch`, is what a flow runs)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY, _merge, move_store
from crash_step import BOUNDARIES, CRASH_EXIT
from PIL import Image

from segloop import gate, loop, registry
from segloop.config import load_settings
from segloop.data.synthetic import generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TESTS = Path(__file__).resolve().parent


def _raw(root: Path) -> dict:
    raw = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    raw["drift"] |= {"min_images": 8, "reference_size": 32, "model_crop": 64, "mmd_permutations": 200, "alpha": 0.05}
    raw["continual"] |= {"epochs": 4, "lr": 0.003}
    # Integrity, not learning: every candidate passes (a tiny model's update gains or loses
    # by chance, and CPUs differ), so each crash below has a promotion to undo or redo.
    raw["registry"] = {"model_name": "loop", "gate": {"min_gain": -1.0, "max_forgetting": 1.0, "floor_miou": 0.05}}
    raw["tracking"] = {"enabled": True, "uri": f"sqlite:///{root}/store/mlflow.db", "experiment": "loop"}
    raw["flows"] = {"workspace": str(root / "ws"), "retries": 0, "max_attempts": 2}
    return raw


def _params(root: Path, **over) -> Path:
    raw = _raw(root)
    for key, value in over.items():
        section, name = key.split("__")
        raw[section][name] = value
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def arrive(ws: loop.Workspace, name: str, domain: str, n: int, seed: int, ready: bool = True) -> Path:
    out = ws.incoming / name
    generate(out, domain, n=n, seed=seed, size=(72, 80))
    if ready:
        (out / "batch.json").write_text(json.dumps({"domain": domain}))
    return out


@pytest.fixture(scope="module")
def bootstrapped(tmp_path_factory):
    """A workspace whose champion (v1) was trained on a `base` batch."""
    root = tmp_path_factory.mktemp("integrity")
    settings = load_settings(_params(root))
    ws = loop.Workspace.of(settings)
    rec = loop.process_batch(ws, arrive(ws, "00-base", "base", 40, 1), settings)
    assert rec.promoted and rec.champion_version == "1"
    return root


@pytest.fixture
def copy(tmp_path, bootstrapped):
    """A private copy of the bootstrapped workspace and its store: (params, settings, ws)."""
    root = tmp_path / "root"
    shutil.copytree(bootstrapped, root, symlinks=True)
    move_store(root / "store" / "mlflow.db", bootstrapped, root)
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tracking_utils._artifact_repos_cache.clear()  # the copy has the original's run ids
    params = _params(root)
    settings = load_settings(params)
    return params, settings, loop.Workspace.of(settings)


def _versions(settings) -> int:
    client, _ = registry.registry_client(settings)
    return len(client.search_model_versions(f"name = '{settings.registry.model_name}'"))


def assert_consistent(ws: loop.Workspace, settings, batches: list[str], versions: int) -> None:
    """Each batch processed exactly once; champion, alias history and state.json agree; the
    workspace clean for git and DVC; no replay or model folder that no stage produced."""
    assert loop.processed(ws) == set(batches)
    subjects = loop.git(ws, "log", "--format=%s").splitlines()
    for b in batches:
        assert sum(s.startswith(f"batch {b}:") for s in subjects) == 1, subjects
    assert loop.pending_batches(ws) == []
    assert _versions(settings) == versions  # nothing trained twice
    state = loop.read_state(ws)
    client, _ = registry.registry_client(settings)
    assert str(client.get_model_version_by_alias("loop", "champion").version) == state.champion
    moves = [e for e in registry.history(settings) if e["alias"] == "champion"]
    assert moves[-1]["to"] == state.champion
    assert loop.git(ws, "status", "--porcelain") == ""
    assert "up to date" in loop.dvc(ws, "status")
    stages = yaml.safe_load((ws.root / "dvc.yaml").read_text())["stages"]
    outs = {o for st in stages.values() for o in st.get("outs", [])}
    for kind in ("replay", "models"):
        folders = {f"{kind}/{p.name}" for p in (ws.root / kind).iterdir() if p.is_dir()}
        assert folders <= outs, f"orphaned {kind} folder(s): {sorted(folders - outs)}"
    assert state.replay in outs and (ws.root / state.replay / "manifest.json").is_file()
    # attempt records only of processed batches (a step that died right after its commit;
    # never read again, collected by the next step)
    assert {p.stem for p in (ws.root / loop.ATTEMPTS_DIR).glob("*.json")} <= set(batches)
    assert {r["status"] for r in loop.list_batches(ws)} == {"processed"}
    assert not (ws.root / loop.FAILED_DIR).exists() or not any((ws.root / loop.FAILED_DIR).iterdir())


ALL = [(b, w) for b in BOUNDARIES for w in ("before", "after")]
# In every run: the three where a half-done step is hardest to undo (a registered model,
# a moved alias, a marker written but not committed).
FAST = [("update", "after"), ("alias", "after"), ("marker", "after")]


def _crash_then_run(params: Path, settings, ws: loop.Workspace, boundary: str, when: str, cli_env: dict) -> None:
    batch = arrive(ws, "01-fog", "fog", 30, 3)
    proc = subprocess.run(
        [sys.executable, str(TESTS / "crash_step.py"), str(params), str(batch), boundary, when],
        env={**cli_env, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == CRASH_EXIT, (
        f"{boundary} {when}: not reached (exit {proc.returncode})\n{proc.stderr[-3000:]}"
    )
    records = [loop.process_batch(ws, b, settings) for b in loop.pending_batches(ws)]
    if boundary == "commit" and when == "after":  # the step had counted: nothing to redo
        assert records == []
    else:
        assert [r.batch for r in records] == ["01-fog"] and records[0].promoted
    assert_consistent(ws, settings, ["00-base", "01-fog"], versions=2)


@pytest.mark.parametrize("boundary,when", FAST)
def test_a_crash_at_a_write_boundary_is_redone_exactly_once(copy, boundary, when, cli_env):
    params, settings, ws = copy
    _crash_then_run(params, settings, ws, boundary, when, cli_env)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("SEGLOOP_CRASH_ALL"),
    reason="the other 19 boundaries take ~22 min on one worker: `make test-crash` runs all 22",
)
@pytest.mark.parametrize("boundary,when", [x for x in ALL if x not in FAST])
def test_every_write_boundary_crash_is_redone_exactly_once(copy, boundary, when, cli_env):
    params, settings, ws = copy
    _crash_then_run(params, settings, ws, boundary, when, cli_env)


def test_a_gate_retried_after_it_promoted_succeeds_without_a_second_move(copy, monkeypatch):
    """The flow retries the gate task on I/O errors: an error once the alias moved (while
    describing the versions) must not make the retry fail with "already champion"."""
    params, settings, ws = copy
    real = registry.describe_version
    state = {"moved": False, "failed": 0}
    move = registry.move_alias

    def moving(*args, **kwargs):
        state["moved"] = True
        return move(*args, **kwargs)

    def flaky(*args, **kwargs):
        if state["moved"] and not state["failed"]:
            state["failed"] += 1
            raise ConnectionError("injected: the store went away for a moment")
        return real(*args, **kwargs)

    monkeypatch.setattr(gate, "move_alias", moving)  # the gate's own references to the registry's functions
    for module in (registry, gate):
        monkeypatch.setattr(module, "describe_version", flaky)

    def retrying(name, fn, *args):  # what continual_flow's task retries do, without Prefect
        try:
            return fn(*args)
        except ConnectionError:
            assert name == "gate"
            return fn(*args)

    rec = loop.process_batch(ws, arrive(ws, "01-fog", "fog", 30, 3), settings, retrying)
    assert state["failed"] == 1 and rec.promoted and rec.champion_version == "2"
    gates = [e for e in registry.history(settings) if e["alias"] == "champion"]
    assert [(e["kind"], e["from"], e["to"]) for e in gates] == [("gate", None, "1"), ("gate", "1", "2")]
    client, _ = registry.registry_client(settings)
    assert "champion since" in client.get_model_version("loop", "2").description  # the retry finished the descriptions
    assert_consistent(ws, settings, ["00-base", "01-fog"], versions=2)


def test_a_model_trained_by_the_loop_records_the_project_commit_not_the_workspace(bootstrapped):
    """The stage ran in the workspace (a data repo): its run must name the segloop code that ran."""
    settings = load_settings(bootstrapped / "params.yaml")
    ws = loop.Workspace.of(settings)
    client, _ = registry.registry_client(settings)
    tags = client.get_run(client.get_model_version("loop", "1").run_id).data.tags
    package = Path(loop.__file__).resolve().parent
    project = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert project.returncode == 0, "these tests run from a git checkout of segloop"
    dirty = subprocess.run(
        ["git", "-C", str(package), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    assert tags["segloop.git_commit"] == tags["mlflow.source.git.commit"] == project.stdout.strip()
    assert tags["segloop.git_dirty"] == ("true" if dirty else "false")
    assert tags["segloop.git_commit"] not in loop.git(ws, "log", "--format=%H").splitlines()


def test_dvc_status_stays_clean_after_steps_run_with_other_settings(copy):
    """Each step's stages depend on params/<batch>.yaml, the settings that step ran with: a
    later run given other overrides rewrites the workspace's params.yaml, and nothing goes stale."""
    params, settings, ws = copy
    rec = loop.process_batch(ws, arrive(ws, "01-fog", "fog", 30, 3), load_settings(params, ["continual.epochs=2"]))
    assert rec.updated
    later = load_settings(params, ["continual.epochs=3", "train.lr=0.01", "split.seed=7"])
    assert loop.process_batch(ws, arrive(ws, "02-few", "fog", 3, 5), later).skipped  # too few pairs: no training
    assert yaml.safe_load((ws.root / "params.yaml").read_text())["continual"]["epochs"] == 3
    assert yaml.safe_load(ws.step_params("01-fog").read_text())["continual"]["epochs"] == 2
    lock = yaml.safe_load((ws.root / "dvc.lock").read_text())["stages"]
    assert lock["update-01-fog"]["params"]["params/01-fog.yaml"]["continual"]["epochs"] == 2
    assert lock["train-00-base"]["params"]["params/00-base.yaml"]["continual"]["epochs"] == 4
    assert "up to date" in loop.dvc(ws, "status")
    out = loop.dvc(ws, "repro")
    assert "Running stage" not in out and "up to date" in out, out
    assert _versions(settings) == 2  # nothing retrained, nothing registered again
    assert loop.git(ws, "status", "--porcelain") == ""


def test_workspace_git_holds_text_only_references_in_dvc_quarantine_by_hash(copy):
    """A drift reference (images sampled from training data) is a DVC output; a quarantined
    file stays on disk, ignored by git, its reason and sha256 in the tracked reasons.jsonl."""
    params, settings, ws = copy
    batch = arrive(ws, "01-base", "base", 12, 9)
    (batch / "images" / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (1, 1)).save(batch / "images" / "dot.png")
    Image.new("L", (1, 1)).save(batch / "masks" / "dot.png")
    rec = loop.process_batch(ws, batch, settings)
    assert rec.drift is not None and rec.quarantined == 3
    tracked = loop.git(ws, "ls-files").splitlines()
    binary = [f for f in tracked if Path(f).suffix.lower() in {".png", ".jpg", ".jpeg", ".pt", ".onnx", ".npy"}]
    assert binary == [], binary
    assert "reference/v1/base.dvc" in tracked and "quarantine/01-base/reasons.jsonl" in tracked
    assert (ws.root / "reference" / "v1" / "base" / "images").is_dir()  # in the workspace, versioned by DVC
    lines = [json.loads(x) for x in (ws.root / "quarantine" / "01-base" / "reasons.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for line in lines:
        kept = Path(line["quarantined_as"])
        assert kept.is_file() and line["sha256"] == hashlib.sha256(kept.read_bytes()).hexdigest()
    assert loop.git(ws, "status", "--porcelain") == "" and "up to date" in loop.dvc(ws, "status")


# ---------------------------------------------------------------- the batch contract


def _pairs(folder: Path, sizes: list[tuple[int, int]]) -> None:
    """Image/mask pairs of the given (height, width), valid except for their size."""
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        Image.new("RGB", (w, h)).save(folder / "images" / f"p{i}.png")
        Image.new("L", (w, h)).save(folder / "masks" / f"p{i}.png")


@pytest.fixture
def contract(tmp_path, store_uri):
    """A fresh workspace (no champion) on this test's store; no step here trains."""
    raw = _raw(tmp_path)
    raw["tracking"]["uri"] = store_uri
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    settings = load_settings(path)
    return path, settings, loop.Workspace.of(settings)


def _ready(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / loop.READY).write_text("")
    return folder


def test_bad_batch_names_are_refused_into_failed_at_once_naming_the_folder(contract):
    _, settings, ws = contract
    for name in ("2024.06.01", "site A", "über", "a\nb", "-x"):
        batch = _ready(ws.incoming / name)
        with pytest.raises(loop.DeadLettered, match="not allowed") as err:
            loop.process_batch(ws, batch, settings)
        assert repr(name) in str(err.value) and str(batch) in str(err.value)
        info = json.loads((ws.failed(name) / loop.FAILED_INFO).read_text())
        assert info["kind"] == "refused" and info["attempts"] == 0 and not batch.exists()
    assert loop.pending_batches(ws) == []
    assert {r["batch"] for r in loop.list_batches(ws) if r["status"] == "refused"} == {
        "2024.06.01",
        "site A",
        "über",
        "a\nb",
        "-x",
    }


def test_a_batch_is_picked_up_only_once_ready_and_counts_once_committed(contract):
    _, settings, ws = contract
    half = ws.incoming / "02-half"
    _pairs(half, [(72, 80)] * 3)
    assert loop.pending_batches(ws) == []  # being copied: no READY, no batch.json yet
    with pytest.raises(ValueError, match="not ready"):
        loop.process_batch(ws, half, settings)
    _ready(half)
    assert loop.pending_batches(ws) == [half]
    # a marker on disk that no step committed (a crash between marker and commit) does not count
    ws.marker("02-half").parent.mkdir(parents=True, exist_ok=True)
    ws.marker("02-half").write_text("{}")
    assert loop.pending_batches(ws) == [half]
    rec = loop.process_batch(ws, half, settings)  # 3 pairs < drift.min_images 8: recorded, skipped
    assert rec.skipped and "drift.min_images" in rec.skipped and rec.accepted == 3
    assert loop.processed(ws) == {"02-half"} and loop.pending_batches(ws) == []
    assert loop.git(ws, "status", "--porcelain") == ""


def test_empty_tiny_oversized_and_linked_batches_are_recorded_and_skipped(contract, tmp_path):
    _, settings, ws = contract
    empty = _ready(ws.incoming / "10-empty")
    tiny = _ready(ws.incoming / "11-tiny")
    _pairs(tiny, [(1, 1)])
    huge = _ready(ws.incoming / "12-huge")
    _pairs(huge, [])
    Image.new("L", (10000, 10000)).save(huge / "images" / "big.png")  # 10^8 pixels > data.max_pixels
    Image.new("L", (10000, 10000)).save(huge / "masks" / "big.png")
    linked = _ready(ws.incoming / "13-linked")
    _pairs(linked, [])
    secret = tmp_path / "outside.png"
    Image.new("RGB", (80, 72), (1, 2, 3)).save(secret)
    (linked / "images" / "evil.png").symlink_to(secret)
    (linked / "masks" / "evil.png").symlink_to("/etc/passwd")
    (linked / "images" / "gone.png").symlink_to(tmp_path / "missing.png")  # dangling: quarantined, not skipped silently
    records = {b.name: loop.process_batch(ws, b, settings) for b in [empty, tiny, huge, linked]}
    assert all(r.skipped and r.accepted == 0 for r in records.values())
    assert loop.processed(ws) == set(records) and loop.pending_batches(ws) == []

    def reasons(b: str) -> dict[str, str]:
        lines = (ws.root / "quarantine" / b / "reasons.jsonl").read_text().splitlines()
        return {Path(x["file"]).parent.name + "/" + Path(x["file"]).name: x["reason"] for x in map(json.loads, lines)}

    assert reasons("10-empty") == {}
    assert reasons("11-tiny")["images/p0.png"] == "image too small: 1x1, a side below data.min_side 16"
    assert reasons("12-huge")["images/big.png"].startswith(
        "image too large: 10000x10000 = 100000000 pixels > data.max_pixels"
    )
    linked_reasons = reasons("13-linked")
    assert linked_reasons["images/evil.png"] == f"symbolic link (-> {secret}) not followed"
    assert linked_reasons["masks/evil.png"] == "symbolic link (-> /etc/passwd) not followed"
    assert "images/gone.png" in linked_reasons
    q = ws.root / "quarantine" / "13-linked"
    links = [p for p in q.rglob("*") if p.is_symlink()]
    assert len(links) == 3 and not [
        p for p in q.rglob("*.png") if not p.is_symlink()
    ]  # links kept as links, nothing copied
    assert os.readlink(q / "masks" / "evil.png") == "/etc/passwd"
    assert loop.git(ws, "status", "--porcelain") == ""


def test_a_failing_batch_goes_to_failed_after_max_attempts_and_can_be_retried_or_skipped(contract, capsys):
    from segloop.cli import main

    params, settings, ws = contract
    bad = ws.incoming / "20-bad"
    _pairs(bad, [(72, 80)] * 2)
    (bad / "batch.json").write_text(json.dumps({"domain": "no such/domain"}))
    with pytest.raises(ValueError, match="batch.json: 'domain' must be"):
        loop.process_batch(ws, bad, settings)  # attempt 1 of flows.max_attempts 2
    assert json.loads(ws.attempts("20-bad").read_text())["attempts"] == 1
    assert main(["batches", "list", "--params", str(params)]) == 0
    assert "1 attempt(s), last error: ValueError" in capsys.readouterr().out
    with pytest.raises(loop.DeadLettered, match="failed 2 times"):
        loop.process_batch(ws, bad, settings)
    info = json.loads((ws.failed("20-bad") / loop.FAILED_INFO).read_text())
    assert info["kind"] == "failed" and info["attempts"] == 2 and "'domain' must be" in info["error"]
    assert not bad.exists() and not ws.attempts("20-bad").exists() and loop.pending_batches(ws) == []
    # the next batch is processed
    nxt = _ready(ws.incoming / "21-next")
    assert loop.pending_batches(ws) == [nxt] and loop.process_batch(ws, nxt, settings).skipped
    # a process that dies on every attempt counts too: after max_attempts it leaves
    dying = _ready(ws.incoming / "22-dying")
    ws.attempts("22-dying").parent.mkdir(exist_ok=True)
    ws.attempts("22-dying").write_text(json.dumps({"batch": "22-dying", "attempts": 2, "errors": []}))
    with pytest.raises(loop.DeadLettered, match="2 attempts .* did not finish"):
        loop.process_batch(ws, dying, settings)
    # retry: back into incoming with a fresh count; skip: out of the way again, with the reason
    assert main(["batches", "retry", "20-bad", "--params", str(params)]) == 0
    assert bad.is_dir() and not (bad / loop.FAILED_INFO).exists() and loop.pending_batches(ws) == [bad]
    assert main(["batches", "skip", "20-bad", "--reason", "mislabelled domain", "--params", str(params)]) == 0
    assert json.loads((ws.failed("20-bad") / loop.FAILED_INFO).read_text())["kind"] == "skipped"
    assert main(["batches", "retry", "21-next", "--params", str(params)]) == 2  # processed: never again
    capsys.readouterr()
    assert main(["batches", "list", "--json", "--params", str(params)]) == 0
    rows = {(r["batch"], r["status"]) for r in json.loads(capsys.readouterr().out)}
    assert rows == {("21-next", "processed"), ("20-bad", "skipped"), ("22-dying", "failed")}
    assert loop.git(ws, "status", "--porcelain") == ""


# ---------------------------------------------------------------- no orphans


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="segloop.lifeline's guardian reads /proc")
def test_kill_9_of_the_monitor_mid_update_leaves_no_process_behind(contract, tmp_path, cli_env):
    """`python -m flows.monitor` (Prefect's temporary server in a child process) killed while
    `dvc repro` trains: within seconds no process it started is left."""
    psutil = pytest.importorskip("psutil")
    params, settings, ws = contract
    raw = yaml.safe_load(params.read_text())
    raw["train"] |= {"epochs": 10000, "patience": 10000}  # still training when it is killed
    params.write_text(yaml.safe_dump(raw))
    arrive(ws, "00-base", "base", 12, 1)
    env = {
        **cli_env,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "240",
    }
    env.pop("PREFECT_API_URL", None)  # its own temporary server
    log = tmp_path / "monitor.log"
    with open(log, "w") as out:
        monitor = subprocess.Popen(
            [sys.executable, "-m", "flows.monitor", "--params", str(params)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    seen: list = []
    try:
        deadline = time.time() + 400
        while True:
            assert monitor.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "training never started:\n" + log.read_text()[-3000:]
            seen = psutil.Process(monitor.pid).children(recursive=True)
            argvs = []
            for p in seen:
                try:
                    argvs.append(p.cmdline())
                except psutil.Error:
                    pass
            cmds = [" ".join(a) for a in argvs]
            training = any(Path(a[1]).name == "segloop" and a[2] == "train" for a in argvs if len(a) > 2)
            if training and any("uvicorn" in c for c in cmds):
                break
            time.sleep(0.5)
        assert any("dvc repro" in c for c in cmds) and any("lifeline" in c for c in cmds), "\n".join(cmds)
        os.kill(monitor.pid, signal.SIGKILL)
        monitor.wait()
        _, alive = psutil.wait_procs(seen, timeout=10)
        assert alive == [], [" ".join(p.cmdline()) for p in alive]
    finally:
        for p in [*seen, psutil.Process(monitor.pid) if monitor.poll() is None else None]:
            if p is not None:
                try:
                    p.kill()
                except psutil.Error:
                    pass
