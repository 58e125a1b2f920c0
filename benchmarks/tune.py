"""Tuning vs defaults at the same CPU budget: does `segloop tune` beat params.yaml's settings?

Per seed, on the synthetic base domain (train / val / test generated from seed-derived
seeds): the default arm trains with params.yaml for the whole budget; the tuned arm spends
`--tune-share` of it on an Optuna study (`tune.*` of params.yaml: TPE, median pruning; each
trial gets an equal slice, trials start while a slice is left) and the rest on training
with the best trial's params file. Budgets count CPU seconds of this process
(time.process_time: the same compute whatever else runs on a shared machine; data loading
runs in it too, `train.num_workers` 0). The score
is the final model's mIoU on the test split, which neither arm saw.

    python benchmarks/tune.py [--budget-min 30] [--seeds 0 1 2] [--trials 6] [--tune-share 0.5]
                              [--n 160] [--threads 1] [--set KEY=VALUE] [--resume] [--quick]

Writes reports/bench/tune.json and tune.png (work files in reports/bench/tune_work).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from segloop.checkpoint import load_model
from segloop.config import Settings, apply_override, load_settings, settings_from_dict
from segloop.data.synthetic import generate
from segloop.evaluate import miou_on
from segloop.train import train
from segloop.tune import BEST_PARAMS, tune

ROOT = Path(__file__).resolve().parents[1]
# quick: a smoke run on tiny images (crops that fit them; fewer steps per epoch)
QUICK = {
    "generate": {"image_size": [96, 96]},
    "train": {"iters_per_epoch": 8},
}
QUICK_CROPS = [64, 96]


def make_data(root: Path, seed: int, n: int, size: tuple[int, int]) -> dict[str, Path]:
    """{split: folder} of base-domain pairs; each split its own scenes."""
    dirs = {}
    for k, (split, count) in enumerate((("train", n), ("val", max(8, n // 5)), ("test", max(8, n // 2)))):
        out = root / f"{split}_{count}x{size[0]}x{size[1]}_seed{seed}"
        if not out.exists():
            generate(out, "base", count, seed * 1000 + k, size)
        dirs[split] = out
    return dirs


def with_budget(settings: Settings, minutes: float, seed: int) -> Settings:
    raw = settings.model_dump(mode="json")
    raw["train"] |= {"max_minutes": minutes, "seed": seed}
    return settings_from_dict(raw, "benchmark")


def test_miou(ckpt: Path, test: Path, settings: Settings) -> float:
    model = load_model(ckpt)[0].eval()
    return round(miou_on(model, test, settings, torch.device("cpu"))[0], 4)


def default_arm(settings: Settings, dirs: dict, out: Path, budget_min: float, seed: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cpu = time.process_time()
    r = train(
        with_budget(settings, budget_min, seed), dirs["train"], out, dirs["val"], log=_quiet, clock=time.process_time
    )
    return {
        "test_miou": test_miou(out / "best.pt", dirs["test"], settings),
        "val_miou": r.best_miou,
        "epochs": r.epochs,
        "stopped": r.stopped,
        "cpu_s": round(time.process_time() - cpu, 1),
    }


def tuned_arm(settings: Settings, dirs: dict, out: Path, args, seed: int) -> dict:
    """A study of `args.trials` slices of the tuning share (one trial per `tune` call: the study
    resumes from its storage each time), then training with the best params for what is left."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    study_min = args.budget_min * args.tune_share
    trial_min = study_min / args.trials
    raw = settings.model_dump(mode="json")
    raw["tune"] |= {"trials": 1, "study": f"bench-{seed}", "storage": f"sqlite:///{out / 'optuna.db'}", "seed": seed}
    raw["train"] |= {"max_minutes": trial_min, "seed": seed}
    study_settings = settings_from_dict(raw, "benchmark study")
    cpu = time.process_time()
    result = None
    while (time.process_time() - cpu) / 60 + trial_min <= study_min * 1.02:  # 2%: overheads of a trial's start
        result = tune(study_settings, dirs["train"], dirs["val"], out / "study", log=print, clock=time.process_time)
    assert result is not None and result.params_file is not None, "no trial completed"
    study_cpu = time.process_time() - cpu
    best = load_settings(out / "study" / BEST_PARAMS)
    left = args.budget_min - study_cpu / 60
    r = train(
        with_budget(best, left, seed), dirs["train"], out / "final", dirs["val"], log=_quiet, clock=time.process_time
    )
    return {
        "test_miou": test_miou(out / "final" / "best.pt", dirs["test"], settings),
        "val_miou": r.best_miou,
        "epochs": r.epochs,
        "stopped": r.stopped,
        "best_params": result.best_params,
        "best_trial_val_miou": result.best_value,
        "trials": {"complete": result.complete, "pruned": result.pruned, "failed": result.failed},
        "study_cpu_s": round(study_cpu, 1),
        "final_cpu_s": round(time.process_time() - cpu - study_cpu, 1),
    }


def cached(path: Path, budget_min: float | None) -> dict | None:
    """An arm's earlier result at the same budget (--resume), else None."""
    if not budget_min or not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.pop("budget_min") == budget_min else None


def _quiet(line: str) -> None:
    pass


def save_plot(path: Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for r in results:
        d, t = r["default"]["test_miou"], r["tuned"]["test_miou"]
        ax.plot([0, 1], [d, t], "o-", color="tab:green" if t > d else "tab:red", alpha=0.8)
        ax.annotate(f"seed {r['seed']}", (1, t), fontsize=8, xytext=(5, 0), textcoords="offset points")
    ax.set_xticks([0, 1], ["defaults (params.yaml)", "tuned study + best params"])
    ax.set_xlim(-0.3, 1.4)
    ax.set_ylabel("base test mIoU")
    ax.set_title("same CPU budget: defaults vs tuned")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-min", type=float, default=30.0, help="CPU minutes per arm and seed (default 30)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--trials", type=int, default=6, help="trials of the study (equal slices of its share)")
    p.add_argument("--tune-share", type=float, default=0.5, help="share of the budget the study spends (default 0.5)")
    p.add_argument("--n", type=int, default=160, help="training pairs (val: n/5, test: n/2)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: CPU time is the budget)")
    p.add_argument("--work", type=Path, default=ROOT / "reports/bench/tune_work")
    p.add_argument("--out", type=Path, default=ROOT / "reports/bench")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a setting")
    p.add_argument("--resume", action="store_true", help="reuse each seed's default arm trained at the same budget")
    p.add_argument("--quick", action="store_true", help="smoke run: 96 px images, 48 pairs, 2 CPU min, 1 seed")
    args = p.parse_args()
    if not 0 < args.tune_share < 1:
        p.error("--tune-share must be in (0, 1)")

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tracking"] = {**raw.get("tracking", {}), "enabled": False}  # no MLflow store: the study's sqlite is enough
    raw["train"]["num_workers"] = 0  # loading in this process: process_time counts all of each arm's compute
    if args.quick:
        for section, values in QUICK.items():
            raw[section] = {**raw[section], **values}
        raw["tune"]["space"]["data.crop_size"] = {"choices": QUICK_CROPS}
        args.budget_min, args.n, args.seeds, args.trials = min(args.budget_min, 2.0), 48, args.seeds[:1], 3
    for assignment in args.set:
        apply_override(raw, assignment)
    settings = settings_from_dict(raw, "params.yaml" + (" (quick)" if args.quick else ""))
    torch.set_num_threads(args.threads)
    started, load_before = time.monotonic(), os.getloadavg()
    size = tuple(settings.generate.image_size)

    results = []
    for seed in args.seeds:
        dirs = make_data(args.work / "data", seed, args.n, size)
        work = args.work / f"seed-{seed}"
        default = cached(work / "default.json", args.resume and args.budget_min) or default_arm(
            settings, dirs, work / "default", args.budget_min, seed
        )
        (work / "default.json").write_text(json.dumps({**default, "budget_min": args.budget_min}))
        print(f"seed {seed} defaults: test mIoU {default['test_miou']:.4f} ({default['epochs']} epochs)", flush=True)
        tuned = tuned_arm(settings, dirs, work / "tuned", args, seed)
        print(f"seed {seed} tuned:    test mIoU {tuned['test_miou']:.4f} ({tuned['trials']})", flush=True)
        results.append({"seed": seed, "default": default, "tuned": tuned})

    delta = [r["tuned"]["test_miou"] - r["default"]["test_miou"] for r in results]
    report = {
        "measured": f"base-domain test mIoU after {args.budget_min:g} CPU minutes per arm ({args.threads} thread(s)): "
        f"params.yaml defaults vs a {args.trials}-trial study ({args.tune_share:.0%} of the budget) + best params",
        "scale": {
            "quick": args.quick,
            "budget_cpu_min": args.budget_min,
            "seeds": args.seeds,
            "trials": args.trials,
            "tune_share": args.tune_share,
            "train_pairs": args.n,
            "image_size": list(size),
            "overrides": args.set,
        },
        "machine": {
            "cores": os.cpu_count(),
            "threads": args.threads,
            "load_avg_before": [round(v, 2) for v in load_before],
            "load_avg_after": [round(v, 2) for v in os.getloadavg()],
        },
        "results": results,
        "headline": {
            "defaults test mIoU (mean)": round(float(np.mean([r["default"]["test_miou"] for r in results])), 4),
            "tuned test mIoU (mean)": round(float(np.mean([r["tuned"]["test_miou"] for r in results])), 4),
            "tuned - defaults, pts (min..max)": f"{100 * np.mean(delta):+.1f} ({100 * min(delta):+.1f}.."
            f"{100 * max(delta):+.1f})",
        },
        # every seed, as loop_stream's goals: a mean over 3 seeds of +0.0 is a tie, not a win
        "goals": {"tuned beats defaults at the same budget (every seed)": bool(min(delta) > 0)},
        "wall_s": round(time.monotonic() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tune.json").write_text(json.dumps(report, indent=1))
    save_plot(args.out / "tune.png", results)
    for key, value in report["headline"].items():
        print(f"{key}: {value}")
    print(f"wrote {args.out / 'tune.json'}, tune.png ({report['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
