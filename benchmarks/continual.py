"""Continual-learning benchmark: the stream base -> lowlight -> fog -> noise -> colorshift.

Every strategy starts from the same base model, sees the same batches with the
same seeds, and is scored on the held-out set of every domain after every step
(the accuracy matrix R). Compute is counted as training images processed
(replayed samples included), so the cost ratio to `joint` holds on a noisy machine.
Each step keeps its epoch with the best mean val mIoU over every domain seen so
far, as the gate judges a challenger (`--val new`: the new domain's alone).

    python benchmarks/continual.py [--quick] [--threads N] [--test-images N] [--strategies ...]
        [--set key=value ...] [--base CKPT] [--resume]

Writes reports/bench/continual.json, continual_R_<strategy>.png, continual_curves.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from segloop.checkpoint import load_model
from segloop.config import load_settings
from segloop.continual import STRATEGIES, continual_metrics, update
from segloop.data.replay import update_buffer
from segloop.data.synthetic import generate
from segloop.evaluate import miou_on
from segloop.inference import pick_device
from segloop.plots import save_accuracy_matrix, save_domain_curves
from segloop.train import train

STREAM = ["base", "lowlight", "fog", "noise", "colorshift"]
# The bar: a replay strategy near joint, without forgetting, at a fraction of its compute;
# finetune must forget enough to show the problem.
GOALS = {"acc_vs_joint": 0.95, "max_forgetting": 0.02, "max_compute_vs_joint": 0.30, "finetune_min_forgetting": 0.05}
ROOT = Path(__file__).resolve().parents[1]


def miou(model_path: Path, data: Path, settings) -> float:
    model, _ = load_model(model_path)
    device = pick_device()
    return miou_on(model.to(device), data, settings, device)[0]


def goals(results: dict) -> dict:
    """Goal name -> met (None where the strategies it needs did not run)."""
    replays = [results[n] for n in ("replay", "replay_lwf") if n in results]
    near = (
        None
        if "joint" not in results or not replays
        else any(
            r["acc_vs_joint"] >= GOALS["acc_vs_joint"]
            and r["forgetting"] <= GOALS["max_forgetting"]
            and r["compute_vs_joint"] <= GOALS["max_compute_vs_joint"]
            for r in replays
        )
    )
    forgets = (
        None if "finetune" not in results else results["finetune"]["forgetting"] >= GOALS["finetune_min_forgetting"]
    )
    return {"replay_near_joint_without_forgetting": near, "finetune_forgets": forgets}


def headline(results: dict) -> dict:
    """Strategy -> its figures for `make bench`'s summary table."""
    return {
        name: f"ACC {r['acc']:.3f}, forgetting {100 * r['forgetting']:.1f} pts"
        + (
            f" ({r['acc_vs_joint']:.0%} of joint at {r['compute_vs_joint']:.0%} of its compute)"
            if "acc_vs_joint" in r and name != "joint"
            else ""
        )
        for name, r in results.items()
    }


def make_stream(root: Path, n_train: int, n_test: int, size: tuple[int, int]) -> dict:
    # one folder per set of sizes: a folder made for other counts is never reused
    root, dirs = root / f"{n_train}-{n_test}-{size[0]}x{size[1]}", {}
    for k, domain in enumerate(STREAM):
        dirs[domain] = {}
        for split, n, seed in (("train", n_train, 100 + k), ("val", n_test // 2, 200 + k), ("test", n_test, 300 + k)):
            out = root / domain / split
            if not out.exists():
                generate(out, domain, n, seed, size)
            dirs[domain][split] = out
    return dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "reports/bench/continual_work")
    parser.add_argument("--out", type=Path, default=ROOT / "reports/bench")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny data, 1 epoch")
    parser.add_argument("--strategies", nargs="*", default=sorted(STRATEGIES))
    parser.add_argument("--set", action="append", default=[], help="extra key.path=value overrides (e.g. continual.*)")
    parser.add_argument(
        "--base", type=Path, help="reuse this base checkpoint (trained by an earlier run) instead of training one"
    )
    parser.add_argument(
        "--val",
        choices=["seen", "new"],
        default="seen",
        help="keep the update's best epoch on every seen domain's val set, or on the new domain's",
    )
    parser.add_argument("--threads", type=int, help="torch threads (1 on a shared machine)")
    parser.add_argument(
        "--test-images",
        type=int,
        default=32,
        help="held-out images per domain (val gets half): more resolves smaller forgetting",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse WORK's base model and every strategy result computed with the same settings",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    # 4 update epochs: replay with a balanced mix then costs 24% of joint (5 would cost 30.2%)
    n_train, n_test, size, base_epochs, upd_epochs = (96, args.test_images, (96, 96), 15, 4)
    if args.quick:
        n_train, n_test, size, base_epochs, upd_epochs = (16, 8, (64, 64), 1, 1)
    settings = load_settings(
        ROOT / "params.yaml",
        [
            "data.crop_size=64",
            f"train.epochs={base_epochs}",
            "train.max_minutes=null",
            "train.patience=1000",
            "train.batch_size=8",
            f"continual.epochs={upd_epochs}",
            "continual.replay.size=96",
            *args.set,
        ],
    )
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    dirs = make_stream(args.work / "data", n_train, n_test, size)
    started = time.monotonic()
    if args.base or (args.resume and (args.work / "base" / "best.pt").is_file()):
        base_ckpt = args.base or args.work / "base" / "best.pt"
        print(f"base model: {base_ckpt} (reused)", flush=True)
    else:
        base = train(settings, dirs["base"]["train"], args.work / "base", dirs["base"]["val"], log=lambda _: None)
        base_ckpt = args.work / "base" / "best.pt"
        print(f"base model: val mIoU {base.best_miou:.3f}, {base.images_seen} images, {base.seconds:.0f}s", flush=True)
    first_row = [miou(base_ckpt, dirs[d]["test"], settings) for d in STREAM]

    results = {}
    for strategy in args.strategies:
        s = settings.model_copy(update={"continual": settings.continual.model_copy(update={"strategy": strategy})})
        # what a strategy's result depends on (joint retrains with train.* alone)
        key = {
            "settings": s.model_dump(mode="json", exclude={"continual"} if strategy == "joint" else None),
            "val": args.val,
            "data": [n_train, n_test, list(size)],
            "base": str(base_ckpt),
        }
        cache = args.work / strategy / "result.json"
        if args.resume and cache.is_file() and json.loads(cache.read_text())["key"] == key:
            cached = json.loads(cache.read_text())["result"]
            results[strategy] = {**cached, **continual_metrics(np.array(cached["R"]), baseline=np.array(first_row))}
            print(f"{strategy}: reused {cache}", flush=True)
            save_accuracy_matrix(
                args.out / f"continual_R_{strategy}.png", np.array(results[strategy]["R"]), STREAM, strategy
            )
            continue
        r, parent, images, t0 = [first_row], base_ckpt, 0, time.monotonic()
        rs = s.continual.replay
        buffer = args.work / strategy / f"buffer_{rs.sampling}{rs.size}_0"
        if not buffer.exists():
            update_buffer(None, dirs["base"]["train"], "base", rs.size, 0, buffer, rs.sampling)
        for k, domain in enumerate(STREAM[1:], start=1):
            out = args.work / strategy / f"step_{k}_{domain}"
            # the checkpoint kept is the best on every domain seen so far, as the gate judges it
            val = [dirs[d]["val"] for d in STREAM[: k + 1]] if args.val == "seen" else dirs[domain]["val"]
            res = update(
                s,
                parent,
                dirs[domain]["train"],
                out,
                val,
                seen=[dirs[d]["train"] for d in STREAM[:k]],
                replay=buffer,
                log=lambda _: None,
            )
            images += res.images_seen
            parent = out / "best.pt"
            nxt = args.work / strategy / f"buffer_{rs.sampling}{rs.size}_{k}"  # per fill and size, as the data
            if not nxt.exists():
                update_buffer(buffer, dirs[domain]["train"], domain, rs.size, 0, nxt, rs.sampling)
            buffer = nxt
            r.append([miou(parent, dirs[d]["test"], settings) for d in STREAM])
            print(f"{strategy:15s} after {domain:10s} " + " ".join(f"{v:.3f}" for v in r[-1]), flush=True)
        r = np.array(r)
        metrics = continual_metrics(r, baseline=np.array(first_row))
        results[strategy] = {
            **metrics,
            "R": r.round(4).tolist(),
            "train_images": images,
            "wall_s": round(time.monotonic() - t0, 1),
        }
        cache.write_text(json.dumps({"key": key, "result": results[strategy]}, indent=1))
        save_accuracy_matrix(args.out / f"continual_R_{strategy}.png", r, STREAM, strategy)

    joint = results.get("joint")
    for res in results.values():
        if joint:
            res["acc_vs_joint"] = round(res["acc"] / joint["acc"], 4)
            res["compute_vs_joint"] = round(res["train_images"] / joint["train_images"], 4)
    report = {
        "stream": STREAM,
        "n_train_per_domain": n_train,
        "n_test_per_domain": n_test,
        "image_size": list(size),
        "base_epochs": base_epochs,
        "update_epochs": upd_epochs,
        "base_row": np.round(first_row, 4).tolist(),
        "settings": {"continual": settings.continual.model_dump(), "overrides": args.set},
        "torch_threads": torch.get_num_threads(),
        "val": args.val,
        "total_wall_s": round(time.monotonic() - started, 1),  # this run's; with --resume, cached results took
        "strategies_wall_s": round(sum(r["wall_s"] for r in results.values()), 1),  # their own wall_s
        "goals": goals(results),
        "goal_thresholds": GOALS,
        "headline": headline(results),
        "strategies": results,
    }
    (args.out / "continual.json").write_text(json.dumps(report, indent=1))
    save_domain_curves(args.out / "continual_curves.png", {k: np.array(v["R"]) for k, v in results.items()}, STREAM)
    print(
        "\n| strategy | ACC | vs joint | BWT | forgetting | LA | FWT | train images | vs joint | wall s |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    for name, res in results.items():
        print(
            f"| {name} | {res['acc']:.3f} | {res.get('acc_vs_joint', '-')} | {res['bwt']:+.3f} | "
            f"{res['forgetting']:.3f} | "
            f"{res['la']:.3f} | {res['fwt']:+.3f} | {res['train_images']} | {res.get('compute_vs_joint', '-')} | "
            f"{res['wall_s']} |"
        )
    print(f"\ngoals {GOALS}: {report['goals']}")


if __name__ == "__main__":
    main()
