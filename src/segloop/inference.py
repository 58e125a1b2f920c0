"""Full-image inference: pad to a multiple of 32, sliding window above a size limit.

The padding and tiling run the same for every backend: anything that maps a padded
batch to logits (an eager `nn.Module`, or `OnnxBackend`: a `segloop export` file in ONNX Runtime).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from segloop.distributed import device_for, world_from_env

STRIDE = 32  # total downsampling of a depth-5 encoder

# The exported graph's names and metadata (segloop.export writes them, OnnxBackend reads them).
INPUT, OUTPUT = "images", "logits"
PROVIDER = "CPUExecutionProvider"
META = "segloop."  # prefix of segloop's metadata keys

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
    total: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    for top in _starts(h, max_size, step):
        for left in _starts(w, max_size, step):
            tile = x[..., top : top + max_size, left : left + max_size]
            logits = _forward_padded(model, tile).float()
            if total is None or counts is None:
                total = x.new_zeros((x.shape[0], logits.shape[1], h, w), dtype=torch.float32)
                counts = x.new_zeros((1, 1, h, w), dtype=torch.float32)
            total[..., top : top + tile.shape[-2], left : left + tile.shape[-1]] += logits
            counts[..., top : top + tile.shape[-2], left : left + tile.shape[-1]] += 1
    assert total is not None and counts is not None  # _starts() is never empty
    return total / counts


class OnnxBackend:
    """An exported segloop model in ONNX Runtime (CPU): logits for a padded batch.

    Callable like the eager model, so `segloop.inference.predict_logits` pads and tiles
    for it. `threads` defaults to torch's intra-op thread count, so both backends get
    the same CPU budget in one process.
    """

    def __init__(self, path: Path | str, threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ONNX model not found")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3  # errors only: the CPU provider's notes would drown the CLI's output
        try:
            self.session = ort.InferenceSession(str(path), options, providers=[PROVIDER])
        except Exception as err:  # ORT raises its own Fail/InvalidGraph/... types
            raise ValueError(f"{path}: not a loadable ONNX model ({type(err).__name__}: {str(err)[:200]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if f"{META}classes" not in meta or f"{META}channels" not in meta:
            raise ValueError(
                f"{path}: not a segloop ONNX export (no {META}classes / {META}channels metadata; "
                "write one with `segloop export`)"
            )
        self.path = path
        self.classes: list[str] = json.loads(meta[f"{META}classes"])
        self.channels = int(meta[f"{META}channels"])
        self.metadata = dict(meta)
        self.provider = self.session.get_providers()[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float in [0, 1], H and W multiples of 32 -> logits (N, K, H, W) float32."""
        feed = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: feed})[0])
