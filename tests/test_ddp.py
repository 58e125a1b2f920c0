"""Multi-process training: `segloop train` under torchrun (2 CPU processes, gloo) on tiny data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from segloop.checkpoint import load_checkpoint, load_model
from segloop.train import train

pytestmark = pytest.mark.slow


def test_torchrun_trains_once_and_writes_a_single_process_checkpoint(
    base_data, tmp_path, tiny_params, tiny_settings, cli_env
):
    torchrun = Path(sys.executable).parent / "torchrun"
    out, epochs, world, batch = tmp_path / "ddp", 2, 2, tiny_settings.train.batch_size
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc-per-node",
        str(world),
        "-m",
        "segloop.cli",
        "train",
        "--params",
        str(tiny_params),
        "--data",
        str(base_data),
        "--out",
        str(out),
        "--set",
        f"train.epochs={epochs}",
    ]
    proc = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # Rank 0 alone logs and prints: one line per epoch, one result.
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("epoch")] == [
        f"{e}/{epochs}" for e in range(1, epochs + 1)
    ]
    assert proc.stdout.count('"best_miou"') == 1
    # One set of files, no leftovers from a second writer.
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pt",
        "history.json",
        "last.pt",
        "plan.yaml",
        "settings.yaml",
        "train_metrics.json",
    ]
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [1, 2]

    # An epoch is iters_per_epoch synchronised steps; each rank took every other batch of it.
    last = load_checkpoint(out / "last.pt")
    steps_per_rank = tiny_settings.train.iters_per_epoch
    assert last["step"] == epochs * steps_per_rank
    assert last["images_seen"] == epochs * steps_per_rank * batch * world

    model, settings = load_model(out / "best.pt")
    assert settings.model.model_copy(update={"norm": None}) == tiny_settings.model  # norm: planned from the data
    single = train(
        tiny_settings.model_copy(update={"train": tiny_settings.train.model_copy(update={"epochs": 1})}),
        base_data,
        tmp_path / "single",
        log=lambda _: None,
    )
    reference = load_checkpoint(single.checkpoint)
    ddp_best = load_checkpoint(out / "best.pt")
    assert set(ddp_best) == set(reference)
    assert list(ddp_best["model"]) == list(reference["model"])  # plain module keys, no "module." prefix
    assert set(last) == set(load_checkpoint(tmp_path / "single" / "last.pt"))


def test_torchrun_ranks_stop_together_on_the_time_budget(base_data, tmp_path, tiny_params, cli_env):
    """A budget shorter than one step: the shared stop decision (all-reduced each step) ends both
    ranks after step 1; a rank leaving alone would leave the other waiting in DDP's all-reduce."""
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "ddp"
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "segloop.cli",
        "train",
        "--params",
        str(tiny_params),
        "--data",
        str(base_data),
        "--out",
        str(out),
        "--set",
        "train.max_minutes=0.0001",
    ]
    proc = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("time budget of 0.0001 min reached") == 1
    result = json.loads((out / "train_metrics.json").read_text())
    assert result["stopped"] == "time_budget" and result["epochs"] == 1
    assert load_checkpoint(out / "last.pt")["step"] == 1 and result["images_seen"] == 2 * 4
