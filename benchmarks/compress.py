"""Compression on the CPU: champion vs distilled student vs pruned model, each in fp32 and static int8.

One table: parameters, file size (ONNX, and ONNX Runtime's mobile .ort), ONNX Runtime CPU
latency at batch 1 and throughput at batch 8 (interleaved rounds, medians, as
benchmarks/infer_speed.py times them), and mIoU per domain on synthetic test sets.

The champion is trained here on every domain of `generate.domains` (or given with --model,
then trained on those domains already); the student (`distill.student`) is distilled from it
and the pruned model is `segloop prune` of it (`prune.ratio`, `prune.epochs` of fine-tuning),
on the same data. Training budgets count CPU seconds of this process (a shared machine
gives every model the same compute whatever else runs).

    python benchmarks/compress.py [--model REF] [--minutes M] [--n N] [--seed S] [--side PX] [--threads T]
                                  [--set KEY=VALUE] [--build-only] [--quick]

`--seed` sets the training seeds and the synthetic data's scenes (run 3 for a spread);
`--build-only` trains the models and stops (seeds train in parallel, each in its --work,
then each is timed alone on an idle machine by a second run that finds them trained).

Writes reports/bench/compress.json and compress.png (work files in reports/bench/compress_work).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import yaml
from infer_speed import cpu_name, time_rounds  # benchmarks/ (this script's folder) is on sys.path

from segloop.checkpoint import load_model
from segloop.compress import count_parameters, distill, prune
from segloop.config import Settings, apply_override, settings_from_dict
from segloop.data.dataset import to_tensor
from segloop.data.files import list_samples, read_image
from segloop.data.synthetic import generate
from segloop.evaluate import miou_on
from segloop.export import OnnxBackend, convert_to_ort, export_model, int8_path
from segloop.registry import resolve_model
from segloop.train import train

ROOT = Path(__file__).resolve().parents[1]
# quick: a smoke run that still trains something (two domains, tiny images, short budgets)
QUICK = {
    "generate": {"domains": ["base", "fog"]},
    "data": {"crop_size": 64},
    "train": {"batch_size": 4, "iters_per_epoch": 8, "num_workers": 0, "epochs": 4},
    "prune": {"epochs": 2},
    "export": {"calib_images": 16},
}


def merged(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merged(base.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def make_data(root: Path, domains: list[str], n: int, size: tuple[int, int], seed: int) -> dict[str, dict[str, Path]]:
    """{split: {domain: folder}}: the same scenes in every domain (generate's seed), split by seed."""
    dirs: dict[str, dict[str, Path]] = {}
    for split, count, k in (("train", n, 100), ("val", max(8, n // 4), 200), ("test", max(8, n // 2), 300)):
        for domain in domains:
            out = root / f"{split}_{domain}_{count}x{size[0]}x{size[1]}_seed{seed}"
            if not out.exists():
                generate(out, domain, count, seed * 1000 + k, size)
            dirs.setdefault(split, {})[domain] = out
    return dirs


def budgeted(settings: Settings, minutes: float) -> Settings:
    return settings.model_copy(update={"train": settings.train.model_copy(update={"max_minutes": minutes})})


def build_models(args, settings: Settings, dirs: dict) -> dict[str, tuple[Path, str]]:
    """{name: (checkpoint, how it was made)} for champion, distilled and pruned."""
    train_dirs, val = list(dirs["train"].values()), list(dirs["val"].values())
    quiet = {"log": lambda _: None, "clock": time.process_time}
    s = budgeted(settings, args.minutes)
    models = {}
    if args.model:
        path, label, _ = resolve_model(args.model, settings)
        models["champion"] = (path, f"{label} (--model)")
    else:
        out = args.work / "champion"
        if not (out / "best.pt").is_file():
            print(f"training the champion ({settings.model.arch}/{settings.model.encoder}) ...", flush=True)
            train(s, train_dirs, out, val, **quiet)
        models["champion"] = (
            out / "best.pt",
            f"params.yaml model, {args.minutes:g} CPU min on {len(train_dirs)} domains",
        )
    champion = models["champion"][0]
    out = args.work / "distilled"
    if not (out / "best.pt").is_file():
        print(f"distilling into {settings.distill.student.encoder} ...", flush=True)
        distill(s, champion, train_dirs, out, val, **quiet)
    d = settings.distill
    models["distilled"] = (
        out / "best.pt",
        f"distill.student {d.student.arch}/{d.student.encoder} {d.student.decoder_channels}, T {d.temperature:g}, "
        f"alpha {d.alpha:g}, {args.minutes:g} CPU min",
    )
    out = args.work / "pruned"
    if not (out / "best.pt").is_file():
        print(f"pruning {settings.prune.ratio:g} of the channels, then fine-tuning ...", flush=True)
        prune(s, champion, train_dirs, out, val, **quiet)
    p = settings.prune
    models["pruned"] = (out / "best.pt", f"L1 channel pruning ratio {p.ratio:g} + {p.epochs} epochs fine-tune")
    return models


def measure(args, settings: Settings, models: dict, dirs: dict, side: int, rounds: int) -> dict:
    """Every model exported to fp32 and int8 ONNX, then sized, timed and scored per domain."""
    calib = dirs["train"][next(iter(dirs["train"]))]
    backends, rows = {}, {}
    for name, (ckpt, how) in models.items():
        onnx_path = args.work / "export" / name / "model.onnx"
        parity = export_model(
            ckpt, onnx_path, settings.export, settings.eval, quantize="int8", calib=calib, log=lambda _: None
        )
        params = count_parameters(load_model(ckpt)[0])
        for precision, path in (("fp32", onnx_path), ("int8", int8_path(onnx_path))):
            key = f"{name} {precision}"
            backends[key] = OnnxBackend(path, args.threads)
            rows[key] = {
                "model": how,
                "parameters": params,
                "onnx_bytes": path.stat().st_size,
                "ort_bytes": convert_to_ort(path).stat().st_size,
                "max_abs_logit_diff_vs_eager": parity[precision]["max_abs_logit_diff"],
            }
    speed = torch.stack([to_tensor(read_image(s.image, settings.data.channels)) for s in list_samples(args.speed)])
    b1 = time_rounds(backends, speed[:1], rounds)
    b8 = time_rounds(backends, speed[:8], max(3, rounds // 3))
    cpu = torch.device("cpu")
    for key, backend in backends.items():
        per_domain = {d: round(miou_on(backend, folder, settings, cpu)[0], 4) for d, folder in dirs["test"].items()}
        rows[key] |= {
            "latency_b1_ms": round(1000 * float(np.median(b1[key])), 1),
            "throughput_b8_img_s": round(8 / float(np.median(b8[key])), 2),
            "miou": per_domain,
            "miou_mean": round(float(np.mean(list(per_domain.values()))), 4),
        }
    return rows


def save_plot(path: Path, rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, r in rows.items():
        ax.scatter(r["latency_b1_ms"], r["miou_mean"], s=30 + r["onnx_bytes"] / 2**18, alpha=0.7, label=key)
        ax.annotate(key, (r["latency_b1_ms"], r["miou_mean"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("ORT CPU latency, batch 1 (ms)")
    ax.set_ylabel("mean test mIoU over domains")
    ax.set_title("compression: accuracy vs latency (marker area ~ file size)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="the champion: checkpoint or models:/ ref (default: trained here)")
    parser.add_argument("--minutes", type=float, default=5.0, help="CPU minutes of each training (default 5)")
    parser.add_argument("--n", type=int, default=96, help="training pairs per domain (default 96)")
    parser.add_argument("--seed", type=int, default=0, help="training seeds and data scenes (default 0)")
    parser.add_argument("--side", type=int, default=512, help="timed images are side x side (default 512)")
    parser.add_argument("--build-only", action="store_true", help="train the models into --work and stop")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads (default: cores)")
    parser.add_argument("--rounds", type=int, default=20, help="timing rounds at batch 1 (batch 8: a third)")
    parser.add_argument("--work", type=Path, default=ROOT / "reports/bench/compress_work")
    parser.add_argument("--out", type=Path, default=ROOT / "reports/bench")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a params.yaml setting"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 domains, 24 pairs, 1 CPU min each, 128 px")
    args = parser.parse_args()

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    if args.quick:
        raw, args.minutes, args.n, args.rounds = merged(raw, QUICK), min(args.minutes, 1.0), min(args.n, 24), 3
    raw["train"]["seed"] = args.seed
    for assignment in args.set:
        apply_override(raw, assignment)
    settings = settings_from_dict(raw, "params.yaml" + (" (quick)" if args.quick else ""))
    side = 128 if args.quick else args.side
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started, load_before = time.monotonic(), os.getloadavg()
    size = (96, 96) if args.quick else tuple(settings.generate.image_size)
    dirs = make_data(args.work / "data", list(settings.generate.domains), args.n, size, args.seed)
    args.speed = args.work / "data" / f"speed_{side}"
    if not args.speed.exists():
        generate(args.speed, "base", 8, 45, (side, side))

    models = build_models(args, settings, dirs)
    if args.build_only:
        print(f"trained into {args.work}: {', '.join(models)}")
        return
    rows = measure(args, settings, models, dirs, side, args.rounds)
    champion = rows["champion fp32"]
    report = {
        "measured": f"ONNX Runtime CPU ({args.threads} threads): latency at batch 1 and throughput at batch 8 on "
        f"{side}x{side} images; mIoU on {args.n // 2} synthetic test images of {size[0]}x{size[1]} per domain",
        "scale": {
            "quick": args.quick,
            "seed": args.seed,
            "train_pairs_per_domain": args.n,
            "domains": list(settings.generate.domains),
            "cpu_minutes_per_training": args.minutes,
            "timing_rounds_b1": args.rounds,
            "overrides": args.set,
        },
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "load_avg_before": [round(v, 2) for v in load_before],
            "load_avg_after": [round(v, 2) for v in os.getloadavg()],
            "note": "shared machine: absolute times are noisy",
        },
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "rows": rows,
        "headline": {
            f"{key}: params, b1 latency, mean mIoU": f"{r['parameters'] / champion['parameters']:.0%}, "
            f"{r['latency_b1_ms'] / champion['latency_b1_ms']:.2f}x, {r['miou_mean']:.3f}"
            for key, r in rows.items()
        },
        "wall_s": round(time.monotonic() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compress.json").write_text(json.dumps(report, indent=1))
    save_plot(args.out / "compress.png", rows)

    domains = list(settings.generate.domains)
    print(
        f"\n{cpu_name()}, {args.threads} threads, {side}x{side}; load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(f"| model | params | ONNX MiB | .ort MiB | b1 ms | b8 img/s | {' | '.join(domains)} | mean |")
    print("|---|---|---|---|---|---|" + "---|" * (len(domains) + 1))
    for key, r in rows.items():
        print(
            f"| {key} | {r['parameters'] / 1e6:.2f}M | {r['onnx_bytes'] / 2**20:.1f} | {r['ort_bytes'] / 2**20:.1f} | "
            f"{r['latency_b1_ms']:.1f} | {r['throughput_b8_img_s']:.1f} | "
            + " | ".join(f"{r['miou'][d]:.3f}" for d in domains)
            + f" | {r['miou_mean']:.3f} |"
        )
    print(f"wrote {args.out / 'compress.json'}, compress.png ({report['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
