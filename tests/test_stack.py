"""The scale-out stack for real: `scripts/stack.py up --auth` starts PostgreSQL, moto's S3, the
MLflow server (PostgreSQL + S3 artifacts, basic auth) and the Prefect server (PostgreSQL) with a
process pool and two workers from the local binaries, once for this module; every test talks to
it over HTTP with the client environment the stack writes (`DIR/env`).

- the registry (register, gate, alias history, rollback) on the HTTP store, artifacts in S3;
- `monitor_flow` deployed to the pool (`from_source`), two runs started at once: one cancelled
  by the deployment's concurrency limit (CANCEL_NEW), the other processes both batches, once each.
- the workspace's git + DVC remotes: another host goes on from them; a step killed (SIGKILL)
  mid-way on one host is finished by another without a second model version; a fresh clone
  of the workspace pulls the champion's data and `dvc repro` has nothing to do.

Skipped (with the reason) only where a binary the stack needs is missing on this machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY, _merge

from segloop import gate, registry
from segloop.cli import main
from segloop.config import load_settings, settings_from_dict
from segloop.data.synthetic import generate

pytestmark = [pytest.mark.stack, pytest.mark.usefixtures("one_torch_thread")]
SCRIPT = ROOT / "scripts" / "stack.py"
NAME = "tiny"


def _stack_module():
    spec = importlib.util.spec_from_file_location("stack", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _missing() -> str | None:
    """Why the stack cannot start here (a binary missing), or None."""
    stack = _stack_module()
    for name in ("initdb", "pg_ctl", "postgres"):
        try:
            stack.pg_bin(name)
        except stack.StackError as err:
            return str(err)
    if os.geteuid() == 0 and not shutil.which("runuser"):
        return "runuser not found (util-linux): initdb must run as the postgres user"
    for name in ("moto_server", "mlflow", "prefect"):
        if not (Path(sys.executable).parent / name).exists():
            return f"{name} not in {Path(sys.executable).parent}: pip install -r requirements.lock"
    return None


@pytest.fixture(scope="module")
def stack():
    """The running stack's state (stack.json: URLs, pids, start-up seconds, memory); stopped at the end."""
    reason = _missing()
    if reason:
        pytest.skip(f"scale-out stack: {reason}")
    # Not under pytest's temp root: that is private to root (0700), and PostgreSQL runs as `postgres`.
    folder = Path(tempfile.mkdtemp(prefix="segloop-stack-"))
    folder.chmod(0o755)
    up = [sys.executable, str(SCRIPT), "up", "--dir", str(folder), "--workers", "2", "--poll-s", "1", "--auth"]
    env = pytest.MonkeyPatch()
    try:
        done = subprocess.run(up, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"stack up failed:\n{done.stdout}\n{done.stderr}"
        print(done.stdout)
        for key, value in _client_env(folder).items():  # as `source DIR/env` would (MLflow's login among them)
            env.setenv(key, value)
        yield json.loads((folder / "stack.json").read_text())
    finally:
        env.undo()
        subprocess.run([sys.executable, str(SCRIPT), "down", "--dir", str(folder)], timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def _client_env(folder: Path) -> dict[str, str]:
    lines = (folder / "env").read_text().splitlines()
    return dict(line.removeprefix("export ").split("=", 1) for line in lines)


def _raw(stack: dict, **sections) -> dict:
    raw = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    raw["tracking"] = {"enabled": True, "uri": stack["mlflow"]["url"], "experiment": "stack"}
    raw["serve"] = {"backend": "torch"}  # the store is under test here, not the serving backend
    return _merge(raw, sections)


def _s3_keys(stack: dict) -> list[str]:
    import boto3

    secrets = dict(line.split("=", 1) for line in (Path(stack["dir"]) / "secrets.env").read_text().splitlines())
    s3 = boto3.client(
        "s3",
        endpoint_url=stack["s3"]["url"],
        aws_access_key_id=secrets["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=secrets["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="segloop")
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_stack_records_urls_pids_memory_and_writes_the_client_env(stack):
    import urllib.error
    import urllib.request

    env = _client_env(Path(stack["dir"]))
    assert env["MLFLOW_TRACKING_URI"] == stack["mlflow"]["url"] and env["MLFLOW_TRACKING_USERNAME"] == "admin"
    assert env["PREFECT_API_URL"] == stack["prefect"]["url"] and env["SEGLOOP_WORK_POOL"] == "segloop"
    assert not any(k.startswith("AWS_") for k in env)  # clients need no storage keys: the server serves artifacts
    assert len(stack["workers"]) == 2 and all(v > 0 for v in stack["memory_mb"].values())
    for name in ("secrets.env", "env"):
        assert (Path(stack["dir"]) / name).stat().st_mode & 0o077 == 0, f"{name} readable by others"
    with pytest.raises(urllib.error.HTTPError, match="401"):  # basic auth is on: no login, no answer
        urllib.request.urlopen(f"{stack['mlflow']['url']}/api/2.0/mlflow/experiments/search?max_results=1")
    ui = stack["prefect"]["url"].removesuffix("/api")
    with urllib.request.urlopen(f"{ui}/ui-settings") as r:  # the Prefect UI reads its data from this server
        assert json.load(r)["api_url"] == stack["prefect"]["url"]


@pytest.mark.slow
def test_registry_register_gate_history_rollback_on_the_http_store(stack, base_data, tmp_path):
    raw = _raw(stack, registry={"model_name": NAME}, train={"epochs": 2})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    settings = settings_from_dict(raw)
    small = tmp_path / "small"
    generate(small, "base", n=8, seed=2, size=(64, 64))
    for out, extra in (("strong", []), ("weak", ["--set", "train.epochs=1", "--set", "train.lr=1e-9"])):
        args = ["train", "--params", str(params), "--data", str(base_data if out == "strong" else small)]
        args += ["--val", str(small), "--out", str(tmp_path / out), "--domain", "base", "--register", NAME, *extra]
        assert main(args) == 0
    # the model files went through the server into the bucket
    assert any(k.endswith("extra_files/best.pt") for k in _s3_keys(stack))

    def gate_it(version: str, *overrides: str) -> dict:
        s = load_settings(params, list(overrides))
        return gate.gate(s, version, {"base": small}, "base", tmp_path / f"gate-{version}", log=lambda _: None)

    assert gate_it("2", "registry.gate.floor_miou=0.0")["promoted"]
    assert gate_it("1", "registry.gate.min_gain=-1.0")["promoted"]
    # aliases over HTTP: `segloop models list` must show them (search results carry none there)
    rows = registry.list_versions(settings)
    assert [(r["version"], r["aliases"]) for r in rows] == [(1, ["champion"]), (2, [])]
    path, label, mv = registry.resolve_model(f"models:/{NAME}@champion", settings)
    assert mv.version == "1" and registry.file_sha256(path) == registry.file_sha256(tmp_path / "strong" / "best.pt")
    assert main(["models", "rollback", "--params", str(params), "--reason", "stack test"]) == 0
    moves = [(e["from"], e["to"], e["kind"]) for e in registry.history(settings) if e["alias"] == "champion"]
    assert moves == [(None, "2", "gate"), ("2", "1", "gate"), ("1", "2", "rollback")]
    assert [r["aliases"] for r in registry.list_versions(settings)] == [[], ["champion"]]


# ---------------------------------------------------------------- the loop through the work pool


def _arrive(ws: Path, name: str, domain: str, n: int, seed: int) -> None:
    out = ws / "incoming" / name
    generate(out, domain, n=n, seed=seed, size=(72, 80))
    (out / "batch.json").write_text(json.dumps({"domain": domain}))


def _wait_final(run_ids: list, timeout: float) -> dict:
    """{flow run id: final state name}, polling the server."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            now = {i: client.read_flow_run(i).state for i in run_ids}
            if all(s is not None and s.is_final() for s in now.values()):
                return {i: s.name for i, s in now.items()}
            if time.monotonic() > deadline:
                raise AssertionError(f"flow runs not finished within {timeout:g}s: {now}")
            time.sleep(2)


def _worker_logs(stack: dict) -> str:
    return "\n".join(f"--- {w['name']}\n{Path(w['log']).read_text()[-3000:]}" for w in stack["workers"])


def _loop_raw(stack: dict, ws: Path, **flows) -> dict:
    """The loop's tiny settings (as tests/test_flows.py): every update passes the gate."""
    raw = _raw(
        stack,
        flows={"workspace": str(ws), "retries": 0, **flows},
        registry={"model_name": "loop", "gate": {"min_gain": -1.0, "max_forgetting": 1.0, "floor_miou": 0.0}},
        train={"epochs": 4},
        continual={"epochs": 3},
        drift={"min_images": 8, "reference_size": 32, "model_crop": 64, "mmd_permutations": 200, "alpha": 0.01},
    )
    raw["drift"]["max_quality_drop"] = 0.5
    return raw


@pytest.fixture(scope="module")
def deployed(stack, tmp_path_factory) -> dict:
    """`monitor_flow` deployed to the pool, its workspace with git + DVC remotes; two batches
    waiting and two runs of the deployment started at once; returns when both have finished."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import deploy_to_pool

    root = tmp_path_factory.mktemp("deployed")
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(root / "remote.git")], check=True)
    remotes = {"git_remote": str(root / "remote.git"), "dvc_remote": str(root / "dvc-remote")}
    ws = root / "a" / "ws"
    raw = _loop_raw(stack, ws, **remotes)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    _arrive(ws, "00-base", "base", 32, 1)
    _arrive(ws, "01-base", "base", 16, 5)
    with temporary_settings({PREFECT_API_URL: stack["prefect"]["url"]}):
        deploy_to_pool("stack-test", stack["pool"], {"params": str(params), "overrides": []})
        # both at once: whichever a worker starts first holds the deployment's one slot
        runs = [run_deployment("monitor-flow/stack-test", timeout=0, as_subflow=False) for _ in range(2)]
        final = _wait_final([r.id for r in runs], timeout=420)
    return {"root": root, "ws": ws, "raw": raw, "remotes": remotes, "final": final}


@pytest.mark.slow
def test_monitor_deployment_runs_batches_on_a_worker_one_run_at_a_time(stack, deployed):
    ws, final = deployed["ws"], deployed["final"]
    assert sorted(final.values()) == ["Cancelled", "Completed"], f"{final}\n{_worker_logs(stack)}"
    processed = sorted(p.name for p in (ws / "processed").iterdir())
    assert processed == ["00-base.json", "01-base.json"]
    records = [json.loads((ws / "processed" / p).read_text()) for p in processed]
    assert records[0]["promoted"] and records[0]["champion_version"] == "1"
    assert not records[1]["updated"] and records[1]["champion_version"] == "1"
    client, _ = registry.registry_client(settings_from_dict(deployed["raw"]))
    assert len(client.search_model_versions("name = 'loop'")) == 1  # the bootstrap, trained once
    steps = subprocess.run(["git", "-C", str(ws), "log", "--format=%s"], capture_output=True, text=True).stdout
    assert [line.split(":")[0] for line in steps.splitlines() if line.startswith("batch ")] == [
        "batch 01-base",
        "batch 00-base",
    ]


@pytest.mark.slow
def test_another_host_goes_on_from_the_workspace_remotes_and_a_fresh_clone_rebuilds_nothing(stack, deployed):
    from segloop import loop

    # host B starts empty: its step pulls what the worker pushed (champion's references, replay) and goes on
    raw_b = _loop_raw(stack, deployed["root"] / "b" / "ws", **deployed["remotes"])
    settings_b = settings_from_dict(raw_b)
    ws_b = loop.Workspace.of(settings_b)
    _arrive(ws_b.root, "02-base", "base", 16, 6)
    rec = loop.process_batch(ws_b, ws_b.incoming / "02-base", settings_b)
    assert rec.drift is not None and not rec.updated and rec.champion_version == "1"
    assert loop.processed(ws_b) == {"00-base", "01-base", "02-base"}
    settings_a = settings_from_dict(deployed["raw"])
    loop.pull_workspace(loop.Workspace.of(settings_a), settings_a)  # and host A sees B's step
    assert loop.processed(loop.Workspace.of(settings_a)) == {"00-base", "01-base", "02-base"}
    # a fresh clone: `dvc pull` restores the champion's data, `dvc repro` has nothing to do
    clone = deployed["root"] / "clone"
    subprocess.run(["git", "clone", "-q", deployed["remotes"]["git_remote"], str(clone)], check=True)
    ws_c = loop.Workspace(clone, clone / "incoming")
    loop.dvc(ws_c, "remote", "add", "--local", "-d", "shared", deployed["remotes"]["dvc_remote"])
    loop.dvc(ws_c, "pull", "-q")
    assert (clone / "models" / "00-base" / "best.pt").is_file() and (clone / "reference" / "v1" / "base").is_dir()
    assert "Running stage" not in loop.dvc(ws_c, "repro")


# Host C's step, in a process of its own so that it can be killed outright.
_STEP = """
import sys
from segloop import loop
from segloop.config import load_settings
settings = load_settings(sys.argv[1])
ws = loop.Workspace.of(settings)
loop.process_batch(ws, ws.incoming / sys.argv[2], settings)
"""


@pytest.mark.slow
def test_a_worker_killed_mid_step_is_finished_by_another_host_without_a_second_version(stack, deployed):
    import signal

    from segloop import loop

    raw_c = _loop_raw(stack, deployed["root"] / "c" / "ws", **deployed["remotes"])
    params_c = deployed["root"] / "params-c.yaml"
    params_c.write_text(yaml.safe_dump(raw_c))
    settings_c = settings_from_dict(raw_c)
    ws_c = loop.Workspace.of(settings_c)
    _arrive(ws_c.root, "03-fog", "fog", 24, 3)
    client, _ = registry.registry_client(settings_c)

    def versions() -> set[int]:
        return {int(v.version) for v in client.search_model_versions("name = 'loop'")}

    def pushed() -> bool:
        """The step tags its update's version once the stage's run cache is on the DVC remote."""
        new = versions() - before
        tags = registry.version_tags(client.get_model_version("loop", str(max(new)))) if new else {}
        return tags.get("segloop.batch") == "03-fog"

    before = versions()
    log = deployed["root"] / "host-c.log"
    with log.open("w") as out:  # its own session: SIGKILL takes its DVC and training processes too
        proc = subprocess.Popen(
            [sys.executable, "-c", _STEP, str(params_c), "03-fog"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    # killed once the update it trained is registered and pushed: mid-step (the gate is next)
    deadline = time.monotonic() + 300
    while not pushed():
        assert proc.poll() is None, f"host C's step ended before it could be killed:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"host C registered nothing in 300 s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert "03-fog" not in loop.processed(ws_c)  # it died before its step committed
    (registered,) = versions() - before
    # the same batch arrives on host A (the deployment's workspace): it pulls, DVC's run cache
    # restores the model the killed step trained, and its version is the one gated
    settings_a = settings_from_dict(deployed["raw"])
    ws_a = loop.Workspace.of(settings_a)
    shutil.copytree(ws_c.incoming / "03-fog", ws_a.incoming / "03-fog")
    rec = loop.process_batch(ws_a, ws_a.incoming / "03-fog", settings_a)
    assert rec.updated and rec.candidate_version == str(registered)
    assert versions() - before == {registered}
    assert "03-fog" in loop.processed(ws_a)
