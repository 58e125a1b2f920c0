"""Segmentation metrics as functions: per-image confusion counts first, reductions second.

A class absent from both truth and prediction has no defined IoU/Dice: it is
NaN and left out of the means (written as null in JSON).
"""

from __future__ import annotations

import math

import torch

from segloop.data.files import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (K, K) int64, rows = truth, cols = prediction; target == 255 is ignored.

    pred, target: (H, W) or (N, H, W) integer class ids.
    """
    keep = target != IGNORE_INDEX
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (t.max() >= num_classes or t.min() < 0):
        raise ValueError(f"target holds class ids outside 0..{num_classes - 1}")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_iou(cm: torch.Tensor) -> torch.Tensor:
    tp = cm.diag().double()
    denom = cm.sum(0).double() + cm.sum(1).double() - tp
    return torch.where(denom > 0, tp / denom.clamp(min=1), torch.nan)


def per_class_dice(cm: torch.Tensor) -> torch.Tensor:
    tp = cm.diag().double()
    denom = cm.sum(0).double() + cm.sum(1).double()
    return torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.nan)


def pixel_accuracy(cm: torch.Tensor) -> float:
    total = int(cm.sum())
    return float(cm.diag().sum()) / total if total else math.nan


def nanmean(values: torch.Tensor) -> float:
    valid = values[~values.isnan()]
    return float(valid.mean()) if valid.numel() else math.nan


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 6)


def summarize(cm: torch.Tensor, class_names: list[str], n_images: int) -> dict:
    """The metrics.json record of a summed confusion matrix."""
    iou, dice = per_class_iou(cm), per_class_dice(cm)
    return {
        "miou": _json_float(nanmean(iou)),
        "dice": _json_float(nanmean(dice)),
        "pixel_accuracy": _json_float(pixel_accuracy(cm)),
        "per_class_iou": {n: _json_float(v) for n, v in zip(class_names, iou.tolist())},
        "per_class_dice": {n: _json_float(v) for n, v in zip(class_names, dice.tolist())},
        "n_images": n_images,
    }
