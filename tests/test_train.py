"""Model tests: a shrunk real config trains, evaluates, resumes and transfers."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from segloop.checkpoint import load_checkpoint
from segloop.config import settings_from_dict
from segloop.data.files import list_samples, read_mask
from segloop.evaluate import evaluate, predict_folder
from segloop.metrics import confusion_matrix, summarize
from segloop.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_data):
    """One tiny model trained for TINY epochs, shared by the tests below."""
    from conftest import ROOT, TINY, _merge

    raw = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    raw["train"]["epochs"] = 24  # 24 images: enough steps to learn from any seed's initialisation
    settings = settings_from_dict(raw)
    out = tmp_path_factory.mktemp("model")
    lines = []
    result = train(settings, base_data, out, log=lines.append)
    return settings, out, result, lines


def _trivial_miou(data_dir, classes):
    """mIoU of always predicting the most frequent class."""
    masks = [torch.from_numpy(read_mask(s.mask).astype(np.int64)) for s in list_samples(data_dir)]
    counts = torch.bincount(torch.cat([m[m != 255] for m in masks]), minlength=len(classes))
    cm = sum(confusion_matrix(torch.full_like(m, int(counts.argmax())), m, len(classes)) for m in masks)
    return summarize(cm, classes, len(masks))["miou"]


def test_training_learns(trained, base_data, tmp_path):
    settings, out, result, lines = trained
    history = json.loads((out / "history.json").read_text())
    epochs = settings.train.epochs
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert all(h["img_per_s"] > 0 for h in history)
    epoch_lines = [line for line in lines if line.startswith("epoch")]
    assert len(epoch_lines) == epochs and "val mIoU" in epoch_lines[0]
    assert any(line.startswith("plan of") for line in lines)  # crop etc. left null: planned, and said so
    cfg = settings.train
    assert result.stopped == "completed" and result.images_seen == epochs * cfg.iters_per_epoch * cfg.batch_size
    assert (out / "settings.yaml").is_file()

    metrics = evaluate(out / "best.pt", base_data, tmp_path / "eval", settings.eval)
    trivial = _trivial_miou(base_data, list(settings.data.classes))
    assert metrics["miou"] > trivial + 0.1, (metrics["miou"], trivial)
    assert metrics["miou"] == pytest.approx(result.best_miou, abs=1e-4)  # same data, same model
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(written) >= {"miou", "dice", "pixel_accuracy", "per_class_iou", "n_images"}
    assert set(written["per_class_iou"]) == set(settings.data.classes) and written["n_images"] == 24
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 1000
    assert len(list((tmp_path / "eval").glob("overlay_*.png"))) == settings.eval.n_overlays


def test_checkpoint_describes_itself(trained):
    settings, out, _, _ = trained
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["classes"] == list(settings.data.classes) and ckpt["channels"] == 3
    assert ckpt["settings"]["model"]["arch"] == "Unet" and ckpt["parent"] is None
    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == settings.train.epochs and "optimizer" in last
    assert len(last["history"]) == settings.train.epochs
    (out / "evil.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="evil.pt: not a loadable segloop checkpoint"):
        load_checkpoint(out / "evil.pt")


def test_predict_writes_the_masks_evaluate_scores(trained, base_data, tmp_path):
    settings, out, _, _ = trained
    n = predict_folder(out / "best.pt", base_data / "images", tmp_path / "pred", settings.eval)
    assert n == 24
    cm = 0
    for sample in list_samples(base_data):
        png = Image.open(tmp_path / "pred" / f"{sample.stem}.png")
        assert png.mode == "P"  # palette PNG: class ids as values, visible colours in any viewer
        pred = np.asarray(png)
        assert pred.shape == read_mask(sample.mask).shape
        cm = cm + confusion_matrix(
            torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(read_mask(sample.mask).astype(np.int64)), 4
        )
    ref = evaluate(out / "best.pt", base_data, tmp_path / "ref", settings.eval)
    assert summarize(cm, list(settings.data.classes), 24)["miou"] == pytest.approx(ref["miou"], abs=1e-6)


def test_init_transfers_weights_and_rejects_mismatch(trained, base_data, tmp_path, tiny_raw):
    settings, out, _, _ = trained
    tiny_raw["train"]["epochs"] = 1
    tiny_raw["train"]["lr"] = 1e-9  # practically frozen: the first epoch must score like the parent
    child = train(settings_from_dict(tiny_raw), base_data, tmp_path / "child", init=out / "best.pt", log=lambda _: None)
    assert load_checkpoint(tmp_path / "child" / "best.pt")["parent"] == str(out / "best.pt")
    assert child.best_miou > 0.5 * trained[2].best_miou

    tiny_raw["data"]["classes"] = ["background", "stripes", "checker"]
    with pytest.raises(ValueError, match=r"--init .*classes \['background', 'stripes', 'checker', 'speckle'\] differ"):
        train(settings_from_dict(tiny_raw), base_data, tmp_path / "bad", init=out / "best.pt")
    tiny_raw["data"]["classes"] = list(settings.data.classes)
    tiny_raw["data"]["channels"] = 1
    with pytest.raises(ValueError, match="--init .*3 channels, data.channels is 1"):
        train(settings_from_dict(tiny_raw), base_data, tmp_path / "bad", init=out / "best.pt")


def test_resume_after_kill_continues_from_saved_epoch(base_data, tmp_path, tiny_raw, cli_env):
    out, epochs = tmp_path / "run", tiny_raw["train"]["epochs"]
    tiny_params = tmp_path / "params.yaml"  # the resume state after every epoch (tiny epochs take a second)
    tiny_params.write_text(yaml.safe_dump({**tiny_raw, "train": {**tiny_raw["train"], "resume_every_s": 0}}))
    cmd = [
        sys.executable,
        "-m",
        "segloop.cli",
        "train",
        "--params",
        str(tiny_params),
        "--data",
        str(base_data),
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 900  # generous: a loaded CI machine is slow, the check is not timing
    saved = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "last.pt").exists():
            try:
                saved = load_checkpoint(out / "last.pt")["epoch"]
            except ValueError:
                saved = 0
            if saved >= 2:
                break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted = load_checkpoint(out / "last.pt")  # written atomically: always loadable
    k = interrupted["epoch"]
    assert 2 <= k < epochs, "training was not interrupted mid-run"

    resumed = subprocess.run(cmd + ["--resume"], env=cli_env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out / 'last.pt'} after epoch {k}" in resumed.stdout
    epochs_run = [line.split()[1] for line in resumed.stdout.splitlines() if line.startswith("epoch")]
    assert epochs_run == [f"{e}/{epochs}" for e in range(k + 1, epochs + 1)]
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert history[:k] == interrupted["history"]


@pytest.mark.parametrize(
    "every_s, expected, final",
    [(3600.0, [False, False, False], 3), (0.0, [False, True, True], 3), (None, [False, False, False], None)],
)
def test_the_resume_state_is_written_every_resume_every_s_and_after_the_last_epoch(
    base_data, tmp_path, tiny_raw, every_s, expected, final
):
    """last.pt (4x best.pt) is not rewritten after every epoch unless asked to: each epoch's
    hook sees whether an earlier epoch left one; the finished run always has its last epoch's,
    except with resume_every_s null (never: the loop's stages, which DVC reruns from scratch)."""
    raw = {**tiny_raw, "train": {**tiny_raw["train"], "epochs": 3, "iters_per_epoch": 1, "resume_every_s": every_s}}
    out, seen = tmp_path / "run", []
    train(settings_from_dict(raw), base_data, out, on_epoch=lambda _: seen.append((out / "last.pt").exists()))
    assert seen == expected
    assert (out / "best.pt").is_file()
    assert (load_checkpoint(out / "last.pt")["epoch"] if (out / "last.pt").exists() else None) == final
