"""Full-image inference: pad to a multiple of 32, sliding window above a size limit.

The padding and tiling run the same for every backend: anything that maps a padded
batch to logits (an eager `nn.Module`, or `segloop.export.OnnxBackend` for ONNX Runtime).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from segloop.distributed import device_for, world_from_env

STRIDE = 32  # total downsampling of a depth-5 encoder

# Padded batch (N, C, H, W) float in [0, 1], H and W multiples of STRIDE -> logits (N, K, H, W).
Backend = Callable[[torch.Tensor], torch.Tensor]


def pick_device() -> torch.device:
    """This process's GPU when there is one (cuda:LOCAL_RANK under torchrun), else the CPU."""
    return device_for(world_from_env())


def pad_to_stride(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(x padded at the bottom/right to multiples of STRIDE, original H, original W)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % STRIDE, (-w) % STRIDE
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    return x, h, w


def _forward_padded(model: Backend, x: torch.Tensor) -> torch.Tensor:
    padded, h, w = pad_to_stride(x)
    return model(padded)[..., :h, :w]


def _starts(length: int, tile: int, step: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


@torch.inference_mode()
def predict_logits(model: Backend, x: torch.Tensor, max_size: int = 512, overlap: float = 0.25) -> torch.Tensor:
    """Logits (N, K, H, W) float32 for images (N, C, H, W) float in [0, 1] of any size.

    Images whose sides fit in `max_size` run whole; larger ones are tiled with
    `max_size` windows overlapping by `overlap`, and the logits averaged.
    """
    h, w = x.shape[-2:]
    if max(h, w) <= max_size:
        return _forward_padded(model, x).float()
    step = max(STRIDE, int(max_size * (1 - overlap)) // STRIDE * STRIDE)
    total = counts = None
    for top in _starts(h, max_size, step):
        for left in _starts(w, max_size, step):
            tile = x[..., top : top + max_size, left : left + max_size]
            logits = _forward_padded(model, tile).float()
            if total is None:
                total = x.new_zeros((x.shape[0], logits.shape[1], h, w), dtype=torch.float32)
                counts = x.new_zeros((1, 1, h, w), dtype=torch.float32)
            total[..., top : top + tile.shape[-2], left : left + tile.shape[-1]] += logits
            counts[..., top : top + tile.shape[-2], left : left + tile.shape[-1]] += 1
    return total / counts
