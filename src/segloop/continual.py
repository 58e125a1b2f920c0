"""Continual updates of a champion, and the metrics that show what it forgot.

An update starts from the parent's weights and trains on a new batch with a
strategy chosen by name. `finetune` is the cheap lower bound that forgets;
`joint` (retrain from scratch on every batch so far) is the expensive upper
bound; `replay`, `lwf`, `replay_lwf` and `freeze_encoder` sit in between.
A class-incremental update (`continual.new_classes`) composes with any of them
but `joint`: the head grows, and with `continual.unbiased` the losses follow MiB
(segloop.class_incremental).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segloop.checkpoint import load_checkpoint, load_model, save_checkpoint
from segloop.class_incremental import UnbiasedSegLoss, merge_new_into_background
from segloop.config import GateSettings, Settings, Strategy
from segloop.data.files import IGNORE_INDEX, Folders
from segloop.data.replay import group_of, read_manifest
from segloop.inference import pick_device
from segloop.tracking import dir_md5
from segloop.train import SegLoss, TrainResult, train


class Distillation:
    """LwF for segmentation: per-pixel KL(teacher || student) at temperature T, times T^2.

    Pixels marked ignore (crop padding) are left out; the teacher is frozen. A
    student with more classes than its teacher (class-incremental) is compared
    through MiB's unbiased view: its new classes merge into its background, which
    is what the teacher's background meant; `unbiased=False` compares the
    student's old channels alone (plain LwF over the old head). `replay_only`
    distils the replayed samples of a batch only.
    """

    def __init__(
        self, teacher: nn.Module, temperature: float, weight: float, unbiased: bool = True, replay_only: bool = False
    ):
        self.teacher = teacher.eval().requires_grad_(False)
        self.t, self.weight, self.unbiased, self.replay_only = temperature, weight, unbiased, replay_only

    def __call__(
        self, images: torch.Tensor, logits: torch.Tensor, masks: torch.Tensor, from_replay: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.replay_only:
            if from_replay is None or not bool(from_replay.any()):
                return logits.sum() * 0.0
            images, logits, masks = images[from_replay], logits[from_replay], masks[from_replay]
        with torch.no_grad():
            target = F.log_softmax(self.teacher(images).float() / self.t, dim=1)
        n_old = target.shape[1]
        if self.unbiased:
            student = merge_new_into_background(F.log_softmax(logits.float() / self.t, dim=1), n_old)
        else:
            student = F.log_softmax(logits[:, :n_old].float() / self.t, dim=1)
        kl = F.kl_div(student, target, log_target=True, reduction="none").sum(1)
        valid = (masks != IGNORE_INDEX).float()
        return self.weight * self.t**2 * (kl * valid).sum() / valid.sum().clamp(min=1.0)


def _update_settings(settings: Settings) -> Settings:
    """Updates train with continual.epochs / continual.lr; everything else as trained."""
    c = settings.continual
    return settings.model_copy(update={"train": settings.train.model_copy(update={"epochs": c.epochs, "lr": c.lr})})


def _class_incremental_loss(settings: Settings, parent: Path) -> nn.Module | None:
    """MiB's unbiased loss when the update adds classes (None: the plain loss)."""
    c, t = settings.continual, settings.train
    if not c.new_classes or not c.unbiased:
        return None
    n_old = len(load_checkpoint(parent)["classes"])
    return UnbiasedSegLoss(n_old, SegLoss(t.dice_weight, t.ce_weight))


def replay_ratio(settings: Settings, replay: Path) -> float:
    """continual.replay.ratio, or with mix `balanced` the share that gives every domain of the
    buffer (a batch of unknown domain: every source batch) and the new batch an equal part of
    each training batch."""
    if settings.continual.replay.mix == "ratio":
        return settings.continual.replay.ratio
    sources = {group_of(item) for item in read_manifest(replay)["items"]}
    return len(sources) / (len(sources) + 1)


def _run(
    settings: Settings,
    parent: Path,
    new: Sequence[Path],
    out: Path,
    val,
    seen: Sequence[Path],
    replay: Path | None,
    log,
    hooks: dict,
    *,
    use_replay=False,
    distill=False,
    freeze=False,
    joint=False,
) -> TrainResult:
    if use_replay and replay is None:
        raise ValueError(f"strategy {settings.continual.strategy!r} needs a replay buffer (--replay DIR)")
    c = settings.continual
    if joint and c.new_classes:
        raise ValueError(
            "continual.new_classes: `joint` retrains from scratch on data.classes, so every batch "
            "must label every class; leave new_classes empty for it"
        )
    extra = None
    if distill:
        teacher, _ = load_model(parent)
        extra = Distillation(
            teacher.to(pick_device()), c.lwf.temperature, c.lwf.weight, c.unbiased, c.lwf.replay_only and use_replay
        )
    data = [*seen, *new] if joint else list(new)
    replay_dir = replay if use_replay else None
    ratio = replay_ratio(settings, replay_dir) if replay_dir is not None else 0.0
    meta = {
        "strategy": c.strategy,
        "update_parent": str(parent),
        "data_md5": {str(d): dir_md5(d) for d in data},
        **({"replay_md5": dir_md5(replay_dir), "replay_ratio": ratio} if replay_dir is not None else {}),
        **({"new_classes": list(c.new_classes), "unbiased": c.unbiased} if c.new_classes else {}),
    }
    return train(
        settings if joint else _update_settings(settings),
        data,
        out,
        val,
        init=None if joint else parent,
        log=log,
        replay_dir=replay_dir,
        replay_ratio=ratio,
        extra_loss=extra,
        freeze_encoder=freeze,
        new_classes=() if joint else c.new_classes,
        seg_loss=None if joint else _class_incremental_loss(settings, parent),
        meta=meta,
        **hooks,
    )


STRATEGIES: dict[str, dict] = {
    "finetune": {},
    "joint": {"joint": True},
    "replay": {"use_replay": True},
    "lwf": {"distill": True},
    "replay_lwf": {"use_replay": True, "distill": True},
    "freeze_encoder": {"freeze": True},
}
# config validates continual.strategy against its Literal (without importing torch): one list of names.
assert set(STRATEGIES) == set(get_args(Strategy)), (
    f"segloop.config.Strategy {get_args(Strategy)} != STRATEGIES {list(STRATEGIES)}"
)


def update(
    settings: Settings,
    parent: Path,
    new: Path | Sequence[Path],
    out: Path,
    val: Path | Sequence[Folders] | None = None,
    seen: Sequence[Path] = (),
    replay: Path | None = None,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
    **hooks,
) -> TrainResult:
    """Update `parent` with the batch `new` (one folder, or several: the batch and earlier
    refused batches of its domain) using `continual.strategy`.

    `val`: validation sets (each a folder, or a list of folders scored as one set). With
    `continual.select: mean` the checkpoint kept is the best on their mean mIoU; with `gate`
    the first set is the new domain's and the others are learnt domains', and the kept epoch
    is the best that passes the gate's rules against the parent on them (`gate_score`);
    `continual.interpolate` then moves the kept weights towards the parent's as far as those
    rules need (`interpolate_with_parent`).
    `seen`: training folders of earlier batches (used by `joint` only);
    `replay`: the replay buffer folder (used by the replay strategies);
    `hooks`: passed to `train` (`on_epoch`, `init_label`).
    """
    new = [Path(new)] if isinstance(new, (str, Path)) else [Path(n) for n in new]
    c = settings.continual
    if c.select == "mean":
        return _run(settings, parent, new, out, val, seen, replay, log, hooks, **STRATEGIES[c.strategy])
    vals = [new[0]] if val is None else [Path(val)] if isinstance(val, (str, Path)) else list(val)
    base = parent_scores(settings, parent, vals)
    log(f"parent val mIoU per folder: {' '.join(f'{m:.4f}' for m in base)} (gate-constrained selection)")
    rule = partial(gate_score, parent=base, gate=settings.registry.gate, margin=c.select_margin)
    result = _run(
        settings, parent, new, out, vals, seen, replay, log, {**hooks, "select": rule}, **STRATEGIES[c.strategy]
    )
    if c.interpolate:
        interpolate_with_parent(settings, parent, out / "best.pt", vals, rule, log)
    return result


def parent_scores(settings: Settings, parent: Path, vals: Sequence[Folders]) -> list[float]:
    """The parent's mIoU on each validation folder: what the gate will compare against."""
    from segloop.evaluate import miou_on

    model, _ = load_model(parent)
    device = pick_device()
    model.to(device).eval()
    return [miou_on(model, v, settings, device)[0] for v in vals]


def gate_score(per_folder: Sequence[float], parent: Sequence[float], gate: GateSettings, margin: float) -> float:
    """An epoch's rank by the promotion gate's own rules, applied on validation.

    per_folder[0] is the new domain (must gain min_gain + margin over the parent),
    per_folder[1:] are learnt domains (each may lose at most max_forgetting - margin).
    The margin absorbs part of the gap between small validation and test sets.
    Feasible epochs score 1 + mean mIoU (in [1, 2]); infeasible ones -v / (1 + v) for
    their total shortfall v (in (-1, 0)): every feasible epoch ranks above every
    infeasible one, and among infeasible ones the nearest to feasible wins.
    """
    need = [parent[0] + gate.min_gain + margin] + [p - max(0.0, gate.max_forgetting - margin) for p in parent[1:]]
    shortfall = sum(max(0.0, n - v) for n, v in zip(need, per_folder))
    if shortfall == 0.0:
        return 1.0 + sum(per_folder) / len(per_folder)
    return -shortfall / (1.0 + shortfall)


ALPHAS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


def interpolate_with_parent(
    settings: Settings,
    parent: Path,
    best: Path,
    vals: Sequence[Folders],
    rule: Callable[[list[float]], float],
    log: Callable[[str], None],
) -> float:
    """WiSE-FT: rewrite `best` as parent + alpha * (best - parent) for the largest alpha in
    ALPHAS whose weights pass `rule` on `vals` (else the alpha that comes nearest). Moving
    back towards the parent trades new-domain gain for old-domain retention, which is
    what a refused update lacked. Returns alpha (also stored in the checkpoint)."""
    from segloop.evaluate import miou_on

    ckpt, start = load_checkpoint(best), load_checkpoint(parent)["model"]
    model, _ = load_model(best)
    device = pick_device()
    tried: list[tuple[float, float]] = []
    for alpha in ALPHAS:
        model.load_state_dict(mix_weights(start, ckpt["model"], alpha))
        model.to(device).eval()
        per = [miou_on(model, v, settings, device)[0] for v in vals]
        tried.append((rule(per), alpha))
        log(
            f"interpolation alpha {alpha:.1f}: val mIoU per folder {' '.join(f'{m:.4f}' for m in per)} score "
            f"{tried[-1][0]:.4f}"
        )
        if tried[-1][0] >= 1.0:  # feasible: the largest such alpha keeps the most of the update
            break
    score, alpha = max(tried, key=lambda t: (t[0] >= 1.0, t[0] if t[0] < 1.0 else t[1]))
    if alpha != 1.0:
        save_checkpoint(
            best, {**ckpt, "model": mix_weights(start, ckpt["model"], alpha), "wise_alpha": alpha, "val_score": score}
        )
    return alpha


def mix_weights(parent: dict, child: dict, alpha: float) -> dict:
    """parent + alpha * (child - parent) for floating tensors (BatchNorm statistics too);
    integer buffers (BatchNorm's batch counters) are the child's."""
    return {k: parent[k] + alpha * (v - parent[k]) if v.is_floating_point() else v for k, v in child.items()}


def continual_metrics(r: np.ndarray, baseline: np.ndarray | None = None) -> dict:
    """Standard continual-learning summaries of an accuracy matrix: ACC (final average),
    BWT, forgetting, learning accuracy (LA: each domain right after its step) and FWT.

    r: (T, T) with r[i, j] = mIoU on domain j's held-out set after step i
    (domain j is the one introduced at step j). baseline: (T,) mIoU of a model
    that never trained on domain j (for forward transfer), optional.
    """
    r = np.asarray(r, dtype=float)
    t = r.shape[0]
    old = range(t - 1)
    out = {
        "acc": float(r[-1].mean()),
        "bwt": float(np.mean([r[-1, j] - r[j, j] for j in old])) if t > 1 else 0.0,
        "forgetting": float(np.mean([r[j : t - 1, j].max() - r[-1, j] for j in old])) if t > 1 else 0.0,
        "la": float(np.mean(np.diag(r))),
        "fwt": None,
    }
    if baseline is not None and t > 1:
        out["fwt"] = float(np.mean([r[j - 1, j] - baseline[j] for j in range(1, t)]))
    return out
