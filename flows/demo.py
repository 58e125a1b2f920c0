"""`make demo`: the continual loop on synthetic data, batch by batch, through `monitor_flow`.

Each batch of the stream is generated into the loop's incoming folder (new scenes every
batch: a seed per batch) and one `monitor_flow` run picks it up, as a scheduled run
would. The first batch bootstraps the champion. Then a shifted batch arrives without masks
(as serving's capture hands them in): drift -> label request; the demo stands in for the
person who labels it (the generator's true masks of the requested images, dropped into
labels/done/<batch>/) and the next monitor run imports them: update -> gate -> promotion.
A re-run continues where the last one stopped: batches already processed are neither
regenerated nor processed again. Writes reports/demo/summary.json, summary.md and the
plots; the runs are in the project's MLflow store (`make ui`), Prefect database
(`make prefect-ui`) and the drift checks over time in the Evidently workspace (`make evidently-ui`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from flows.monitor import monitor_flow
from segloop import loop
from segloop.config import load_settings
from segloop.data.synthetic import generate, parse_stream
from segloop.labels import LabelRequest
from segloop.loop import BATCH_INFO, READY, Workspace

# Lowlight and fog are shifts a champion trained as `make demo` trains it already half-knows
# (small updates); noise is one it does not (docs/loop_stream.md: 0.5-0.6 mIoU before its update).
# A second noise batch: a refused first one (its update trades fog for noise) is retried with
# both batches' data (its pool) and both batches' held-out splits.
STREAM = "base:240,base:96,lowlight:120,fog:120,noise:120,base:96,noise:120"
# Arrives after the stream, without masks: a domain the stream never showed.
UNLABELLED = "colorshift:160"
DEPLOYMENT = "segloop-demo"  # --pool: the demo's own deployment, next to the scheduled one
KEYS = ("batch", "drift", "updated", "promoted", "champion_version", "miou_before", "miou_after")


def arrive(ws: Workspace, i: int, domain: str, n: int, settings, truth: Path | None = None) -> Path:
    """Batch i lands in incoming/ (once: an existing or processed batch is left as it is).
    With `truth`: unlabelled, its masks kept apart in truth/<batch>/ (what a person would draw)."""

    folder = ws.incoming / f"{i:02d}-{domain}"
    if not folder.exists() and not ws.marker(folder.name).exists():
        g = settings.generate
        tmp = folder.with_name(f".{folder.name}.tmp")  # complete before the monitor can see it
        generate(tmp, domain, n, 1000 + i, tuple(g.image_size), g.strength)
        info: dict = {"domain": domain}
        if truth is not None:
            shutil.rmtree(truth / folder.name, ignore_errors=True)
            truth.mkdir(parents=True, exist_ok=True)
            shutil.move(str(tmp / "masks"), truth / folder.name)
            info["labelled"] = False
        (tmp / BATCH_INFO).write_text(json.dumps(info))
        tmp.rename(folder)
    return folder


def label_as_a_person(ws: Workspace, batch: str, truth: Path) -> int | None:
    """The demo standing in for a person: the generator's true masks of the images the batch's
    label request asks for, dropped into labels/done/<batch>/ (masks/, then READY, written last).
    Returns how many; None when no request of the batch waits (it did not drift, or its labels
    are in already)."""
    try:
        rec = loop.awaiting_labels(ws, batch)
    except ValueError:
        return None
    assert rec.label_request is not None  # awaiting_labels checked it
    request = LabelRequest.read(ws.root / rec.label_request)
    drop = ws.labels_drop(batch)
    (drop / "masks").mkdir(parents=True, exist_ok=True)
    for image in request.images:
        shutil.copy2(truth / batch / f"{image['stem']}.png", drop / "masks" / f"{image['stem']}.png")
    (drop / READY).write_text("")
    return len(request.images)


def monitor_runs(params: str, overrides: list[str], pool: str | None) -> Callable[[], object]:
    """How the demo starts each monitor run and waits for it: `monitor_flow` in this process
    (Prefect's ephemeral mode, or the server PREFECT_API_URL names), or with `pool` a run of
    the deployment DEPLOYMENT on that work pool, which one of its workers picks up."""
    if pool is None:
        return lambda: monitor_flow(params, overrides)
    from prefect.deployments import run_deployment

    from flows.deploy import deploy_to_pool

    parameters = {"params": str(Path(params).resolve()), "overrides": overrides}
    deploy_to_pool(DEPLOYMENT, pool, parameters, description="segloop demo: the loop's monitor runs on the pool")
    print(f"deployment monitor-flow/{DEPLOYMENT} on work pool {pool}: its workers run the demo's monitor runs")

    def run() -> None:
        flow_run = run_deployment(f"monitor-flow/{DEPLOYMENT}", as_subflow=False)  # waits for the end
        if flow_run.state is None or not flow_run.state.is_completed():
            state = flow_run.state.name if flow_run.state else "no state"
            raise RuntimeError(f"monitor run {flow_run.name} ({flow_run.id}) ended {state}: see the Prefect UI")
        print(f"monitor run {flow_run.name} completed on a worker of pool {pool}", flush=True)

    return run


def unlabelled_round(ws: Workspace, i: int, spec: str, settings, run: Callable[[], object], out: Path) -> None:
    """A shifted batch without masks: monitor run (drift -> label request), the demo's stand-in
    labels, monitor run (labels imported -> update -> gate -> promotion)."""
    domain, n = parse_stream(spec)[0]
    truth = out / "truth"
    batch = arrive(ws, i, domain, n, settings, truth)
    print(f"\n=== batch {batch.name} arrived: {n} {domain} images without masks; monitor run ===", flush=True)
    run()
    asked = label_as_a_person(ws, batch.name, truth)
    if asked is None:
        print(f"\nbatch {batch.name}: no label request waiting (no drift, or labelled already): nothing to label")
        return
    print(
        f"\n=== labels for {batch.name}: the demo stands in for a person here, handing in the generator's true "
        f"masks of the {asked} requested images ({ws.labels_drop(batch.name)}); monitor run ===",
        flush=True,
    )
    run()


def step_records(ws: Workspace) -> list[dict]:
    """Every step record in order: each batch's, then the step of its imported labels if any."""
    records = []
    for path in sorted((ws.root / "processed").glob("*.json")):
        records.append(json.loads(path.read_text()))
        if ws.labelled_marker(path.stem).is_file():
            records.append(json.loads(ws.labelled_marker(path.stem).read_text()))
    return records


def fmt(miou: dict) -> str:
    return " ".join(f"{d}={v:.3f}" for d, v in miou.items()) or "-"


def versus(r: dict) -> str:
    """Each domain as champion -> candidate (held-out mIoU), so a refusal shows what the candidate
    reached; domains the champion never learnt (reported, not protected by the gate) marked with *."""
    cand, champ, learnt = r.get("candidate_miou") or {}, r["miou_before"], r.get("learnt") or []
    if not cand or not champ:
        return "-"
    return " ".join(
        f"{d}{'' if d in learnt or d == r['domain'] or not learnt else '*'} {champ[d]:.3f}->{v:.3f}"
        for d, v in cand.items()
    )


def table(records: list[dict]) -> str:
    lines = [
        "| batch | drift (score) | update | gate | champion | mIoU before | champion -> candidate | mIoU after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        d, status = r["drift"], r.get("status")
        drift = (
            "bootstrap"
            if d is None
            else "yes (no reference)"
            if d["score"] is None
            else f"{'yes' if d['drift'] else 'no'} ({d['score']:.2g}{', perf' if d['performance_drift'] else ''})"
        )
        gate = (
            (
                "promoted"
                if r["promoted"]
                else "rejected: " + next((x for x in r["reasons"] if x.startswith("FAIL")), "")
            )
            if r["updated"]
            else "-"
        )
        update = (
            f"v{r['candidate_version']}"
            if r["updated"]
            else "label request"
            if status == "awaiting-labels"
            else "no: covered, pooled"  # continual.covered_drop
            if r.get("kept_in_pool")
            else "no"
        )
        name = f"{r['batch']} (its labels)" if status == "labelled" else r["batch"]
        lines.append(
            f"| {name} | {drift} | {update} | {gate} | v{r['champion_version']} | {fmt(r['miou_before'])} "
            f"| {versus(r)} | {fmt(r['miou_after'])} |"
        )
    return "\n".join(lines) + "\n\n*: a domain the champion never learnt, reported but not protected by the gate"


def batches(records: list[dict]) -> int:
    """Batches behind the records (a batch's imported labels are a second record of it)."""
    return len({r["batch"] for r in records})


def write_reports(records: list[dict], out: Path, seconds: float) -> None:
    from segloop.plots import save_accuracy_matrix, save_domain_curves

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps([{k: r[k] for k in KEYS} | r for r in records], indent=1) + "\n")
    domains = list(dict.fromkeys(d for r in records for d in r["miou_after"]))
    steps = [r["batch"] for r in records]
    r_mat = np.array([[r["miou_after"].get(d, np.nan) for d in domains] for r in records])
    save_accuracy_matrix(out / "accuracy_matrix.png", r_mat, domains, "champion mIoU after each batch", steps)
    save_domain_curves(out / "miou_over_time.png", {"champion": r_mat}, domains, steps)
    (out / "summary.md").write_text(
        f"# segloop demo: the continual loop over {batches(records)} batches ({seconds / 60:.1f} min)\n\n"
        f"{table(records)}\n\n"
        + "\n".join(f"- {r['batch']}: {r['summary']}" for r in records)
        + "\n\n![accuracy matrix](accuracy_matrix.png)\n\n![mIoU over time](miou_over_time.png)\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--stream", default=STREAM, help=f"DOMAIN:N,... batches in arrival order (default {STREAM})")
    parser.add_argument(
        "--unlabelled",
        default=UNLABELLED,
        help=f"DOMAIN:N arriving after the stream without masks ('' : none; default {UNLABELLED})",
    )
    parser.add_argument("--out", type=Path, default=Path("reports/demo"))
    parser.add_argument(
        "--pool", help="run each monitor run as a deployment run on this Prefect work pool (make demo-stack)"
    )
    args = parser.parse_args(argv)
    settings = load_settings(args.params, args.set)
    ws, started = Workspace.of(settings), time.monotonic()
    run = monitor_runs(args.params, args.set, args.pool)
    stream = parse_stream(args.stream)
    for i, (domain, n) in enumerate(stream):
        batch = arrive(ws, i, domain, n, settings)
        print(f"\n=== batch {batch.name} arrived: {n} {domain} images; monitor run ===", flush=True)
        run()
    if args.unlabelled:
        unlabelled_round(ws, len(stream), args.unlabelled, settings, run, args.out)
    records = step_records(ws)
    write_reports(records, args.out, time.monotonic() - started)
    print("\n" + table(records))
    print(
        f"\n{batches(records)} batches in {(time.monotonic() - started) / 60:.1f} min; reports: {args.out}/summary.md, "
        "summary.json"
    )
    if args.pool:  # the stack's own servers hold the runs
        api = os.environ.get("PREFECT_API_URL", "")
        print(f"Look at it:  MLflow UI {os.environ.get('MLFLOW_TRACKING_URI')}, Prefect UI {api.removesuffix('/api')}")
    else:
        print(
            "Look at it:  make ui          (MLflow: runs, models, champion history at http://127.0.0.2:5000; it "
            "prints the links)"
        )
        print("             make prefect-ui  (Prefect: the monitor and continual flow runs at http://127.0.0.1:4200)")
    if settings.drift.evidently_workspace is not None:
        print("             make evidently-ui  (Evidently: drift checks over time at http://127.0.0.1:8001)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
