"""Checkpoints that describe themselves: weights plus settings, classes, channels, parent.

Written atomically (temp file + rename) so a crash never leaves a torn file;
read with `weights_only=True` so a checkpoint can never run code on load. Each one
carries the SHA-256 of its weights (`weights_sha256`), checked on every load: a
corrupted or edited file stops with an error instead of predicting garbage.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segloop.config import Settings, redact_settings, settings_from_dict
from segloop.models import build_model

FORMAT = "segloop.checkpoint/1"


class CheckpointIntegrityError(ValueError):
    """A checkpoint's weights do not match the SHA-256 it was saved with."""


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor of a state_dict, in key order: name, dtype, shape, then raw bytes.

    Independent of the file's zip layout and of the device, so the same weights always hash the same.
    """
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(payload.get("settings"), dict):  # an artifact never carries the store's password
                payload = {**payload, "settings": redact_settings(payload["settings"])}
            torch.save({"format": FORMAT, **payload, "weights_sha256": weights_sha256(payload["model"])}, f)
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
    expected = ckpt.get("weights_sha256")
    if expected is None:
        # Saved before checkpoints carried a hash: still loaded (existing champions, DVC caches
        # and registered versions hold such files), with a warning so nobody takes it as checked.
        print(
            f"warning: {path}: checkpoint has no weights hash (saved by an older segloop); integrity not checked",
            file=sys.stderr,
        )
    elif weights_sha256(ckpt["model"]) != expected:
        raise CheckpointIntegrityError(
            f"{path}: weights do not match their SHA-256 (saved {expected[:12]}...): the file was corrupted or "
            "modified after it was written; refusing to use it"
        )
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], source: str = "<checkpoint>") -> tuple[nn.Module, Settings]:
    """Rebuild the model a checkpoint describes, weights loaded, in eval mode."""
    settings = settings_from_dict(ckpt["settings"], f"{source} (settings)")
    # A pruned model's narrower layers are in `widths` (segloop.models.layer_widths).
    model = build_model(settings.model, ckpt["channels"], len(ckpt["classes"]), ckpt.get("widths"))
    model.load_state_dict(ckpt["model"])
    return model.eval(), settings


def load_model(path: Path | str) -> tuple[nn.Module, Settings]:
    return model_from_checkpoint(load_checkpoint(path), str(path))
