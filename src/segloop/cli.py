"""The `segloop` command: one sub-command per pipeline step; DVC stages call these.

Each command parses arguments, loads settings, calls one core function and
prints what it wrote. Errors in user input exit with status 2 and one message.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

from segloop.config import DEFAULT_PARAMS, Settings, SettingsError, load_settings, save_settings
from segloop.tracking import TrackingError

DEFAULT_DRIFT_CACHE = Path(".cache/drift")  # features of reference and batches, keyed by content
DEFAULT_TUNE_DIR = Path("models/tune")  # <study>/: best_params.yaml, plots, the trials' train folders


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.params, args.set)


def cmd_generate(args: argparse.Namespace) -> int:
    from segloop.data.synthetic import generate

    s = _settings(args)
    g = s.generate
    n = args.n if args.n is not None else g.n
    seed = args.seed if args.seed is not None else g.seed
    strength = args.strength if args.strength is not None else g.strength
    if args.out.exists() and any(args.out.iterdir()):
        raise FileExistsError(f"{args.out}: exists and is not empty; refusing to overwrite")
    stems = generate(args.out, args.domain, n, seed, g.image_size, strength)
    save_settings(s, args.out / "settings.yaml")
    print(f"generated {len(stems)} {args.domain} pairs (seed {seed}, strength {strength}) in {args.out}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from segloop.data.validate import SizeLimits, validate_folder

    s = _settings(args)
    result = validate_folder(
        args.src, args.out, args.quarantine, s.num_classes, SizeLimits(s.data.min_side, s.data.max_pixels)
    )
    if result.accepted:
        save_settings(s, args.out / "settings.yaml")
    print(result.summary())
    if result.rejected:
        print(f"rejected files and reasons: {args.quarantine / 'reasons.jsonl'}")
    if not result.accepted:
        print(f"error: nothing accepted from {args.src}", file=sys.stderr)
        return 1
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from segloop.data.split import split_dataset

    s = _settings(args)
    counts = split_dataset(args.src, args.out, s.split)
    save_settings(s, args.out / "settings.yaml")
    print(" ".join(f"{k}={v}" for k, v in counts.items()), "->", args.out)
    return 0


def _model(ref: str, settings: Settings) -> tuple[Path, str, Any]:
    """A checkpoint path or a `models:/name@alias|/version` ref -> (local path, label, version)."""
    from segloop.registry import resolve_model

    return resolve_model(ref, settings)


def cmd_plan(args: argparse.Namespace) -> int:
    from segloop.plan import describe, fingerprint, recipe, resolve, write_plan

    s = _settings(args)
    fp = fingerprint(args.data, s.data.channels)
    full = recipe(fp, s.data.channels, s.num_classes, s.train.memory_mb, s.model.encoder_weights is not None)
    _, applied, _ = resolve(s, args.data, fp)
    print(describe(fp, full))
    kept = [k for k in full.settings if k not in applied.settings]
    if kept:
        print(f"set explicitly in {args.params}{' / --set' if args.set else ''}, so kept: {', '.join(kept)}")
    write_plan(args.out, args.data, fp, full)
    print(f"wrote {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from segloop.distributed import world_from_env
    from segloop.runs import train_step

    result, _ = train_step(
        _settings(args),
        args.data,
        args.out,
        args.val,
        args.init,
        args.resume,
        args.domain,
        register=args.register,
        overwrite=args.overwrite,
    )
    if world_from_env().primary:  # under torchrun only rank 0 prints (and tracks, see runs.train_step)
        print(json.dumps(result.__dict__, indent=1))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from segloop.evaluate import evaluate
    from segloop.tracking import eval_metrics, tracked_run

    s = _settings(args)
    path, label, mv = _model(args.model, s)
    tags = {"segloop.model": label, "segloop.model_version": mv.version if mv else None, "segloop.domain": args.domain}
    with tracked_run(
        s, "evaluate", {"eval": args.data}, tags, run_name=f"evaluate:{args.domain or args.data.name}"
    ) as run:
        m = evaluate(path, args.data, args.out, s.eval, label=label)
        if run:
            run.log_metrics(eval_metrics(m, f"{args.domain}." if args.domain else ""))
            run.log_folder(args.out)
    per_class = "  ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in m["per_class_iou"].items())
    print(
        f"{args.data}: mIoU {m['miou']:.4f}  dice {m['dice']:.4f}  pixel acc {m['pixel_accuracy']:.4f}  "
        f"({m['n_images']} images)"
    )
    print(f"  per class IoU: {per_class}")
    print(f"  wrote {args.out / 'metrics.json'}, confusion.png, overlays")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from segloop.evaluate import check_predict_out, predict_folder
    from segloop.registry import is_model_ref

    s = _settings(args)
    if args.backend == "onnx" and is_model_ref(args.model):
        raise ValueError(f"--backend onnx --model {args.model}: needs an exported .onnx file (see `segloop export`)")
    check_predict_out(args.input, args.out, args.overwrite)  # before a model is downloaded or loaded
    path = Path(args.model) if args.backend == "onnx" else _model(args.model, s)[0]
    n = predict_folder(path, args.input, args.out, s.eval, args.backend, overwrite=args.overwrite)
    print(f"wrote {n} masks to {args.out} ({args.backend} backend)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from segloop.export import export_model, parity_lines, parity_path
    from segloop.registry import log_export

    s = _settings(args)
    path, label, mv = _model(args.model, s)
    report = export_model(
        path, args.out, s.export, s.eval, args.format, args.quantize, args.calib, args.parity_data, label=label
    )
    for line in parity_lines(report):
        print(line)
    print(f"wrote {parity_path(args.out)}")
    if mv is not None and s.tracking.enabled:
        files = [Path(report[k]["file"]) for k in ("fp32", "int8") if k in report] + [parity_path(args.out)]
        print(f"logged to the run of {label}: {log_export(s, mv, files)}")
    if not report["fp32"]["within_tolerance"]:
        print(
            f"error: {args.out} differs from eager PyTorch by {report['fp32']['max_abs_logit_diff']:.3g} "
            f"> export.tolerance {s.export.tolerance:g}; do not deploy it",
            file=sys.stderr,
        )
        return 1
    return 0


def _compress(args: argparse.Namespace, kind: Literal["distill", "prune"], ref: str, ratio: float | None = None) -> int:
    from segloop.runs import compress_step

    result, _ = compress_step(
        _settings(args),
        kind,
        ref,
        args.data,
        args.out,
        args.val,
        ratio,
        register=args.register,
        overwrite=args.overwrite,
    )
    print(json.dumps(result.__dict__, indent=1))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    return _compress(args, "distill", args.teacher)


def cmd_prune(args: argparse.Namespace) -> int:
    return _compress(args, "prune", args.model, args.ratio)


def cmd_tune(args: argparse.Namespace) -> int:
    from segloop.tune import tune

    options = {
        "trials": args.trials,
        "timeout_min": args.timeout,
        "study": args.study,
        "sampler": args.sampler,
        "pruner": args.pruner,
        "storage": args.storage,
    }
    given = [f"tune.{k}={json.dumps(v)}" for k, v in options.items() if v is not None]  # JSON: YAML, types kept
    s = load_settings(args.params, [*args.set, *given])
    r = tune(s, args.data, args.val, args.out or DEFAULT_TUNE_DIR / s.tune.study)
    print(json.dumps(r.__dict__, indent=1))
    if r.params_file is None:
        print(f"error: study {r.study}: no trial completed, no best params written", file=sys.stderr)
        return 1
    print(f"train with the best settings: segloop train --params {r.params_file} --data {args.data} --out DIR")
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    from segloop.runs import update_step

    s = _settings(args)
    result, _ = update_step(
        s,
        args.parent,
        args.data,
        args.out,
        None if args.val is None else [_pooled(v) for v in args.val],
        args.seen,
        args.replay,
        args.domain,
        register=args.register,
        overwrite=args.overwrite,
    )
    print(json.dumps({"strategy": s.continual.strategy, **result.__dict__}, indent=1))
    return 0


def _pooled(value: Path) -> Path | list[Path]:
    """A --val of folders joined with os.pathsep (`a:b`, like PATH) is one set pooled from them."""
    text = str(value)
    return value if os.pathsep not in text or value.exists() else [Path(p) for p in text.split(os.pathsep)]


def cmd_replay_update(args: argparse.Namespace) -> int:
    from segloop.data.replay import update_buffer

    s = _settings(args)
    r = s.continual.replay
    manifest = update_buffer(
        args.buffer, args.batch, args.batch_id, r.size, s.split.seed, args.out, r.sampling, args.domain
    )
    print(f"replay buffer {args.out}: {len(manifest['items'])}/{manifest['size']} samples, {manifest['seen']} seen")
    return 0


def _domain_dirs(pairs: list[str]) -> dict[str, Path | list[Path]]:
    out: dict[str, Path | list[Path]] = {}
    for pair in pairs:
        domain, sep, folder = pair.partition("=")
        if not sep or not domain or not folder:
            raise ValueError(f"--data {pair!r}: expected DOMAIN=FOLDER")
        if domain in out:
            raise ValueError(f"--data: domain {domain!r} given twice")
        out[domain] = _pooled(Path(folder))
    return out


def cmd_gate(args: argparse.Namespace) -> int:
    from segloop.gate import AlreadyChampion, gate

    try:
        d = gate(_settings(args), args.candidate, _domain_dirs(args.data), args.target, args.out)
    except AlreadyChampion as err:
        print(err)
        return 0
    print(
        f"{'PROMOTED' if d['promoted'] else 'NOT PROMOTED'}: {d['model']} v{d['candidate_version']}"
        f" (champion was {'v' + d['champion_version'] if d['champion_version'] else 'none'})"
    )
    for line in d["reasons"]:
        print(f"  {line}")
    print(f"decision: {args.out / 'promotion_decision.json'} (logged as {d['decision_uri']})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from segloop import registry

    s = _settings(args)
    if args.action == "list":
        rows = registry.list_versions(s)
        if args.json:
            print(json.dumps(rows, indent=1))
            return 0
        print("version  aliases              val mIoU  domain mIoU                         parent  strategy  created")
        for r in rows:
            miou = " ".join(f"{d}={v:.3f}" for d, v in r["miou"].items()) or "-"
            val = "-" if r["val_miou"] is None else f"{r['val_miou']:.3f}"
            print(
                f"{r['version']:>7}  {','.join(r['aliases']) or '-':<20} {val:>8}  {miou:<35} {r['parent'] or '-':>6}  "
                f"{r['strategy'] or '-':<8}  {r['created']}"
            )
        return 0
    if args.action == "history":
        entries = registry.history(s)
        if args.json:
            print(json.dumps(entries, indent=1))
            return 0
        for e in entries:
            print(
                f"{e['time']}  {e['alias']}: {'v' + e['from'] if e['from'] else 'none'} -> v{e['to']}  [{e['kind']}] "
                f"{e['reason']}"
                + (f"  decision: {e['decision']}" if e.get("decision") else "")
                + (f"  FORCED over: {'; '.join(e['forced'])}" if e.get("forced") else "")
            )
        return 0
    if args.action == "promote":
        e = registry.promote(s, args.alias, args.version, args.reason, force=args.force)
    else:
        e = registry.rollback(s, args.reason)
    print(f"{e['alias']}: {'v' + e['from'] if e['from'] else 'none'} -> v{e['to']} [{e['kind']}] {e['reason']}")
    return 0


def cmd_batches(args: argparse.Namespace) -> int:
    from segloop import loop

    ws = loop.Workspace.of(_settings(args))
    if args.action == "list":
        rows = loop.list_batches(ws)
        if args.json:
            print(json.dumps(rows, indent=1))
            return 0
        for r in rows:
            print(f"{r['status']:<10} {r['batch']!r:<24} {r['detail']}".rstrip())
        return 0
    if args.action == "retry":
        print(f"{args.batch}: back in {loop.retry_batch(ws, args.batch)} (attempts reset)")
    else:
        print(f"{args.batch}: skipped, moved to {loop.skip_batch(ws, args.batch, args.reason)}")
    return 0


def cmd_labels(args: argparse.Namespace) -> int:
    from segloop import loop

    settings = _settings(args)
    rec = loop.import_labels(loop.Workspace.of(settings), settings, args.batch, args.folder)
    print(f"batch {rec.batch}: {rec.summary}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from segloop.report import domain_table

    _settings(args)  # reads no setting, but a bad --params/--set must not pass silently
    table = domain_table(args.eval_dir)
    (args.eval_dir / "summary.md").write_text(table + "\n")
    print(table)
    print(
        f"\nreports: {args.eval_dir}/<domain>/ (metrics.json, confusion.png, overlay_*.png); table: "
        f"{args.eval_dir / 'summary.md'}"
    )
    return 0


def cmd_reference(args: argparse.Namespace) -> int:
    from segloop.drift.features import file_sha256
    from segloop.drift.reference import build_reference

    d = _settings(args).drift
    n = args.n if args.n is not None else d.reference_size
    seed = args.seed if args.seed is not None else d.reference_seed
    model_id = file_sha256(args.model)[:16] if args.model is not None else None
    rec = build_reference(args.train, n, seed, args.out, model_id, None if args.model is None else str(args.model))
    print(f"reference: {rec['n']} of {rec['n_available']} images of {args.train} (seed {seed}) -> {args.out}")
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from segloop.drift.detect import DRIFT_HTML, DRIFT_JSON
    from segloop.drift.features import load_champion
    from segloop.runs import drift_step

    s = _settings(args)
    model_path, label, mv = _model(args.model, s) if args.model is not None else (None, None, None)
    champion = load_champion(model_path) if model_path is not None else None
    tags = {"segloop.model": label, "segloop.model_version": mv.version if mv else None}
    r, run_id = drift_step(
        s,
        args.reference,
        args.current,
        args.out,
        champion,
        None if args.no_cache else args.cache,
        args.champion_miou,
        tags,
    )
    verdict = "DRIFT" if r["drift"] else "no drift"
    print(
        f"{verdict}: data drift {r['data_drift']} (score {r['score']:.3g}, {len(r['drifted_features'])} drifted: "
        f"{', '.join(r['drifted_features'][:6]) or '-'}), performance drift {r['performance_drift']} "
        f"({r['quality']['reason']})"
    )
    print(f"  method: {r['method']}")
    for w in r["warnings"]:
        print(f"  warning: {w}")
    print(f"  wrote {args.out / DRIFT_JSON}, {args.out / DRIFT_HTML}" + (f"; MLflow run {run_id}" if run_id else ""))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from segloop.serve import run

    overrides = [
        f"serve.{k}={v}"
        for k, v in (("backend", args.backend), ("host", args.host), ("port", args.port))
        if v is not None
    ]
    run(load_settings(args.params, [*args.set, *overrides]), args.model)
    return 0


REGISTER_HELP = (
    "register the trained model as a version of NAME in the MLflow registry (the continual loop passes "
    "registry.model_name). Without it the run is tracked (metrics, settings, files) but no model is "
    "registered, so an ad-hoc run never becomes a version of the loop's model"
)


def _model_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", text):
        raise argparse.ArgumentTypeError(f"{text!r}: a registered model name is letters, digits, '_', '.', '-'")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segloop", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="settings file (default: params.yaml)")
    common.add_argument(
        "--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a setting (repeatable)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", parents=[common], help="write a synthetic dataset of one domain")
    p.add_argument("--domain", required=True)
    p.add_argument("--n", type=int, help="number of pairs (default generate.n)")
    p.add_argument("--seed", type=int, help="default generate.seed")
    p.add_argument("--strength", type=float, help="shift strength (default generate.strength)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("validate", parents=[common], help="check a dataset folder, quarantine bad files")
    p.add_argument("src", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quarantine", type=Path, required=True)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("split", parents=[common], help="split a dataset into train/val/test")
    p.add_argument("src", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("plan", parents=[common], help="dataset fingerprint and the training recipe derived from it")
    p.add_argument("data", type=Path, help="a dataset folder (images/, masks/)")
    p.add_argument("--out", type=Path, default=Path("plan.yaml"), help="where to write the plan (default: plan.yaml)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("train", parents=[common], help="train a segmentation model")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--val", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--init", help="start from this checkpoint's weights (transfer learning): a path or models:/NAME@ALIAS|/VERSION"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="train into a non-empty OUT, replacing what an earlier train wrote there",
    )
    p.add_argument("--domain", help="domain the training data belongs to (recorded on the run and model version)")
    p.add_argument("--register", metavar="NAME", type=_model_name, help=REGISTER_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", parents=[common], help="metrics, confusion matrix and overlays")
    p.add_argument("--model", required=True, help="checkpoint path or models:/NAME@ALIAS|/VERSION")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--domain", help="domain of DATA: prefixes the logged metrics (DOMAIN.miou, DOMAIN.iou.CLASS)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", parents=[common], help="write predicted masks for a folder of images")
    p.add_argument("--model", required=True, help="checkpoint path or models:/NAME@ALIAS|/VERSION")
    p.add_argument("--input", type=Path, required=True)
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for <stem>.png palette masks (class ids); never inside INPUT; must be new or empty",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty OUT (files of the same name are replaced)"
    )
    p.add_argument(
        "--backend",
        default="torch",
        help="torch (a checkpoint or models:/ ref) or onnx (a `segloop export` file, ONNX Runtime CPU)",
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "export", parents=[common], help="ONNX / mobile export (+ static int8) with a parity check against eager"
    )
    p.add_argument("--model", required=True, help="checkpoint path or models:/NAME@ALIAS|/VERSION")
    p.add_argument(
        "--format",
        default="onnx",
        help="onnx (default); ort: ONNX Runtime's mobile format, converted from the .onnx written beside it; "
        "pte: an ExecuTorch program (XNNPACK, batch 1)",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="the .onnx (.ort, .pte) file; FILE.parity.json is written beside it"
    )
    p.add_argument("--quantize", help="int8: also write <stem>.int8.onnx (static QDQ quantization, needs --calib)")
    p.add_argument("--calib", type=Path, help="training images calibrating int8 (export.calib_images of them, seeded)")
    p.add_argument(
        "--parity-data",
        type=Path,
        help="images (+ masks: mIoU too) compared eager vs ONNX Runtime (default: seeded noise images)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "distill", parents=[common], help="train the smaller distill.student from a teacher's soft labels"
    )
    p.add_argument("--teacher", required=True, help="checkpoint path or models:/NAME@ALIAS|/VERSION")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--val", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    p.add_argument("--register", metavar="NAME", type=_model_name, help=REGISTER_HELP)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("prune", parents=[common], help="structured channel pruning (L1 magnitude) + a short fine-tune")
    p.add_argument("--model", required=True, help="checkpoint path or models:/NAME@ALIAS|/VERSION")
    p.add_argument("--ratio", type=float, help="share of channels removed per layer, in (0, 1) (default prune.ratio)")
    p.add_argument("--data", type=Path, required=True, help="fine-tuning data")
    p.add_argument("--val", type=Path)
    p.add_argument("--out", type=Path, required=True, help="pruned.pt (before) and best.pt (fine-tuned)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    p.add_argument("--register", metavar="NAME", type=_model_name, help=REGISTER_HELP)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "tune", parents=[common], help="hyper-parameter search (Optuna) over tune.space; writes the best params file"
    )
    p.add_argument("--data", type=Path, required=True, help="training folder of every trial")
    p.add_argument("--val", type=Path, required=True, help="validation folder (each trial's score: its best mIoU)")
    p.add_argument("--out", type=Path, help=f"best_params.yaml, plots, trials/ (default {DEFAULT_TUNE_DIR}/STUDY)")
    p.add_argument("--trials", type=int, help="trials this process runs (default tune.trials)")
    p.add_argument("--timeout", type=float, metavar="MIN", help="start no trial after MIN minutes (tune.timeout_min)")
    p.add_argument("--study", help="study name; an existing one is resumed (default tune.study)")
    p.add_argument("--sampler", choices=["tpe", "random", "grid"], help="default tune.sampler")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], help="default tune.pruner")
    p.add_argument("--storage", help="Optuna RDB URL, e.g. postgresql://... (default tune.storage, else sqlite)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("update", parents=[common], help="update a parent model with a new batch (continual.strategy)")
    p.add_argument("--parent", required=True, help="checkpoint path or models:/NAME@ALIAS|/VERSION to start from")
    p.add_argument(
        "--data",
        type=Path,
        action="append",
        required=True,
        help="training folder of the new batch, repeatable (earlier refused batches of its domain)",
    )
    p.add_argument(
        "--val",
        type=Path,
        action="append",
        help="validation folder, repeatable: the new domain's first, then learnt domains' "
        "(continual.select picks the kept epoch on them; default: the new batch); folders joined "
        f"with {os.pathsep!r} are scored as one set (a domain's splits of several batches)",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--replay", type=Path, help="replay buffer folder (replay strategies)")
    p.add_argument("--seen", type=Path, action="append", default=[], help="earlier training folders (joint)")
    p.add_argument("--domain", help="domain of the new batch (tag on the MLflow run)")
    p.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty OUT, replacing what an earlier run wrote there"
    )
    p.add_argument("--register", metavar="NAME", type=_model_name, help=REGISTER_HELP)
    p.set_defaults(func=cmd_update)

    p = sub.add_parser("replay-update", parents=[common], help="write a new replay buffer version with a batch added")
    p.add_argument("--buffer", type=Path, help="current buffer (omit for the first)")
    p.add_argument("--batch", type=Path, required=True)
    p.add_argument("--batch-id", required=True)
    p.add_argument("--domain", help="the batch's domain (sampling: balanced shares the buffer by domain)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_replay_update)

    p = sub.add_parser("report", parents=[common], help="table of per-domain metrics written by evaluate")
    p.add_argument("eval_dir", type=Path)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "gate", parents=[common], help="evaluate candidate vs champion on every domain; promote if it wins"
    )
    p.add_argument(
        "--candidate", required=True, metavar="VERSION", help="registered version of registry.model_name, or 'latest'"
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="DOMAIN=FOLDER",
        help="held-out set of one domain (repeat for every domain seen so far); folders joined with "
        f"{os.pathsep!r} are scored as one set",
    )
    p.add_argument("--target", required=True, metavar="DOMAIN", help="the new domain the candidate must improve")
    p.add_argument("--out", type=Path, required=True, help="folder for reports and promotion_decision.json")
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("models", help="registered versions, alias history, manual promotion, rollback")
    msub = p.add_subparsers(dest="action", required=True)
    q = msub.add_parser("list", parents=[common], help="versions with aliases, domain metrics, parent, created")
    q.add_argument("--json", action="store_true")
    q = msub.add_parser("history", parents=[common], help="every recorded alias change")
    q.add_argument("--json", action="store_true")
    q = msub.add_parser(
        "promote", parents=[common], help="manual override: point an alias at VERSION (recorded as manual)"
    )
    q.add_argument("version", metavar="VERSION")
    q.add_argument("--reason", required=True)
    q.add_argument("--alias", default="champion", help="default champion (or e.g. challenger)")
    q.add_argument(
        "--force",
        action="store_true",
        help="promote although classes, channels or signature differ from the champion's (recorded with --reason)",
    )
    q = msub.add_parser("rollback", parents=[common], help="champion back to the champion it replaced (recorded)")
    q.add_argument("--reason")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("batches", help="the loop's batches: pending, failed (dead letters), processed")
    bsub = p.add_subparsers(dest="action", required=True)
    q = bsub.add_parser("list", parents=[common], help="every batch with its status and last error")
    q.add_argument("--json", action="store_true")
    q = bsub.add_parser("retry", parents=[common], help="a failed batch back into incoming/ with a fresh attempt count")
    q.add_argument("batch", help="its folder name under <workspace>/failed/")
    q = bsub.add_parser(
        "skip", parents=[common], help="a pending batch out of the loop's way (into failed/, as skipped)"
    )
    q.add_argument("batch", help="its folder name under the incoming folder")
    q.add_argument("--reason", required=True, help="recorded in failed/<batch>/FAILED.json")
    p.set_defaults(func=cmd_batches)

    p = sub.add_parser("labels", help="labels for the loop's label requests (unlabelled batches that drifted)")
    lsub = p.add_subparsers(dest="action", required=True)
    q = lsub.add_parser(
        "import",
        parents=[common],
        help="masks for a batch awaiting labels: checked against its request, then the batch is updated on (once)",
    )
    q.add_argument("batch", help="the batch's name (status awaiting-labels in `segloop batches list`)")
    q.add_argument("folder", type=Path, help="one PNG mask of class ids per requested image, named by its stem")
    p.set_defaults(func=cmd_labels)

    p = sub.add_parser(
        "reference", parents=[common], help="seeded sample of the champion's training images for drift checks"
    )
    p.add_argument("--train", type=Path, required=True, help="the champion's training folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", type=Path, help="champion checkpoint, recorded in reference.json")
    p.add_argument("--n", type=int, help="default drift.reference_size")
    p.add_argument("--seed", type=int, help="default drift.reference_seed")
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser(
        "drift", parents=[common], help="did a batch drift from the reference? (Evidently report + decision)"
    )
    p.add_argument("--reference", type=Path, required=True)
    p.add_argument("--current", type=Path, required=True)
    p.add_argument(
        "--model", help="champion: checkpoint path or models:/NAME@ALIAS|/VERSION (without it: image statistics only)"
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--cache", type=Path, default=DEFAULT_DRIFT_CACHE, help=f"feature cache (default {DEFAULT_DRIFT_CACHE})"
    )
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--champion-miou", type=float, help="champion's held-out mIoU (default: its checkpoint's val mIoU)")
    p.set_defaults(func=cmd_drift)

    p = sub.add_parser(
        "serve", parents=[common], help="HTTP service: the champion answers, follows its alias live, /metrics"
    )
    p.add_argument(
        "--model",
        help="models:/NAME@ALIAS (followed), models:/NAME/VERSION or a checkpoint path "
        "(default serve.model, else models:/<registry.model_name>@champion)",
    )
    p.add_argument("--backend", choices=["onnx", "torch"], help="default serve.backend")
    p.add_argument("--host", help="default serve.host")
    p.add_argument("--port", type=int, help="default serve.port")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SettingsError, TrackingError, FileNotFoundError, FileExistsError, ValueError) as err:
        from segloop.redaction import redact

        print(f"error: {redact(str(err))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
