"""Code tests: typed settings fail at load with the key's dotted name."""

import pytest
import yaml
from conftest import ROOT

from segloop.cli import main
from segloop.config import SettingsError, apply_override, load_settings, settings_from_dict


def test_project_params_load():
    s = load_settings(ROOT / "params.yaml")
    assert s.data.crop_size is None and s.train.augment is None  # planned from the data (segloop.plan)
    assert s.num_classes == len(s.data.classes) >= 4


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("train.lrr=0.1", "train.lrr", "unknown key"),
        ("train.epochs=many", "train.epochs", "integer"),
        ("data.crop_size=100", "data.crop_size", "multiple of 32"),
        ("train.lr=0", "train.lr", "greater than 0"),
        ("train.lr=-1e-3", "train.lr", "greater than 0"),
        ("data.channels=2", "data.channels", "1 or 3"),
        ("split.val_fraction=0.85", "split", "leave images for training"),
        ("generate.domains=[base, rain]", "generate.domains", "unknown value 'rain'"),
        ("train.schedule=step", "train.schedule", "cosine"),
        ("eval.max_size=500", "eval.max_size", "multiple of 32"),
    ],
)
def test_bad_values_name_the_key(override, key, words):
    with pytest.raises(SettingsError) as err:
        load_settings(ROOT / "params.yaml", [override])
    text = str(err.value)
    assert f"{key}:" in text or f"  {key}" in text, text
    assert words in text
    assert "params.yaml" in text


def test_unknown_section_in_file(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["trian"] = {"lr": 1}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SettingsError, match=r"trian: unknown key"):
        load_settings(path)


def test_override_parses_yaml_values(tiny_raw):
    apply_override(tiny_raw, "train.augment.hflip=0")
    apply_override(tiny_raw, "model.decoder_channels=[8, 8, 8, 8, 8]")
    apply_override(tiny_raw, "model.encoder_weights=null")
    s = settings_from_dict(tiny_raw)
    assert s.train.augment.hflip == 0.0
    assert s.model.decoder_channels == [8, 8, 8, 8, 8]
    assert s.model.encoder_weights is None


def test_override_into_a_value_is_an_error(tiny_raw):
    with pytest.raises(SettingsError, match="train.lr is not a section"):
        apply_override(tiny_raw, "train.lr.x=1")


def test_missing_params_file(tmp_path):
    with pytest.raises(SettingsError, match="params file not found"):
        load_settings(tmp_path / "nope.yaml")


def test_cli_reports_bad_setting_and_exits_2(tmp_path, capsys, base_data):
    code = main(
        [
            "train",
            "--params",
            str(ROOT / "params.yaml"),
            "--set",
            "train.lr=0",
            "--data",
            str(base_data),
            "--out",
            str(tmp_path / "m"),
        ]
    )
    assert code == 2
    assert "train.lr" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_set_value_that_is_not_yaml_is_one_line(capsys):
    assert main(["report", str(ROOT), "--params", str(ROOT / "params.yaml"), "--set", "train.lr=[1,2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --set 'train.lr=[1,2': the value is not valid YAML"), (
        err
    )
