"""Checkpoints that describe themselves: weights plus settings, classes, channels, parent.

Written atomically (temp file + rename) so a crash never leaves a torn file;
read with `weights_only=True` so a checkpoint can never run code on load.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segloop.config import Settings, settings_from_dict
from segloop.models import build_model

FORMAT = "segloop.checkpoint/1"


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a loadable segloop checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a segloop checkpoint (format {FORMAT!r} expected)")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], source: str = "<checkpoint>") -> tuple[nn.Module, Settings]:
    """Rebuild the model a checkpoint describes, weights loaded, in eval mode."""
    settings = settings_from_dict(ckpt["settings"], f"{source} (settings)")
    model = build_model(settings.model, ckpt["channels"], len(ckpt["classes"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), settings


def load_model(path: Path | str) -> tuple[nn.Module, Settings]:
    return model_from_checkpoint(load_checkpoint(path), str(path))
