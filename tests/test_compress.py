"""Compression tests: distillation and pruning give ordinary checkpoints that evaluate, export and
predict take; pruned ones reload without Torch-Pruning; the mobile (.ort) export matches eager;
bad input gets one clear line. Tiny models, TINY settings, real CLI, real ONNX Runtime."""

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from segloop.checkpoint import load_checkpoint, load_model, model_from_checkpoint, save_checkpoint
from segloop.cli import main
from segloop.compress import count_parameters, prune_model
from segloop.config import ModelSettings
from segloop.continual import Distillation
from segloop.data.dataset import to_tensor
from segloop.data.files import list_samples, read_image
from segloop.models import build_model, layer_widths

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Fast runs: a small student, two short epochs of training or fine-tuning.
FAST = {
    "distill": {"student": {"encoder": "mobilenet_v2", "decoder_channels": [16, 8, 8, 8, 8]}},
    "train": {"epochs": 2, "iters_per_epoch": 2},
    "prune": {"epochs": 1},
}


@pytest.fixture
def params(tmp_path, tiny_raw):
    raw = {**tiny_raw, **{k: {**tiny_raw.get(k, {}), **v} for k, v in FAST.items()}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def teacher(tmp_path, tiny_settings):
    """A randomly initialised TINY model as a checkpoint (what is compressed need not be trained)."""
    torch.manual_seed(0)
    model = build_model(tiny_settings.model, 3, tiny_settings.num_classes)
    path = tmp_path / "teacher.pt"
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "settings": tiny_settings.model_dump(mode="json"),
            "classes": list(tiny_settings.data.classes),
            "channels": 3,
            "parent": None,
        },
    )
    return path


def accepted_by_every_step(checkpoint, params, data, tmp_path, capsys):
    """`evaluate`, `export` (parity within tolerance) and `predict` each take `checkpoint`."""
    common = ["--params", str(params)]
    assert (
        main(["evaluate", *common, "--model", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "ev")]) == 0
    )
    assert 0.0 <= json.loads((tmp_path / "ev" / "metrics.json").read_text())["miou"] <= 1.0
    onnx_file = tmp_path / "m.onnx"
    assert main(["export", *common, "--model", str(checkpoint), "--out", str(onnx_file)]) == 0
    assert json.loads((tmp_path / "m.onnx.parity.json").read_text())["fp32"]["within_tolerance"]
    out = tmp_path / "pred"
    assert (
        main(["predict", *common, "--model", str(checkpoint), "--input", str(data / "images"), "--out", str(out)]) == 0
    )
    assert len(list(out.glob("*.png"))) == len(list((data / "images").iterdir()))
    capsys.readouterr()


def test_distilled_student_learns_from_the_teacher_and_is_an_ordinary_checkpoint(
    tmp_path, params, teacher, base_data, capsys
):
    """alpha 1 (soft labels only) leaves the student much closer to the teacher, in KL on the
    training images, than the same run with alpha 0 (labels only); the student is a smaller,
    ordinary checkpoint."""
    teacher_model, _ = load_model(teacher)
    images = torch.stack([to_tensor(read_image(s.image, 3)) for s in list_samples(base_data)[:8]])[..., :64, :64]
    gap = Distillation(teacher_model, temperature=2.0, weight=1.0, unbiased=False)
    kl = {}
    for alpha in (0.0, 1.0):
        out = tmp_path / f"alpha{alpha}"
        args = ["--set", f"distill.alpha={alpha}", "--set", "train.epochs=4", "--set", "train.iters_per_epoch=4"]
        argv = ["distill", "--params", str(params), *args, "--teacher", str(teacher), "--data", str(base_data)]
        assert main([*argv, "--out", str(out)]) == 0
        student, _ = load_model(out / "best.pt")
        with torch.no_grad():
            kl[alpha] = float(gap(images, student(images), torch.zeros(8, 64, 64, dtype=torch.long)))
    capsys.readouterr()
    assert kl[1.0] < 0.5 * kl[0.0], kl

    ckpt = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["teacher"] == str(teacher) and ckpt["distill"]["alpha"] == 1.0
    student, settings = load_model(out / "best.pt")
    assert settings.model.encoder == "mobilenet_v2" and settings.model.decoder_channels == [16, 8, 8, 8, 8]
    assert count_parameters(student) < count_parameters(teacher_model) / 4
    accepted_by_every_step(out / "best.pt", params, base_data, tmp_path, capsys)


@pytest.mark.parametrize("encoder", ["resnet18", "mobilenet_v2"])
def test_pruned_model_reloads_from_its_widths_with_the_same_outputs(tmp_path, tiny_settings, encoder):
    settings = ModelSettings(encoder=encoder, decoder_channels=[16, 8, 8, 8, 8])
    torch.manual_seed(0)
    model = build_model(settings, 3, 4).eval()
    before = count_parameters(model)
    prune_model(model, 0.5, 3, 64)
    assert count_parameters(model) < before / 2
    raw = tiny_settings.model_dump(mode="json")
    raw["model"] = settings.model_dump(mode="json")
    ckpt = {
        "model": model.state_dict(),
        "widths": layer_widths(model),
        "settings": raw,
        "classes": ["a", "b", "c", "d"],
        "channels": 3,
    }
    save_checkpoint(tmp_path / "p.pt", ckpt)
    reloaded, _ = model_from_checkpoint(load_checkpoint(tmp_path / "p.pt"))
    x = torch.rand(2, 3, 96, 64)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    assert reloaded.encoder.get_submodule(next(iter(layer_widths(reloaded.encoder)))).in_channels == 3  # input kept
    assert reloaded.segmentation_head[0].out_channels == 4  # classes kept


def test_pruning_rounds_each_layer_to_whole_blocks_of_channels():
    """round_to 16: every pruned convolution keeps a multiple of 16 channels; narrower ones stay whole."""
    torch.manual_seed(0)
    model = build_model(ModelSettings(encoder="resnet18", decoder_channels=[48, 24, 16, 8, 8]), 3, 4).eval()
    before = {name: w[1] for name, w in layer_widths(model).items() if len(w) == 3}
    prune_model(model, 0.3, 3, 64, round_to=16)
    after = {name: w[1] for name, w in layer_widths(model).items() if len(w) == 3}
    pruned = {name for name in after if after[name] < before[name]}
    assert {"encoder.layer1.0.conv1", "decoder.blocks.0.conv1.0"} <= pruned  # 64 -> 32 (not 44), 48 -> 32
    assert all(after[name] % 16 == 0 for name in pruned)
    assert all(after[name] == before[name] for name in after if before[name] <= 16)


def test_prune_finetunes_a_smaller_model_that_loads_without_torch_pruning(tmp_path, params, teacher, base_data, capsys):
    out = tmp_path / "pruned"
    args = [
        "prune",
        "--params",
        str(params),
        "--model",
        str(teacher),
        "--ratio",
        "0.5",
        "--data",
        str(base_data),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert best["pruning"]["ratio"] == 0.5 and best["parent"] == str(teacher) and best["widths"]
    assert json.loads((out / "train_metrics.json").read_text())["epochs"] == 1  # prune.epochs
    code = (
        "import sys; from segloop.checkpoint import load_model; "
        f"m, _ = load_model({str(out / 'best.pt')!r}); "
        "print(sum(p.numel() for p in m.parameters()), 'torch_pruning' in sys.modules)"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(got[0]) < count_parameters(load_model(teacher)[0]) / 2 and got[1] == "False"
    accepted_by_every_step(out / "best.pt", params, base_data, tmp_path, capsys)


def test_ort_files_match_eager(tmp_path, params, teacher, base_data, capsys):
    out = tmp_path / "m.ort"
    argv = [
        "--model",
        str(teacher),
        "--format",
        "ort",
        "--out",
        str(out),
        "--quantize",
        "int8",
        "--calib",
        str(base_data),
    ]
    assert main(["export", "--params", str(params), *argv]) == 0
    assert f"converted to ONNX Runtime's mobile format: {out}, {tmp_path / 'm.int8.ort'}" in capsys.readouterr().out
    report = json.loads((tmp_path / "m.ort.parity.json").read_text())
    assert report["format"] == "ort" and report["fp32"]["file"] == str(out) and report["fp32"]["within_tolerance"]
    assert (
        report["int8"]["file"] == str(tmp_path / "m.int8.ort") and report["int8"]["bytes"] < report["fp32"]["bytes"] / 3
    )
    model, _ = load_model(teacher)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        expected = model(x).numpy()
    # ONNX Runtime's own sessions on the .ort files, independently of segloop's backend
    for path, tolerance in ((out, 1e-3), (tmp_path / "m.int8.ort", None)):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        assert json.loads(meta["segloop.classes"]) == ["background", "stripes", "checker", "speckle"]
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == expected.shape
        if tolerance is not None:
            assert np.abs(got - expected).max() < tolerance  # export.tolerance


def test_pte_program_matches_eager_in_executorch(tmp_path, params, teacher, base_data, capsys):
    out = tmp_path / "m.pte"
    argv = ["export", "--params", str(params), "--model", str(teacher), "--format", "pte", "--out", str(out)]
    assert main([*argv, "--parity-data", str(base_data)]) == 0
    assert "parity vs eager PyTorch (ExecuTorch XNNPACK): 24 images" in capsys.readouterr().out
    report = json.loads((tmp_path / "m.pte.parity.json").read_text())
    assert report["format"] == "pte" and report["runtime"].startswith("executorch ")
    assert report["fp32"]["within_tolerance"] and report["fp32"]["pixel_agreement"] > 0.999
    # convolutions, norms and activations in XNNPACK; only the decoder's 5 upsamplings outside it
    assert report["fp32"]["lowering"]["portable_ops"] == {"aten.upsample_nearest2d.vec": 5}
    # ExecuTorch's own runtime on the file, independently of segloop's backend
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(str(out))
    model, _ = load_model(teacher)
    for shape in [(1, 3, 64, 96), (1, 3, 160, 32)]:  # sizes other than the export's example
        x = torch.rand(*shape)
        with torch.no_grad():
            expected = model(x)
        got = program.load_method("forward").execute([x])[0]
        assert got.shape == expected.shape and (got - expected).abs().max() < 1e-3  # export.tolerance


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["prune", "--ratio", "1.5", "--model", "{teacher}"],
            "--ratio 1.5: the share of channels to remove must be in (0, 1)",
        ),
        (
            ["prune", "--ratio", "0", "--model", "{teacher}"],
            "--ratio 0: the share of channels to remove must be in (0, 1)",
        ),
        (
            ["distill", "--set", "distill.student.encoder=nonet", "--teacher", "{teacher}"],
            "distill.student.encoder: unknown encoder 'nonet'",
        ),
        (["distill", "--teacher", "{tmp}/missing.pt"], "missing.pt: checkpoint not found"),
        (
            ["export", "--format", "ort", "--model", "{teacher}", "--out", "{tmp}/m.onnx"],
            "--out {tmp}/m.onnx: a --format ort file name must end in .ort",
        ),
        (
            ["export", "--format", "pte", "--model", "{teacher}", "--out", "{tmp}/m.pte", "--quantize", "int8"],
            "--quantize int8 is not offered for --format pte (not built): use --format onnx or ort",
        ),
        (
            ["export", "--format", "pte", "--set", "eval.max_size=2048", "--model", "{teacher}"]
            + ["--out", "{tmp}/m.pte"],
            "export.pte_max_side 1024 < eval.max_size 2048",
        ),
    ],
)
def test_bad_input_gets_one_line_naming_it(tmp_path, params, teacher, base_data, capsys, argv, message):
    fill = {"teacher": str(teacher), "tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in argv]
    if argv[0] != "export":
        argv += ["--data", str(base_data), "--out", str(tmp_path / "out")]
    assert main([argv[0], "--params", str(params), *argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(**fill) in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out" / "best.pt").exists()


def test_out_of_range_settings_name_their_key(tmp_path, params, teacher, base_data, capsys):
    argv = ["--teacher", str(teacher), "--data", str(base_data), "--out", str(tmp_path / "out")]
    for key, value in (("distill.alpha", "2"), ("distill.temperature", "0"), ("prune.ratio", "1")):
        assert main(["distill", "--params", str(params), "--set", f"{key}={value}", *argv]) == 2
        assert f"\n  {key}: Input should be" in capsys.readouterr().err


def test_pruned_model_registers_and_teaches_by_its_models_ref(tmp_path, tracked_raw, teacher, base_data, capsys):
    """`--register` adds the pruned model as a version; `distill --teacher models:/NAME/1` resolves it
    (as `update --parent` does) and the student names it."""
    raw = {**tracked_raw, **{k: {**tracked_raw.get(k, {}), **v} for k, v in FAST.items()}}
    params = tmp_path / "tracked.yaml"
    params.write_text(yaml.safe_dump(raw))
    common = ["--params", str(params), "--data", str(base_data)]
    assert main(["prune", *common, "--model", str(teacher), "--out", str(tmp_path / "p"), "--register", "small"]) == 0
    assert json.loads((tmp_path / "p" / "registered.json").read_text())["version"] == "1"
    assert main(["distill", *common, "--teacher", "models:/small/1", "--out", str(tmp_path / "s")]) == 0
    student = load_checkpoint(tmp_path / "s" / "best.pt")
    assert student["teacher"] == "models:/small/1 (version 1)" and "widths" not in student
    capsys.readouterr()
