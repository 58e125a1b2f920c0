"""Which images to label: each `labels.strategy` at several budgets, on one shifted domain.

Per seed: a base champion is trained (base:160, split like the loop splits a batch) with a
replay buffer of its training split; a shifted domain arrives as an unlabelled batch of
`--pool` images (>= 200; the generator's masks are the oracle a labeller would draw). For
every budget (a share of the pool) and every rule, the rule picks the images
(`segloop.labels.select` over the champion's view, `champion_uncertainty`: what the loop's
label request uses), their oracle masks are split like a labelled batch, and the same update
recipe as the loop's (`segloop.continual.update` from the champion, validation on the new
domain + base, the base replay buffer) is trained. Every model is scored on audit sets (64
images per domain, never picked, trained or validated on): target-domain gain and base change.

    python benchmarks/active_labels.py --seeds 0 1 2                # the full run
    python benchmarks/active_labels.py --quick                      # a smoke run: tiny models, one seed
    python benchmarks/active_labels.py --seeds 1 --budgets 0.25 --set continual.interpolate=false  # one cell, changed

Writes reports/bench/active_labels[_quick].json (per seed, rule and budget) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from loop_stream import BENCH, QUICK, audit_scores, make_audit, seed_settings  # noqa: E402  (benchmarks/ on sys.path)

from segloop.checkpoint import load_checkpoint
from segloop.config import LabelSettings
from segloop.continual import update
from segloop.data.files import IMAGES, MASKS
from segloop.data.replay import update_buffer
from segloop.data.split import split_dataset
from segloop.data.synthetic import generate
from segloop.labels import STRATEGIES, champion_uncertainty, select
from segloop.train import train

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = [0.1, 0.25, 0.5]
ALL = "all"  # the reference row: every image of the batch labelled


def labelled_subset(pool: Path, stems: list[str], out: Path) -> Path:
    """The picked images with their oracle masks, as a dataset folder."""
    for sub in (IMAGES, MASKS):
        (out / sub).mkdir(parents=True)
    for stem in stems:
        shutil.copy2(pool / IMAGES / f"{stem}.png", out / IMAGES / f"{stem}.png")
        shutil.copy2(pool / MASKS / f"{stem}.png", out / MASKS / f"{stem}.png")
    return out


def run_seed(seed: int, root: Path, domain: str, n_pool: int, budgets: list[float], bench: list[str], log) -> dict:
    settings = seed_settings(root, seed, [*bench, "tracking.enabled=false"])
    size = tuple(settings.generate.image_size)
    audit = make_audit(root / "audit", ["base", domain], 64, seed, size)
    base = root / "b-base" / "split"
    if not (base / "train").is_dir():
        generate(root / "b-base" / "raw", "base", 160, seed * 1000, size)
        split_dataset(root / "b-base" / "raw", base, settings.split)
    parent = root / "champion" / "best.pt"
    if not parent.exists():
        train(settings, [base / "train"], parent.parent, [base / "val"], log=lambda _: None)
    replay = root / "replay"
    if not replay.is_dir():
        update_buffer(None, base / "train", "b-base", settings.continual.replay.size, 0, replay)
    pool = root / "pool"
    if not (pool / IMAGES).is_dir():
        generate(pool, domain, n_pool, seed * 1000 + 2, size)
    u, _ = champion_uncertainty(parent, pool, settings, root / ".cache")
    before = audit_scores(parent, audit, settings)
    log(f"seed {seed} champion audit {before}")
    out: dict = {"seed": seed, "champion": before, "runs": {}}
    # every rule at every budget, then the reference: the whole batch labelled (one update)
    cells = [(b, s) for b in budgets for s in STRATEGIES] + [(1.0, ALL)]
    for budget, strategy in cells:
        if strategy == ALL:
            chosen = list(u.stems)
        else:
            chosen = [u.stems[i] for i in select(u, LabelSettings(budget=budget, strategy=strategy, seed=seed))]
        work = root / "runs" / f"{strategy}-{budget}"
        shutil.rmtree(work, ignore_errors=True)
        split = work / "split"
        split_dataset(labelled_subset(pool, chosen, work / "labelled"), split, settings.split)
        vals = [split / "val", base / "val"]
        r = update(settings, parent, [split / "train"], work / "model", vals, replay=replay, log=lambda _: None)
        after = audit_scores(work / "model" / "best.pt", audit, settings)
        kept = load_checkpoint(work / "model" / "best.pt")
        shutil.rmtree(work)  # its checkpoints: about 250 MB per run, and only the scores are kept
        rec = {
            "labelled": len(chosen),
            "gain": round(after[domain] - before[domain], 4),
            "base": round(after["base"] - before["base"], 4),
            "images_seen": r.images_seen,
            # what the update kept: its epoch, the WiSE-FT alpha, and whether it passed the
            # gate's rules on validation (score >= 1: continual.gate_score) or only came nearest
            "epoch": kept.get("epoch"),
            "alpha": kept.get("wise_alpha", 1.0),
            "val_feasible": kept.get("val_score", r.best_miou) >= 1.0,
        }
        out["runs"].setdefault(strategy, {})[str(budget)] = rec
        log(
            f"seed {seed} {strategy:>8} budget {budget:4.2f} ({len(chosen):3d} labelled): "
            f"{domain} {100 * rec['gain']:+5.1f} pts, base {100 * rec['base']:+5.1f} pts, kept epoch "
            f"{rec['epoch']} alpha {rec['alpha']:.1f}{'' if rec['val_feasible'] else ' (failed the rules on val)'}"
        )
    return out


def table(results: list[dict], domain: str) -> list[str]:
    """Gain per rule and budget: mean (min..max) over seeds, and the mean as a share of the
    all-labelled update's; how many of the cell's updates failed the gate's rules on validation."""
    budgets = list(results[0]["runs"]["random"])
    every = np.array([r["runs"][ALL]["1.0"]["gain"] for r in results]) * 100
    lines = [
        f"| rule | {' | '.join(f'{domain} gain @ {float(b):.0%}, pts (share of all)' for b in budgets)} "
        "| base change (mean), pts | failed rules on val |",
        "|---|" + "---|" * (len(budgets) + 2),
    ]
    for strategy in [s for s in results[0]["runs"] if s != ALL]:
        cells = []
        for b in budgets:
            g = np.array([r["runs"][strategy][b]["gain"] for r in results]) * 100
            cells.append(f"{g.mean():+.1f} ({g.min():+.1f}..{g.max():+.1f}; {g.mean() / every.mean():.0%})")
        runs = [r["runs"][strategy][b] for r in results for b in budgets]
        base = np.mean([x["base"] for x in runs]) * 100
        failed = sum(not x.get("val_feasible", True) for x in runs)
        lines.append(f"| {strategy} | {' | '.join(cells)} | {base:+.1f} | {failed}/{len(runs)} |")
    alls = [r["runs"][ALL]["1.0"] for r in results]
    base = np.mean([x["base"] for x in alls]) * 100
    failed = sum(not x.get("val_feasible", True) for x in alls)
    lines.append(
        f"| all labelled ({alls[0]['labelled']} images) | {every.mean():+.1f} ({every.min():+.1f}..{every.max():+.1f}) "
        f"|{' |' * (len(budgets) - 1)} {base:+.1f} | {failed}/{len(alls)} |"
    )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--domain", default="fog")
    p.add_argument("--pool", type=int, default=200, help="images in the unlabelled batch (at least 200)")
    p.add_argument("--budgets", type=float, nargs="+", default=BUDGETS)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny models, seed 0, budgets 10%% and 25%%")
    p.add_argument("--out", type=Path, default=ROOT / "reports/bench", help="writes active_labels[_quick].json there")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)")
    args = p.parse_args()
    if args.pool < 200:
        p.error(f"--pool {args.pool}: the unlabelled batch needs at least 200 images")
    torch.set_num_threads(args.threads)
    bench = [*([*QUICK, "train.iters_per_epoch=4"] if args.quick else BENCH), *args.set]
    seeds, budgets = ([0], [0.1, 0.25]) if args.quick else (args.seeds, args.budgets)
    name = "active_labels_quick" if args.quick else "active_labels"
    work = args.out / f"{name}_work"
    results = [
        run_seed(s, work / f"seed-{s}", args.domain, args.pool, budgets, bench, lambda x: print(x, flush=True))
        for s in seeds
    ]
    lines = table(results, args.domain)
    out = args.out / f"{name}.json"
    payload = {"quick": args.quick, "seeds": seeds, "budgets": budgets, "pool": args.pool, "bench": bench}
    out.write_text(json.dumps({**payload, "domain": args.domain, "results": results, "table": lines}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
