"""Class-incremental updates: grow the head for new classes, and MiB's background-shift fix.

A batch that brings new classes is labelled for those classes only: everything
else, old classes included, is marked background, and the old data (where the
new classes were background too) is gone. MiB (Cermelli et al. 2020, "Modeling
the Background for Incremental Learning in Semantic Segmentation") reads the
background label of the new batch as "background or any old class" (unbiased
cross-entropy), and compares the parent's background with the student's
background + new classes (unbiased distillation, see continual.Distillation).

This module must not import the training loop: `train` imports it to grow the head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segloop.data.files import IGNORE_INDEX

# The output convolution of every segmentation_models_pytorch architecture.
HEAD = "segmentation_head.0"


def grow_head(state: dict[str, torch.Tensor], n_new: int) -> dict[str, torch.Tensor]:
    """A copy of the parent's state_dict with `n_new` output channels appended to the head.

    MiB's initialisation: each new channel copies the background channel, and the
    background and new biases drop by log(n_new + 1). The parent's background
    probability is then split evenly between background and the new classes,
    and every old-class logit (hence probability) is unchanged.
    """
    if n_new < 1:
        raise ValueError(f"n_new must be >= 1, got {n_new}")
    keys = (f"{HEAD}.weight", f"{HEAD}.bias")
    if not all(k in state for k in keys):
        raise ValueError(f"cannot grow the head: the weights have no {keys} (not a segmentation_models_pytorch model?)")
    weight, bias = state[keys[0]], state[keys[1]]
    background = bias[:1] - math.log(n_new + 1)
    grown = dict(state)
    grown[keys[0]] = torch.cat([weight, weight[:1].repeat(n_new, *[1] * (weight.dim() - 1))])
    grown[keys[1]] = torch.cat([background, bias[1:], background.repeat(n_new)])
    return grown


def merge_new_into_background(log_probs: torch.Tensor, n_old: int) -> torch.Tensor:
    """(N, K, H, W) log-probabilities over old + new classes -> (N, n_old, H, W) over the old ones,
    background absorbing the new classes (what the parent calls background)."""
    if log_probs.shape[1] == n_old:
        return log_probs
    background = torch.logsumexp(torch.cat([log_probs[:, :1], log_probs[:, n_old:]], 1), 1, keepdim=True)
    return torch.cat([background, log_probs[:, 1:n_old]], 1)


def merge_old_into_background(
    logits: torch.Tensor, target: torch.Tensor, n_old: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a new batch's labels as MiB does.

    logits: (N, K, H, W) over n_old old classes (0 = background) then the new ones;
    target: (N, H, W) class ids, 255 = ignore. Returns log-probabilities
    (N, 1 + K - n_old, H, W) over [background or any old class, new classes...]
    and the target in that index space (an old-class label counts as background).
    With n_old == 1 (nothing old to hide) both are the inputs' own.
    """
    log_probs = F.log_softmax(logits.float(), 1)
    merged = torch.cat([torch.logsumexp(log_probs[:, :n_old], 1, keepdim=True), log_probs[:, n_old:]], 1)
    mapped = torch.where(target >= n_old, target - n_old + 1, torch.zeros_like(target))
    return merged, torch.where(target == IGNORE_INDEX, target, mapped)


class UnbiasedSegLoss(nn.Module):
    """MiB's unbiased cross-entropy (and the Dice term on the same merged classes) for a new batch.

    `seg_loss(logits, target)` is the plain loss (train.SegLoss); it is applied to
    the merged log-probabilities, where log_softmax is the identity, so with
    n_old == 1 this is exactly the plain loss.
    """

    def __init__(self, n_old: int, seg_loss: nn.Module):
        super().__init__()
        if n_old < 1:
            raise ValueError(f"n_old must be >= 1 (background), got {n_old}")
        self.n_old, self.seg_loss = n_old, seg_loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.seg_loss(*merge_old_into_background(logits, target, self.n_old))
