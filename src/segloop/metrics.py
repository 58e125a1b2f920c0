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
    """(..., K) IoU of (..., K, K) confusion counts (a stack gives one row per matrix)."""
    tp = cm.diagonal(dim1=-2, dim2=-1).double()
    denom = cm.sum(-2).double() + cm.sum(-1).double() - tp
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


def paired_gain_bound(
    candidate: torch.Tensor, champion: torch.Tensor, confidence: float, resamples: int = 2000, seed: int = 0
) -> float:
    """Lower bound, at `confidence`, of the candidate's mIoU gain over the champion on a set
    of images, from their per-image (N, K, K) confusion counts on the same images.

    Paired percentile bootstrap over images: each resample draws N images with replacement,
    sums both models' counts over the same draw and takes the mIoU difference, so what the
    two models share (the images' difficulty) cancels. Seeded: a decision is reproducible.
    """
    if candidate.shape != champion.shape or candidate.ndim != 3 or len(candidate) == 0:
        raise ValueError(
            f"per-image confusion counts must match and be (N>0, K, K): {candidate.shape}, {champion.shape}"
        )
    n = len(candidate)
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(n, (resamples, n), generator=g)
    weights = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(resamples, n, dtype=torch.float64)
    )

    def miou(cms: torch.Tensor) -> torch.Tensor:
        sums = (weights @ cms.reshape(n, -1).double()).reshape(resamples, *cms.shape[1:])
        return per_class_iou(sums).nanmean(-1)

    return float(torch.quantile(miou(candidate) - miou(champion), 1.0 - confidence))
