"""Smaller models from a trained one: knowledge distillation into a light student, and
structured channel pruning followed by a short fine-tune.

Both train with the ordinary loop (`segloop.train.train`) and write ordinary segloop
checkpoints: `evaluate`, `export`, `predict`, `serve` and the registry take them as they
take any other. A pruned checkpoint records its narrower layers (`widths`, plain ints), so
it reloads with `weights_only=True` and without Torch-Pruning, which only `prune` imports.
This module decides nothing about promotion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from segloop.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from segloop.config import Settings
from segloop.continual import Distillation
from segloop.inference import pick_device
from segloop.models import check_model_settings, layer_widths
from segloop.train import SegLoss, TrainResult, train

PRUNED = "pruned.pt"  # the pruned, not yet fine-tuned weights (kept beside best.pt for comparison)


def _check_fits(ckpt: dict, settings: Settings, source: str) -> None:
    """The model must predict the classes and read the channels the training data has."""
    if list(ckpt["classes"]) != list(settings.data.classes):
        raise ValueError(f"{source}: classes {ckpt['classes']} differ from data.classes {settings.data.classes}")
    if ckpt["channels"] != settings.data.channels:
        raise ValueError(f"{source}: {ckpt['channels']} channels, data.channels is {settings.data.channels}")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def distill(
    settings: Settings,
    teacher: Path,
    data: Path | Sequence[Path],
    out: Path,
    val: Path | None = None,
    label: str | None = None,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
    **hooks: Any,
) -> TrainResult:
    """Train the student `distill.student` on `data` (several folders: concatenated) from `teacher`
    (a checkpoint) and the labels; write `out` like `train` does (best.pt is the student). `label`
    names the teacher in the checkpoint (e.g. a models:/ ref rather than a downloaded copy's path).
    `hooks`: `train` options (`on_epoch`, `clock`)."""
    d = settings.distill
    check_model_settings(d.student, "distill.student")
    ckpt = load_checkpoint(teacher)
    _check_fits(ckpt, settings, f"--teacher {label or teacher}")
    teacher_model, teacher_settings = model_from_checkpoint(ckpt, str(teacher))
    # The student reads what the teacher reads unless told otherwise (the soft labels are for that input).
    student = (
        d.student if d.student.norm is not None else d.student.model_copy(update={"norm": teacher_settings.model.norm})
    )
    t = settings.train
    meta = {
        "teacher": label or str(teacher),
        "distill": {
            "temperature": d.temperature,
            "alpha": d.alpha,
            "teacher_parameters": count_parameters(teacher_model),
        },
    }
    log(f"distilling {label or teacher} into {student.arch}/{student.encoder} (T {d.temperature:g}, alpha {d.alpha:g})")
    return train(
        settings.model_copy(update={"model": student}),
        data,
        out,
        val,
        log=log,
        # LwF's per-pixel KL term, here against a different, larger model of the same classes.
        extra_loss=Distillation(teacher_model.to(pick_device()), d.temperature, d.alpha, unbiased=False),
        seg_loss=SegLoss((1 - d.alpha) * t.dice_weight, (1 - d.alpha) * t.ce_weight),
        meta=meta,
        **hooks,
    )


def prune_model(model: torch.nn.Module, ratio: float, channels: int, size: int, round_to: int | None = None) -> None:
    """Remove `ratio` of the channels of every prunable layer of `model`, in place, by group L1
    magnitude (Torch-Pruning's dependency graph keeps residual and skip connections consistent).
    The input convolution keeps its input channels and the segmentation head its classes.
    `round_to`: each layer keeps a multiple of that many channels (rounded down; narrower layers stay)."""
    import torch_pruning as tp

    example = torch.rand(1, channels, size, size)
    pruner = tp.pruner.MetaPruner(
        model.eval(),
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=[model.get_submodule("segmentation_head")],
        round_to=round_to,
    )
    pruner.step()


def prune(
    settings: Settings,
    model_path: Path,
    data: Path | Sequence[Path],
    out: Path,
    val: Path | None = None,
    ratio: float | None = None,
    label: str | None = None,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
    **hooks: Any,
) -> TrainResult:
    """Prune `model_path` by `ratio` (default `prune.ratio`), write `out/pruned.pt`, then fine-tune
    it on `data` for `prune.epochs` at `prune.lr` (best.pt is the result). `label` names the source
    model in the checkpoints; `hooks`: `train` options (`on_epoch`, `clock`)."""
    p = settings.prune
    ratio = p.ratio if ratio is None else ratio
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"--ratio {ratio:g}: the share of channels to remove must be in (0, 1)")
    ckpt = load_checkpoint(model_path)
    _check_fits(ckpt, settings, f"--model {label or model_path}")
    model, source = model_from_checkpoint(ckpt, str(model_path))
    before = count_parameters(model)
    prune_model(model, ratio, ckpt["channels"], source.data.crop_size or 64, p.round_to)
    after = count_parameters(model)
    record = {
        "ratio": ratio,
        "round_to": p.round_to,
        "importance": "group L1 magnitude",
        "parameters_before": before,
        "parameters_after": after,
    }
    log(f"pruned {label or model_path}: {before:,} -> {after:,} parameters ({100 * after / before:.1f}%)")
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        out / PRUNED,
        {
            "model": model.state_dict(),
            "widths": layer_widths(model),
            "settings": ckpt["settings"],
            "classes": list(ckpt["classes"]),
            "channels": ckpt["channels"],
            "parent": label or str(model_path),
            "pruning": record,
        },
    )
    # The source's architecture and input normalisation; the fine-tune's length and lr from prune.*.
    tuned = settings.model_copy(
        update={
            "model": source.model,
            "train": settings.train.model_copy(update={"epochs": p.epochs, "lr": p.lr}),
        }
    )
    return train(
        tuned,
        data,
        out,
        val,
        init=out / PRUNED,
        log=log,
        meta={"pruning": record},
        init_label=label or str(model_path),
        **hooks,
    )
