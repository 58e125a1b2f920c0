"""Update levers: one continual update of a base champion, each lever against the same parent.

Per seed: a base champion is trained (the loop-stream benchmark's bootstrap: base:160 split
70/10/20), then for every lever and every shifted domain the update the loop would run
(`segloop.continual.update`: the domain's 96-image batch split the same way, replay buffer
of the base training split, validation on the new domain + base) is trained from that
champion. Every model is scored on audit sets (64 images per domain, never seen in
training, validation or selection). Per lever: target-domain gain, base change, and
whether the update would pass the gate's rules measured on the audit sets (gain >=
min_gain, base loss <= max_forgetting). Much cheaper than benchmarks/loop_stream.py (one
update per lever instead of a stream), so levers are compared here and confirmed there.

    python benchmarks/update_levers.py --seeds 0 1 2 --domains fog lowlight \\
        --lever params= --lever "lwf_all=continual.lwf.replay_only=false;continual.lr=0.0005"

`--lever NAME=overrides` (`;`-separated, applied to params.yaml + the loop-stream settings);
without any, LEVERS below: the defaults against the update recipe before them and a margin.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from loop_stream import BENCH, audit_scores, make_audit, seed_settings  # noqa: E402  (benchmarks/ is on sys.path)

from segloop.continual import update
from segloop.data.replay import update_buffer
from segloop.data.split import split_dataset
from segloop.data.synthetic import generate
from segloop.train import train

ROOT = Path(__file__).resolve().parents[1]
LEVERS = {
    "params": [],  # params.yaml as it is: distil replayed samples only, lr 2e-4
    "before": ["continual.lwf.replay_only=false", "continual.lr=0.0005"],  # distil every sample, lr 5e-4
    "margin_0.01": ["continual.select_margin=0.01"],  # selection stricter than the gate on validation
}


def batch(root: Path, domain: str, n: int, seed: int, size, settings) -> Path:
    """A batch as the loop would split it (split.* settings): root/split/{train,val,test}."""
    if not (root / "split" / "train").is_dir():
        generate(root / "raw", domain, n, seed, size)
        split_dataset(root / "raw", root / "split", settings.split)
    return root / "split"


def run_seed(
    seed: int, root: Path, domains: list[str], levers: dict[str, list[str]], common: list[str], others, log=print
) -> dict:
    """`common`: overrides of the champion and every lever; `others`: audit domains scored besides the updated ones."""
    common = [*BENCH, "tracking.enabled=false", *common]
    settings = seed_settings(root, seed, common)
    size = tuple(settings.generate.image_size)
    audit = make_audit(root / "audit", list(dict.fromkeys(["base", *others, *domains])), 64, seed, size)
    base = batch(root / "b-base", "base", 160, seed * 1000, size, settings)
    parent = root / "champion" / "best.pt"
    if not parent.exists():
        train(settings, [base / "train"], parent.parent, [base / "val"], log=lambda _: None)
    replay = root / "replay"
    if not replay.is_dir():
        update_buffer(None, base / "train", "b-base", settings.continual.replay.size, 0, replay)
    before = audit_scores(parent, audit, settings)
    log(f"seed {seed} champion audit {before}")
    out: dict = {"seed": seed, "champion": before, "updates": {}}
    for k, domain in enumerate(domains):
        new = batch(root / f"b-{domain}", domain, 96, seed * 1000 + 2 + k, size, settings)
        for name, overrides in levers.items():
            s = seed_settings(root, seed, [*common, *overrides])
            dest = root / "updates" / name / domain
            shutil.rmtree(dest, ignore_errors=True)
            r = update(s, parent, [new / "train"], dest, [new / "val", base / "val"], replay=replay, log=lambda _: None)
            after = audit_scores(dest / "best.pt", audit, settings)
            rec = {
                "gain": round(after[domain] - before[domain], 4),
                "base": round(after["base"] - before["base"], 4),
                # every other audit domain (e.g. one the champion covers untrained): what the gate protects too
                "worst_other": round(min(after[d] - before[d] for d in audit if d != domain), 4),
                "images": r.images_seen,
                "alpha": torch.load(dest / "best.pt", weights_only=True).get("wise_alpha", 1.0),
            }
            out["updates"].setdefault(name, {})[domain] = rec
            log(
                f"seed {seed} {name:>12} {domain:>10}: gain {100 * rec['gain']:+5.1f}  base {100 * rec['base']:+5.1f} "
                f"worst other {100 * rec['worst_other']:+5.1f} pts"
                f"  alpha {rec['alpha']}  images {rec['images']}"
            )
    return out


def table(results: list[dict], gate) -> list[str]:
    levers = list(results[0]["updates"])
    lines = [
        "| lever | domain | target gain, pts (min..max) | base change, pts (min..max) | worst other domain, pts "
        "(min..max) | passes the gate on audit | images |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in levers:
        for domain in results[0]["updates"][name]:
            rs = [r["updates"][name][domain] for r in results]
            g, b = np.array([x["gain"] for x in rs]) * 100, np.array([x["base"] for x in rs]) * 100
            w = np.array([x.get("worst_other", x["base"]) for x in rs]) * 100
            ok = sum(x["gain"] >= gate.min_gain and x.get("worst_other", x["base"]) >= -gate.max_forgetting for x in rs)
            lines.append(
                f"| {name} | {domain} | {g.mean():+.1f} ({g.min():+.1f}..{g.max():+.1f}) | {b.mean():+.1f} "
                f"({b.min():+.1f}..{b.max():+.1f}) | {w.mean():+.1f} ({w.min():+.1f}..{w.max():+.1f}) "
                f"| {ok}/{len(rs)} | {int(np.mean([x['images'] for x in rs]))} |"
            )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--domains", nargs="+", default=["fog", "lowlight"])
    p.add_argument("--others", nargs="*", default=[], help="audit domains scored besides base and the updated ones")
    p.add_argument("--set", action="append", default=[], help="override of the champion and every lever")
    p.add_argument(
        "--lever", action="append", default=[], help="NAME=override[;override...] (NAME= : params as they are)"
    )
    p.add_argument("--work", type=Path, default=ROOT / "reports/bench/update_levers_work")
    p.add_argument("--out", type=Path, default=ROOT / "reports/bench/update_levers.json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="reuse each seed's finished result")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    levers = {n: [o for o in rest.split(";") if o] for n, rest in (lv.split("=", 1) for lv in args.lever)} or LEVERS
    results = []
    for seed in args.seeds:
        cache = args.work / f"seed-{seed}.json"
        if args.resume and cache.is_file() and json.loads(cache.read_text())["levers"] == [levers, args.set]:
            results.append(json.loads(cache.read_text())["result"])
            continue
        say = lambda line: print(line, flush=True)  # noqa: E731
        result = run_seed(seed, args.work / f"seed-{seed}", args.domains, levers, args.set, args.others, say)
        cache.write_text(json.dumps({"levers": [levers, args.set], "result": result}, indent=1))
        results.append(result)
    gate = seed_settings(args.work, 0, BENCH).registry.gate
    lines = table(results, gate)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"levers": levers, "seeds": args.seeds, "bench": BENCH, "results": results, "table": lines}, indent=1
        )
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
