"""Hyper-parameter search (`segloop tune`): an Optuna study over `tune.space`.

Each trial is one ordinary `segloop.train.train` run with the sampled settings; its
per-epoch hook (`on_epoch`) reports the validation mIoU to the pruner, which may stop it
(a diverged trial, loss not finite, reports NaN, which pruners prune). The study lives in an
RDB storage (`tune.storage`, default sqlite beside the MLflow store), so a study resumes
where it stopped and several processes can work on it at once. With tracking on, each
`segloop tune` process is one MLflow run and every trial it runs is a child run of it.
The result is a complete params file (the settings tune read, with the best trial's values)
that `segloop train --params` takes, and Optuna's history and importance plots.

This module samples, trains through `train` and writes; it never changes how a model
trains. Only the CLI and the benchmarks import it.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from segloop.config import DEFAULT_MLRUNS, ParamSpace, Settings, settings_from_dict, settings_record
from segloop.redaction import redact
from segloop.tracking import TrackedRun, resolve_store, sqlite_path, tracked_run

BEST_PARAMS = "best_params.yaml"
SUMMARY = "tune.json"
PLOTS = ("optimization_history.png", "param_importances.png")
TRIALS = "trials"  # <out>/trials/<number>/: each trial's train folder (checkpoints of the best one only)


@dataclass
class TuneResult:
    study: str
    storage: str  # password masked
    trials_run: int  # by this process
    complete: int  # in the whole study
    pruned: int
    failed: int
    best_trial: int | None
    best_value: float | None
    best_params: dict[str, Any]
    params_file: str | None
    run_id: str | None


def storage_url(settings: Settings) -> str:
    """tune.storage, else sqlite:///<folder of the MLflow sqlite store (default mlruns/)>/optuna.db."""
    if settings.tune.storage:
        return settings.tune.storage
    db = sqlite_path(resolve_store(settings.tracking).uri)
    folder = db.parent if db is not None else DEFAULT_MLRUNS.resolve()
    return f"sqlite:///{folder / 'optuna.db'}"


def open_study(settings: Settings) -> optuna.Study:
    """The study `tune.study` in its storage, created or loaded (resumed)."""
    url = storage_url(settings)
    db = sqlite_path(url)
    engine: dict[str, Any] = {}
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        engine = {"connect_args": {"timeout": 60}}  # processes sharing the file wait for its lock
    # Heartbeats mark the trials of a killed process failed when the study is next run.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats, stable since Optuna 2.9
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=60, grace_period=180)
    study = optuna.create_study(
        study_name=settings.tune.study,
        storage=storage,
        pruner=make_pruner(settings),
        direction="maximize",
        load_if_exists=True,
    )
    # Seeded by the trials already there: a resumed study, or a second process, does not redraw the first one's points.
    study.sampler = make_sampler(settings, len(study.get_trials(deepcopy=False)))
    return study


def make_sampler(settings: Settings, offset: int = 0) -> optuna.samplers.BaseSampler:
    """tune.sampler, seeded with tune.seed + `offset` (unseeded when tune.seed is null)."""
    t = settings.tune
    seed = None if t.seed is None else t.seed + offset
    if t.sampler == "grid":
        return optuna.samplers.GridSampler(grid(t.space, t.grid_points), seed=seed)
    if t.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, t.startup_trials))


def make_pruner(settings: Settings) -> optuna.pruners.BasePruner:
    t = settings.tune
    if t.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")  # the first complete trial's epochs
    if t.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=t.startup_trials, n_warmup_steps=t.warmup_epochs)
    return optuna.pruners.NopPruner()


def grid(space: dict[str, ParamSpace], points: int) -> dict[str, list]:
    """The grid sampler's values: the choices, or `points` values spread over low..high."""
    import numpy as np

    out: dict[str, list] = {}
    for name, spec in space.items():
        if spec.choices is not None:
            out[name] = list(spec.choices)
            continue
        assert spec.low is not None and spec.high is not None  # ParamSpace: choices or a range
        spread = np.geomspace if spec.log else np.linspace
        values = [min(max(float(v), spec.low), spec.high) for v in spread(spec.low, spec.high, points)]
        out[name] = sorted({round(v) for v in values}) if spec.integer else values
    return out


def sample(trial: optuna.Trial, space: dict[str, ParamSpace]) -> dict[str, Any]:
    """{space name: value} drawn for `trial`."""
    values: dict[str, Any] = {}
    for name, spec in space.items():
        if spec.choices is not None:
            values[name] = trial.suggest_categorical(name, spec.choices)
        elif spec.integer:
            values[name] = trial.suggest_int(name, int(spec.low or 0), int(spec.high or 0), log=spec.log)
        else:
            values[name] = trial.suggest_float(name, spec.low or 0.0, spec.high or 0.0, log=spec.log)
    return values


def overrides(values: dict[str, Any], space: dict[str, ParamSpace]) -> dict[str, Any]:
    """{dotted settings key: value}: each entry sets its own name or its `sets`."""
    return {key: value for name, value in values.items() for key in (space[name].sets or [name])}


def _parent_is_null(raw: dict, key: str) -> bool:
    node: Any = raw
    for part in key.split(".")[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return True
    return False


def trial_settings(raw: dict, keys: dict[str, Any], planned: dict | None, source: str) -> Settings:
    """`raw` settings with `keys` set. A section left null (planned from the data, e.g. train.augment)
    is first filled from `planned`, so one tuned field keeps the plan's others."""
    from segloop.models import takes_decoder_channels

    raw = copy.deepcopy(raw)
    for key, value in keys.items():
        *parents, last = key.split(".")
        node, plan_node = raw, planned
        for part in parents:
            plan_node = plan_node.get(part) if isinstance(plan_node, dict) else None
            if node.get(part) is None:
                node[part] = copy.deepcopy(plan_node) if isinstance(plan_node, dict) else {}
            node = node[part]
        node[last] = value
    if "model.arch" in keys and not takes_decoder_channels(raw["model"]["arch"]):
        raw["model"]["decoder_channels"] = None  # a per-stage list is for U-Nets; others use their default
    return settings_from_dict(raw, source)


def check_space(settings: Settings, raw: dict, planned: dict | None) -> None:
    """Every choice and both ends of every range must give valid settings (and a buildable model):
    a bad value fails before the first trial, naming its entry."""
    from segloop.models import check_model_settings

    for name, spec in settings.tune.space.items():
        for value in spec.choices if spec.choices is not None else [spec.low, spec.high]:
            if spec.integer and value is not None:
                value = int(value)
            keys = overrides({name: value}, settings.tune.space)
            s = trial_settings(raw, keys, planned, f"tune.space.{name}={value!r}")
            check_model_settings(s.model, f"tune.space.{name}={value!r}: model")


def _plan(settings: Settings, data: Path) -> dict:
    from segloop.plan import resolve

    return resolve(settings, data)[0].model_dump(mode="json")


@dataclass
class _Study:
    """What every trial of one `tune` call shares."""

    settings: Settings
    raw: dict
    planned: dict | None
    data: Path
    val: Path
    out: Path
    parent: TrackedRun | None
    clock: Callable[[], float]
    ran: int = 0  # trials this process started (others may run on the same study)


def _objective(job: _Study, trial: optuna.Trial) -> float:
    from segloop.train import train

    job.ran += 1
    values = sample(trial, job.settings.tune.space)
    s = trial_settings(job.raw, overrides(values, job.settings.tune.space), job.planned, f"trial {trial.number}")
    out = job.out / TRIALS / str(trial.number)

    def on_epoch(record: dict) -> None:
        if run is not None:
            run.log_epoch(record)
        # A diverged run (loss not finite) has garbage weights whatever its mIoU says: NaN, pruned.
        value = record["val_miou"] if math.isfinite(record["loss"]) else math.nan
        trial.report(value, record["epoch"])
        if trial.should_prune():
            trial.set_user_attr("pruned_at", {"epoch": record["epoch"], "val_miou": value})
            raise optuna.TrialPruned(f"epoch {record['epoch']}: val mIoU {value}")

    pruned = None
    with _trial_run(job, trial.number, values) as run:
        try:
            result = train(s, job.data, out, job.val, log=_quiet, on_epoch=on_epoch, clock=job.clock)
        except optuna.TrialPruned as err:
            pruned = err
        except (ValueError, RuntimeError) as err:  # this combination cannot train (e.g. memory); the study goes on
            trial.set_user_attr("error", str(err)[:300])
            raise
        if run is not None:
            run.set_tags({"segloop.tune.state": "pruned" if pruned else "complete"})
            if not pruned:
                run.log_metrics({"best_val_miou": result.best_miou})
    if pruned is not None:
        raise pruned
    trial.set_user_attr("epochs", result.epochs)
    return result.best_miou


def _quiet(line: str) -> None:
    pass


@contextmanager
def _trial_run(job: _Study, number: int, values: dict) -> Iterator[TrackedRun | None]:
    if job.parent is None:
        yield None
        return
    tags = {
        "mlflow.parentRunId": job.parent.run_id,  # MLflow's own parent link: the UI nests the trials
        "segloop.tune.study": job.settings.tune.study,
        "segloop.tune.trial": number,
        "segloop.tune.params": json.dumps(values),
    }
    name = f"{job.settings.tune.study}:trial-{number}"
    with tracked_run(job.settings, "tune-trial", None, tags, run_name=name) as run:
        yield run


def _progress(log: Callable[[str], None]) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    def line(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        state = t.state.name
        if t.state == optuna.trial.TrialState.PRUNED:
            at = t.user_attrs.get("pruned_at", {})
            what = f"at epoch {at.get('epoch')} (val mIoU {at.get('val_miou', math.nan):.4f})"
        elif t.state == optuna.trial.TrialState.COMPLETE:
            what = f"val mIoU {t.value:.4f} in {t.user_attrs.get('epochs')} epochs"
        else:
            what = t.user_attrs.get("error", "")
        try:
            best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
        except ValueError:  # no trial completed yet
            best = "best -"
        ended, started = t.datetime_complete, t.datetime_start
        seconds = (ended - started).total_seconds() if ended and started else 0.0
        params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        log(f"trial {t.number:3d} {state:<8} {what}  {best}  {seconds:.0f}s  {params}")

    return line


def _keep_best_checkpoints(study: optuna.Study, out: Path) -> None:
    """Checkpoints only in the study's best trial's folder (a trial of a U-Net is ~100 MB)."""
    try:
        best = str(study.best_trial.number)
    except ValueError:
        best = None
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    finished = {str(t.number) for t in study.get_trials(deepcopy=False, states=done)}
    for folder in (out / TRIALS).glob("*"):
        if folder.name not in finished:  # still running (maybe in another process sharing `out`)
            continue
        if folder.name != best:
            for ckpt in folder.glob("*.pt"):
                ckpt.unlink()
        else:
            (folder / "last.pt").unlink(missing_ok=True)  # the optimiser state is not needed to use it


def tune(
    settings: Settings,
    data: Path,
    val: Path,
    out: Path,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
    clock: Callable[[], float] = time.monotonic,
) -> TuneResult:
    """Run `tune.trials` trials (or until `tune.timeout_min`) of study `tune.study`, training on `data`,
    scoring each by its best mIoU on `val`; write `out`/best_params.yaml, tune.json and the plots.

    `clock` is each trial's budget clock (`train.max_minutes`; a benchmark passes time.process_time)."""
    for folder in (data, val):
        if not (Path(folder) / "images").is_dir():
            raise FileNotFoundError(f"{folder}: not a dataset folder (no images/ inside)")
    t = settings.tune
    if not t.space:
        raise ValueError("tune.space is empty: nothing to search")
    raw = settings.model_dump(mode="json")
    keys = overrides({name: None for name in t.space}, t.space)
    planned = _plan(settings, data) if any(_parent_is_null(raw, k) for k in keys) else None
    check_space(settings, raw, planned)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours
    study = open_study(settings)
    url = redact(storage_url(settings))
    before = len(study.trials)
    log(f"study {t.study} in {url}: {before} trials so far; sampler {t.sampler}, pruner {t.pruner}")
    out.mkdir(parents=True, exist_ok=True)
    tags = {"segloop.tune.study": t.study, "segloop.tune.storage": url, "segloop.tune.sampler": t.sampler}
    inputs = {"train": data, "val": val}
    with (
        tracked_run(settings, "tune", inputs, tags, run_name=f"tune:{t.study}")
        if settings.tracking.enabled
        else (nullcontext()) as run
    ):
        job = _Study(settings, raw, planned, data, val, out, run, clock)
        study.optimize(
            lambda trial: _objective(job, trial),
            n_trials=t.trials,
            timeout=t.timeout_min * 60 if t.timeout_min else None,
            catch=(ValueError, RuntimeError),
            callbacks=[_progress(log), lambda st, _: _keep_best_checkpoints(st, out)],
        )
        result = _write_results(study, job, url)
        if run is not None:
            _log_study(run, result, out)
            result.run_id = run.run_id
    return result


def _write_results(study: optuna.Study, job: _Study, url: str) -> TuneResult:
    states = [tr.state for tr in study.trials]
    count = {s: states.count(s) for s in optuna.trial.TrialState}
    complete = count[optuna.trial.TrialState.COMPLETE]
    best = study.best_trial if complete else None
    params_file = None
    if best is not None:
        keys = overrides(best.params, job.settings.tune.space)
        s = trial_settings(job.raw, keys, job.planned, f"best trial {best.number}")
        params_file = job.out / BEST_PARAMS
        header = (
            f"# segloop tune: study {study.study_name}, best trial {best.number} (val mIoU {best.value:.4f}).\n"
            f"# The settings tune read, with: {json.dumps(keys)}\n"
            f"# Use: segloop train --params {params_file} --data ... --out ...\n"
        )
        params_file.write_text(header + yaml.safe_dump(settings_record(s), sort_keys=False))
    save_plots(study, job.out)
    result = TuneResult(
        study=study.study_name,
        storage=url,
        trials_run=job.ran,
        complete=complete,
        pruned=count[optuna.trial.TrialState.PRUNED],
        failed=count[optuna.trial.TrialState.FAIL],
        best_trial=best.number if best else None,
        best_value=round(best.value, 5) if best and best.value is not None else None,
        best_params=best.params if best else {},
        params_file=str(params_file) if params_file else None,
        run_id=None,
    )
    trials = [
        {"number": tr.number, "state": tr.state.name, "value": tr.value, "params": tr.params, **tr.user_attrs}
        for tr in study.trials
    ]
    (job.out / SUMMARY).write_text(json.dumps({**asdict(result), "trials": trials}, indent=1, default=str))
    return result


def save_plots(study: optuna.Study, out: Path) -> list[Path]:
    """Optuna's optimisation history and parameter importances (matplotlib) as PNG in `out`;
    importances need two completed trials that differ (skipped until then)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as oplt

    written = []
    complete = [tr for tr in study.trials if tr.state == optuna.trial.TrialState.COMPLETE]
    plots: list[tuple[str, Callable[..., Any]]] = [(PLOTS[0], oplt.plot_optimization_history)]
    if len(complete) >= 2:
        plots.append((PLOTS[1], oplt.plot_param_importances))
    for name, plot in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                ax = plot(study, target_name="best val mIoU")
            except (ValueError, RuntimeError):  # e.g. importances of parameters that never varied
                continue
        fig = ax.get_figure(root=True)
        assert fig is not None  # an Axes Optuna drew on a figure of its own
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(out / name)
    return written


def _log_study(run: TrackedRun, result: TuneResult, out: Path) -> None:
    run.log_metrics(
        {
            "trials_complete": result.complete,
            "trials_pruned": result.pruned,
            "trials_failed": result.failed,
            **({"best_val_miou": result.best_value} if result.best_value is not None else {}),
        }
    )
    run.set_tags({"segloop.tune.best_trial": result.best_trial})
    for name in (BEST_PARAMS, SUMMARY, *PLOTS):
        if (out / name).is_file():
            run.log_file(out / name)
