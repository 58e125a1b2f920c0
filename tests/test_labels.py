"""Unlabelled batches in the loop: drift -> label request (Label Studio tasks with the champion's
drafts) -> labels imported -> update, exactly once. Real git, DVC, MLflow (sqlite), Evidently;
the selection rules on constructed cases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, TINY, _merge, move_store
from crash_step import CRASH_EXIT
from PIL import Image

from segloop import cli, loop, registry
from segloop.config import LabelSettings, load_settings
from segloop.data.synthetic import generate
from segloop.drift.history import history
from segloop.labels import Uncertainty, budget_count, k_center, select

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# An import killed right after it wrote its marker (trained, registered, promoted, not committed).
CRASHED_IMPORT = """
import sys
from pathlib import Path
from crash_step import inject
from segloop import loop
from segloop.config import load_settings
inject("marker", "after")
settings = load_settings(Path(sys.argv[1]))
loop.import_labels(loop.Workspace.of(settings), settings, "01-fog", Path(sys.argv[2]))
"""


def _params(root: Path) -> Path:
    raw = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    # alpha 0.01: the base batch must not raise a 5%-per-batch false alarm (as test_flows saw); fog drifts far below
    raw["drift"] |= {"min_images": 8, "reference_size": 32, "model_crop": 64, "mmd_permutations": 200, "alpha": 0.01}
    raw["drift"]["evidently_workspace"] = str(root / "evidently")  # drift over time (test_drift_history.py)
    raw["continual"] |= {"epochs": 4, "lr": 0.003}
    # The plumbing, not learning: every candidate passes the gate.
    raw["registry"] = {"model_name": "loop", "gate": {"min_gain": -1.0, "max_forgetting": 1.0, "floor_miou": 0.05}}
    raw["tracking"] = {"enabled": True, "uri": f"sqlite:///{root}/store/mlflow.db", "experiment": "loop"}
    raw["flows"] = {"workspace": str(root / "ws"), "retries": 0, "max_attempts": 2}
    raw["labels"] = {"budget": 0.25, "strategy": "entropy"}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def arrive(ws: loop.Workspace, name: str, domain: str, n: int, seed: int, labelled: bool, truth: Path) -> Path:
    """A batch in incoming/; unlabelled: its masks moved to `truth`/<name> (what a labeller would draw)."""
    out = ws.incoming / name
    generate(out, domain, n=n, seed=seed, size=(72, 80))
    if not labelled:
        truth.mkdir(parents=True, exist_ok=True)
        shutil.move(str(out / "masks"), truth / name)
    (out / "batch.json").write_text(json.dumps({"domain": domain, "labelled": labelled}))
    return out


@pytest.fixture(scope="module")
def awaiting(tmp_path_factory):
    """A champion (v1) trained on `base`, then an unlabelled `fog` batch that drifted: awaiting labels."""
    root = tmp_path_factory.mktemp("labels")
    settings = load_settings(_params(root))
    ws = loop.Workspace.of(settings)
    loop.process_batch(ws, arrive(ws, "00-base", "base", 40, 1, True, root / "truth"), settings)
    rec = loop.process_batch(ws, arrive(ws, "01-fog", "fog", 32, 3, False, root / "truth"), settings)
    return root, rec


@pytest.fixture
def copy(tmp_path, awaiting):
    """A private copy of that workspace and its store: (root, settings, ws)."""
    root = tmp_path / "root"
    shutil.copytree(awaiting[0], root, symlinks=True)
    move_store(root / "store" / "mlflow.db", awaiting[0], root)
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tracking_utils._artifact_repos_cache.clear()  # the copy has the original's run ids
    settings = load_settings(_params(root))
    return root, settings, loop.Workspace.of(settings)


def _versions(settings) -> int:
    client, _ = registry.registry_client(settings)
    return len(client.search_model_versions(f"name = '{settings.registry.model_name}'"))


def test_a_drifted_unlabelled_batch_asks_for_labels_and_does_not_block_the_next(copy, awaiting):
    root, settings, ws = copy
    rec = awaiting[1]
    assert not rec.labelled and rec.drift["drift"] and not rec.updated
    assert rec.status == "awaiting-labels" and rec.label_request == "labels/requests/01-fog"
    request = ws.root / rec.label_request
    chosen = json.loads((request / "request.json").read_text())
    assert chosen["strategy"] == "entropy" and chosen["batch_images"] == 32 and len(chosen["images"]) == 8
    stems = [r["stem"] for r in chosen["images"]]
    assert sorted(p.stem for p in (request / "images").iterdir()) == sorted(stems)
    assert sorted(p.stem for p in (request / "drafts").iterdir()) == sorted(stems)
    entropies = [r["entropy"] for r in chosen["images"]]
    assert entropies == sorted(entropies, reverse=True)  # the most uncertain first
    tasks = json.loads((request / "tasks.json").read_text())
    assert [t["data"]["segloop_stem"] for t in tasks] == stems
    assert tasks[0]["data"]["image"] == f"/data/local-files/?d=labels/requests/01-fog/images/{stems[0]}.png"
    # versioned (DVC), and logged to MLflow on the run the request names
    assert (ws.root / "labels" / "requests" / "01-fog.dvc").is_file()
    client, _ = registry.registry_client(settings)
    logged = {a.path for a in client.list_artifacts(chosen["mlflow_run"], "label_request")}
    assert {"label_request/tasks.json", "label_request/request.json", "label_request/drafts"} <= logged
    assert loop.read_state(ws).champion == "1" and _versions(settings) == 1  # nothing trained on it

    # The next batch goes on meanwhile: an unlabelled base batch, no drift, so no request.
    arrive(ws, "02-base", "base", 16, 7, False, root / "truth")
    assert [p.name for p in loop.pending_batches(ws)] == ["02-base"]
    nxt = loop.process_batch(ws, loop.pending_batches(ws)[0], settings)
    assert nxt.status == "done" and not nxt.drift["drift"] and nxt.label_request is None
    assert not ws.request("02-base").exists() and _versions(settings) == 1
    assert loop.pending_batches(ws) == [] and loop.processed(ws) == {"00-base", "01-fog", "02-base"}
    status = {r["batch"]: r["status"] for r in loop.list_batches(ws)}
    assert status == {"00-base": "processed", "01-fog": "awaiting-labels", "02-base": "processed"}
    # Each drift check is a snapshot in the Evidently workspace (the bootstrap had none to make).
    points = history(settings.drift.evidently_workspace, "loop")
    assert [(p["batch"], p["drift"]) for p in points] == [("01-fog", 1.0), ("02-base", 0.0)]
    assert [p["score"] for p in points] == pytest.approx([rec.drift["score"], nxt.drift["score"]])
    assert all(0 < p["confidence"] <= 1 and p["model_version"] == "1" for p in points)
    assert loop.git(ws, "status", "--porcelain") == "" and "up to date" in loop.dvc(ws, "status")


def test_the_tasks_load_with_label_studio_s_own_converter(awaiting):
    """Each prediction decodes, with Label Studio's brush decoder, to the draft mask; its names
    and labels are the labelling config's (parsed by Label Studio's own config parser)."""
    brush = pytest.importorskip("label_studio_converter.brush")
    label_config = pytest.importorskip("label_studio_tools.core.label_config")
    request = awaiting[0] / "ws" / awaiting[1].label_request
    config = label_config.parse_config((request / "label_config.xml").read_text())
    assert config["label"]["type"] == "BrushLabels" and config["label"]["to_name"] == ["image"]
    classes = config["label"]["labels"]
    for t in json.loads((request / "tasks.json").read_text()):
        draft = np.array(Image.open(request / "drafts" / f"{t['data']['segloop_stem']}.png"))
        (prediction,) = t["predictions"]
        rebuilt = np.full(draft.shape, -1)
        for r in prediction["result"]:
            assert (r["from_name"], r["to_name"], r["type"]) == ("label", "image", "brushlabels")
            assert (r["original_height"], r["original_width"]) == draft.shape
            layer = brush.decode_rle(r["value"]["rle"]).reshape(*draft.shape, 4)[..., 3]
            assert set(np.unique(layer)) <= {0, 255}
            rebuilt[layer == 255] = classes.index(r["value"]["brushlabels"][0])
        assert (rebuilt == draft).all()


def test_imported_labels_quarantine_bad_masks_update_once_and_refuse_a_second_import(copy, capsys, cli_env):
    root, settings, ws = copy
    request = json.loads((ws.request("01-fog") / "request.json").read_text())
    stems = [r["stem"] for r in request["images"]]
    labels = root / "labelled-by-hand"
    labels.mkdir()
    for stem in stems[1:]:
        shutil.copy2(root / "truth" / "01-fog" / f"{stem}.png", labels / f"{stem}.png")
    Image.fromarray(np.full((72, 80), 9, np.uint8)).save(labels / f"{stems[0]}.png")  # class 9 of 4
    Image.fromarray(np.zeros((72, 80), np.uint8)).save(labels / "fog-s3-09999.png")  # not requested

    # A crash before the import's commit: it did not count, and running it again redoes it whole.
    proc = subprocess.run(
        [sys.executable, "-c", CRASHED_IMPORT, str(root / "params.yaml"), str(labels)],
        env={**cli_env, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == CRASH_EXIT, proc.stderr[-3000:]
    assert loop.labels_imported(ws) == set() and _versions(settings) == 2
    rec = loop.import_labels(ws, settings, "01-fog", labels)
    assert rec.status == "labelled" and rec.labelled and rec.accepted == 7 and rec.quarantined == 2
    assert rec.updated and rec.candidate_version == "2" and rec.update_reason.startswith("labels imported")
    assert rec.labels["missing"] == []  # the bad one came back: quarantined, not missing
    log = ws.root / "quarantine" / "01-fog" / "reasons.jsonl"
    reasons = [json.loads(line) for line in log.read_text().splitlines()]
    why = {Path(r["file"]).name: r["reason"] for r in reasons}
    assert why[f"{stems[0]}.png"].startswith("mask values out of range: [9]")
    assert why["fog-s3-09999.png"] == "not in the label request of batch 01-fog"
    assert (ws.root / "quarantine" / "01-fog" / "labels" / f"{stems[0]}.png").is_file()
    assert loop.labels_imported(ws) == {"01-fog"} and _versions(settings) == 2
    assert "labelled/01-fog.json" in loop.git(ws, "ls-files")
    assert {r["batch"]: r["status"] for r in loop.list_batches(ws)}["01-fog"] == "processed"
    state = loop.read_state(ws)
    assert rec.promoted and state.champion == "2" and "fog" in state.heldout  # the gate lets every candidate pass
    moves = [(e["kind"], e["to"]) for e in registry.history(settings) if e["alias"] == "champion"]
    assert moves == [("gate", "1"), ("gate", "2"), ("rollback", "1"), ("gate", "2")]  # the crashed promotion undone
    assert loop.git(ws, "status", "--porcelain") == "" and "up to date" in loop.dvc(ws, "status")

    with pytest.raises(ValueError, match="labels already imported"):
        loop.import_labels(ws, settings, "01-fog", labels)
    assert cli.main(["labels", "import", "--params", str(root / "params.yaml"), "01-fog", str(labels)]) == 2
    assert "labels already imported" in capsys.readouterr().err
    assert _versions(settings) == 2  # nothing trained twice
    assert sum(s.startswith("batch 01-fog:") for s in loop.git(ws, "log", "--format=%s").splitlines()) == 2


# ---------------------------------------------------------------- the selection rules


def _uncertainty(n: int, embeddings: np.ndarray | None = None, seed: int = 0) -> Uncertainty:
    rng = np.random.default_rng(seed)
    emb = embeddings if embeddings is not None else rng.normal(size=(n, 4))
    return Uncertainty([f"s{i}" for i in range(n)], rng.random(n), rng.random(n), emb)


def test_entropy_and_margin_pick_the_most_uncertain_images():
    u = _uncertainty(10)
    u.entropy[[3, 7]] = [0.99, 0.98]  # the two the champion is least sure of
    u.margin[[2, 5]] = [0.001, 0.002]
    assert select(u, LabelSettings(budget=2, strategy="entropy")) == [3, 7]
    assert select(u, LabelSettings(budget=2, strategy="margin")) == [2, 5]


def test_coreset_picks_spread_out_embeddings_where_entropy_piles_up():
    # Three tight clusters; the most uncertain images are all in the first one.
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    emb = np.repeat(centres, 5, axis=0) + np.random.default_rng(1).normal(scale=0.1, size=(15, 2))
    u = _uncertainty(15, emb)
    u.entropy[:] = np.linspace(0.1, 0.2, 15)
    u.entropy[:5] += 0.5
    clusters = lambda picks: {i // 5 for i in picks}  # noqa: E731
    assert clusters(select(u, LabelSettings(budget=3, strategy="coreset"))) == {0, 1, 2}
    assert clusters(select(u, LabelSettings(budget=3, strategy="entropy"))) == {0}
    hybrid = select(u, LabelSettings(budget=3, strategy="hybrid", hybrid_pool=5.0))
    assert hybrid[0] == int(np.argmax(u.entropy)) and len(clusters(hybrid)) == 3
    assert k_center(emb, 3, 0)[0] == 0


def test_budget_is_a_count_or_a_share_and_random_is_seeded():
    assert budget_count(10, 200) == 10 and budget_count(0.25, 200) == 50 and budget_count(0.25, 3) == 1
    assert budget_count(500, 200) == 200 and budget_count(1.0, 7) == 7
    u = _uncertainty(40)
    seeded = LabelSettings(budget=0.1, strategy="random", seed=3)
    picks = select(u, seeded)
    assert len(picks) == 4 == len(set(picks)) and picks == select(u, seeded)
    assert len(select(u, LabelSettings(budget=12, strategy="coreset"))) == 12


def test_an_unlabelled_folder_keeps_its_images_quarantines_bad_ones_and_refuses_masks(tmp_path):
    from segloop.data.validate import validate_images

    src = tmp_path / "batch"
    generate(src, "fog", n=3, seed=0, size=(72, 80))
    (src / "images" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="has masks/ but is declared unlabelled"):
        validate_images(src, tmp_path / "out", tmp_path / "q")
    shutil.rmtree(src / "masks")
    result = validate_images(src, tmp_path / "out", tmp_path / "q")
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == sorted(p.name for p in result.images)
    assert len(result.images) == 3 and [Path(r["file"]).name for r in result.rejected] == ["broken.png"]
    assert "unreadable image" in (tmp_path / "q" / "reasons.jsonl").read_text()
    assert (src / "images" / "broken.png").exists()  # the source is only read
