"""Loop-stream benchmark: the loop's own step over a long stream of batches, several seeds.

Each seed gets a fresh workspace (git + DVC) and MLflow sqlite store; every batch of the
stream is generated (data seeded by the seed and the batch) into incoming/ and processed
by `segloop.loop.process_batch`, the code `continual_flow` runs (no Prefect server here):
drift, update as a DVC stage, gate, promotion. Training runs with `train.seed` = the seed.

Every champion is also scored on an **audit set** per domain: larger than the loop's
held-out splits, generated separately, outside the workspace, never given to the loop or
its gate, so a gate that passed on a lucky small test split shows up. At the end a
**joint** model is trained from scratch (train.*) on every training split the loop saw.

Per shifted batch (domain other than the first batch's): promoted or not, the first failed
rule, target-domain gain and worst learnt-domain change (gate's held-out view), and for a
promotion the worst change on the audit sets of the domains learnt before it; a refused
candidate is scored on them too (was the refusal the audit's verdict, or the small split's?). Training
cost is counted as images processed (TrainResult.images_seen, replayed ones included).

    python benchmarks/loop_stream.py [--seeds 0 1 2] [--quick] [--stream DOMAIN:N,...] [--set key=value ...] [--resume]

Seeds run one after another; with --resume a seed whose result.json exists under --work
(same settings and stream) is reused, so seeds can run in separate processes and a last
call with all of them writes the report: reports/bench/loop_stream.json and loop_stream.png.
--resume without --no-joint on a seed run with --no-joint adds joint to that seed's loop.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml

from segloop import loop
from segloop.checkpoint import load_model
from segloop.config import apply_override, settings_from_dict
from segloop.data.synthetic import generate, parse_stream
from segloop.evaluate import miou_on
from segloop.inference import pick_device
from segloop.plan import count_images, iters_per_epoch
from segloop.train import train

ROOT = Path(__file__).resolve().parents[1]
STREAM = "base:160,base:64,lowlight:96,fog:96,base:64,noise:96,colorshift:96,lowlight:96,fog:96,base:64"
QUICK_STREAM = "base:40,fog:30,fog:30"
GOALS = {
    "first_arrival_promoted": 0.90,
    "second_arrival_learnt": 1.0,
    "max_audit_forgetting": 0.02,
    "mean_vs_joint": 0.95,
    "max_images_vs_joint": 0.30,
}
# Cost: 96x96 images with 64-pixel crops (5 seeds in well under an hour on 2 cores), fixed
# epoch counts (no wall-clock budget: a loaded machine must not change what is measured),
# the loop's own replay settings (the mix changes what a batch holds, not how many images an
# update processes), one data-loading process.
BENCH = [
    "generate.image_size=[96,96]",
    "data.crop_size=64",
    "train.batch_size=8",
    "train.max_minutes=null",
    "train.num_workers=0",
    "train.epochs=15",
    "train.patience=1000",
    "continual.epochs=4",
    "drift.model_crop=64",
    "tracking.experiment=loop-stream",
    "registry.model_name=loopbench",
]
QUICK = [
    "data.crop_size=64",
    "generate.image_size=[72,80]",
    "model.decoder_channels=[32,16,16,8,8]",
    "train.epochs=3",
    "train.batch_size=4",
    "continual.epochs=2",
    "train.max_minutes=null",
    "train.num_workers=0",
    "drift.min_images=8",
    "drift.reference_size=32",
    "drift.model_crop=64",
    "drift.mmd_permutations=200",
    "drift.alpha=0.05",
    "registry.gate.floor_miou=0.0",
    "eval.n_overlays=0",
    "tracking.experiment=loop-stream",
    "registry.model_name=loopbench",
]


def seed_settings(root: Path, seed: int, overrides: list[str]):
    """params.yaml + the benchmark's overrides, with this seed's store, workspace, Evidently
    workspace and training seed (seeds run as parallel processes: Evidently's local workspace
    is not safe for two writers, one seed crashed reading a snapshot the other was writing)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for o in [
        *overrides,
        f"train.seed={seed}",
        f"tracking.uri=sqlite:///{root / 'store' / 'mlflow.db'}",
        f"flows.workspace={root / 'ws'}",
        f"drift.evidently_workspace={root / 'evidently'}",
        "flows.retries=0",
    ]:
        apply_override(raw, o)
    return settings_from_dict(raw, "loop_stream settings")


def make_audit(root: Path, domains: list[str], n: int, seed: int, size: tuple[int, int]) -> dict[str, Path]:
    """One audit set per domain, from seeds no batch of the stream uses (batches: seed*1000 + i)."""
    out = {}
    for k, domain in enumerate(domains):
        out[domain] = root / domain
        if not (out[domain] / "images").is_dir():
            generate(out[domain], domain, n, 900_000 + 100 * seed + k, size)
    return out


def audit_scores(checkpoint: Path, audit: dict[str, Path], settings) -> dict[str, float]:
    model, _ = load_model(checkpoint)
    device = pick_device()
    model.to(device).eval()
    return {d: round(miou_on(model, folder, settings, device)[0], 4) for d, folder in audit.items()}


def from_scratch_images(n_train: int, settings) -> int:
    """Training images a model trained from scratch on `n_train` images processes (what joint's
    `images_seen` counts): train.epochs epochs of train.iters_per_epoch steps (null: the plan's)
    of train.batch_size."""
    bs = settings.train.batch_size
    return settings.train.epochs * (settings.train.iters_per_epoch or iters_per_epoch(n_train, bs)) * bs


def from_scratch_costs(ws, steps: list[dict], settings) -> dict:
    """What training from scratch would process on the loop's batches, computed, not trained:
    joint once on every training split, and joint retrained on every split so far each time
    the loop trained (bootstrap included): the loop's alternative without continual learning."""
    n_train = retrain = 0
    for s in steps:
        if (split := ws.split(s["batch"], "train")).is_dir():
            n_train += count_images(split)
        if s["images_seen"]:
            retrain += from_scratch_images(n_train, settings)
    return {
        "joint_images": from_scratch_images(n_train, settings),
        "joint_images_computed": True,
        "retrain_images": retrain,
    }


def run_seed(
    seed: int,
    stream: list[tuple[str, int]],
    root: Path,
    overrides: list[str],
    n_audit: int,
    log=print,
    joint: bool = True,
) -> dict:
    """The whole stream through the loop for one seed, then joint; returns the seed's result."""
    shutil.rmtree(root, ignore_errors=True)
    settings = seed_settings(root, seed, overrides)
    ws, size = loop.Workspace.of(settings), tuple(settings.generate.image_size)
    domains = list(dict.fromkeys(d for d, _ in stream))
    audit = make_audit(root / "audit", domains, n_audit, seed, size)
    steps, champion_audit, started = [], None, time.monotonic()
    for i, (domain, n) in enumerate(stream):
        folder = ws.incoming / f"{i:02d}-{domain}"
        tmp = folder.with_name(f".{folder.name}.tmp")
        generate(tmp, domain, n, seed * 1000 + i, size)
        (tmp / loop.BATCH_INFO).write_text(json.dumps({"domain": domain}))
        tmp.rename(folder)
        t0 = time.monotonic()
        rec = loop.process_batch(ws, folder, settings)
        before_audit, candidate_audit = champion_audit, None
        if rec.updated:
            candidate_audit = audit_scores(ws.root / "models" / rec.batch / "best.pt", audit, settings)
        if rec.promoted:
            champion_audit = candidate_audit
        steps.append(
            {
                **rec.to_dict(),
                "audit_before": before_audit,
                "audit_after": champion_audit,
                "audit_candidate": candidate_audit,
                # learnt: trained on by a promoted champion, or covered untrained (LoopState.covered)
                "learnt_after": loop.learnt_domains(loop.read_state(ws)) or [],
                "covered_after": loop.read_state(ws).covered,
                "weak_after": loop.read_state(ws).weak,
                "seconds": round(time.monotonic() - t0, 1),
            }
        )
        log(f"seed {seed} {rec.batch}: {rec.summary}  [{time.monotonic() - t0:.0f}s]")
    result = {
        "seed": seed,
        "steps": steps,
        "final_audit": champion_audit,
        "joint_audit": None,
        **from_scratch_costs(ws, steps, settings),  # add_joint puts joint's own images
        "loop_images": sum(s["images_seen"] or 0 for s in steps),
        "loop_s": round(time.monotonic() - started, 1),
        "joint_s": None,
        "audit_dirs": {d: str(p) for d, p in audit.items()},
    }
    return add_joint(result, root, overrides, log) if joint else result  # no joint: a lever comparison


def add_joint(result: dict, root: Path, overrides: list[str], log=print) -> dict:
    """`result` (a seed's finished loop under `root`) with joint's figures: a model from scratch
    on every training split the loop saw, validated on all their val splits."""
    settings = seed_settings(root, result["seed"], overrides)
    ws = loop.Workspace.of(settings)
    trains = [ws.split(s["batch"], "train") for s in result["steps"]]
    vals = [ws.split(s["batch"], "val") for s in result["steps"]]
    audit = {d: Path(p) for d, p in result["audit_dirs"].items()}
    shutil.rmtree(root / "joint", ignore_errors=True)
    t0 = time.monotonic()
    joint = train(settings, trains, root / "joint", vals, log=lambda _: None)
    joint_audit = audit_scores(root / "joint" / "best.pt", audit, settings)
    log(f"seed {result['seed']} joint: {joint.images_seen} images, audit {joint_audit}  [{time.monotonic() - t0:.0f}s]")
    return {
        **result,
        "joint_audit": joint_audit,
        "joint_images": joint.images_seen,
        "joint_images_computed": False,
        "joint_s": round(time.monotonic() - t0, 1),
    }


def partial_seed(root: Path, seed: int, overrides: list[str], n_audit: int) -> dict | None:
    """The steps a seed's run has finished so far, rebuilt from its workspace's step records
    (processed/*.json) and the promoted models; no joint. For a run stopped by a deadline."""
    from segloop.records import StepRecord

    settings = seed_settings(root, seed, overrides)
    ws = loop.Workspace.of(settings)
    records = [StepRecord.read(p) for p in sorted((ws.root / "processed").glob("*.json"))]
    if not records:
        return None
    domains = list(dict.fromkeys(p.name for p in sorted((root / "audit").iterdir())))
    audit = {d: root / "audit" / d for d in domains}
    steps, champion_audit, learnt = [], None, []
    for rec in records:
        before = champion_audit
        if rec.promoted:
            champion_audit = audit_scores(ws.root / "models" / rec.batch / "best.pt", audit, settings)
            learnt = list(dict.fromkeys([*learnt, rec.domain]))
        steps.append(
            {
                **rec.to_dict(),
                "audit_before": before,
                "audit_after": champion_audit,
                "learnt_after": learnt,  # promotions only: what was covered is not in the records
                "seconds": None,
            }
        )
    return {
        "seed": seed,
        "steps": steps,
        "final_audit": champion_audit,
        "joint_audit": None,
        **from_scratch_costs(ws, steps, settings),
        "loop_images": sum(s["images_seen"] or 0 for s in steps),
        "loop_s": None,
        "joint_s": None,
        "audit_dirs": {d: str(p) for d, p in audit.items()},
        "partial": True,
    }


def seed_metrics(result: dict) -> dict:
    """Goal figures of one seed's run."""
    steps = result["steps"]
    first = steps[0]["domain"]
    arrivals: dict[str, int] = {}
    shifted, second = [], {}
    for k, s in enumerate(steps):
        arrivals[s["domain"]] = arrivals.get(s["domain"], 0) + 1
        if s["domain"] == first:
            continue
        target = s["domain"]
        cand, before = s["candidate_miou"], s["miou_before"]
        learnt_old = [d for d in s["learnt"] if d != target]
        audit_change = refused = None
        old = [d for d in steps[k - 1]["learnt_after"] if d != target]  # k >= 1: the first batch is skipped
        if s["promoted"] and s["audit_before"]:
            audit_change = min((s["audit_after"][d] - s["audit_before"][d] for d in old), default=None)
        elif s["updated"] and s.get("audit_candidate") and s["audit_before"]:
            # the refused candidate on the audit sets: did it forget (or gain too little) there too?
            a, b = s["audit_candidate"], s["audit_before"]
            refused = {
                "target_gain": round(a[target] - b[target], 4),
                "worst_learnt_change": round(min((a[d] - b[d] for d in old), default=0.0), 4),
            }
        shifted.append(
            {
                "batch": s["batch"],
                "domain": target,
                "arrival": arrivals[target],
                "updated": s["updated"],
                "promoted": s["promoted"],
                "covered": target in s.get("covered_after", []),  # not trained: the champion already segments it
                "learnt_after": target in s["learnt_after"],
                "first_failed": next((r for r in s["reasons"] if r.startswith("FAIL")), None),
                "target_gain": round(cand[target] - before[target], 4) if cand else None,
                "worst_learnt_change": round(min((cand[d] - before[d] for d in learnt_old), default=0.0), 4)
                if cand
                else None,
                "worst_audit_change_on_learnt": None if audit_change is None else round(audit_change, 4),
                "refused_candidate_on_audit": refused,
                "pooled": len(s["pooled"]),
            }
        )
        if arrivals[target] == 2:
            second[target] = target in s["learnt_after"]
    firsts = [x for x in shifted if x["arrival"] == 1]
    audit_changes = [
        x["worst_audit_change_on_learnt"] for x in shifted if x["worst_audit_change_on_learnt"] is not None
    ]
    # How far the gate's view of forgetting (its held-out splits) is from the audit sets' at a promotion.
    gaps = [
        x["worst_learnt_change"] - x["worst_audit_change_on_learnt"]
        for x in shifted
        if x["promoted"] and x["worst_audit_change_on_learnt"] is not None
    ]
    final, joint = result["final_audit"], result["joint_audit"] or {"-": float("nan")}
    mean, joint_mean = float(np.mean(list(final.values()))), float(np.mean(list(joint.values())))
    return {
        "shifted": shifted,
        "first_arrival_promoted": round(sum(x["promoted"] for x in firsts) / max(1, len(firsts)), 4),
        "first_arrival_learnt": round(sum(x["learnt_after"] for x in firsts) / max(1, len(firsts)), 4),
        # of the first arrivals the loop trained on (continual.covered_drop leaves covered ones alone)
        "first_arrival_promoted_of_trained": round(
            sum(x["promoted"] for x in firsts) / max(1, sum(x["updated"] for x in firsts)), 4
        ),
        "second_arrival_learnt": round(sum(second.values()) / len(second), 4) if second else None,
        "worst_audit_change_on_learnt": round(min(audit_changes), 4) if audit_changes else None,
        "final_audit_mean": round(mean, 4),
        "joint_audit_mean": None if result["joint_audit"] is None else round(joint_mean, 4),
        "mean_vs_joint": None if result["joint_audit"] is None else round(mean / joint_mean, 4),
        "images_vs_joint": round(result["loop_images"] / result["joint_images"], 4) if result["joint_images"] else None,
        # against retraining joint from scratch at every update instead (the loop without continual learning)
        "images_vs_retrain": round(result["loop_images"] / result["retrain_images"], 4)
        if result.get("retrain_images")
        else None,
        "loop_images": result["loop_images"],
        "gate_minus_audit_at_promotions": [round(g, 4) for g in gaps],
        "trained_shifted_batches": sum(x["updated"] for x in shifted),
    }


def summarise(metrics: list[dict]) -> dict:
    keys = [
        "first_arrival_promoted",
        "first_arrival_learnt",
        "first_arrival_promoted_of_trained",
        "second_arrival_learnt",
        "worst_audit_change_on_learnt",
        "mean_vs_joint",
        "images_vs_joint",
        "images_vs_retrain",
        "final_audit_mean",
        "joint_audit_mean",
    ]
    out = {}
    for k in keys:
        vals = [m[k] for m in metrics if m[k] is not None]
        out[k] = (
            {"mean": round(float(np.mean(vals)), 4), "min": round(min(vals), 4), "max": round(max(vals), 4)}
            if vals
            else None
        )
    gaps = [g for m in metrics for g in m["gate_minus_audit_at_promotions"]]
    # The gate's forgetting estimate vs the audit's: its spread is the noise of a decision on the
    # gate's small held-out splits (the audit's own noise, on 64 images, is part of it).
    out["gate_minus_audit_pts"] = (
        {
            "n": len(gaps),
            "mean": round(100 * float(np.mean(gaps)), 2),
            "sd": round(100 * float(np.std(gaps, ddof=1)), 2),
        }
        if len(gaps) > 1
        else None
    )
    return out


def goals(metrics: list[dict]) -> dict:
    """Goal name -> met over every seed (each seed must meet it)."""

    def every(check, key: str | None = None):
        judged = [m for m in metrics if m[key] is not None] if key else metrics
        return all(check(m) for m in judged) if judged else None  # None: no seed has a joint model

    return {
        "first_arrival_promoted>=90%": every(lambda m: m["first_arrival_promoted"] >= GOALS["first_arrival_promoted"]),
        # the same bar, counting a domain the champion already covers without training as learnt
        "first_arrival_learnt>=90%": every(lambda m: m["first_arrival_learnt"] >= GOALS["first_arrival_promoted"]),
        "second_arrival_learnt=100%": every(lambda m: m["second_arrival_learnt"] in (None, 1.0)),
        "audit_forgetting<=2pts": every(
            lambda m: (m["worst_audit_change_on_learnt"] or 0.0) >= -GOALS["max_audit_forgetting"]
        ),
        "mean>=95%_of_joint": every(lambda m: m["mean_vs_joint"] >= GOALS["mean_vs_joint"], "mean_vs_joint"),
        "images<=30%_of_joint": every(
            lambda m: m["images_vs_joint"] <= GOALS["max_images_vs_joint"], "images_vs_joint"
        ),
    }


def plot(path: Path, results: list[dict], domains: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.5), squeeze=False)
    for ax, r in zip(axes[0], results):
        steps = [s["batch"] for s in r["steps"]]
        for d in domains:
            ax.plot(
                range(len(steps)),
                [np.nan if s["audit_after"] is None else s["audit_after"][d] for s in r["steps"]],
                marker="o",
                label=d,
            )
            if r["joint_audit"]:
                ax.axhline(r["joint_audit"][d], ls=":", lw=0.8, color=ax.lines[-1].get_color())
        for k, s in enumerate(r["steps"]):
            if s["updated"] and not s["promoted"]:
                ax.axvline(k, color="red", alpha=0.2, lw=6)
        ax.set_xticks(range(len(steps)), steps, rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"seed {r['seed']}: champion on the audit sets (dotted: joint; red: refused update)", fontsize=9)
        ax.set_ylabel("audit mIoU")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--stream", help=f"DOMAIN:N,... in arrival order (default {STREAM})")
    parser.add_argument("--audit-images", type=int, default=64, help="audit images per domain")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny images and model, 3 batches, 1 seed")
    parser.add_argument("--set", action="append", default=[], help="extra key.path=value overrides")
    parser.add_argument("--work", type=Path, default=ROOT / "reports/bench/loop_stream_work")
    parser.add_argument("--out", type=Path, default=ROOT / "reports/bench")
    parser.add_argument("--threads", type=int, help="torch threads (1 on a shared machine)")
    parser.add_argument(
        "--resume", action="store_true", help="reuse each seed's result.json made with the same settings"
    )
    parser.add_argument(
        "--partial",
        action="store_true",
        help="report what each seed's run under --work has finished (finished seeds in full), run nothing",
    )
    parser.add_argument("--no-joint", action="store_true", help="skip the joint model (comparing levers of the loop)")
    parser.add_argument("--name", default="loop_stream", help="report name (reports/bench/NAME.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [*(QUICK if args.quick else BENCH), *args.set]
    stream = parse_stream(args.stream or (QUICK_STREAM if args.quick else STREAM))
    seeds = args.seeds[:1] if args.quick else args.seeds
    n_audit = 16 if args.quick else args.audit_images
    key = {"overrides": overrides, "stream": stream, "audit_images": n_audit, "joint": not args.no_joint}
    results = []
    say = partial(print, flush=True)
    want = json.loads(json.dumps(key))  # as a cache file holds it (tuples become lists)
    for seed in seeds:
        cache = args.work / f"seed-{seed}.json"
        cached = json.loads(cache.read_text()) if cache.is_file() else {"key": None}
        finished = cached["key"] == want
        if args.resume and not args.no_joint and cached["key"] == {**want, "joint": False}:
            # a --no-joint run of the same stream and settings: its loop stands, joint is added
            result = add_joint(cached["result"], args.work / f"seed-{seed}", overrides, say)
            cache.write_text(json.dumps({"key": key, "result": result}, indent=1))
            results.append(result)
            continue
        if args.partial and not finished:
            result = partial_seed(args.work / f"seed-{seed}", seed, overrides, n_audit)
            if result is not None:
                results.append(result)
            continue
        if (args.resume or args.partial) and finished:
            results.append(cached["result"])
            say(f"seed {seed}: reused {cache}")
            continue
        result = run_seed(
            seed,
            stream,
            args.work / f"seed-{seed}",
            overrides,
            n_audit,
            say,
            joint=not args.no_joint,
        )
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "result": result}, indent=1))
        results.append(result)
    seeds = [r["seed"] for r in results]
    metrics = [seed_metrics(r) for r in results]
    report = {
        "stream": [f"{d}:{n}" for d, n in stream],
        "seeds": seeds,
        "audit_images_per_domain": n_audit,
        "settings": {"overrides": overrides},
        "torch_threads": torch.get_num_threads(),
        "goals": goals(metrics),
        "goal_thresholds": GOALS,
        "spread": summarise(metrics),
        "headline": {
            f"seed {m_seed}": (
                f"first arrival promoted {m['first_arrival_promoted']:.0%}, worst audit change "
                f"{100 * (m['worst_audit_change_on_learnt'] or 0):+.1f} pts, audit mean {m['final_audit_mean']:.3f}"
                + (
                    ""
                    if m["mean_vs_joint"] is None
                    else f", {m['mean_vs_joint']:.0%} of joint at {m['images_vs_joint']:.0%} of its images"
                )
            )
            for m_seed, m in zip(seeds, metrics)
        },
        "per_seed": [
            {
                **m,
                "partial": r.get("partial", False),
                "joint_images_computed": r.get("joint_images_computed", False),
                "final_audit": r["final_audit"],
                "joint_audit": r["joint_audit"],
                "loop_images": r["loop_images"],
                "joint_images": r["joint_images"],
                "retrain_images": r.get("retrain_images"),
                "loop_s": r["loop_s"],
                "joint_s": r["joint_s"],
            }
            for m, r in zip(metrics, results)
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{args.name}_quick" if args.quick else args.name
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1))
    plot(args.out / f"{name}.png", results, list(dict.fromkeys(d for d, _ in stream)))
    for seed, m in zip(seeds, metrics):
        print(
            f"\nseed {seed}: "
            + " | ".join(
                f"{x['batch']} "
                + (
                    "PROMOTED"
                    if x["promoted"]
                    else ("covered, " if x["covered"] else "") + "no update"
                    if not x["updated"]
                    else "refused: " + (x["first_failed"] or "")[:60]
                )
                + f" gain {x['target_gain']} worst learnt {x['worst_learnt_change']} audit "
                f"{x['worst_audit_change_on_learnt']}"
                + (
                    f" (refused candidate: {x['refused_candidate_on_audit']})"
                    if x["refused_candidate_on_audit"]
                    else ""
                )
                for x in m["shifted"]
            )
        )
    print(f"\nspread over seeds: {json.dumps(report['spread'])}\ngoals: {report['goals']}")


if __name__ == "__main__":
    main()
