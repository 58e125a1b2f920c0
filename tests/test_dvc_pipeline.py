"""Pipeline test: the real dvc.yaml in a temporary git repo, with real DVC.

`dvc repro` builds every stage, a second `dvc repro` does nothing, and changing
one param invalidates exactly the stages that read it. The drift checks' drift.json
files are DVC metrics.
"""

import json
import shutil
import subprocess

import pytest
import yaml
from conftest import ROOT

pytestmark = pytest.mark.slow
COMPRESSION = ("distill", "prune")  # dvc.yaml stages left out of the repro below


def _run(args, cwd, env):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _changed_stages(repo, env):
    status = json.loads(_run(["dvc", "status", "--json"], repo, env))
    return sorted(status)


def test_repro_then_nothing_then_only_dependent_stages(tmp_path, tiny_raw, cli_env):
    repo = tmp_path / "repo"
    repo.mkdir()
    # The compression stages train twice more (minutes here): this test runs the pipeline without them
    # and only checks at the end that DVC reads them and wires them to the champion.
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    compression = {name: pipeline["stages"].pop(name) for name in COMPRESSION}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    tiny_raw["train"]["epochs"] = 2
    # 40 pairs: test splits of 8 images, the fewest a drift check accepts (drift.min_images)
    tiny_raw["generate"]["n"] = 40
    tiny_raw["drift"] = {**tiny_raw["drift"], "min_images": 8, "mmd_permutations": 300}
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_raw))
    _run(["git", "init", "-q"], repo, cli_env)
    _run(["dvc", "init", "-q"], repo, cli_env)
    _run(["dvc", "config", "core.analytics", "false"], repo, cli_env)

    first = _run(["dvc", "repro"], repo, cli_env)
    for stage in ("generate@base", "generate@fog", "validate@fog", "split@base", "train", "evaluate@fog", "drift@fog"):
        assert f"Running stage '{stage}'" in first, first
    for domain in ("base", "fog"):
        metrics = json.loads((repo / "reports" / "eval" / domain / "metrics.json").read_text())
        assert metrics["n_images"] == round(40 * 0.2) and 0.0 <= metrics["miou"] <= 1.0
    assert (repo / "models" / "base" / "best.pt").is_file()
    assert _changed_stages(repo, cli_env) == []

    # drift@DOMAIN: the domain's test split against base's training split, as DVC metrics
    drift = {d: json.loads((repo / "reports" / "drift" / d / "drift.json").read_text()) for d in ("base", "fog")}
    assert drift["fog"]["data_drift"] is True and drift["base"]["data_drift"] is False  # base: the control
    assert drift["fog"]["n_current"] == 8 and drift["fog"]["n_reference"] == round(40 * 0.7)
    assert (repo / "reports" / "drift" / "fog" / "drift.html").is_file()
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], repo, cli_env))
    fog = shown[""]["data"]["reports/drift/fog/drift.json"]["data"]
    assert fog["score"] == drift["fog"]["score"] and fog["share_drifted"] == drift["fog"]["share_drifted"]

    second = _run(["dvc", "repro"], repo, cli_env)
    assert "Running stage" not in second, second
    assert "didn't change" in second or "up to date" in second

    tiny_raw["eval"]["n_overlays"] = 1  # read by the evaluate stages and the drift checks' champion evaluation
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_raw))
    assert _changed_stages(repo, cli_env) == ["drift@base", "drift@fog", "evaluate@base", "evaluate@fog"]
    tiny_raw["eval"]["n_overlays"] = 2
    tiny_raw["drift"]["alpha"] = 0.02  # read only by the drift checks
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_raw))
    assert _changed_stages(repo, cli_env) == ["drift@base", "drift@fog"]
    tiny_raw["drift"]["alpha"] = 0.01
    tiny_raw["drift"]["reference_size"] = 100  # read by `segloop reference`, not by these stages
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_raw))
    assert _changed_stages(repo, cli_env) == []

    tiny_raw["split"]["seed"] = 5  # read by split; train, evaluate and drift follow from its new outputs
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_raw))
    assert _changed_stages(repo, cli_env) == ["split@base", "split@fog"]
    third = _run(["dvc", "repro"], repo, cli_env)
    ran = {line.split("'")[1] for line in third.splitlines() if line.startswith("Running stage")}
    assert ran == {"split@base", "split@fog", "train", "evaluate@base", "evaluate@fog", "drift@base", "drift@fog"}, (
        third
    )

    pipeline["stages"].update(compression)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    assert _changed_stages(repo, cli_env) == sorted(COMPRESSION)  # valid stages on the built champion, never run
