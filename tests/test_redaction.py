"""A password in the tracking URI is never written, logged, embedded or printed.

A real MLflow tracking server (HTTP, sqlite behind it, artifacts served) reached as
`http://mlflow:<password>@127.0.0.1:<port>` (the server has no auth: the password is only
there to be leaked), a real loop step that trains and registers through it, and a real
ONNX export; then a grep of everything written."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY, _merge, copy_store

from segloop import loop
from segloop.config import TrackingSettings, load_settings
from segloop.data.synthetic import generate
from segloop.redaction import redact
from segloop.tracking import TrackingError, open_store, resolve_store

PASSWORD = "S3cret-pw-4711"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_redact_masks_userinfo_passwords_and_secret_query_values_only():
    assert redact("postgresql+psycopg://mlflow:p@ss@db:5432/mlflow") == "postgresql+psycopg://mlflow:***@db:5432/mlflow"
    assert (
        redact("error at http://u:pw@h:1/x?token=abc&n=1 (refused)")
        == "error at http://u:***@h:1/x?token=***&n=1 (refused)"
    )
    for plain in ("sqlite:////tmp/mlflow.db", "http://127.0.0.1:5000", "file:///a:b@c", "models:/segloop@champion"):
        assert redact(plain) == plain


def test_an_unreachable_store_with_a_password_is_named_without_it():
    store = resolve_store(TrackingSettings(uri=f"http://mlflow:{PASSWORD}@127.0.0.1:9/"))
    with pytest.raises(TrackingError) as err:
        open_store(store, timeout_s=2)
    assert PASSWORD not in str(err.value) and "http://mlflow:***@127.0.0.1:9" in str(err.value)


@pytest.fixture(scope="module")
def server(tmp_path_factory, migrated_store):
    root = tmp_path_factory.mktemp("server")
    db = copy_store(migrated_store, root).removeprefix("sqlite:///")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        cwd=root,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=open(root / "server.log", "w"),
    )
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        yield root, f"http://mlflow:{PASSWORD}@127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_a_loop_step_and_an_export_leave_the_password_nowhere(server, tmp_path, capsys):
    from mlflow import MlflowClient

    from segloop.cli import main

    server_root, uri = server
    raw = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    raw["drift"] |= {"min_images": 8, "reference_size": 32}
    raw["registry"] = {"model_name": "loop", "gate": {"min_gain": 0.0, "max_forgetting": 1.0, "floor_miou": 0.0}}
    raw["tracking"] = {"enabled": True, "uri": uri, "experiment": "secret"}
    raw["flows"] = {"workspace": str(tmp_path / "ws"), "retries": 0}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    settings = load_settings(params)
    ws = loop.Workspace.of(settings)
    batch = ws.incoming / "00-base"
    generate(batch, "base", n=24, seed=1, size=(72, 80))
    (batch / "batch.json").write_text(json.dumps({"domain": "base"}))
    rec = loop.process_batch(ws, batch, settings)
    assert rec.updated and rec.candidate_version == "1"
    assert (
        yaml.safe_load((ws.root / "params.yaml").read_text())["tracking"]["uri"] is None
    )  # stages get it from the env
    onnx = tmp_path / "model.onnx"
    assert (
        main(
            [
                "export",
                "--params",
                str(params),
                "--model",
                "models:/loop/1",
                "--out",
                str(onnx),
                "--parity-data",
                str(ws.split("00-base", "test")),
            ]
        )
        == 0
    )
    assert onnx.stat().st_size > 0 and PASSWORD not in capsys.readouterr().out
    # every file written: workspace (checkout, DVC cache), served artifacts, the export; and the git history
    leaks = subprocess.run(
        ["grep", "-rla", PASSWORD, str(ws.root), str(server_root / "artifacts"), str(tmp_path / "model.onnx")],
        capture_output=True,
        text=True,
    ).stdout.split()
    leaks = [p for p in leaks if Path(p) != params]  # the operator's own settings file holds it, as given
    assert leaks == []
    assert PASSWORD not in loop.git(ws, "log", "-p", "--all")
    assert (ws.root / "models" / "00-base" / "best.pt").is_file()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs and any("tracking.uri" in r.data.params for r in runs)
    for r in runs:
        assert PASSWORD not in json.dumps(r.data.params) + json.dumps(r.data.tags)
    for mv in client.search_model_versions("name = 'loop'"):
        assert PASSWORD not in json.dumps(mv.tags) + (mv.description or "")
