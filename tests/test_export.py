"""Export tests: ONNX round trip with dynamic sizes, static int8, the ONNX predict backend,
logging to a model version's run, bad input. Tiny untrained models (parity is about the graph,
not the weights); real onnxruntime, real MLflow on a temporary sqlite store."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from segloop.checkpoint import load_model, save_checkpoint
from segloop.cli import main
from segloop.config import NormSettings
from segloop.data.files import list_samples
from segloop.evaluate import predict_folder
from segloop.export import OnnxBackend, export_model, int8_path, parity_path
from segloop.inference import predict_logits
from segloop.models import build_model
from segloop.registry import log_export

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_checkpoint(path, settings, channels):
    """A randomly initialised model of `settings` with `channels` input channels, as a checkpoint."""
    torch.manual_seed(channels)
    settings = settings.model_copy(update={"data": settings.data.model_copy(update={"channels": channels})})
    model = build_model(settings.model, channels, settings.num_classes)
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "settings": settings.model_dump(mode="json"),
            "classes": list(settings.data.classes),
            "channels": channels,
            "parent": None,
        },
    )
    return path


@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip_matches_eager_at_any_batch_and_size(tmp_path, tiny_settings, channels):
    ckpt = tiny_checkpoint(tmp_path / "m.pt", tiny_settings, channels)
    out = tmp_path / "m.onnx"
    report = export_model(ckpt, out, tiny_settings.export, tiny_settings.eval, log=lambda _: None)

    graph = onnx.load(str(out)).graph
    graph_input = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in graph_input] == ["batch", channels, "height", "width"]
    # every decoder upsampling has constant scales (ORT's NCHWc layout), no size from Shape ops
    resizes = [n for n in graph.node if n.op_type == "Resize"]
    constants = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in graph.initializer}
    assert len(resizes) == 5 and all(len(n.input) == 3 and constants[n.input[2]] == [1, 1, 2, 2] for n in resizes)
    backend = OnnxBackend(out)
    assert backend.channels == channels and backend.classes == list(tiny_settings.data.classes)
    model, _ = load_model(ckpt)
    for shape in [(1, channels, 64, 96), (3, channels, 128, 64)]:  # padded batches, as inference feeds them
        x = torch.rand(*shape)
        with torch.inference_mode():
            expected = model(x)
        got = backend(x)
        assert got.shape == expected.shape == (shape[0], tiny_settings.num_classes, *shape[2:])
        assert (got - expected).abs().max() < 1e-4
    x = torch.rand(2, channels, 72, 80)  # not multiples of 32: predict_logits pads for both backends
    assert (predict_logits(backend, x) - predict_logits(model, x)).abs().max() < 1e-4

    written = json.loads(parity_path(out).read_text())
    assert written == json.loads(json.dumps(report))
    assert written["n_images"] == 3 and written["input_sizes"] == [[72, 80], [96, 128]]
    assert written["provider"] == "CPUExecutionProvider" and written["opset"] == tiny_settings.export.opset
    assert written["fp32"]["within_tolerance"] and written["fp32"]["max_abs_logit_diff"] < 1e-4
    assert written["fp32"]["pixel_agreement"] > 0.999 and written["fp32"]["miou"] is None  # noise has no masks
    assert "int8" not in written


def test_int8_export_is_smaller_and_mostly_agrees(tmp_path, tiny_settings, base_data):
    ckpt = tiny_checkpoint(tmp_path / "m.pt", tiny_settings, 3)
    out = tmp_path / "m.onnx"
    report = export_model(
        ckpt,
        out,
        tiny_settings.export,
        tiny_settings.eval,
        quantize="int8",
        calib=base_data,
        parity_data=base_data,
        log=lambda _: None,
    )
    q = report["int8"]
    assert q["file"] == str(int8_path(out)) and q["bytes"] < 0.4 * report["fp32"]["bytes"]
    ops = {node.op_type for node in onnx.load(q["file"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert q["quantization"]["calib_images"] == 24 and q["quantization"]["format"] == "QDQ"  # all 24 < calib_images
    assert report["n_images"] == 24 and report["input_sizes"] == [[72, 80]] and report["labelled"]
    assert q["pixel_agreement"] > 0.9, q
    assert abs(q["miou_diff"]) < 0.05 and report["fp32"]["miou_diff"] == pytest.approx(0, abs=1e-6)
    int8 = OnnxBackend(q["file"])
    assert int8.classes == list(tiny_settings.data.classes) and int8.metadata["segloop.precision"] == "int8"


def test_int8_keeps_the_local_input_normalisation_in_float(tmp_path, tiny_settings, base_data):
    """Quantized, `local`'s windowed mean and variance of x^2 ran slower than the whole fp32 model."""
    local = NormSettings(kind="local", window=9)
    settings = tiny_settings.model_copy(update={"model": tiny_settings.model.model_copy(update={"norm": local})})
    ckpt = tiny_checkpoint(tmp_path / "m.pt", settings, 3)
    out = tmp_path / "m.onnx"
    ev = settings.eval
    report = export_model(ckpt, out, settings.export, ev, quantize="int8", calib=base_data, log=lambda _: None)
    graph = onnx.load(report["int8"]["file"]).graph
    made_by = {output: node.op_type for node in graph.node for output in node.output}
    norm = [node for node in graph.node if node.name.startswith("/input_norm/")]
    assert sum(node.op_type == "AveragePool" for node in norm) == 2
    assert all(made_by.get(i) != "DequantizeLinear" for node in norm for i in node.input)  # float in, float out
    kept = report["int8"]["quantization"]["float_nodes"]
    assert "/input_norm/AveragePool" in kept and all(name.startswith("/input_norm/") for name in kept)
    assert any(node.op_type == "QuantizeLinear" for node in graph.node)  # the rest is int8
    assert report["int8"]["pixel_agreement"] > 0.9


def test_predict_onnx_backend_writes_the_torch_masks(tmp_path, tiny_settings, tiny_params, base_data, cli_env):
    ckpt = tiny_checkpoint(tmp_path / "m.pt", tiny_settings, 3)
    out = tmp_path / "m.onnx"
    assert main(["export", "--params", str(tiny_params), "--model", str(ckpt), "--out", str(out)]) == 0
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "segloop.cli",
            "predict",
            "--params",
            str(tiny_params),
            "--backend",
            "onnx",
            "--model",
            str(out),
            "--input",
            str(base_data / "images"),
            "--out",
            str(tmp_path / "onnx"),
        ],
        env=cli_env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 24 masks" in proc.stdout and "onnx backend" in proc.stdout
    predict_folder(ckpt, base_data / "images", tmp_path / "torch", tiny_settings.eval)
    same = total = 0
    for sample in list_samples(base_data):
        a = np.asarray(Image.open(tmp_path / "onnx" / f"{sample.stem}.png"))
        b = np.asarray(Image.open(tmp_path / "torch" / f"{sample.stem}.png"))
        assert a.shape == b.shape == (72, 80)
        same, total = same + int((a == b).sum()), total + a.size
    assert same / total > 0.999  # logits match to ~1e-6; only an exact tie could flip a pixel


def test_bad_input_fails_with_clear_errors(tmp_path, tiny_settings, tiny_params, capsys):
    ckpt = tiny_checkpoint(tmp_path / "m.pt", tiny_settings, 3)
    args = lambda *extra: [  # noqa: E731
        "export",
        "--params",
        str(tiny_params),
        "--model",
        str(ckpt),
        "--out",
        str(tmp_path / "m.onnx"),
        *extra,
    ]
    cfg, ev = tiny_settings.export, tiny_settings.eval
    with pytest.raises(FileNotFoundError, match="missing.pt: checkpoint not found"):
        export_model(tmp_path / "missing.pt", tmp_path / "m.onnx", cfg, ev)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"--calib: .*empty: no images"):
        export_model(ckpt, tmp_path / "m.onnx", cfg, ev, quantize="int8", calib=tmp_path / "empty")
    with pytest.raises(ValueError, match="--quantize int8 needs --calib"):
        export_model(ckpt, tmp_path / "m.onnx", cfg, ev, quantize="int8")
    assert main(args("--format", "tflite")) == 2
    assert "--format 'tflite': unknown export format; valid: ['onnx', 'ort', 'pte']" in capsys.readouterr().err
    assert main(args("--quantize", "int4", "--calib", str(tmp_path))) == 2
    assert "--quantize 'int4': unknown quantization; valid: ['int8']" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()  # nothing written before the inputs were checked

    # An export that does not match eager within export.tolerance is reported and fails.
    assert main(args("--set", "export.tolerance=1e-12")) == 1
    assert "differs from eager PyTorch by" in capsys.readouterr().err
    assert not json.loads(parity_path(tmp_path / "m.onnx").read_text())["fp32"]["within_tolerance"]

    (tmp_path / "other.onnx").write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="other.onnx: not a loadable ONNX model"):
        OnnxBackend(tmp_path / "other.onnx")
    assert (
        main(
            [
                "predict",
                "--params",
                str(tiny_params),
                "--backend",
                "onnx",
                "--model",
                "models:/x@champion",
                "--input",
                str(tmp_path),
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    assert "needs an exported .onnx file" in capsys.readouterr().err


def test_export_is_logged_to_the_model_versions_run(tmp_path, tiny_settings):
    from segloop.registry import registry_client

    settings = tiny_settings.model_copy(
        update={
            "tracking": tiny_settings.tracking.model_copy(
                update={"enabled": True, "uri": f"sqlite:///{tmp_path}/store/mlflow.db"}
            )
        }
    )
    client, _ = registry_client(settings)
    run = client.create_run(client.create_experiment("test", artifact_location=str(tmp_path / "artifacts")))
    client.create_registered_model("tiny")
    mv = client.create_model_version("tiny", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    files = [tmp_path / "m.onnx", tmp_path / "m.onnx.parity.json"]
    for f in files:
        f.write_text(f.name)
    uri = log_export(settings, mv, files)
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "export")) == [
        "export/m.onnx",
        "export/m.onnx.parity.json",
    ]
    assert client.get_model_version("tiny", mv.version).tags["segloop.export"] == uri
