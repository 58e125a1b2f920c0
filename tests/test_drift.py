"""Drift detection: features on real images, cache, decision rule, real Evidently reports,
bad input, drift.json, quality-drop trigger, reference sample, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from segloop.checkpoint import save_checkpoint
from segloop.cli import main
from segloop.config import DriftSettings, SettingsError, settings_from_dict
from segloop.data.synthetic import generate
from segloop.drift.decision import column_pvalues, decide, mmd_permutation_test, table_pvalues_and_mmd
from segloop.drift.detect import detect_drift
from segloop.drift.features import featurise_folder, image_statistics, load_champion
from segloop.drift.reference import build_reference, read_reference
from segloop.models import build_model

SIZE = (64, 64)
CFG = DriftSettings(min_images=20, mmd_permutations=500)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 40-image base reference, fresh base / fog batches of 24 (with masks), 64x64."""
    root = tmp_path_factory.mktemp("drift")
    generate(root / "ref", "base", 40, seed=1, size=SIZE)
    generate(root / "base", "base", 24, seed=2, size=SIZE)
    generate(root / "fog", "fog", 24, seed=3, size=SIZE)
    return root


@pytest.fixture(scope="module")
def champion_path(tmp_path_factory):
    """A tiny, untrained U-Net checkpoint: drift features need a model, not a good one."""
    import yaml
    from conftest import ROOT, TINY, _merge

    raw = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    settings = settings_from_dict(raw)
    torch.manual_seed(0)
    model = build_model(settings.model, 3, settings.num_classes)
    path = tmp_path_factory.mktemp("champion") / "best.pt"
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "settings": settings.model_dump(mode="json"),
            "classes": list(settings.data.classes),
            "channels": 3,
            "parent": None,
            "val_miou": 0.5,
        },
    )
    return path


@pytest.fixture(scope="module")
def champion(champion_path):
    return load_champion(champion_path)


# --- features -------------------------------------------------------------------------


def test_image_statistics_known_values():
    grey = np.full((2, 40, 50, 3), 128, np.uint8)
    s = image_statistics(grey)
    assert np.allclose(s["mean_r"], 128 / 255) and np.allclose(s["std_g"], 0)
    assert np.allclose(s["noise"], 0) and np.allclose(s["entropy"], 0) and np.allclose(s["contrast"], 0)
    assert np.allclose(s["colourfulness"], 0)
    rng = np.random.default_rng(0)
    sigma = 12.0
    noisy = np.clip(128 + rng.normal(0, sigma, (2, 128, 128, 1)), 0, 255).round().astype(np.uint8)
    s = image_statistics(noisy)
    assert set(s) == {"mean_gray", "std_gray", "entropy", "contrast", "sharpness", "noise"}  # no colour for 1 channel
    assert np.allclose(s["noise"], sigma / 255, rtol=0.1)  # Immerkaer recovers the noise sigma
    assert np.all(s["sharpness"] > image_statistics(grey)["sharpness"])


def test_features_on_real_images(data, champion):
    base = featurise_folder(data / "base", 3, champion, progress=False)
    fog = featurise_folder(data / "fog", 3, champion, progress=False)
    assert len(base) == 24 and base.stems[0] == "base-s2-00000"
    assert base.embeddings.shape == (24, 512) and np.isfinite(base.embeddings).all()
    areas = np.stack([base.columns[f"area_{c}"] for c in champion.classes], 1)
    assert np.allclose(areas.sum(1), 1.0)
    assert np.all(base.columns["confidence"] >= 1 / 4 - 1e-6) and np.all(base.columns["confidence"] <= 1)
    assert np.all((base.columns["pred_entropy"] >= 0) & (base.columns["pred_entropy"] <= 1 + 1e-6))
    # Fog scatters light: brighter, flatter, blurrier than base.
    assert np.median(fog.columns["mean_g"]) > np.median(base.columns["mean_g"])
    assert np.median(fog.columns["contrast"]) < np.median(base.columns["contrast"])
    assert np.median(fog.columns["sharpness"]) < np.median(base.columns["sharpness"])
    stats_only = featurise_folder(data / "base", 3, None, progress=False)
    assert stats_only.embeddings is None and "confidence" not in stats_only.columns
    assert np.allclose(stats_only.columns["mean_r"], base.columns["mean_r"])


def test_cache_hit_miss(data, champion, tmp_path):
    cache = tmp_path / "cache"
    first = featurise_folder(data / "base", 3, champion, cache, progress=False)
    assert not first.from_cache
    (entry,) = cache.glob("*.npz")
    mtime = entry.stat().st_mtime_ns
    second = featurise_folder(data / "base", 3, champion, cache, progress=False)
    assert second.from_cache and entry.stat().st_mtime_ns == mtime and len(list(cache.glob("*.npz"))) == 1
    assert second.stems == first.stems and np.array_equal(second.embeddings, first.embeddings)
    assert all(np.array_equal(first.columns[k], second.columns[k]) for k in first.columns)
    # Another model version or changed pixels are another key, never a stale hit.
    assert not featurise_folder(data / "base", 3, None, cache, progress=False).from_cache
    changed = tmp_path / "changed"
    shutil.copytree(data / "base", changed)
    shutil.copy(data / "fog" / "images" / "fog-s3-00000.png", changed / "images" / "base-s2-00000.png")
    assert not featurise_folder(changed, 3, champion, cache, progress=False).from_cache
    assert len(list(cache.glob("*.npz"))) == 3


# --- decision rule -------------------------------------------------------------------


def test_decide_weighted_bonferroni():
    cfg = DriftSettings(alpha=0.01, embedding_alpha_share=0.5)
    p = {f"c{i}": 0.5 for i in range(10)}
    # column level = 0.01 * 0.5 / 10 = 5e-4
    d = decide({**p, "c0": 6e-4}, 0.2, cfg)
    assert not d.drift and d.drifted_features == [] and d.column_alpha == pytest.approx(5e-4)
    assert d.score == pytest.approx(6e-4 * 10 / 0.5)
    d = decide({**p, "c0": 4e-4}, 0.2, cfg)
    assert d.drift and d.drifted_features == ["c0"] and d.share_drifted == pytest.approx(0.1)
    d = decide(p, 0.004, cfg)  # embeddings alone: 0.004 <= 0.01 * 0.5
    assert d.drift and d.drifted_features == ["embeddings"]
    # Without embeddings the columns get all of alpha.
    d = decide({**p, "c0": 9e-4}, None, cfg)
    assert d.drift and d.column_alpha == pytest.approx(1e-3) and d.embedding_alpha is None
    two = DriftSettings(min_drifted_columns=2)
    assert not decide({**p, "c0": 1e-6}, None, two).drift
    assert decide({**p, "c0": 1e-6, "c1": 1e-6}, None, two).drift


def test_mmd_permutation_test():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 4))
    _, p_same = mmd_permutation_test(x, rng.normal(size=(40, 4)), 400)
    _, p_shift = mmd_permutation_test(x, rng.normal(size=(40, 4)) + [1.0, 0, 0, 0], 400)
    assert p_same > 0.05 and p_shift == pytest.approx(1 / 401)


# --- end to end with real Evidently ----------------------------------------------------


@pytest.mark.slow
def test_fog_drifts_fresh_base_does_not(data, champion, tmp_path):
    cache = tmp_path / "cache"
    fog = detect_drift(data / "ref", data / "fog", tmp_path / "fog", CFG, 3, champion, cache, progress=False)
    base = detect_drift(data / "ref", data / "base", tmp_path / "base", CFG, 3, champion, cache, progress=False)
    assert fog["data_drift"] and fog["score"] <= CFG.alpha and fog["drifted_features"]
    assert not base["data_drift"] and base["drifted_features"] == [] and base["score"] > CFG.alpha
    assert base["cache"] == {"reference": True, "current": False}  # reference featurised once
    assert (tmp_path / "fog" / "drift.html").stat().st_size > 10_000
    # drift.json schema
    saved = json.loads((tmp_path / "fog" / "drift.json").read_text())
    for key, typ in {
        "drift": bool,
        "score": float,
        "share_drifted": float,
        "drifted_features": list,
        "method": str,
        "n_reference": int,
        "n_current": int,
        "data_drift": bool,
    }.items():
        assert isinstance(saved[key], typ), key
    assert saved["n_reference"] == 40 and saved["n_current"] == 24
    assert "embedding" in saved["method"] and saved["embeddings"]["test"] == "mmd_rbf_permutation"
    assert 0 < saved["share_drifted"] <= 1 and saved["rule"]["alpha"] == CFG.alpha
    # The champion's mean confidence on each side (the drift dashboard plots it): its column's mean.
    ref_conf = featurise_folder(data / "ref", 3, champion, cache, crop=CFG.model_crop, progress=False)
    assert saved["confidence"]["reference"] == pytest.approx(ref_conf.columns["confidence"].mean())
    assert 0 < saved["confidence"]["current"] <= 1
    # The benchmark's fast path (scipy) gives the p-values Evidently reported.
    ref = featurise_folder(data / "ref", 3, champion, cache, crop=CFG.model_crop, progress=False)
    cur = featurise_folder(data / "fog", 3, champion, cache, crop=CFG.model_crop, progress=False)
    ref_cols, cur_cols, mmd = table_pvalues_and_mmd(ref, cur, CFG)
    fast = column_pvalues(ref_cols, cur_cols)
    assert set(fast) == set(saved["pvalues"])
    assert all(fast[c] == pytest.approx(saved["pvalues"][c], rel=1e-9, abs=1e-300) for c in fast)
    assert mmd["p_value"] == saved["embeddings"]["p_value"]


@pytest.mark.slow
def test_without_model_uses_image_statistics_only(data, tmp_path):
    r = detect_drift(data / "ref", data / "fog", tmp_path, CFG, 3, None, None, progress=False)
    assert r["data_drift"] and "no champion" in r["method"] and r["embeddings"] is None
    assert not any(c.startswith(("area_", "emb_")) for c in r["pvalues"])
    assert r["performance_drift"] is None and r["confidence"] is None  # no champion, no confidence


@pytest.mark.slow
def test_quality_drop_trigger(data, champion, tmp_path):
    # Held-out mIoU far above what the (untrained) champion scores on the batch: performance drift.
    r = detect_drift(
        data / "ref", data / "base", tmp_path / "a", CFG, 3, champion, None, champion_miou=1.0, progress=False
    )
    q = r["quality"]
    assert r["performance_drift"] is True and r["drift"] is True and not r["data_drift"]
    assert q["drop"] == pytest.approx(1.0 - q["batch_miou"]) and q["drop"] > CFG.max_quality_drop
    assert (tmp_path / "a" / "quality" / "metrics.json").is_file()
    # Held-out equal to the batch score: no drop.
    r = detect_drift(
        data / "ref",
        data / "base",
        tmp_path / "b",
        CFG,
        3,
        champion,
        None,
        champion_miou=q["batch_miou"],
        progress=False,
    )
    assert r["performance_drift"] is False and r["drift"] is False
    # Without masks there is nothing to evaluate.
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(data / "base" / "images", unlabelled)
    r = detect_drift(data / "ref", unlabelled, tmp_path / "c", CFG, 3, champion, None, progress=False)
    assert r["performance_drift"] is None and r["quality"]["reason"] == "batch has no masks"


# --- bad input ----------------------------------------------------------------------------


def test_bad_input_names_folder_or_file(data, tmp_path):
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"current {empty}.*no images"):
        detect_drift(data / "ref", empty, tmp_path / "o", CFG, 3, progress=False)
    with pytest.raises(FileNotFoundError, match="reference .*nowhere: folder not found"):
        detect_drift(tmp_path / "nowhere", data / "base", tmp_path / "o", CFG, 3, progress=False)
    few = tmp_path / "few"
    (few / "images").mkdir(parents=True)
    for p in sorted((data / "base" / "images").iterdir())[:5]:
        shutil.copy(p, few / "images")
    with pytest.raises(ValueError, match=f"{few}: 5 images, .*at least 20 \\(drift.min_images\\)"):
        detect_drift(data / "ref", few, tmp_path / "o", CFG, 3, progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(data / "base", broken)
    bad = broken / "images" / "base-s2-00003.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=f"{bad}: unreadable image"):
        detect_drift(data / "ref", broken, tmp_path / "o", CFG, 3, progress=False)
    assert not (tmp_path / "o" / "drift.json").exists()


def test_cli_drift_and_bad_input(data, tiny_params, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--params", str(tiny_params), "--reference", str(data / "ref"), "--out", str(out)]  # tracking off
    rc = main(
        [
            "drift",
            *common,
            "--current",
            str(data / "fog"),
            "--cache",
            str(tmp_path / "cache"),
            "--set",
            "drift.mmd_permutations=200",
        ]
    )
    assert rc == 0 and json.loads((out / "drift.json").read_text())["drift"] is True
    assert "DRIFT" in capsys.readouterr().out
    rc = main(["drift", *common, "--current", str(tmp_path / "missing")])
    assert rc == 2 and f"current {tmp_path / 'missing'}: folder not found" in capsys.readouterr().err
    rc = main(["drift", *common, "--current", str(data / "fog"), "--set", "drift.alpha=0"])
    assert rc == 2 and "drift.alpha" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_drift_check_is_an_mlflow_run(data, champion_path, tracked_params, tracked_settings, tmp_path, capsys):
    """With tracking on, each check is a run of `<experiment>-drift` holding both files."""
    from segloop.tracking import dir_md5, open_store, resolve_store

    runs = {}
    for batch in ("fog", "base"):
        out = tmp_path / batch
        assert (
            main(
                [
                    "drift",
                    "--params",
                    str(tracked_params),
                    "--reference",
                    str(data / "ref"),
                    "--current",
                    str(data / batch),
                    "--model",
                    str(champion_path),
                    "--out",
                    str(out),
                    "--no-cache",
                    "--set",
                    "drift.mmd_permutations=200",
                ]
            )
            == 0
        )
        runs[batch] = (
            json.loads((out / "drift.json").read_text()),
            capsys.readouterr().out.split("MLflow run ")[1].strip(),
        )
    client = open_store(resolve_store(tracked_settings.tracking))
    for batch, (record, run_id) in runs.items():
        run = client.get_run(run_id)
        assert client.get_experiment(run.info.experiment_id).name == "test-drift" and run.info.status == "FINISHED"
        assert run.info.run_name == f"drift:{batch}" and run.data.tags["segloop.command"] == "drift"
        assert run.data.tags["segloop.drift"] == str(record["drift"]).lower()
        assert run.data.tags["segloop.drift.data"] == str(record["data_drift"]).lower()
        assert run.data.tags["segloop.data.current.md5"] == dir_md5(data / batch)
        assert run.data.metrics["score"] == pytest.approx(record["score"])
        assert run.data.metrics["share_drifted"] == pytest.approx(record["share_drifted"])
        assert run.data.metrics["n_current"] == 24 and run.data.metrics["n_reference"] == 40
        files = {a.path for a in client.list_artifacts(run_id)}
        assert {"drift.json", "drift.html", "quality"} <= files  # labelled batch: the champion's evaluation too
        logged = client.download_artifacts(run_id, "drift.json", str(tmp_path / f"dl-{batch}"))
        assert json.loads(Path(logged).read_text()) == record
    assert runs["fog"][0]["data_drift"] is True and runs["base"][0]["data_drift"] is False


# --- reference and settings -------------------------------------------------------------


def test_build_reference_is_seeded_and_auditable(data, tmp_path):
    a = build_reference(data / "ref", 16, 3, tmp_path / "a", model_id="abc")
    b = build_reference(data / "ref", 16, 3, tmp_path / "b", model_id="abc")
    c = build_reference(data / "ref", 16, 4, tmp_path / "c")
    assert [f["stem"] for f in a["files"]] == [f["stem"] for f in b["files"]] != [f["stem"] for f in c["files"]]
    assert a["n"] == 16 and a["n_available"] == 40 and read_reference(tmp_path / "a")["model_id"] == "abc"
    from segloop.drift.features import file_sha256

    for f in a["files"]:
        assert file_sha256(tmp_path / "a" / "images" / f["file"]) == f["sha256"]
    assert build_reference(data / "ref", 100, 0, tmp_path / "all")["n"] == 40  # fewer available: all of them
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        build_reference(data / "ref", 16, 3, tmp_path / "a")


def test_reference_model_mismatch_is_reported(data, champion, tmp_path):
    build_reference(data / "ref", 24, 0, tmp_path / "ref", model_id="an-older-champion")
    r = detect_drift(tmp_path / "ref", data / "base", tmp_path / "o", CFG, 3, champion, None, progress=False)
    assert r["reference_model_id"] == "an-older-champion" and "rebuild the reference" in r["warnings"][0]


@pytest.mark.parametrize(
    "override, key",
    [
        ({"alpha": 0}, "drift.alpha"),
        ({"alpha": 0.7}, "drift.alpha"),
        ({"min_images": 2}, "drift.min_images"),
        ({"model_crop": 100}, "drift.model_crop"),
        ({"embedding_alpha_share": 1.0}, "drift.embedding_alpha_share"),
        ({"reference_size": 10}, "drift"),
        ({"thresh": 1}, "drift.thresh"),
        ({"mmd_permutations": 150}, "mmd_permutations=150 cannot reach"),
    ],
)
def test_drift_settings_validated(tiny_raw, override, key):
    tiny_raw["drift"] = {**tiny_raw.get("drift", {}), **override}
    with pytest.raises(SettingsError, match=key.replace(".", r"\.")):
        settings_from_dict(tiny_raw)
