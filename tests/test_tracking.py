"""Tracking tests: store resolution, reachability (fail before training), DVC-style data
hashes, params flattening, per-epoch metrics logged as the epochs happen. Real MLflow on
a temporary sqlite store."""

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from segloop.cli import main
from segloop.config import TrackingSettings, settings_from_dict
from segloop.tracking import (
    TrackingError,
    dir_md5,
    eval_metrics,
    flatten,
    open_store,
    resolve_store,
    tracked_run,
)
from segloop.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket goes


def test_store_precedence_params_then_env_then_project(tmp_path):
    default = resolve_store(TrackingSettings(), env={}, mlruns=tmp_path / "mlruns")
    assert default.uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert default.artifact_root == str(tmp_path / "mlruns" / "artifacts")
    env = resolve_store(TrackingSettings(), env={"MLFLOW_TRACKING_URI": "http://tracking:5000"})
    assert env.uri == "http://tracking:5000" and env.artifact_root is None  # the server decides
    params = resolve_store(
        TrackingSettings(uri=f"sqlite:///{tmp_path}/x/m.db"), env={"MLFLOW_TRACKING_URI": "http://t:5000"}
    )
    assert params.uri == f"sqlite:///{tmp_path}/x/m.db" and params.artifact_root == str(tmp_path / "x" / "artifacts")


def test_flatten_and_eval_metrics():
    assert flatten({"data": {"classes": ["a", "b"], "crop_size": 64}, "model": {"encoder_weights": None}}) == {
        "data.classes": '["a", "b"]',
        "data.crop_size": "64",
        "model.encoder_weights": "null",
    }
    m = {
        "miou": 0.5,
        "dice": 0.6,
        "pixel_accuracy": 0.9,
        "per_class_iou": {"a": 0.4, "b": None},
        "per_class_dice": {"a": 0.5, "b": None},
    }
    assert eval_metrics(m, "fog.") == {
        "fog.miou": 0.5,
        "fog.dice": 0.6,
        "fog.pixel_accuracy": 0.9,
        "fog.iou.a": 0.4,
        "fog.dice.a": 0.5,
    }  # absent class: no score, not 0


def test_unreachable_stores_fail_fast_with_a_clear_message(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(TrackingError, match=r"tracking store sqlite:///.*a_file/sub/mlflow.db: cannot create"):
        open_store(resolve_store(TrackingSettings(uri=f"sqlite:///{blocker}/sub/mlflow.db")))
    port = _closed_port()
    started = time.monotonic()
    with pytest.raises(TrackingError, match=rf"tracking server http://127.0.0.1:{port} did not answer within 2s"):
        open_store(resolve_store(TrackingSettings(uri=f"http://127.0.0.1:{port}")), timeout_s=2)
    assert time.monotonic() - started < 10


def test_train_with_unreachable_store_fails_before_training(tmp_path, tiny_params, base_data, capsys):
    out = tmp_path / "model"
    rc = main(
        [
            "train",
            "--params",
            str(tiny_params),
            "--data",
            str(base_data),
            "--out",
            str(out),
            "--set",
            "tracking.enabled=true",
            "--set",
            f"tracking.uri=http://127.0.0.1:{_closed_port()}",
            "--set",
            "tracking.connect_timeout_s=1",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "did not answer within 1s" in err and "tracking.enabled: false" in err
    assert not out.exists()  # nothing trained, nothing written


@pytest.mark.skipif(not (Path(sys.executable).parent / "dvc").exists(), reason="dvc not installed beside python")
@pytest.mark.slow
def test_dir_md5_is_the_hash_dvc_records(tmp_path, base_data, cli_env):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(base_data, repo / "ds")
    for args in (
        ["dvc", "init", "--no-scm", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        ["dvc", "add", "-q", "ds"],
    ):
        subprocess.run(args, cwd=repo, env=cli_env, check=True, capture_output=True)
    recorded = yaml.safe_load((repo / "ds.dvc").read_text())["outs"][0]["md5"]
    assert dir_md5(repo / "ds") == recorded and recorded.endswith(".dir")


@pytest.mark.slow
def test_epochs_are_logged_as_they_happen(tmp_path, tracked_raw):
    from segloop.data.synthetic import generate

    base_data = tmp_path / "small"  # 8 pairs, 2 steps an epoch: the point is the timing of the logs
    generate(base_data, "base", n=8, seed=3, size=(64, 64))
    tracked_raw["train"]["epochs"] = 2
    settings = settings_from_dict(tracked_raw)
    seen = []
    with tracked_run(settings, "train", {"train": base_data}) as run:

        def on_epoch(record):
            run.log_epoch(record)
            # what the store holds at the end of this epoch, not after training
            seen.append([m.step for m in run.client.get_metric_history(run.run_id, "val_miou")])

        train(settings, base_data, tmp_path / "m", on_epoch=on_epoch, log=lambda _: None)
    assert seen == [[1], [1, 2]]
    stored = run.client.get_run(run.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params["train.epochs"] == "2" and stored.data.params["tracking.enabled"] == "true"
    assert stored.data.tags["segloop.data.train.md5"] == dir_md5(base_data)
    for key in ("loss", "val_miou", "lr", "img_per_s"):
        assert [m.step for m in run.client.get_metric_history(run.run_id, key)] == [1, 2]


def test_failed_step_marks_the_run_failed(tracked_settings):
    with pytest.raises(ValueError, match="boom"):
        with tracked_run(tracked_settings, "train") as run:
            raise ValueError("boom")
    assert run.client.get_run(run.run_id).info.status == "FAILED"


def test_each_test_store_is_a_private_migrated_copy(migrated_store, tmp_path):
    """The conftest store fixtures: a copy is usable at once and shares nothing with another."""
    from conftest import copy_store

    a, b = copy_store(migrated_store, tmp_path / "a"), copy_store(migrated_store, tmp_path / "b")
    client_a = open_store(resolve_store(TrackingSettings(uri=a)))
    client_a.create_experiment("only-in-a")
    assert open_store(resolve_store(TrackingSettings(uri=b))).get_experiment_by_name("only-in-a") is None
    assert (
        open_store(resolve_store(TrackingSettings(uri=f"sqlite:///{migrated_store}"))).get_experiment_by_name(
            "only-in-a"
        )
        is None
    )
