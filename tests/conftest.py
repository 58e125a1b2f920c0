"""Shared fixtures: a shrunk real configuration and tiny synthetic datasets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from segloop.config import Settings, settings_from_dict
from segloop.data.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on a 2-core box: one intra-op thread each
    # (and in the `segloop`/`dvc` processes they start), so they do not fight for cores.
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# The project's params.yaml shrunk to seconds: tiny images, tiny decoder, few epochs.
TINY = {
    "data": {"crop_size": 64},
    "generate": {"n": 24, "image_size": [72, 80], "domains": ["base", "fog"]},
    "model": {"decoder_channels": [32, 16, 16, 8, 8]},
    "train": {
        "epochs": 12,
        "batch_size": 4,
        "iters_per_epoch": 4,
        "lr": 0.003,
        "max_minutes": None,
        "num_workers": 0,
        "patience": 50,
    },
    "eval": {"n_overlays": 2},
    # Tiny tests and the DVC pipeline test need no store; tracking tests point at a temp one.
    "tracking": {"enabled": False},
    # No Evidently workspace in the checkout; tests that check it point it at their temp folder.
    "drift": {"evidently_workspace": None},
    # A tiny champion is poor on every domain, so its quality "holds" on a shifted batch and the
    # loop would skip the update; loop tests exercise drift -> update (test_flows checks the skip).
    "continual": {"covered_drop": None},
}


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core box: one intra-op thread avoids spinning threads
    fighting other processes (several times less CPU here); the code under test is unchanged."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_raw(tmp_path_factory) -> dict:
    raw = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    # ONNX exports of test models go to the run's temp folder, not the checkout's .cache.
    raw["serve"]["cache"] = str(tmp_path_factory.getbasetemp() / "serve-cache")
    return raw


@pytest.fixture
def tiny_settings(tiny_raw) -> Settings:
    return settings_from_dict(tiny_raw)


@pytest.fixture
def tiny_params(tmp_path, tiny_raw) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    return path


@pytest.fixture(scope="session")
def base_data(tmp_path_factory) -> Path:
    """24 labelled `base` pairs of 72x80 (height x width: not multiples of 32)."""
    out = tmp_path_factory.mktemp("base")
    generate(out, "base", n=24, seed=1, size=(72, 80))
    return out


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store, created and migrated once per test run.

    Creating a store runs every MLflow schema migration (about 8-10 s on this CPU);
    copying a migrated one takes milliseconds, so store-backed tests copy this file.
    Opened through segloop's own tracking code, so it is the schema segloop expects.
    """
    from segloop.config import TrackingSettings
    from segloop.tracking import open_store, resolve_store

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    open_store(resolve_store(TrackingSettings(uri=f"sqlite:///{db}")))
    return db


def copy_store(template: Path, folder: Path) -> str:
    """A private copy of the migrated store in `folder` (artifacts beside it); its URI.

    The sqlite backup API copies a consistent snapshot even if a connection is open.
    """
    import sqlite3

    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "mlflow.db"
    src, dst = sqlite3.connect(template), sqlite3.connect(db)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    return f"sqlite:///{db}"


@pytest.fixture
def store_uri(migrated_store, tmp_path) -> str:
    """A fresh MLflow store of this test's own (a copy of the migrated template)."""
    return copy_store(migrated_store, tmp_path / "store")


@pytest.fixture
def tracked_raw(tiny_raw, store_uri) -> dict:
    """TINY settings with tracking on, pointed at this test's store (experiment `test`)."""
    return {**tiny_raw, "tracking": {"enabled": True, "uri": store_uri, "experiment": "test"}}


@pytest.fixture
def tracked_settings(tracked_raw) -> Settings:
    return settings_from_dict(tracked_raw)


@pytest.fixture
def tracked_params(tmp_path, tracked_raw) -> Path:
    path = tmp_path / "params-tracked.yaml"
    path.write_text(yaml.safe_dump(tracked_raw))
    return path


@pytest.fixture
def cli_env() -> dict:
    """Environment for subprocesses that must find this venv's `segloop` and `dvc`."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def move_store(db: Path, old: Path, new: Path) -> None:
    """Point every absolute path the copied MLflow db holds (artifact locations, model
    sources) from the original's folder into the copy's: tests never share artifacts."""
    import sqlite3

    with sqlite3.connect(db) as con:
        for (table,) in con.execute("select name from sqlite_master where type = 'table'").fetchall():
            for col in [
                c[1]
                for c in con.execute(f"pragma table_info('{table}')")
                if c[2].upper().startswith(("TEXT", "VARCHAR"))
            ]:
                con.execute(
                    f'update "{table}" set "{col}" = replace("{col}", ?, ?) where "{col}" like ?',
                    (str(old), str(new), f"%{old}%"),
                )


# Slowest files first: with `--dist loadfile --no-loadscope-reorder` (pyproject) the two
# workers start on the two longest files at once, so neither ends alone on a long one.
SLOWEST_FIRST = (
    "test_flows.py",
    "test_stack.py",
    "test_loop_integrity.py",
    "test_labels.py",
    "test_dvc_pipeline.py",
    "test_registry.py",
    "test_train.py",
    "test_redaction.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
