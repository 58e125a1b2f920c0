"""segloop's automatic recipe vs a plain SMP U-Net loop, same data, same training budget.

    python benchmarks/recipe.py [--datasets membranes,scenes] [--seeds 0,1,2] [--minutes 4] [--quick]

For each training seed and dataset (benchmarks/_datasets.py: grayscale EM-like membranes,
RGB scenes), two runs on the same split, one after the other:
- plain: the 60-line loop a user would write first: SMP Unet-resnet18 (default decoder),
  random 256x256 crops with horizontal flips, batch 8, AdamW 1e-3, CE + Dice, images in
  [0, 1], the last weights after `--minutes`;
- segloop: `segloop.train.train` with only data.classes, data.channels and
  train.max_minutes set, everything else from params.yaml (crop, batch, normalisation,
  augmentation, epoch length planned from the data);
  its `best.pt` as it stood at 2/3 of the budget is scored too (what the run had kept by
  then, before its schedule ended: a lower bound of a run given 2/3 of the budget).
Both are scored on the same test images, whole (segloop.evaluate.confusion_over).

The budget is counted in CPU seconds of the training process (`--clock cpu`, the default:
`minutes` x 60 x 2, what two idle cores give in that time), computed in one thread with the
data loaded in that process for both arms (num_workers 0): a shared, busy machine then gives
each arm the same compute, and no CPU time goes to threads spinning while they wait.
`--clock wall` counts wall-clock seconds with `--threads` threads (fair on an idle machine only).
Writes reports/bench/recipe.json (+ recipe.png) with the per-seed figures and the goals.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _datasets import KINDS, generate  # noqa: E402

from segloop.config import EvalSettings, load_settings  # noqa: E402
from segloop.data.dataset import SegmentationDataset  # noqa: E402
from segloop.data.files import IGNORE_INDEX, list_samples  # noqa: E402
from segloop.evaluate import confusion_over  # noqa: E402
from segloop.metrics import nanmean, per_class_iou  # noqa: E402

GOAL_GAIN = 0.02  # segloop's mean test mIoU >= plain's + 2 pts
SPLITS = {"train": (20, 100), "val": (4, 200), "test": (6, 300)}  # images, data seed


def log(msg: str) -> None:
    print(msg, flush=True)


def make_split(work: Path, kind: str, quick: bool) -> dict[str, Path]:
    return {
        part: generate(work / kind / part, kind, 2 if quick and part != "train" else n, seed)
        for part, (n, seed) in SPLITS.items()
    }


def plain_loop(
    train_dir: Path, channels: int, classes: int, budget_s: float, seed: int, clock, crop: int = 256
) -> torch.nn.Module:
    """The plain loop: what most people write first with SMP (see the module docstring)."""
    import segmentation_models_pytorch as smp
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    torch.manual_seed(seed)
    model = smp.Unet("resnet18", encoder_weights=None, in_channels=channels, classes=classes)
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
    aug = v2.Compose([v2.RandomCrop(crop, pad_if_needed=True, fill=fill), v2.RandomHorizontalFlip()])
    data = SegmentationDataset(train_dir, channels, aug)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, drop_last=True, num_workers=0)
    dice = smp.losses.DiceLoss("multiclass", from_logits=True, ignore_index=IGNORE_INDEX)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    started, steps = clock(), 0
    model.train()
    while clock() - started < budget_s:
        for images, masks in loader:
            logits = model(images)
            loss = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX) + dice(logits, masks)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if clock() - started >= budget_s:
                break
    log(f"    plain: {steps} steps of 8 x {crop}px in {clock() - started:.0f} s")
    return model.eval()


def score(model, test_dir: Path, channels: int, classes: int) -> dict:
    cm = confusion_over(model, list_samples(test_dir), channels, classes, EvalSettings(), torch.device("cpu"))
    iou = per_class_iou(cm)
    return {"miou": round(nanmean(iou), 4), "per_class_iou": [round(float(v), 4) for v in iou]}


def segloop_run(dirs: dict, kind: str, budget_s: float, seed: int, out: Path, clock) -> tuple[dict, Path | None]:
    """Train with the automatic recipe; returns (run info, a copy of best.pt as it stood at 2/3 of the budget)."""
    import shutil

    from segloop.train import train

    _, names, channels = KINDS[kind]
    settings = load_settings(
        ROOT / "params.yaml",
        [
            f"data.classes={json.dumps(names)}",
            f"data.channels={channels}",
            f"train.max_minutes={budget_s / 60}",
            f"train.seed={seed}",
            "tracking.enabled=false",
            "train.num_workers=0",
        ],
    )
    at_two_thirds = out.parent / f"{out.name}-two-thirds.pt"

    def snapshot(record: dict) -> None:  # best.pt is written before on_epoch sees the epoch
        if record["seconds"] <= budget_s * 2 / 3 and (out / "best.pt").exists():
            shutil.copy2(out / "best.pt", at_two_thirds)

    result = train(settings, dirs["train"], out, dirs["val"], log=lambda line: None, clock=clock, on_epoch=snapshot)
    planned = load_settings(out / "settings.yaml")
    log(
        f"    segloop: {result.epochs} epochs, {result.images_seen} crops of {planned.data.crop_size}px "
        f"(batch {planned.train.batch_size}), stopped {result.stopped}, {result.seconds:.0f} s"
    )
    return (
        {
            "epochs": result.epochs,
            "crops": result.images_seen,
            "crop": planned.data.crop_size,
            "batch": planned.train.batch_size,
            "seconds": result.seconds,
            "stopped": result.stopped,
        },
        at_two_thirds if at_two_thirds.exists() else None,
    )


def run_once(kind: str, dirs: dict, seed: int, budget_s: float, work: Path, clock, two_thirds: str) -> dict:
    """Plain and segloop at the full budget; segloop at 2/3 of it as a snapshot of the full run, or
    (`two_thirds="run"`) as a run of its own whose schedule ends at 2/3."""
    from segloop.checkpoint import load_model

    _, names, channels = KINDS[kind]
    test = lambda ckpt: score(load_model(ckpt)[0], dirs["test"], channels, len(names))  # noqa: E731
    row: dict = {"seed": seed}
    if two_thirds != "only":
        row["plain"] = score(
            plain_loop(dirs["train"], channels, len(names), budget_s, seed, clock), dirs["test"], channels, len(names)
        )
        info, early = segloop_run(dirs, kind, budget_s, seed, work / f"{kind}-{seed}", clock)
        row["segloop"] = test(work / f"{kind}-{seed}" / "best.pt") | info
        row["segloop_2_3"] = test(early) if early else None  # no epoch ended before 2/3 of the budget
    if two_thirds in ("run", "only"):
        info, _ = segloop_run(dirs, kind, budget_s * 2 / 3, seed, work / f"{kind}-{seed}-2-3", clock)
        row["segloop_2_3"] = test(work / f"{kind}-{seed}-2-3" / "best.pt") | info
    if two_thirds == "only":
        log(f"    {kind} seed {seed}: segloop with 2/3 of the budget {row['segloop_2_3']['miou']:.3f}")
        return row
    log(
        f"    {kind} seed {seed}: test mIoU plain {row['plain']['miou']:.3f}  segloop {row['segloop']['miou']:.3f}  "
        f"segloop's model at 2/3 of the budget {row['segloop_2_3']['miou'] if row['segloop_2_3'] else float('nan'):.3f}"
    )
    return row


def summarise(names: list[str], runs: list[dict]) -> dict:
    arms = ("plain", "segloop", "segloop_2_3")
    scores = {arm: [r[arm]["miou"] for r in runs if r.get(arm)] or [0.0] for arm in arms}
    mean = {arm: round(float(np.mean(v)), 4) for arm, v in scores.items()}
    spread = {arm: [round(float(min(v)), 4), round(float(max(v)), 4)] for arm, v in scores.items()}
    per_class = {
        arm: [round(float(v), 4) for v in np.mean([r[arm]["per_class_iou"] for r in runs], 0)] for arm in arms[:2]
    }
    return {
        "classes": names,
        "runs": runs,
        "mean_miou": mean,
        "min_max_miou": spread,
        "mean_per_class_iou": per_class,
        "goals": {
            "segloop >= plain + 2 pts": mean["segloop"] >= mean["plain"] + GOAL_GAIN,
            "segloop at 2/3 budget >= plain": mean["segloop_2_3"] >= mean["plain"],
        },
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = ("plain", "segloop", "segloop_2_3")
    fig, axes = plt.subplots(1, len(report["datasets"]), figsize=(5 * len(report["datasets"]), 4), squeeze=False)
    for ax, (kind, d) in zip(axes[0], report["datasets"].items()):
        for i, arm in enumerate(arms):
            vals = [r[arm]["miou"] for r in d["runs"] if r.get(arm)]
            ax.bar(i, np.mean(vals), color=("#999999", "#1f77b4", "#9ecae1")[i])
            ax.scatter([i] * len(vals), vals, color="k", s=12, zorder=3)
        ax.set_xticks(range(len(arms)), ["plain SMP loop", "segloop", "segloop, 2/3 time"])
        low = min(r[a]["miou"] for r in d["runs"] for a in arms if r.get(a))
        ax.set_ylim(max(0.0, low - 0.05), 1)  # the gaps are a few points: start near the lowest seed
        ax.set_title(f"{kind}: test mIoU, {report['minutes']:g} min budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="membranes,scenes")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--minutes", type=float, default=4.0, help="wall-clock budget of each full run")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 with --clock cpu, else 2)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="what the budget counts (see above)")
    ap.add_argument(
        "--two-thirds",
        choices=("snapshot", "run", "only"),
        default="snapshot",
        help="segloop at 2/3 of the budget: the full run's best.pt then, a run of its own, or only that run",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    ap.add_argument("--quick", action="store_true", help="a smoke run: one seed, 0.1-minute budgets, 2 test images")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.minutes = "0", 0.1
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.monotonic()
    if args.threads is None:
        args.threads = 1 if args.clock == "cpu" else 2
    torch.set_num_threads(args.threads)
    clock, scale = (time.process_time, 2) if args.clock == "cpu" else (time.monotonic, 1)
    report = {
        "what": __doc__.splitlines()[0],
        "minutes": args.minutes,
        "seeds": seeds,
        "threads": args.threads,
        "clock": args.clock,
        "budget_s": args.minutes * 60 * scale,
        "datasets": {},
    }
    kinds = args.datasets.split(",")
    runs: dict[str, list] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="segloop-bench-recipe-") as tmp:
        dirs = {k: make_split(Path(tmp), k, args.quick) for k in kinds}
        log(
            f"{SPLITS['train'][0]} train / {SPLITS['val'][0]} val / {SPLITS['test'][0]} test images per dataset; "
            f"budget {report['budget_s']:g} {args.clock} s per run"
        )
        for seed in seeds:  # seeds outside: an interrupted run still has every dataset
            for kind in kinds:
                runs[kind].append(
                    run_once(kind, dirs[kind], seed, report["budget_s"], Path(tmp), clock, args.two_thirds)
                )
                if args.two_thirds != "only":
                    report["datasets"][kind] = summarise(KINDS[kind][1], runs[kind])
                    write(report, args.out, started)
        if args.two_thirds == "only":  # a supplement: one line per run, nothing to compare in here
            (args.out).mkdir(parents=True, exist_ok=True)
            (args.out / "recipe_two_thirds.json").write_text(json.dumps(runs, indent=1) + "\n")
            return 0
    for k, v in report["headline"].items():
        log(f"{k}: {v}")
    log(f"goals: {report['goals']}\nwrote {args.out / 'recipe.json'} in {report['wall_s']} s")
    return 0


def write(report: dict, out: Path, started: float) -> None:
    report["headline"] = {
        f"{k} test mIoU plain / segloop / segloop at 2/3 ({len(d['runs'])} seeds)": " / ".join(
            f"{v:.3f}" for v in d["mean_miou"].values()
        )
        for k, d in report["datasets"].items()
    }
    report["goals"] = {f"{k}: {g}": ok for k, d in report["datasets"].items() for g, ok in d["goals"].items()}
    report["machine"] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    report["wall_s"] = round(time.monotonic() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out / "recipe.png")


if __name__ == "__main__":
    sys.exit(main())
