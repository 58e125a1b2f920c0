"""Benchmark of segloop's drift detector on synthetic data (run by `make bench`).

What it measures, with the decision rule and thresholds of params.yaml (`drift.*`):
- false-alarm rate: `base` batches of fresh seeds against the reference;
- detection rate per shifted domain at full, half and quarter strength;
- the same two with image statistics only (no champion), to show what the model adds;
- time to featurise + decide (Evidently report included) for 1,000 images of 256x256.

Setup: a champion is trained for about a minute on `base` images (or `--model` is used),
the reference is a seeded sample of its training folder (`build_reference`), every
trial is a disjoint batch of fresh scenes (batch t of every condition shares its 64
scenes, so conditions differ only by the shift). Trials use the exact per-column KS
call Evidently makes (scipy `ks_2samp`, checked against Evidently in tests/test_drift.py)
because an Evidently report per trial would take hours; the timing run builds the real
report. Writes reports/bench/drift.json and drift.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from segloop.config import load_settings  # noqa: E402
from segloop.data.synthetic import apply_domain, generate, make_scene  # noqa: E402
from segloop.drift.decision import column_pvalues, decide, table_pvalues_and_mmd  # noqa: E402
from segloop.drift.detect import detect_drift  # noqa: E402
from segloop.drift.features import FeatureTable, featurise_arrays, featurise_folder, load_champion  # noqa: E402
from segloop.drift.reference import build_reference  # noqa: E402

SHIFTED = ("lowlight", "fog", "noise", "colorshift")
TRAIN_SEED, BASE_SEED, SHIFT_SEED, TIMING_SEED = 100, 1000, 2000, 3000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_champion(work: Path, params: Path, size: int, n_train: int, minutes: float) -> Path:
    from segloop.train import train

    generate(work / "train", "base", n_train, TRAIN_SEED, (size, size))
    generate(work / "val", "base", 32, TRAIN_SEED + 1, (size, size))
    settings = load_settings(
        params,
        [
            f"train.max_minutes={minutes}",
            "train.epochs=50",
            "train.num_workers=0",
            "train.patience=50",
        ],
    )
    result = train(settings, work / "train", work / "champion", work / "val", log=lambda line: None)
    log(
        f"champion trained: val mIoU {result.best_miou:.3f}, {result.epochs} epochs, {result.seconds:.0f} s "
        f"({result.stopped})"
    )
    return work / "champion" / "best.pt"


def scenes(seed: int, n: int, size: int) -> list[np.ndarray]:
    """Clean scenes (H, W, 3) float in [0, 1]; `shifted` turns them into uint8 images."""
    return [make_scene(np.random.default_rng([seed, i, 0]), (size, size))[0] for i in range(n)]


def shifted(images: list[np.ndarray], domain: str, strength: float, seed: int) -> list[np.ndarray]:
    return [apply_domain(img, domain, np.random.default_rng([seed, i, 1]), strength) for i, img in enumerate(images)]


def featurise(images: list[np.ndarray], champion, crop, batch: int) -> FeatureTable:
    cols, embs = {}, []
    for start in range(0, len(images), batch):
        c, e = featurise_arrays(images[start : start + batch], champion, crop)
        for k, v in c.items():
            cols.setdefault(k, []).append(v)
        if e is not None:
            embs.append(e)
    return FeatureTable(
        [str(i) for i in range(len(images))],
        {k: np.concatenate(v) for k, v in cols.items()},
        np.concatenate(embs) if embs else None,
        champion.model_id if champion else None,
    )


def subset(table: FeatureTable, idx: np.ndarray) -> FeatureTable:
    emb = None if table.embeddings is None else table.embeddings[idx]
    return FeatureTable(
        [table.stems[i] for i in idx], {k: v[idx] for k, v in table.columns.items()}, emb, table.model_id
    )


def stats_only(table: FeatureTable, stat_columns: list[str]) -> FeatureTable:
    return FeatureTable(table.stems, {k: table.columns[k] for k in stat_columns}, None, None)


def trial(ref: FeatureTable, cur: FeatureTable, cfg) -> dict:
    ref_cols, cur_cols, mmd = table_pvalues_and_mmd(ref, cur, cfg)
    pvalues = column_pvalues(ref_cols, cur_cols)
    d = decide(pvalues, None if mmd is None else mmd["p_value"], cfg)
    p = np.array(list(pvalues.values()))
    return {
        "drift": d.drift,
        "score": d.score,
        "drifted": d.drifted_features,
        # Rules we did not choose, on the same p-values, for comparison: any column at
        # p < 0.05 (no correction), and Evidently's preset default (half the columns at 0.05).
        "any_005": bool((p < 0.05).any()),
        "evidently_default": bool((p < 0.05).mean() >= 0.5),
    }


def run_condition(ref, ref_stats, table, n_trials, batch, cfg, stat_columns) -> dict:
    full, stats, top, any005, evd = [], [], {}, [], []
    for t in range(n_trials):
        idx = np.arange(t * batch, (t + 1) * batch)
        r = trial(ref, subset(table, idx), cfg)
        full.append(r["drift"])
        any005.append(r["any_005"])
        evd.append(r["evidently_default"])
        for f in r["drifted"][:3]:
            top[f] = top.get(f, 0) + 1
        stats.append(trial(ref_stats, stats_only(subset(table, idx), stat_columns), cfg)["drift"])
    return {
        "rate": float(np.mean(full)),
        "rate_stats_only": float(np.mean(stats)),
        "rate_uncorrected_any_p005": float(np.mean(any005)),
        "rate_evidently_default_share05": float(np.mean(evd)),
        "trials": n_trials,
        "top_features": dict(sorted(top.items(), key=lambda kv: -kv[1])[:5]),
    }


def timing(work: Path, ref_dir: Path, champion, settings, cache: Path, n: int, size: int) -> dict:
    """Featurise + decide (real Evidently report, reference features cached) for n images."""
    folder = work / "timing"
    generate(folder, "base", n, TIMING_SEED, (size, size))
    shutil.rmtree(folder / "masks")  # unlabelled batch: time the drift check, not an evaluation
    torch.set_num_threads(torch.get_num_threads())
    t0 = time.perf_counter()
    table = featurise_folder(
        folder, 3, champion, None, settings.drift.model_crop, settings.drift.batch_size, progress=False
    )
    featurise_s = time.perf_counter() - t0
    assert len(table) == n
    t0 = time.perf_counter()
    record = detect_drift(
        ref_dir, folder, work / "timing_out", settings.drift, 3, champion, cache, settings.eval, progress=False
    )
    total_s = time.perf_counter() - t0
    return {
        "n_images": n,
        "image_size": [size, size],
        "featurise_s": round(featurise_s, 2),
        "featurise_and_decide_s": round(total_s, 2),
        "images_per_s": round(n / total_s, 1),
        "decision_on_timing_batch": record["drift"],
        # The CPU is shared: the 1-minute load average says how contended the timing was.
        "load_average_1min": round(os.getloadavg()[0], 2),
        "note": "featurise_and_decide_s = one `detect_drift` call: decode + hash + features of the batch, "
        "reference from cache, Evidently report, MMD, drift.json + drift.html",
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, title in (
        (axes[0], "rate", "champion + image statistics"),
        (axes[1], "rate_stats_only", "image statistics only"),
    ):
        for domain, by_strength in result["detection"].items():
            xs = sorted(float(s) for s in by_strength)
            ax.plot(
                [0.0] + xs,
                [result["false_alarm"][key]] + [by_strength[str(x)][key] for x in xs],
                marker="o",
                label=domain,
            )
        ax.axhline(0.95, color="grey", ls="--", lw=0.8)
        ax.axhline(0.05, color="grey", ls=":", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("shift strength (0 = same domain: false-alarm rate)")
    axes[0].set_ylabel(f"share of batches flagged ({result['trials']} trials, {result['batch']} images)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table_md(result: dict) -> str:
    strengths = result["strengths"]
    head = "| condition | " + " | ".join(f"strength {s}" for s in strengths) + " |"
    lines = [head, "|---" * (1 + len(strengths)) + "|"]
    fa = result["false_alarm"]
    lines.append(
        f"| base, fresh seeds (false alarms, {fa['trials']} trials) | {fa['rate']:.0%} (stats only "
        f"{fa['rate_stats_only']:.0%}) |" + " |" * (len(strengths) - 1)
    )
    for domain, by in result["detection"].items() if strengths else ():
        cells = [f"{by[str(s)]['rate']:.0%} ({by[str(s)]['rate_stats_only']:.0%})" for s in strengths]
        lines.append(f"| {domain} (detection) | " + " | ".join(cells) + " |")
    if not strengths:
        return "\n".join(lines)
    mild = str(min(strengths))
    lines += [
        "",
        f"Other rules on the same p-values (false alarms | mean detection at strength {mild}):",
        "",
        "| rule | false alarms | detection at " + mild + " |",
        "|---|---|---|",
    ]
    for key, name in (
        ("rate", "segloop: weighted Bonferroni, alpha 0.01 (chosen)"),
        ("rate_uncorrected_any_p005", "any column p < 0.05, uncorrected"),
        ("rate_evidently_default_share05", "Evidently preset default: >= 50 % of columns at p < 0.05"),
    ):
        det = np.mean([by[mild][key] for by in result["detection"].values()])
        lines.append(f"| {name} | {fa[key]:.0%} | {det:.0%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    ap.add_argument("--model", type=Path, help="champion checkpoint (default: train one for --train-minutes)")
    ap.add_argument("--train-dir", type=Path, help="the --model's training folder (needed with --model)")
    ap.add_argument("--train-minutes", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=128, help="side of the trial images")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reference", type=int, default=256)
    ap.add_argument("--trials", type=int, default=20, help="trials per shifted condition")
    ap.add_argument("--base-trials", type=int, default=60, help="same-domain trials (false-alarm rate)")
    ap.add_argument("--strengths", type=float, nargs="*", default=[1.0, 0.5, 0.25, 0.1], help="none: false alarms only")
    ap.add_argument("--timing-n", type=int, default=1000, help="0: skip the timing")
    ap.add_argument("--timing-size", type=int, default=256)
    args = ap.parse_args(argv)
    settings = load_settings(args.params)
    cfg = settings.drift
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="segloop-bench-drift-") as tmp:
        work = Path(tmp)
        if args.model is None:
            model_path = train_champion(work, args.params, args.size, max(args.reference + 64, 320), args.train_minutes)
            train_dir, champion_source = (
                work / "train",
                f"trained here for {args.train_minutes} min on base, seed {TRAIN_SEED}",
            )
        else:
            if args.train_dir is None:
                ap.error("--model needs --train-dir (its training folder, to sample the reference from)")
            model_path, train_dir, champion_source = args.model, args.train_dir, str(args.model)
        champion = load_champion(model_path)
        cache = work / "cache"
        build_reference(
            train_dir, args.reference, cfg.reference_seed, work / "reference", champion.model_id, str(model_path)
        )
        ref = featurise_folder(work / "reference", 3, champion, cache, cfg.model_crop, cfg.batch_size, progress=False)
        stat_columns = [c for c in ref.columns if not c.startswith("area_") and c not in ("confidence", "pred_entropy")]
        ref_stats = stats_only(ref, stat_columns)
        log(f"reference: {len(ref)} images, {len(ref.columns)} columns + embeddings {ref.embeddings.shape}")

        fresh_base = shifted(scenes(BASE_SEED, args.base_trials * args.batch, args.size), "base", 1.0, BASE_SEED)
        base = featurise(fresh_base, champion, cfg.model_crop, cfg.batch_size)
        false_alarm = run_condition(ref, ref_stats, base, args.base_trials, args.batch, cfg, stat_columns)
        log(
            f"false alarms: {false_alarm['rate']:.1%} ({args.base_trials} trials), stats only "
            f"{false_alarm['rate_stats_only']:.1%}"
        )

        clean = scenes(SHIFT_SEED, args.trials * args.batch, args.size)
        detection: dict[str, dict] = {}
        for domain in SHIFTED:
            detection[domain] = {}
            for s in args.strengths:
                table = featurise(shifted(clean, domain, s, SHIFT_SEED), champion, cfg.model_crop, cfg.batch_size)
                detection[domain][str(s)] = run_condition(
                    ref, ref_stats, table, args.trials, args.batch, cfg, stat_columns
                )
                r = detection[domain][str(s)]
                log(
                    f"{domain} x{s}: detected {r['rate']:.0%} (stats only {r['rate_stats_only']:.0%}); top "
                    f"{list(r['top_features'])[:3]}"
                )

        t = None
        if args.timing_n:
            t = timing(work, work / "reference", champion, settings, cache, args.timing_n, args.timing_size)
            log(
                f"timing: {t['n_images']} images {args.timing_size}px: featurise {t['featurise_s']} s, featurise + "
                f"decide {t['featurise_and_decide_s']} s"
            )

    full = [detection[d][str(1.0)]["rate"] for d in SHIFTED] if 1.0 in args.strengths else []
    result = {
        "settings": cfg.model_dump(mode="json"),
        "champion": {"source": champion_source, "model_id": champion.model_id, "val_miou": champion.held_out_miou},
        "reference": args.reference,
        "batch": args.batch,
        "trials": args.trials,
        "trial_image_size": [args.size, args.size],
        "strengths": args.strengths,
        "false_alarm": false_alarm,
        "detection": detection,
        "timing": t,
        "goals": {
            "false_alarm_le_5pct": false_alarm["rate"] <= 0.05,
            "detection_ge_95pct_full_strength": min(full) >= 0.95 if full else None,
            "1000_images_le_30s": None if t is None else t["featurise_and_decide_s"] * 1000 / t["n_images"] <= 30.0,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }
    (args.out / "drift.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "drift.png")
    print("\nDetection rate (image statistics only in brackets):\n")
    print(table_md(result))
    print(
        f"\ngoals: {result['goals']}\nwrote {args.out / 'drift.json'}, {args.out / 'drift.png'} in {result['wall_s']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
