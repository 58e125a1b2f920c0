"""Inference speed on the CPU: torch eager vs ONNX Runtime fp32 vs ONNX Runtime int8.

Measures latency at batch 1 and throughput at batch 8 on 512x512 images, and the mIoU
of each backend on a synthetic test set. All backends run in this one process with the
same thread count, timed in interleaved rounds (each round times every backend once, in
rotating order, right after one untimed call of the same backend: warm, as when serving);
times are medians and every speed-up is the median of per-round ratios, so the figures hold
on a shared, noisy machine. Eager runs under
`torch.inference_mode`, both in NCHW and channels_last; the faster one is the baseline.

    python benchmarks/infer_speed.py [--model REF] [--threads N] [--rounds R] [--quick]

The model: --model (a checkpoint or models:/ ref), else models/base/best.pt (`make demo`),
else one trained here for a few epochs on synthetic data; the output says which.
Writes reports/bench/infer_speed.json (+ the exported files and parity report in its work folder).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from segloop.checkpoint import load_model
from segloop.config import load_settings
from segloop.data.dataset import to_tensor
from segloop.data.files import list_samples, read_image
from segloop.data.synthetic import generate
from segloop.export import OnnxBackend, export_model, int8_path
from segloop.registry import resolve_model
from segloop.train import train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models/base/best.pt"
GOALS = {"fp32_speedup_b1": 1.5, "int8_speedup": 2.0, "int8_max_miou_drop": 0.01}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def synthetic(root: Path, name: str, n: int, seed: int, size: tuple[int, int]) -> Path:
    """`n` base-domain pairs of `size`, generated once (the folder name says what it holds)."""
    out = root / f"{name}_{n}x{size[0]}x{size[1]}_seed{seed}"
    if not out.exists():
        generate(out, "base", n, seed, size)
    return out


def pick_model(args, settings, data_root: Path, quick: bool) -> tuple[Path, str]:
    if args.model:
        path, label, _ = resolve_model(args.model, settings)
        return path, f"{label} (--model)"
    if DEFAULT_MODEL.is_file():
        return DEFAULT_MODEL, f"{DEFAULT_MODEL.relative_to(ROOT)} (the project's base model, `make demo`)"
    epochs, n = (1, 16) if quick else (10, 96)
    out = args.work / "model"
    if not (out / "best.pt").is_file():
        s = settings.model_copy(
            update={"train": settings.train.model_copy(update={"epochs": epochs, "max_minutes": 4.0, "patience": 1000})}
        )
        train_dir = synthetic(data_root, "train", n, 41, tuple(settings.generate.image_size))
        val_dir = synthetic(data_root, "val", max(8, n // 4), 42, tuple(settings.generate.image_size))
        print(
            f"no {DEFAULT_MODEL.relative_to(ROOT)}: training one for {epochs} epochs on {n} synthetic base images",
            flush=True,
        )
        train(s, train_dir, out, val_dir, log=lambda _: None)
    return out / "best.pt", f"trained here: params.yaml model, {epochs} epochs (4 min cap) on {n} synthetic base images"


def time_rounds(backends: dict, x: torch.Tensor, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of every backend on `x`, interleaved: round r starts at backend r mod B.

    An untimed call precedes each timed one: a model serving a stream has its weights and
    buffers in cache, while a call right after another model's measures the refill (2026-12-04,
    a pruned int8 U-Net at 512x512 among three other models: 52.7 ms that way, 30.0 ms warm)."""
    names = list(backends)
    times = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:
            for _ in range(warmup):
                backends[name](x)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                backends[name](x)
                t0 = time.perf_counter()
                backends[name](x)
                times[name].append(time.perf_counter() - t0)
    return times


def summarize(times: dict[str, list[float]], batch: int, eager_names: list[str]) -> tuple[dict, str]:
    """Median ms and img/s per backend, and the median per-round speed-up over the faster eager."""
    median = {name: float(np.median(t)) for name, t in times.items()}
    baseline = min(eager_names, key=median.get)
    out = {}
    for name, t in times.items():
        ratios = np.array(times[baseline]) / np.array(t)
        out[name] = {
            "median_ms": round(1000 * median[name], 1),
            "img_per_s": round(batch / median[name], 2),
            "speedup_vs_eager": round(float(np.median(ratios)), 3),
            "speedup_p25_p75": [round(float(np.percentile(ratios, q)), 3) for q in (25, 75)],
            "rounds": len(t),
        }
    return out, baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint path or models:/NAME@ALIAS|/VERSION (default: models/base/best.pt)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="intra-op threads of every backend (default: cores)"
    )
    parser.add_argument(
        "--rounds", type=int, default=20, help="timing rounds at batch 1 (batch 8: a third, at least 3)"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "reports/bench/infer_speed_work")
    parser.add_argument("--out", type=Path, default=ROOT / "reports/bench")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 256x256, 3 rounds, tiny data")
    args = parser.parse_args()

    settings = load_settings(ROOT / "params.yaml")
    side, rounds = (256, 3) if args.quick else (512, args.rounds)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    data_root = args.work / "data"
    load_before = os.getloadavg()
    started = time.monotonic()

    ckpt, source = pick_model(args, settings, data_root, args.quick)
    print(f"model: {source}", flush=True)
    test_dir = synthetic(data_root, "test", 16 if args.quick else 60, 43, tuple(settings.generate.image_size))
    calib_dir = synthetic(data_root, "calib", settings.export.calib_images, 44, tuple(settings.generate.image_size))
    speed_dir = synthetic(data_root, "speed", 8, 45, (side, side))

    # Export + int8 + parity: the mIoU of every backend on the test set comes from the parity report.
    onnx_path = args.work / "model.onnx"
    parity = export_model(
        ckpt,
        onnx_path,
        settings.export,
        settings.eval,
        quantize="int8",
        calib=calib_dir,
        parity_data=test_dir,
        label=source,
    )

    model, model_settings = load_model(ckpt)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    fp32, int8 = OnnxBackend(onnx_path, args.threads), OnnxBackend(int8_path(onnx_path), args.threads)
    backends = {
        "torch eager": model,
        "torch eager channels_last": lambda x: model_cl(x.contiguous(memory_format=torch.channels_last)),
        "ORT fp32": fp32,
        "ORT int8": int8,
    }
    eager = ["torch eager", "torch eager channels_last"]
    images = torch.stack([to_tensor(read_image(s.image, parity["channels"])) for s in list_samples(speed_dir)])
    b1, base1 = summarize(time_rounds(backends, images[:1], rounds), 1, eager)
    print(f"batch 1 timed ({rounds} rounds)", flush=True)
    b8, base8 = summarize(time_rounds(backends, images[:8], max(3, rounds // 3)), 8, eager)

    miou = {
        "torch eager": parity["eager"]["miou"],
        "torch eager channels_last": parity["eager"]["miou"],
        "ORT fp32": parity["fp32"]["miou"],
        "ORT int8": parity["int8"]["miou"],
    }
    int8_drop = parity["eager"]["miou"] - parity["int8"]["miou"]
    goals = {
        "ort_fp32_speedup_b1": {
            "target": GOALS["fp32_speedup_b1"],
            "measured": b1["ORT fp32"]["speedup_vs_eager"],
            "met": b1["ORT fp32"]["speedup_vs_eager"] >= GOALS["fp32_speedup_b1"],
        },
        "ort_int8_speedup_b1": {
            "target": GOALS["int8_speedup"],
            "measured": b1["ORT int8"]["speedup_vs_eager"],
            "met": b1["ORT int8"]["speedup_vs_eager"] >= GOALS["int8_speedup"],
        },
        "ort_int8_speedup_b8": {
            "target": GOALS["int8_speedup"],
            "measured": b8["ORT int8"]["speedup_vs_eager"],
            "met": b8["ORT int8"]["speedup_vs_eager"] >= GOALS["int8_speedup"],
        },
        "ort_int8_miou_drop": {
            "target": GOALS["int8_max_miou_drop"],
            "measured": round(int8_drop, 4),
            "met": int8_drop <= GOALS["int8_max_miou_drop"],
        },
    }
    report = {
        "measured": f"latency at batch 1 and throughput at batch 8 on {side}x{side} RGB images; mIoU on "
        f"{parity['n_images']} synthetic base test images of {parity['input_sizes']}",
        "model": source,
        "arch": model_settings.model.model_dump(mode="json"),
        "checkpoint": str(ckpt),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "load_avg_before": [round(v, 2) for v in load_before],
            "load_avg_after": [round(v, 2) for v in os.getloadavg()],
            "note": "shared machine: absolute times are noisy; the speed-ups are per-round ratios",
        },
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "ort_session": {
            "provider": fp32.provider,
            "graph_optimization": "ORT_ENABLE_ALL",
            "intra_op_threads": args.threads,
        },
        "eager_baseline": {"batch_1": base1, "batch_8": base8},
        "batch_1": b1,
        "batch_8": b8,
        "miou": miou,
        "int8_miou_drop": round(int8_drop, 4),
        "parity": {k: parity[k] for k in ("fp32", "int8")},
        "goals": goals,
        "headline": {
            f"{name} vs eager, batch {b}": f"{res[name]['speedup_vs_eager']:.2f}x"
            for name in ("ORT fp32", "ORT int8")
            for b, res in ((1, b1), (8, b8))
        }
        | {"int8 mIoU drop": f"{100 * int8_drop:.2f} pts", "cpu": cpu_name()},
        "wall_s": round(time.monotonic() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "infer_speed.json").write_text(json.dumps(report, indent=1))

    print(
        f"\n{cpu_name()}, intra-op threads: {args.threads}, {side}x{side}; load average {load_before[0]:.1f} -> "
        f"{os.getloadavg()[0]:.1f} (shared machine: speed-ups are median per-round ratios)"
    )
    print(f"eager baseline (the faster eager layout): batch 1 {base1}, batch 8 {base8}\n")
    print("| backend | batch 1 latency ms | vs eager | batch 8 img/s | vs eager | mIoU | vs eager |")
    print("|---|---|---|---|---|---|---|")
    for name in backends:
        print(
            f"| {name} | {b1[name]['median_ms']:.0f} | {b1[name]['speedup_vs_eager']:.2f}x | "
            f"{b8[name]['img_per_s']:.2f} | "
            f"{b8[name]['speedup_vs_eager']:.2f}x | {miou[name]:.4f} | "
            f"{100 * (miou[name] - miou['torch eager']):+.2f} pts |"
        )
    print()
    for name, g in goals.items():
        print(f"goal {name}: target {g['target']}, measured {g['measured']} -> {'MET' if g['met'] else 'NOT MET'}")
    print(f"wrote {args.out / 'infer_speed.json'} ({report['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
