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

# The project's params.yaml shrunk to seconds: tiny images, tiny decoder, few epochs.
TINY = {
    "data": {"crop_size": 64},
    "generate": {"n": 24, "image_size": [72, 80], "domains": ["base", "fog"]},
    "model": {"decoder_channels": [32, 16, 16, 8, 8]},
    "train": {"epochs": 12, "batch_size": 4, "lr": 0.003, "max_minutes": None, "num_workers": 0, "patience": 50},
    "eval": {"n_overlays": 2},
    # Tiny tests and the DVC pipeline test need no store; tracking tests point at a temp one.
    "tracking": {"enabled": False},
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
def tiny_raw() -> dict:
    return _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)


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


@pytest.fixture
def cli_env() -> dict:
    """Environment for subprocesses that must find this venv's `segloop` and `dvc`."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env
