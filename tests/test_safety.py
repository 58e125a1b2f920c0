"""Safe at the keyboard: refusals that leave every file as it was, integrity of model files,
production (the loop's registered model) only by explicit choice, and everyday commands
that never import torch. Real MLflow (temporary sqlite store), tiny real models."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from segloop import registry
from segloop.checkpoint import FORMAT, load_checkpoint
from segloop.cli import main
from segloop.config import settings_from_dict
from segloop.data.synthetic import generate
from segloop.runs import REGISTERED
from segloop.tracking import open_store, resolve_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LOOP_MODEL = "loop"  # registry.model_name of these tests: the loop's model


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (a file root counts as itself)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for w in words:
        assert w in err, err
    return err


@pytest.fixture(scope="module")
def env(tmp_path_factory, migrated_store):
    """A tracked store and params (model_name `loop`), 8 tiny base pairs, and one model trained ad hoc."""
    from conftest import ROOT, TINY, _merge, copy_store

    root = tmp_path_factory.mktemp("safety")
    raw = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    raw["tracking"] = {"enabled": True, "uri": copy_store(migrated_store, root / "store"), "experiment": "test"}
    raw["registry"] = {"model_name": LOOP_MODEL}
    raw["train"]["epochs"] = 1
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    data = root / "data"
    generate(data, "base", n=8, seed=3, size=(64, 64))
    settings = settings_from_dict(raw)
    assert main(["train", "--params", str(params), "--data", str(data), "--out", str(root / "adhoc")]) == 0
    return {
        "root": root,
        "params": params,
        "data": data,
        "settings": settings,
        "client": open_store(resolve_store(settings.tracking)),
    }


def segloop(env, *args) -> int:
    n = 2 if args[0] == "models" else 1
    return main([*args[:n], "--params", str(env["params"]), *args[n:]])


def test_adhoc_train_registers_nothing(env, capsys):
    client, out = env["client"], env["root"] / "adhoc"
    assert client.search_registered_models() == []  # neither the loop's model nor any other
    assert not (out / REGISTERED).exists() and (out / "best.pt").is_file()
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert [r.info.run_name for r in runs] == ["train:adhoc"] and runs[0].info.status == "FINISHED"


def test_train_refuses_an_existing_model_folder(env, capsys):
    out = env["root"] / "adhoc"
    (out / REGISTERED).write_text('{"model": "loop", "version": "7"}\n')  # as an earlier registered run leaves it
    before = snapshot(out, env["root"] / "store")
    assert segloop(env, "train", "--data", str(env["data"]), "--out", str(out)) == 2
    one_line_error(capsys, f"--out {out}", "not empty", "--resume", "--overwrite")
    assert snapshot(out, env["root"] / "store") == before  # no file touched, no run opened
    # --overwrite replaces it, and the stale record of the earlier registration goes first
    assert segloop(env, "train", "--data", str(env["data"]), "--out", str(out), "--overwrite") == 0
    assert not (out / REGISTERED).exists() and load_checkpoint(out / "best.pt")["epoch"] == 1


def test_predict_refuses_its_input_and_a_full_folder(env, tmp_path, capsys):
    images, model = tmp_path / "imgs", env["root"] / "adhoc" / "best.pt"
    generate(tmp_path / "set", "base", n=3, seed=4, size=(64, 64))
    (tmp_path / "set" / "images").rename(images)
    before = snapshot(images)
    for out, why in ((images, "is the input folder"), (images / "masks", "inside the input folder")):
        assert (
            segloop(env, "predict", "--model", str(model), "--input", str(images), "--out", str(out), "--overwrite")
            == 2
        )
        one_line_error(capsys, f"--out {out}", why)
        assert snapshot(images) == before and not (images / "masks").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    assert segloop(env, "predict", "--model", str(model), "--input", str(images), "--out", str(full)) == 2
    one_line_error(capsys, f"--out {full}", "not empty", "--overwrite")
    assert snapshot(full) == {str(full / "notes.txt"): hashlib.sha256(b"mine").hexdigest()}
    # allowed: a new folder; masks are palette PNGs whose values are the class ids
    assert segloop(env, "predict", "--model", str(model), "--input", str(images), "--out", str(tmp_path / "pred")) == 0
    mask = Image.open(next((tmp_path / "pred").glob("*.png")))
    values = np.asarray(mask)
    assert mask.mode == "P" and values.max() < len(env["settings"].data.classes)
    assert mask.getpalette()[3:6] != [0, 0, 0]  # class 1 is drawn in a visible colour


def _flip_weight_bytes(path: Path, n: int = 64) -> None:
    """Flip `n` bytes inside the largest tensor's data in the file (the zip stays readable)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    key = max(state, key=lambda k: state[k].numel())
    # The storage's bytes as saved (a channels_last tensor is stored in NHWC order).
    raw = torch.empty(0, dtype=torch.uint8).set_(state[key].untyped_storage()).numpy().tobytes()
    blob = path.read_bytes()
    at = blob.find(raw[:256])
    assert at > 0, "tensor bytes not found in the file"
    start = at + len(raw) // 2
    flipped = bytes(b ^ 0xFF for b in blob[start : start + n])
    path.write_bytes(blob[:start] + flipped + blob[start + n :])


def test_a_tampered_checkpoint_is_refused(env, tmp_path, capsys):
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes((env["root"] / "adhoc" / "best.pt").read_bytes())
    assert load_checkpoint(ckpt)["weights_sha256"]
    _flip_weight_bytes(ckpt)
    before = snapshot(ckpt)
    assert segloop(env, "evaluate", "--model", str(ckpt), "--data", str(env["data"]), "--out", str(tmp_path / "e")) == 2
    one_line_error(capsys, str(ckpt), "SHA-256", "corrupted or modified")
    assert snapshot(ckpt) == before and not (tmp_path / "e").exists()

    # A checkpoint saved before the hash existed still loads, with a warning that it is unchecked.
    old = {
        k: v
        for k, v in torch.load(env["root"] / "adhoc" / "best.pt", weights_only=True).items()
        if k != "weights_sha256"
    }
    torch.save(old, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["format"] == FORMAT
    assert "no weights hash" in capsys.readouterr().err


@pytest.mark.slow
def test_promote_refuses_a_version_that_does_not_fit_the_champion(env, capsys):
    client, root = env["client"], env["root"]
    assert segloop(env, "train", "--data", str(env["data"]), "--out", str(root / "rgb"), "--register", LOOP_MODEL) == 0
    assert segloop(env, "models", "promote", "1", "--reason", "first champion") == 0
    # a grayscale model with one class more, registered by hand into the loop's model
    assert (
        segloop(
            env,
            "train",
            "--data",
            str(env["data"]),
            "--out",
            str(root / "gray"),
            "--register",
            LOOP_MODEL,
            "--set",
            "data.channels=1",
            "--set",
            "data.classes=[background,stripes,checker,speckle,extra]",
        )
        == 0
    )
    assert json.loads((root / "gray" / REGISTERED).read_text())["version"] == "2"
    capsys.readouterr()
    before = snapshot(root / "store")
    assert segloop(env, "models", "promote", "2", "--reason", "try it") == 2
    one_line_error(capsys, f"models:/{LOOP_MODEL}/2", "champion v1", "channels 1 vs 3", "classes", "--force")
    assert snapshot(root / "store") == before
    assert registry._alias_version(client, LOOP_MODEL, registry.CHAMPION) == "1"

    # deliberate: --force with a reason, and the differences are on record
    assert segloop(env, "models", "promote", "2", "--force", "--reason", "site B is grayscale") == 0
    last = registry.history(env["settings"])[-1]
    assert (
        last["to"] == "2"
        and last["reason"] == "site B is grayscale"
        and any("channels 1 vs 3" in d for d in last["forced"])
    )
    assert registry.alias_record(client.get_model_version(LOOP_MODEL, "2").tags, "champion")["forced"] == last["forced"]


@pytest.mark.slow
def test_models_list_and_history_read_sqlite_as_mlflow_does(env):
    """The sqlite read path of `models list|history` (no MLflow import) sees what MLflow's client sees."""
    from segloop import registry_sqlite

    settings = env["settings"]
    aliases, fast = registry_sqlite.versions(resolve_store(settings.tracking), LOOP_MODEL)
    mlflow_aliases, slow = registry._versions_mlflow(settings, LOOP_MODEL)
    as_set = lambda mvs: {  # noqa: E731
        (str(v.version), v.creation_timestamp, v.run_id, json.dumps(dict(v.tags), sort_keys=True)) for v in mvs
    }
    assert len(fast) == 2 and as_set(fast) == as_set(slow)
    assert (
        {k: sorted(v) for k, v in aliases.items()}
        == {k: sorted(v) for k, v in mlflow_aliases.items()}
        == {"2": ["champion"]}
    )
    moves = registry.history(settings)
    assert [(e["from"], e["to"]) for e in moves] == [(None, "1"), ("1", "2")] and moves == registry._history_mlflow(
        settings
    )


@pytest.mark.slow
def test_everyday_commands_import_no_torch(env):
    """`models history|list`, `report` and a settings error against a real store: no torch, no SMP."""
    evals = env["root"] / "eval" / "base"
    evals.mkdir(parents=True, exist_ok=True)
    (evals / "metrics.json").write_text(
        json.dumps({"miou": 0.5, "dice": 0.6, "pixel_accuracy": 0.9, "per_class_iou": {"a": 0.5}, "n_images": 3})
    )
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for args, rc in (
        (["models", "history"], 0),
        (["models", "list"], 0),
        (["report", str(evals.parent)], 0),
        (["report", str(evals.parent), "--set", "train.lr=x"], 2),
    ):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "segloop.cli", *args, "--params", str(env["params"])],
            capture_output=True,
            text=True,
            env=environ,
        )
        assert proc.returncode == rc, proc.stderr[-2000:]
        heavy = re.findall(r"\|\s+(torch|torchvision|segmentation_models_pytorch)$", proc.stderr, re.M)
        assert not heavy, f"segloop {' '.join(args)} imported {heavy}"


def test_the_loops_stage_output_leaves_out_dvcs_advice(tmp_path, capsys):
    """`loop.run_stage` shows what the stage prints, without DVC's git-add/autostage/push hints."""
    from segloop import loop

    ws = loop.Workspace(tmp_path, tmp_path / "incoming")
    loop.git(ws, "init", "-q")
    loop.dvc(ws, "init", "-q")
    loop.run_stage(
        ws, "hello", "echo stage says hello > out.txt && echo printed by the stage", [], [tmp_path / "out.txt"], []
    )
    out = capsys.readouterr().out
    assert "printed by the stage" in out and "Running stage 'hello'" in out
    for advice in ("git add", "autostage", "dvc push", "To track the changes"):
        assert advice not in out, out


@pytest.mark.slow
def test_a_changed_registered_file_is_refused(env, tmp_path, monkeypatch, capsys):
    """The version's sha256 (of its registered checkpoint) is checked when a `models:/` ref is downloaded."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # no cached copy from earlier tests
    client = env["client"]
    mv = client.get_model_version(LOOP_MODEL, "1")
    model_id = mv.model_id or mv.source.removeprefix("models:/")
    stored = (
        Path(client.get_logged_model(model_id).artifact_location.removeprefix("file://")) / "extra_files" / "best.pt"
    )
    original = stored.read_bytes()
    try:
        _flip_weight_bytes(stored)
        assert (
            segloop(
                env,
                "evaluate",
                "--model",
                f"models:/{LOOP_MODEL}/1",
                "--data",
                str(env["data"]),
                "--out",
                str(tmp_path / "e"),
                "--set",
                "tracking.enabled=false",
            )
            == 2
        )
        one_line_error(capsys, f"models:/{LOOP_MODEL}/1", "does not match the version's sha256")
    finally:
        stored.write_bytes(original)
