"""`segloop tune`: a real Optuna study (sqlite) on a tiny model, trials as real MLflow child runs."""

from __future__ import annotations

import math

import optuna
import pytest
import yaml

from segloop.cli import main
from segloop.config import SettingsError, load_settings, settings_from_dict
from segloop.tracking import open_store, resolve_store

DIVERGING_LR = 1.0e30  # AdamW steps ~lr per weight: the loss is NaN within the first epoch


@pytest.fixture
def study_params(tmp_path, tracked_raw):
    raw = {**tracked_raw, "train": {**tracked_raw["train"], "epochs": 2, "iters_per_epoch": 2}}
    raw["tune"] = {
        "trials": 2,
        "study": "tiny",
        "startup_trials": 1,  # the first completed trial is the median the second is judged by
        "warmup_epochs": 0,
        "space": {
            "train.lr": {"choices": [0.003, DIVERGING_LR]},
            "model.arch": {"choices": ["Unet", "FPN"]},
            "augment_strength": {"low": 0.0, "high": 0.4, "sets": ["train.augment.brightness", "train.augment.gamma"]},
        },
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_diverging_trial_is_pruned_and_the_best_params_train(
    tmp_path, study_params, base_data, capsys, one_torch_thread
):
    settings = load_settings(study_params)
    from segloop.tune import open_study, storage_url

    # Which trial diverges is fixed, not left to the sampler: trial 0 trains, trial 1 diverges.
    study = open_study(settings)
    study.enqueue_trial({"train.lr": 0.003, "model.arch": "FPN", "augment_strength": 0.3})
    study.enqueue_trial({"train.lr": DIVERGING_LR, "model.arch": "Unet", "augment_strength": 0.1})
    out = tmp_path / "tune"
    argv = ["tune", "--params", str(study_params), "--data", str(base_data), "--val", str(base_data)]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "trial   0 COMPLETE" in printed and "trial   1 PRUNED   at epoch 1 (val mIoU nan)" in printed
    assert '"trials_run": 2,\n "complete": 1,\n "pruned": 1,' in printed

    # The study is in the sqlite beside the MLflow store, and loads again (resumable) with both trials.
    assert storage_url(settings) == f"sqlite:///{tmp_path / 'store' / 'optuna.db'}"
    trials = open_study(settings).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    assert math.isnan(trials[1].intermediate_values[1]) and 0 < trials[0].value <= 1

    # One study run, the two trials its MLflow children (the UI nests them by mlflow.parentRunId).
    client = open_store(resolve_store(settings.tracking))
    exp = client.get_experiment_by_name("test").experiment_id
    [parent] = client.search_runs([exp], "tags.`segloop.command` = 'tune'")
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    states = {r.data.tags["segloop.tune.trial"]: r.data.tags["segloop.tune.state"] for r in children}
    assert states == {"0": "complete", "1": "pruned"}
    assert parent.data.metrics["trials_pruned"] == 1 and parent.data.metrics["best_val_miou"] == trials[0].value
    logged = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"best_params.yaml", "optimization_history.png", "tune.json"} <= logged

    # The best params: trial 0's values on the settings tune read; the augmentation's other fields planned.
    best = load_settings(out / "best_params.yaml")
    assert (best.train.lr, best.model.arch, best.model.decoder_channels) == (0.003, "FPN", None)
    assert best.train.augment is not None and (best.train.augment.brightness, best.train.augment.gamma) == (0.3, 0.3)
    assert best.train.augment.rot90 == 0.5  # the plan's (no up/down in the masks), not AugmentSettings' 0
    assert list((out / "trials" / "0").glob("*.pt")) == [out / "trials" / "0" / "best.pt"]
    assert not list((out / "trials" / "1").glob("*.pt"))  # a pruned trial's checkpoints are removed

    final = tmp_path / "final"
    train = ["train", "--params", str(out / "best_params.yaml"), "--data", str(base_data), "--out", str(final)]
    assert main([*train, "--set", "tracking.enabled=false"]) == 0
    assert (final / "best.pt").is_file()


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"train.lrr": {"low": 0.1, "high": 1.0}}, "tune.space: Value error, train.lrr: 'train.lrr' is not a setting"),
        ({"x": {"choices": [1], "sets": ["tune.trials"]}}, "x.sets: 'tune.trials' is not a setting that can be tuned"),
        ({"train.lr": {"low": 0.0, "high": 1.0, "log": True}}, "tune.space.train.lr: Value error, log: low must be"),
        ({"train.lr": {"choices": [0.1], "low": 0.1}}, "give either choices or low and high"),
    ],
)
def test_bad_search_spaces_fail_at_load_naming_the_entry(tiny_raw, space, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(".", r"\.")):
        settings_from_dict({**tiny_raw, "tune": {"space": space}})


def test_a_value_invalid_for_its_setting_fails_before_any_trial(tmp_path, tiny_raw, base_data, capsys):
    db = tmp_path / "optuna.db"
    raw = {**tiny_raw, "tune": {"storage": f"sqlite:///{db}", "space": {"data.crop_size": {"choices": [64, 80]}}}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    argv = ["tune", "--params", str(path), "--data", str(base_data), "--val", str(base_data), "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tune.space.data.crop_size=80: invalid settings\n  data.crop_size: Value error, must be a multiple" in err
    assert not db.exists()  # no study was opened


def test_grid_spreads_ranges_and_keeps_choices(tiny_raw):
    from segloop.tune import grid

    space = {
        "train.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
        "train.patience": {"low": 2, "high": 7, "integer": True},
        "model.arch": {"choices": ["Unet", "FPN"]},
    }
    s = settings_from_dict({**tiny_raw, "tune": {"sampler": "grid", "grid_points": 3, "space": space}})
    g = grid(s.tune.space, s.tune.grid_points)
    assert g["train.lr"] == pytest.approx([1e-4, 1e-3, 1e-2]) and g["train.lr"][-1] <= 1e-2  # inside the range
    assert g["train.patience"] == [2, 4, 7] and g["model.arch"] == ["Unet", "FPN"]


def test_a_storage_password_is_masked_wherever_settings_are_written(tiny_raw):
    from segloop.config import settings_record

    s = settings_from_dict({**tiny_raw, "tune": {"storage": "postgresql://optuna:s3cret@db:5432/optuna"}})
    assert settings_record(s)["tune"]["storage"] == "postgresql://optuna:***@db:5432/optuna"
    assert s.tune.storage == "postgresql://optuna:s3cret@db:5432/optuna"  # the study itself still connects with it
