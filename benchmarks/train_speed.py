"""Training throughput: segloop's loop against the bare step it wraps and a plain MONAI loop.

Default model of params.yaml (Unet, resnet18 encoder, slim decoder), crop `data.crop_size`,
batch `train.batch_size`, in one process, the three measured in turn and repeated
(`--rounds`), so their ratios hold on a shared, noisy machine:

(a) bare step: forward + Dice/CE loss + backward + grad clipping + AdamW step on one
    random batch held in memory (no data loading, no logging): the ceiling.
(b) segloop: `segloop.train.train` as `segloop train` runs it: PNG decoding and joint
    augmentation in `train.num_workers` DataLoader workers, lr schedule, loss
    bookkeeping, per-epoch validation and checkpoints. img/s is the rate of the
    training part of each epoch as the loop itself records it (history.json
    `img_per_s`: from the first batch request to the last step, so worker start-up is
    in it); validation + checkpoint time per epoch is reported separately. The first
    epoch of each run (cold start) is reported separately too and left out of the ratio.
(c) reference: a plain PyTorch loop (DataLoader as in MONAI's tutorials, no schedule,
    no clipping) training `monai.networks.nets.BasicUNet` on the same data, crops,
    augmentation and loss; timed like (b), first epoch left out.

Then both (b) and (c) train from scratch for the same wall-clock budget (`--budget-s`)
and are scored (mIoU, `segloop.evaluate.miou_on`, full images) on a held-out test split.
segloop's budget includes its per-epoch validation and checkpoints; the reference
spends all of it training and keeps its last weights, segloop keeps its best.

    python benchmarks/train_speed.py [--quick] [--rounds 3] [--budget-s 90] [--threads 1] [--set KEY=VALUE]

Writes reports/bench/train_speed.json and prints a table. Goal: (b)/(a) >= 0.90, judged on
the median of the per-round ratios; the ratio of each loop's best round is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from segloop.checkpoint import load_model  # noqa: E402
from segloop.config import Settings, load_settings  # noqa: E402
from segloop.data.dataset import SegmentationDataset, train_transform  # noqa: E402
from segloop.data.synthetic import generate  # noqa: E402
from segloop.evaluate import miou_on  # noqa: E402
from segloop.inference import pick_device  # noqa: E402
from segloop.models import build_model  # noqa: E402
from segloop.plan import resolve  # noqa: E402
from segloop.train import SegLoss, train  # noqa: E402

GOAL = 0.90  # (b) / (a)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_data(work: Path, n_train: int, n_val: int, n_test: int, size: int) -> dict[str, Path]:
    """Three disjoint `base` folders (different scene seeds) of size x size images."""
    dirs = {}
    for split, n, seed in (("train", n_train, 100), ("val", n_val, 200), ("test", n_test, 300)):
        dirs[split] = work / split
        generate(dirs[split], "base", n, seed, (size, size))
    return dirs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_rate(settings: Settings, steps: int, warmup: int = 2) -> float:
    """(a) img/s of forward + loss + backward + clip + AdamW step on one random in-memory batch
    (on CUDA with segloop's fused AdamW, bf16 autocast and torch.compile as settings ask)."""
    cfg, device = settings.train, pick_device()
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = build_model(settings.model, settings.data.channels, settings.num_classes).to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True if cuda else None
    )
    loss_fn = SegLoss(cfg.dice_weight, cfg.ce_weight)
    crop = settings.data.crop_size
    images = torch.rand(cfg.batch_size, settings.data.channels, crop, crop, device=device)
    if cfg.channels_last:  # the same memory layout as segloop's step
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    masks = torch.randint(0, settings.num_classes, (cfg.batch_size, crop, crop), device=device)
    forward = torch.compile(model) if cfg.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and cfg.bf16 else nullcontext()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        with autocast:
            loss = loss_fn(forward(images), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
    _sync(device)
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def segloop_run(settings: Settings, dirs: dict, out: Path, epochs: int) -> dict:
    """(b) `segloop.train.train` for `epochs`; per-epoch training rate and the time outside it."""
    s = settings.model_copy(
        update={"train": settings.train.model_copy(update={"epochs": epochs, "max_minutes": None, "patience": 1000})}
    )
    train(s, dirs["train"], out, dirs["val"], log=lambda _: None)
    history = json.loads((out / "history.json").read_text())
    n = (len(list((dirs["train"] / "images").iterdir())) // s.train.batch_size) * s.train.batch_size
    epochs_out, previous = [], 0.0
    for h in history:
        train_s = n / h["img_per_s"]
        epochs_out.append(
            {
                "img_per_s": h["img_per_s"],
                "train_s": round(train_s, 2),
                "other_s": round(h["seconds"] - previous - train_s, 2),
            }
        )
        previous = h["seconds"]
    return {"epochs": epochs_out}


def reference_model(settings: Settings) -> nn.Module:
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=settings.data.channels, out_channels=settings.num_classes)


def reference_train(
    settings: Settings, train_dir: Path, epochs: int | None = None, budget_s: float | None = None, seed: int = 0
) -> tuple[nn.Module, list[float], int]:
    """(c) A plain loop: BasicUNet, segloop's dataset, augmentation and loss, AdamW at train.lr.

    Runs `epochs` epochs or until `budget_s` seconds have passed; returns the model, each
    full epoch's img/s (timed from the first batch request to the last step, like (b)) and
    the number of images trained on.
    """
    cfg, device = settings.train, pick_device()
    torch.manual_seed(seed)
    dataset = SegmentationDataset(
        train_dir, settings.data.channels, train_transform(settings.data.crop_size, cfg.augment)
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )
    model = reference_model(settings).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = SegLoss(cfg.dice_weight, cfg.ce_weight)
    started, rates, epoch, seen = time.perf_counter(), [], 0, 0
    while (epochs is None or epoch < epochs) and (budget_s is None or time.perf_counter() - started < budget_s):
        model.train()
        t0, n, complete = time.perf_counter(), 0, True
        for images, masks in loader:
            images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            loss = loss_fn(model(images), masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n += images.shape[0]
            seen += images.shape[0]
            if budget_s is not None and time.perf_counter() - started > budget_s:
                complete = False
                break
        _sync(device)
        if complete:
            rates.append(n / (time.perf_counter() - t0))
        epoch += 1
    return model.eval(), rates, seen


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def throughput(settings: Settings, dirs: dict, work: Path, rounds: int, epochs: int) -> dict:
    """(a), (b), (c) in turn, `rounds` times, the order reversed every other round so a
    trend in the machine's load hits all three alike; (b) and (c) without their first epoch."""
    steps = (epochs - 1) * (len(list((dirs["train"] / "images").iterdir())) // settings.train.batch_size)
    per_round = []
    for r in range(rounds):
        runs = {
            "a": lambda: bare_rate(settings, steps),
            "b": lambda r=r: segloop_run(settings, dirs, work / f"segloop_{r}", epochs),  # called in this round
            "c": lambda r=r: reference_train(settings, dirs["train"], epochs=epochs, seed=r)[1],
        }
        got = {k: runs[k]() for k in ("abc" if r % 2 == 0 else "cba")}
        a, b, c = got["a"], got["b"], got["c"]
        row = {
            "bare_img_per_s": round(a, 2),
            "segloop_img_per_s": round(mean([e["img_per_s"] for e in b["epochs"][1:]]), 2),
            "segloop_first_epoch_img_per_s": b["epochs"][0]["img_per_s"],
            "segloop_val_ckpt_s_per_epoch": round(mean([e["other_s"] for e in b["epochs"]]), 2),
            "reference_img_per_s": round(mean(c[1:]), 2),
            "reference_first_epoch_img_per_s": round(c[0], 2),
        }
        row["segloop_vs_bare"] = round(row["segloop_img_per_s"] / row["bare_img_per_s"], 3)
        per_round.append(row)
        log(
            f"round {r + 1}/{rounds}: bare {a:.1f}  segloop {row['segloop_img_per_s']:.1f}  "
            f"reference {row['reference_img_per_s']:.1f} img/s  (segloop/bare {row['segloop_vs_bare']:.3f})"
        )
    summary = {k: round(mean([row[k] for row in per_round]), 3) for k in per_round[0]}
    ratios = sorted(row["segloop_vs_bare"] for row in per_round)
    summary["segloop_vs_bare_min"], summary["segloop_vs_bare_max"] = ratios[0], ratios[-1]
    summary["segloop_vs_bare_median"] = round(statistics.median(ratios), 3)
    summary["segloop_vs_reference"] = round(summary["segloop_img_per_s"] / summary["reference_img_per_s"], 3)
    # Other processes only ever slow a run down: each loop's best round is its least disturbed speed.
    best = {k: max(row[k] for row in per_round) for k in ("bare_img_per_s", "segloop_img_per_s", "reference_img_per_s")}
    best["segloop_vs_bare"] = round(best["segloop_img_per_s"] / best["bare_img_per_s"], 3)
    best["segloop_vs_reference"] = round(best["segloop_img_per_s"] / best["reference_img_per_s"], 3)
    return {"rounds": per_round, "mean": summary, "best": best}


def same_budget(settings: Settings, dirs: dict, work: Path, budget_s: float) -> dict:
    """(b) and (c) trained from scratch for `budget_s` seconds each, scored on the test split."""
    device = pick_device()
    s = settings.model_copy(update={"train": settings.train.model_copy(update={"max_minutes": budget_s / 60})})
    t0 = time.perf_counter()
    result = train(s, dirs["train"], work / "budget_segloop", dirs["val"], log=lambda _: None)
    segloop_s = time.perf_counter() - t0
    model, _ = load_model(work / "budget_segloop" / "best.pt")
    segloop_miou = miou_on(model.to(device), dirs["test"], settings, device)[0]
    log(
        f"segloop, {budget_s:g} s budget: {result.epochs} epochs, {result.images_seen} images, test mIoU "
        f"{segloop_miou:.3f}"
    )

    t0 = time.perf_counter()
    ref, rates, ref_images = reference_train(settings, dirs["train"], budget_s=budget_s)
    ref_s = time.perf_counter() - t0
    ref_miou = miou_on(ref, dirs["test"], settings, device)[0]
    log(f"reference, {budget_s:g} s budget: {len(rates)} full epochs, {ref_images} images, test mIoU {ref_miou:.3f}")
    return {
        "budget_s": budget_s,
        "segloop": {
            "test_miou": round(segloop_miou, 4),
            "epochs": result.epochs,
            "images_seen": result.images_seen,
            "best_val_miou": result.best_miou,
            "wall_s": round(segloop_s, 1),
            "stopped": result.stopped,
        },
        "reference": {
            "test_miou": round(ref_miou, 4),
            "full_epochs": len(rates),
            "images_seen": ref_images,
            "wall_s": round(ref_s, 1),
            "params": sum(p.numel() for p in ref.parameters()),
        },
        "segloop_params": sum(p.numel() for p in model.parameters()),
    }


def table(report: dict) -> str:
    m, best, b = report["throughput"]["mean"], report["throughput"]["best"], report.get("same_budget")
    lines = [
        f"| loop | img/s, mean of {report['rounds']} rounds | best round | vs bare: median of rounds (range) | vs "
        "bare: best rounds | first epoch img/s |",
        "|---|---|---|---|---|---|",
        f"| (a) bare step, random batch in memory | {m['bare_img_per_s']:.1f} | {best['bare_img_per_s']:.1f} | 1 | 1 "
        "| - |",
        f"| (b) segloop.train.train | {m['segloop_img_per_s']:.1f} | {best['segloop_img_per_s']:.1f} | "
        f"{m['segloop_vs_bare_median']:.3f} "
        f"({m['segloop_vs_bare_min']:.3f}-{m['segloop_vs_bare_max']:.3f}) | {best['segloop_vs_bare']:.3f} | "
        f"{m['segloop_first_epoch_img_per_s']:.1f} |",
        f"| (c) plain loop, MONAI BasicUNet | {m['reference_img_per_s']:.1f} | {best['reference_img_per_s']:.1f} | - "
        f"| - | {m['reference_first_epoch_img_per_s']:.1f} |",
        "",
        f"segloop spends {m['segloop_val_ckpt_s_per_epoch']:.1f} s per epoch outside the training steps (validation on "
        f"{report['n_val']} images + checkpoints), not counted above.",
    ]
    if b:
        lines += [
            "",
            f"| same {b['budget_s']:g} s budget | test mIoU | images trained on | epochs | params |",
            "|---|---|---|---|---|",
            f"| segloop (Unet/resnet18, best val) | {b['segloop']['test_miou']:.3f} | {b['segloop']['images_seen']} | "
            f"{b['segloop']['epochs']} | {b['segloop_params']:,} |",
            f"| reference (BasicUNet, last) | {b['reference']['test_miou']:.3f} | {b['reference']['images_seen']} | "
            f"{b['reference']['full_epochs']} full | {b['reference']['params']:,} |",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per (b)/(c) run; the first is left out")
    ap.add_argument("--n-train", type=int, default=160)
    ap.add_argument("--size", type=int, default=144, help="side of the synthetic images (generate.image_size)")
    ap.add_argument("--budget-s", type=float, default=90.0, help="same-budget comparison; 0 skips it")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the training process")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 round, tiny data, 10 s budget")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.n_train, args.size, args.budget_s = 1, 32, 96, 10.0
    torch.set_num_threads(args.threads)
    settings = load_settings(args.params, ["tracking.enabled=false", *args.set])
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="segloop-bench-train-") as tmp:
        work = Path(tmp)
        n_val, n_test = max(8, args.n_train // 10), max(8, args.n_train * 3 // 8)
        dirs = make_data(work, args.n_train, n_val, n_test, args.size)
        settings = resolve(settings, dirs["train"])[0]  # crop, batch, augmentation as training plans them
        log(
            f"data: {args.n_train} train / {n_val} val / {n_test} test images of {args.size}px; "
            f"device {pick_device()}, {torch.get_num_threads()} torch threads, {settings.train.num_workers} loader "
            "workers"
        )
        tp = throughput(settings, dirs, work, args.rounds, args.epochs)
        budget = same_budget(settings, dirs, work, args.budget_s) if args.budget_s else None
    m = tp["mean"]
    report = {
        "what": "images/s of (a) the bare train step, (b) segloop.train.train, (c) a plain MONAI BasicUNet loop; "
        "(b) and (c) over full epochs after the first, validation excluded",
        "model": settings.model.model_dump(mode="json"),
        "overrides": args.set,
        "crop": settings.data.crop_size,
        "batch_size": settings.train.batch_size,
        "num_workers": settings.train.num_workers,
        "n_train": args.n_train,
        "n_val": n_val,
        "image_size": args.size,
        "epochs_per_run": args.epochs,
        "rounds": args.rounds,
        "device": str(pick_device()),
        "torch_threads": torch.get_num_threads(),
        "throughput": tp,
        "same_budget": budget,
        "headline": {
            "segloop img/s (mean)": m["segloop_img_per_s"],
            "bare step img/s (mean)": m["bare_img_per_s"],
            "segloop / bare (median of rounds)": m["segloop_vs_bare_median"],
            "segloop / bare (best rounds)": tp["best"]["segloop_vs_bare"],
            "segloop / MONAI BasicUNet loop img/s": m["segloop_vs_reference"],
            **(
                {
                    f"test mIoU after {budget['budget_s']:g} s, segloop / BasicUNet": (
                        f"{budget['segloop']['test_miou']:.3f} / {budget['reference']['test_miou']:.3f}"
                    )
                }
                if budget
                else {}
            ),
        },
        "goals": {f"segloop_vs_bare_ge_{GOAL:.2f}": m["segloop_vs_bare_median"] >= GOAL},
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_average_1min": round(os.getloadavg()[0], 2),
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }
    (args.out / "train_speed.json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n" + table(report))
    print(f"\ngoals: {report['goals']}\nwrote {args.out / 'train_speed.json'} in {report['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
