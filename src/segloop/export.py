"""ONNX export of a checkpoint, static int8 quantization, and the parity check against eager.

The exported graph maps images (N, C, H, W) float32 in [0, 1] to logits (N, K, H, W),
with N, H and W dynamic (H and W multiples of 32: `segloop.inference` pads and tiles
before any backend sees a batch). The file carries the checkpoint's classes, channels
and settings in its metadata, so `OnnxBackend` needs nothing else to predict.

Parity: the same images through eager PyTorch and ONNX Runtime, with the same padding
and tiling; max |logit difference| and the mIoU of each, written beside the file as
`<FILE>.parity.json`. This module trains nothing and decides nothing about promotion.

Format `ort`: ONNX Runtime's mobile/edge format, converted from the ONNX export (which stays
beside it); its parity is checked by loading the .ort file in ONNX Runtime itself.
Format `pte`: an ExecuTorch program lowered to its XNNPACK delegate (batch 1, height and width
any multiples of 32 up to `export.pte_max_side`), checked in ExecuTorch's own runtime.
"""

from __future__ import annotations

import json
import operator
import random
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segloop.checkpoint import load_checkpoint, model_from_checkpoint
from segloop.config import EvalSettings, ExportSettings, redact_settings
from segloop.data.dataset import to_tensor
from segloop.data.files import list_samples, read_image, read_mask
from segloop.inference import INPUT, META, OUTPUT, Backend, OnnxBackend, pad_to_stride, predict_logits
from segloop.metrics import confusion_matrix, nanmean, per_class_iou

# Bumped whenever the same checkpoint and settings export to a different file (serve's export
# cache keys on it): 2 = int8 keeps the input normalisation in float.
EXPORT_RECIPE = 2
FORMATS = ("onnx", "ort", "pte")
QUANTIZATIONS = ("int8",)
# Without --parity-data: seeded noise images at these (N, H, W), sides not multiples of 32.
RANDOM_PARITY_SHAPES = ((1, 96, 128), (2, 72, 80))


def parity_path(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.name + ".parity.json")


def int8_path(onnx_path: Path) -> Path:
    """model.onnx -> model.int8.onnx (the quantized copy lives beside the fp32 file)."""
    return onnx_path.with_suffix(".int8.onnx")


def convert_to_ort(onnx_path: Path) -> Path:
    """Write ONNX Runtime's mobile format beside `onnx_path` (model.onnx -> model.ort); return its path.

    What `python -m onnxruntime.tools.convert_onnx_models_to_ort` does in its default (fixed)
    style: the graph optimised once, offline, at ORT_ENABLE_ALL without the x86-only NCHWc
    layout, so the file runs on ARM too and in ORT's minimal (mobile) builds. Metadata is kept.
    """
    import onnxruntime as ort

    out = onnx_path.with_suffix(".ort")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(out)
    options.add_session_config_entry("session.save_model_format", "ORT")
    options.log_severity_level = 3
    ort.InferenceSession(
        str(onnx_path), options, providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"]
    )
    return out


# ---------------------------------------------------------------- export


def export_onnx(model: nn.Module, channels: int, path: Path, opset: int, metadata: Mapping[str, str]) -> None:
    """Write `model` (eval mode) as ONNX with dynamic batch, height and width, plus `metadata`."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    # Batch 2 and a non-square size, so no dimension can be specialised by accident.
    example = torch.rand(2, channels, 64, 96)
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) warns that it is legacy; it traces an SMP
        # U-Net to a graph matching eager to ~1e-5, and the dynamo exporter needs onnxscript,
        # which this project does not install.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: axes, OUTPUT: axes},
        )
    proto = onnx.load(str(path))
    _constant_upsample_scales(proto, channels)
    _set_metadata(proto, metadata)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def export_pte(model: nn.Module, channels: int, path: Path, max_side: int) -> dict:
    """Write `model` (eval mode) as an ExecuTorch program lowered to the XNNPACK delegate; return
    how many delegate calls it makes and which operators run outside them (ExecuTorch's portable
    kernels: an SMP U-Net's dynamic-size upsamplings).

    Batch 1 (an app segments one image at a time); height and width dynamic, multiples of 32 up
    to `max_side`, for which ExecuTorch plans its memory ahead of time."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from torch.export import Dim

    blocks = max_side // 32
    h, w = Dim("height_blocks", min=1, max=blocks), Dim("width_blocks", min=1, max=blocks)
    example = torch.rand(1, channels, 64, 96)  # non-square, so neither side is specialised
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # executorch 1.5's own importlib.resources calls
        program = torch.export.export(model.eval(), (example,), dynamic_shapes=({2: 32 * h, 3: 32 * w},))
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        ops = Counter(  # before to_executorch, which rewrites them into out-variants and allocations
            getattr(n.target, "__name__", str(n.target))
            for n in edge.exported_program().graph.nodes
            if n.op == "call_function" and n.target is not operator.getitem
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(edge.to_executorch().buffer)
    delegated = ops.pop("executorch_call_delegate", 0)
    return {"xnnpack_calls": delegated, "portable_ops": {k: v for k, v in ops.items() if "sym_size" not in k}}


class PteBackend:
    """A `--format pte` file in ExecuTorch's runtime, callable like the eager model (one image per call)."""

    provider = "ExecuTorch XNNPACK"

    def __init__(self, path: Path):
        from executorch.runtime import Runtime

        self.method = Runtime.get().load_program(str(path)).load_method("forward")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.method.execute([x[i : i + 1].contiguous()])[0] for i in range(x.shape[0])])


def _constant_upsample_scales(proto, channels: int) -> None:
    """Give each Resize that upsamples to a size computed by Shape ops its constant scales.

    SMP decoders size every upsampling to the skip connection's shape, so the traced Resize
    takes `sizes` from Shape/Gather/Concat nodes, and ORT's CPU NCHWc optimizer (which needs
    constant scales) leaves the decoder in plain NCHW with a layout reorder around every
    upsampling. For inputs padded to multiples of 32 (the contract above) the two are the
    same: a node is rewritten only if shape inference finds the same integer scales at two
    input sizes. ORT fp32 at 512x512, batch 8: 1.63-1.73x eager instead of 1.51-1.54x (Xeon VM).
    """
    from onnx import numpy_helper

    probes = [_resize_shapes(proto, channels, h, w) for h, w in ((64, 96), (96, 64))]
    for node in proto.graph.node:
        if node.op_type != "Resize" or len(node.input) < 4 or not node.input[3]:
            continue
        scales = {_scale(*probe.get(node.output[0], ([], []))) for probe in probes}
        if len(scales) != 1 or (scale := scales.pop()) is None or scale[:2] != (1.0, 1.0) or any(v % 1 for v in scale):
            continue
        name = f"{node.name or node.output[0]}/constant_scales"
        proto.graph.initializer.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), name))
        inputs = [node.input[0], node.input[1], name]
        del node.input[:]
        node.input.extend(inputs)


def _scale(before: list[int], after: list[int]) -> tuple[float, ...] | None:
    if len(before) != 4 or len(after) != 4 or 0 in before or 0 in after:  # 0: a dimension inference left unknown
        return None
    return tuple(o / i for i, o in zip(before, after))


def _resize_shapes(proto, channels: int, h: int, w: int) -> dict[str, tuple[list[int], list[int]]]:
    """Resize output name -> (input shape, output shape) for a (1, channels, h, w) input,
    by ONNX shape inference with data propagation (it follows the Shape ops)."""
    import onnx
    from onnx import shape_inference

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    for dim, value in zip(probe.graph.input[0].type.tensor_type.shape.dim, (1, channels, h, w)):
        dim.Clear()
        dim.dim_value = value
    probe = shape_inference.infer_shapes(probe, data_prop=True)
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*probe.graph.value_info, *probe.graph.output]
    }
    return {
        n.output[0]: (shapes.get(n.input[0], []), shapes.get(n.output[0], []))
        for n in probe.graph.node
        if n.op_type == "Resize"
    }


def _set_metadata(proto, metadata: Mapping[str, str]) -> None:
    """Set (replace) `metadata` in the model `proto`, in memory."""
    keep = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)


# ---------------------------------------------------------------- int8


class CalibrationImages:
    """Feeds ONNX Runtime's calibrator a seeded sample of images, one padded image per batch.

    An ORT `CalibrationDataReader` (its ABC accepts any class with `get_next`). Images larger
    than `max_size` give their top-left `max_size` window: the tile inference would see.
    """

    def __init__(self, folder: Path, channels: int, n: int, seed: int, max_size: int):
        samples = list_samples(Path(folder), require_masks=False)
        self.samples = random.Random(seed).sample(samples, min(n, len(samples)))
        self.channels, self.max_size = channels, max_size
        self._next: Iterator = iter(self.samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        sample = next(self._next, None)
        if sample is None:
            return None
        x = to_tensor(read_image(sample.image, self.channels))[None, :, : self.max_size, : self.max_size]
        return {INPUT: pad_to_stride(x)[0].numpy()}


def quantize_int8(fp32_path: Path, out_path: Path, reader: CalibrationImages, per_channel: bool) -> dict:
    """Static int8 (QDQ) copy of `fp32_path` calibrated on `reader`'s images; returns how it was made."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="segloop-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # ORT's recommended pre-processing: graph optimisation (BN folding...) + shape inference.
        # ONNX's own shape inference: ORT's symbolic one cannot follow the constant-scale
        # upsampling (export_onnx) to the skip connection's size.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        # The input normalisation stays float: in int8, `local`'s 17x17 pooling of x and x^2
        # ran 2.5x slower than the whole fp32 model (ORT's QLinearAveragePool) and squaring in
        # 8 bits loses the variance; a z-score is two elementwise ops either way.
        float_nodes = [n.name for n in onnx.load(str(prepared)).graph.node if n.name.startswith("/input_norm/")]
        # uint8 activations, int8 weights, full range: ORT's advice for x86 CPUs (VNNI or AMX run
        # u8s8 without the saturation that reduce_range guards against on older cores).
        quantize_static(
            str(prepared),
            str(out_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            reduce_range=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=float_nodes,
        )
    return {
        "format": "QDQ",
        "activations": "uint8",
        "weights": "int8",
        "per_channel": per_channel,
        "calibration": "MinMax",
        "calib_images": len(reader.samples),
        "float_nodes": float_nodes,
    }


# ---------------------------------------------------------------- parity


def parity_inputs(
    data_dir: Path | None, channels: int, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(images (N, C, H, W) float in [0, 1], masks (N, H, W) int64 or None) to compare backends on.

    A folder gives its images one by one (with masks when it has them); no folder gives
    seeded noise images of RANDOM_PARITY_SHAPES.
    """
    if data_dir is None:
        g = torch.Generator().manual_seed(seed)
        for n, h, w in RANDOM_PARITY_SHAPES:
            yield torch.rand(n, channels, h, w, generator=g), None
        return
    for sample in list_samples(Path(data_dir), require_masks=False):
        x = to_tensor(read_image(sample.image, channels))[None]
        truth = None if sample.mask is None else torch.from_numpy(read_mask(sample.mask).astype(np.int64))[None]
        yield x, truth


def check_parity(
    model: Backend,
    backends: Mapping[str, Backend],
    inputs: Iterator[tuple[torch.Tensor, torch.Tensor | None]],
    num_classes: int,
    cfg: EvalSettings,
) -> dict:
    """Each backend against eager `model` on the same inputs, padded and tiled alike.

    Per backend: max and mean |logit - eager logit|, share of pixels whose class agrees,
    mIoU and its difference to eager (None unless every input has a mask).
    """
    cms = {name: torch.zeros(num_classes, num_classes, dtype=torch.int64) for name in ["eager", *backends]}
    diff = {name: {"max": 0.0, "sum": 0.0, "agree": 0} for name in backends}
    sizes, n_images, n_pixels, labelled = set(), 0, 0, True
    for x, truth in inputs:
        ref = predict_logits(model, x, cfg.max_size, cfg.overlap)
        ref_pred = ref.argmax(1)
        sizes.add(tuple(x.shape[-2:]))
        n_images += x.shape[0]
        n_pixels += ref_pred.numel()
        labelled &= truth is not None
        if truth is not None:
            cms["eager"] += confusion_matrix(ref_pred, truth, num_classes)
        for name, backend in backends.items():
            out = predict_logits(backend, x, cfg.max_size, cfg.overlap)
            delta = (out - ref).abs()
            diff[name]["max"] = max(diff[name]["max"], float(delta.max()))
            diff[name]["sum"] += float(delta.double().sum()) / ref.shape[1]
            pred = out.argmax(1)
            diff[name]["agree"] += int((pred == ref_pred).sum())
            if truth is not None:
                cms[name] += confusion_matrix(pred, truth, num_classes)
    if not n_images:
        raise ValueError("parity check: no inputs")
    miou = {name: nanmean(per_class_iou(cm)) if labelled else None for name, cm in cms.items()}
    report = {
        "n_images": n_images,
        "input_sizes": sorted([list(s) for s in sizes]),
        "labelled": labelled,
        "eager": {"miou": miou["eager"]},
    }
    eager = miou["eager"]
    for name, d in diff.items():
        m = miou[name]  # None exactly when unlabelled
        report[name] = {
            "max_abs_logit_diff": d["max"],
            "mean_abs_logit_diff": d["sum"] / n_pixels,
            "pixel_agreement": d["agree"] / n_pixels,
            "miou": m,
            "miou_diff": None if m is None or eager is None else m - eager,
        }
    return report


# ---------------------------------------------------------------- the `segloop export` step


def export_model(
    checkpoint: Path,
    out: Path,
    cfg: ExportSettings,
    eval_cfg: EvalSettings,
    fmt: str = "onnx",
    quantize: str | None = None,
    calib: Path | None = None,
    parity_data: Path | None = None,
    label: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Export `checkpoint` to `out` (and `<stem>.int8.onnx` with `quantize="int8"`), check parity.

    Writes `<out>.parity.json` and returns it: opset, provider, input sizes, number of
    images, and per exported file its logit difference and mIoU difference to eager.
    `fp32.within_tolerance` says whether the fp32 file matches eager to `cfg.tolerance`.
    """
    import onnx
    import onnxruntime as ort

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: unknown export format; valid: {list(FORMATS)}")
    if quantize not in (None, *QUANTIZATIONS):
        raise ValueError(f"--quantize {quantize!r}: unknown quantization; valid: {list(QUANTIZATIONS)}")
    if out.suffix != f".{fmt}":
        raise ValueError(f"--out {out}: a --format {fmt} file name must end in .{fmt}")
    if quantize is None and calib is not None:
        raise ValueError("--calib is only used with --quantize int8")
    if fmt == "pte" and quantize:
        raise ValueError("--quantize int8 is not offered for --format pte (not built): use --format onnx or ort")
    if fmt == "pte" and eval_cfg.max_size > cfg.pte_max_side:
        raise ValueError(
            f"export.pte_max_side {cfg.pte_max_side} < eval.max_size {eval_cfg.max_size}: the program must take "
            "the tiles inference feeds it"
        )
    # Every input is checked before the (slow) export starts.
    ckpt = load_checkpoint(checkpoint)
    model, _ = model_from_checkpoint(ckpt, str(checkpoint))
    channels, classes = ckpt["channels"], list(ckpt["classes"])
    reader = None
    if quantize:
        if calib is None:
            raise ValueError("--quantize int8 needs --calib DIR: training images that set the activation ranges")
        try:
            reader = CalibrationImages(calib, channels, cfg.calib_images, cfg.calib_seed, eval_cfg.max_size)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"--calib: {err}") from None
    if parity_data is not None:
        list_samples(Path(parity_data), require_masks=False)  # a clear error now, not after the export

    metadata = {
        f"{META}classes": json.dumps(classes),
        f"{META}channels": str(channels),
        f"{META}settings": json.dumps(redact_settings(ckpt["settings"])),
        f"{META}source": label or str(checkpoint),
        f"{META}input": "images (N, C, H, W) float32 in [0, 1], H and W multiples of 32",
    }
    files: dict[str, Path] = {}
    quantization = lowering = None
    if fmt == "pte":
        lowering = export_pte(model, channels, out, cfg.pte_max_side)
        log(
            f"exported {out} (ExecuTorch: {lowering['xnnpack_calls']} XNNPACK calls, outside them "
            f"{lowering['portable_ops'] or 'nothing'}; batch 1, height/width multiples of 32 <= {cfg.pte_max_side})"
        )
        files["fp32"] = out
    else:
        onnx_out = out.with_suffix(".onnx")  # format ort: converted from this file, kept beside it
        export_onnx(model, channels, onnx_out, cfg.opset, {**metadata, f"{META}precision": "fp32"})
        log(f"exported {onnx_out} (opset {cfg.opset}, dynamic batch/height/width)")
        files["fp32"] = onnx_out
        if reader is not None:  # never with pte (refused above)
            files["int8"] = int8_path(onnx_out)
            quantization = quantize_int8(onnx_out, files["int8"], reader, cfg.per_channel)
            int8 = onnx.load(str(files["int8"]))
            _set_metadata(int8, {**metadata, f"{META}precision": "int8"})
            onnx.save(int8, str(files["int8"]))
            log(f"quantized {files['int8']} (static int8 QDQ, {len(reader.samples)} calibration images from {calib})")
        if fmt == "ort":
            files = {name: convert_to_ort(path) for name, path in files.items()}
            log(f"converted to ONNX Runtime's mobile format: {', '.join(str(p) for p in files.values())}")

    backends = {name: PteBackend(path) if fmt == "pte" else OnnxBackend(path) for name, path in files.items()}
    parity = check_parity(model, backends, parity_inputs(parity_data, channels), len(classes), eval_cfg)
    report = {
        "model": label or str(checkpoint),
        "checkpoint": str(checkpoint),
        "format": fmt,
        "opset": None if fmt == "pte" else cfg.opset,
        "provider": backends["fp32"].provider,
        "runtime": f"executorch {version('executorch')}" if fmt == "pte" else f"onnxruntime {ort.__version__}",
        "torch": torch.__version__,
        "classes": classes,
        "channels": channels,
        "data": str(parity_data) if parity_data is not None else "random noise images (no --parity-data)",
        "eval": {"max_size": eval_cfg.max_size, "overlap": eval_cfg.overlap},
        **parity,
    }
    for name, path in files.items():
        report[name] = {"file": str(path), "bytes": path.stat().st_size, **report[name]}
    report["fp32"]["within_tolerance"] = report["fp32"]["max_abs_logit_diff"] <= cfg.tolerance
    report["tolerance"] = cfg.tolerance
    if lowering:
        report["fp32"]["lowering"] = lowering
    if quantization:
        report["int8"]["quantization"] = {**quantization, "calib": str(calib), "calib_seed": cfg.calib_seed}
    parity_path(out).write_text(json.dumps(report, indent=1))
    return report


def parity_lines(report: dict) -> list[str]:
    """Human summary of a parity report, one line per exported file."""
    lines = [
        f"parity vs eager PyTorch ({report['provider']}"
        + (f", opset {report['opset']}" if report["opset"] else "")
        + f"): {report['n_images']} images "
        f"of {report['data']}, sizes {' '.join(f'{h}x{w}' for h, w in report['input_sizes'][:6])}"
        + (" ..." if len(report["input_sizes"]) > 6 else "")
    ]
    if report["eager"]["miou"] is not None:
        lines.append(f"  eager  mIoU {report['eager']['miou']:.4f}")
    for name in ("fp32", "int8"):
        r = report.get(name)
        if r is None:
            continue
        miou = "" if r["miou"] is None else f"  mIoU {r['miou']:.4f} ({100 * r['miou_diff']:+.2f} pts)"
        lines.append(
            f"  {name:5s}  max |logit diff| {r['max_abs_logit_diff']:.2e}  mean {r['mean_abs_logit_diff']:.2e}  "
            f"pixels agreeing {100 * r['pixel_agreement']:.2f}%{miou}  ({r['bytes'] / 2**20:.1f} MiB)"
        )
    return lines
