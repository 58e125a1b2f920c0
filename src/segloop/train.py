"""The training loop, readable top to bottom.

One call trains a model on a dataset folder: settings left null planned from the
data (segloop.plan), joint augmentation, Dice + CE (ignore 255), AdamW with warm-up +
cosine/poly ending where the wall-clock budget ends, epochs of a fixed number of steps,
gradient clipping, an EMA of the weights validated on full images, early stopping on
validation mIoU, atomic checkpoints (`best.pt` on improvement; `last.pt`, the resume state,
every `train.resume_every_s` and after the last epoch) and `resume`. Each epoch is reseeded
from (seed, epoch), so a resumed run replays the same shuffles and augmentations
(segloop.data.loader).

channels_last on every device (oneDNN's CPU convolutions gain too). On CUDA: bf16
autocast, pinned memory with non-blocking copies, optional torch.compile. Under
`torchrun --nproc-per-node N` the same call trains with DistributedDataParallel
(segloop.distributed): each rank takes every N-th batch, rank 0 alone validates, logs
and writes; checkpoints hold the plain module's weights, as in a single process. Nothing
in the step loop waits for the GPU (the loss is summed on the device and read once per
epoch).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypedDict, cast

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset

from segloop.checkpoint import load_checkpoint, save_checkpoint
from segloop.class_incremental import grow_head
from segloop.config import Settings, TrainSettings, save_settings
from segloop.data.dataset import SegmentationDataset, train_transform
from segloop.data.files import IGNORE_INDEX, Folders
from segloop.data.loader import SEED_STRIDE, EpochBatches, sized, training_loader
from segloop.data.replay import MixedBatchSampler
from segloop.distributed import any_rank, device_for, from_primary, mean_over_ranks, process_group, world_from_env
from segloop.evaluate import miou_on
from segloop.models import build_model

LAST, BEST = "last.pt", "best.pt"


class TrainState(TypedDict):
    """The loop's progress, saved in `last.pt` (and read back on resume)."""

    epoch: int
    step: int
    best_miou: float
    bad_epochs: int
    history: list[dict]
    images_seen: int
    elapsed: float


@dataclass
class TrainResult:
    best_miou: float
    epochs: int
    images_seen: int
    seconds: float
    images_per_s: float
    stopped: str  # "completed" | "early_stopping" | "time_budget"
    checkpoint: str


class SegLoss(nn.Module):
    """dice_weight * Dice + ce_weight * cross-entropy, both ignoring 255."""

    def __init__(self, dice_weight: float, ce_weight: float):
        super().__init__()
        self.dice_weight, self.ce_weight = dice_weight, ce_weight
        self.dice = smp.losses.DiceLoss("multiclass", from_logits=True, ignore_index=IGNORE_INDEX)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.ce_weight * F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits, target)
        return loss


def lr_factor(step: int, total: int, warmup: int, cfg: TrainSettings, time_progress: float = 0.0) -> float:
    """Multiplier of the base lr: linear warm-up, then cosine or poly decay to min_lr_ratio.

    The decay runs on the larger of step progress and `time_progress` (share of the time
    budget spent), so it reaches its end where the budget does."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_progress))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else (1 - progress) ** 0.9
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def init_from(model: nn.Module, ckpt: dict, path: Path, settings: Settings, new_classes: Sequence[str] = ()) -> str:
    """Load another model's weights (`ckpt`, read from `path`) for transfer learning; classes and
    channels must match, except `new_classes` (class-incremental): the parent lacks them and its head grows."""
    if list(ckpt["classes"]) + list(new_classes) != list(settings.data.classes):
        grown = f" + continual.new_classes {list(new_classes)}" if new_classes else ""
        raise ValueError(
            f"--init {path}: classes {ckpt['classes']}{grown} differ from data.classes {settings.data.classes}"
        )
    if ckpt["channels"] != settings.data.channels:
        raise ValueError(f"--init {path}: {ckpt['channels']} channels, data.channels is {settings.data.channels}")
    try:
        model.load_state_dict(grow_head(ckpt["model"], len(new_classes)) if new_classes else ckpt["model"])
    except RuntimeError as err:
        raise ValueError(
            f"--init {path}: weights do not fit model {settings.model.arch}/{settings.model.encoder}: {err}"
        ) from None
    return str(path)


# An extra loss term for continual strategies: (images, student logits, masks, from_replay) -> scalar;
# from_replay: (N,) bool, which samples of the batch came from the replay buffer.
ExtraLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainJob:
    """Everything one training run needs besides settings (what `train` was called with)."""

    data_dirs: list[Path]
    out_dir: Path
    val_dirs: list[Folders]  # validation sets: a folder, or several pooled into one set
    init: Path | None = None
    resume: bool = False
    log: Callable[[str], None] = print
    replay_dir: Path | None = None
    replay_ratio: float = 0.0
    extra_loss: ExtraLoss | None = None
    freeze_encoder: bool = False
    new_classes: Sequence[str] = ()
    seg_loss: nn.Module | None = None
    meta: dict | None = None
    on_epoch: Callable[[dict], None] | None = None
    init_label: str | None = None
    select: Callable[[list[float]], float] | None = None
    # The budget's time source: wall-clock; a benchmark on a shared machine passes
    # time.process_time so that every arm gets the same CPU seconds whatever else runs.
    clock: Callable[[], float] = time.monotonic


def train(
    settings: Settings,
    data_dir: Path | Sequence[Path],
    out_dir: Path,
    val_dir: Path | Sequence[Folders] | None = None,
    init: Path | None = None,
    resume: bool = False,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
    **options,
) -> TrainResult:
    """Train on `data_dir` (several folders are concatenated), validate on `val_dir`
    (the first training folder when None; several sets: the mean of their mIoUs, e.g. every
    domain seen so far; a set given as a list of folders is scored as one), write `out_dir`.

    Settings left null (crop, batch, epoch length, normalisation, augmentation) come from the
    recipe of the first training folder (segloop.plan; an epoch is one pass over all of
    them); a transfer or update keeps its parent's input normalisation. `train.max_minutes`
    is the budget and the lr schedule ends where it ends (or at `train.epochs`, whichever is
    first); the weights validated and kept are an exponential moving average (`train.ema`).

    `options` are TrainJob's other fields. Continual strategies use them: `replay_dir`
    mixes its samples into each batch at `replay_ratio`; `extra_loss` is added to the
    segmentation loss (distillation); `freeze_encoder` trains decoder and head only, the
    encoder (BatchNorm statistics included) stays bit-identical; `new_classes` grows the
    head of `init` (class-incremental); `seg_loss` replaces Dice + CE (MiB's unbiased
    loss). `meta` is stored in the checkpoints (strategy, data hashes...).
    `on_epoch(record)` sees each epoch's record as it ends (MLflow logs them live).
    `init_label` names the parent in the checkpoint when `init` is a downloaded copy
    (e.g. `models:/segloop/3` rather than a temporary path).
    `select(per_folder_miou) -> score` ranks epochs for `best.pt` (default: the mean over the
    validation folders); a continual update ranks by the promotion gate's own rules.
    """
    data_dirs = [Path(data_dir)] if isinstance(data_dir, (str, Path)) else [Path(d) for d in data_dir]
    val = data_dirs[0] if val_dir is None else val_dir
    val_dirs: list[Folders] = [Path(val)] if isinstance(val, (str, Path)) else list(val)
    world = world_from_env()
    job = TrainJob(data_dirs, out_dir, val_dirs, init, resume, log if world.primary else _silent, **options)
    if not world.primary:
        job.on_epoch = None
    device = device_for(world)
    with process_group(world, device) as control:
        return _train(settings, job, world.rank, world.size, device, control)


def _silent(line: str) -> None:
    pass


def planned_settings(
    settings: Settings, job: TrainJob, parent: dict | None, primary: bool = True
) -> tuple[Settings, list[str]]:
    """Settings with the recipe filled in (see `train`), and log lines saying what was planned;
    the primary process writes the plan to `<out>/plan.yaml`."""
    from segloop.plan import count_images, describe, fingerprint, resolve, write_plan

    lines = []
    if parent is not None and parent["channels"] == settings.data.channels:  # else init_from says why not
        parent_norm = parent["settings"]["model"].get("norm") or {"kind": "none"}
        if settings.model.norm is not None and settings.model.norm.model_dump(mode="json") != parent_norm:
            lines.append(f"model.norm: keeping the parent's {parent_norm} (its weights expect that input)")
        raw = settings.model_dump(mode="json")
        raw["model"]["norm"] = parent_norm
        settings = type(settings).model_validate(raw)
    fp = fingerprint(job.data_dirs[0], settings.data.channels)
    if len(job.data_dirs) > 1:  # an epoch is one pass over every training folder, not the first one
        fp = replace(fp, images=sum(count_images(d) for d in job.data_dirs))
    settings, recipe, fp = resolve(settings, job.data_dirs[0], fp)
    if primary:
        job.out_dir.mkdir(parents=True, exist_ok=True)
        write_plan(job.out_dir / "plan.yaml", job.data_dirs[0], fp, recipe)
    if recipe.settings:
        lines.append(f"plan of {job.data_dirs[0]} (settings left null in params; {job.out_dir / 'plan.yaml'}):")
        lines += [f"  {line}" for line in describe(fp, recipe).splitlines()]
    return settings, lines


class Ema:
    """Exponential moving average of a model's weights and buffers (what is validated and kept).

    Decay ramps up as min(decay, (1 + t) / (10 + t)) so the first steps are not averaged
    with the random (or parent) start for long."""

    def __init__(self, model: nn.Module, decay: float):
        import copy

        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self.floats = [(e, p) for e, p in pairs if e.dtype.is_floating_point]
        self.others = [(e, p) for e, p in pairs if not e.dtype.is_floating_point]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_([e for e, _ in self.floats], [p for _, p in self.floats], 1 - d)
        for e, p in self.others:
            e.copy_(p)


def _train(settings: Settings, job: TrainJob, rank: int, world: int, device: torch.device, control) -> TrainResult:
    clock = job.clock
    started = clock()
    parent_ckpt = load_checkpoint(job.init) if job.init else None  # read once: plan and weights
    settings, plan_lines = planned_settings(settings, job, parent_ckpt, rank == 0)
    for line in plan_lines:
        job.log(line)
    cfg, cuda, primary = settings.train, device.type == "cuda", rank == 0
    crop_size, batch_size, augment = settings.data.crop_size, cfg.batch_size, cfg.augment
    assert crop_size is not None and batch_size is not None and augment is not None  # planned: no nulls left
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick its fastest kernels once
    job.out_dir.mkdir(parents=True, exist_ok=True)
    transform = train_transform(crop_size, augment, cfg.foreground)
    parts = [SegmentationDataset(d, settings.data.channels, transform) for d in job.data_dirs]
    dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    replay = SegmentationDataset(job.replay_dir, settings.data.channels, transform) if job.replay_dir else None
    if len(sized(dataset)) < batch_size * world:
        raise ValueError(
            f"{job.data_dirs[0]}: {len(sized(dataset))} images, fewer than train.batch_size={cfg.batch_size}"
            + (f" x {world} processes" if world > 1 else "")
        )

    resumed = load_checkpoint(job.out_dir / LAST) if job.resume else None
    # A pruned parent's (or run's) narrower layers: the model is built at those widths.
    widths = (resumed or parent_ckpt or {}).get("widths")
    torch.manual_seed(cfg.seed)  # weight init too: a run depends on its seed, not on what ran before
    model = build_model(settings.model, settings.data.channels, settings.num_classes, widths)
    parent = init_from(model, parent_ckpt, job.init, settings, job.new_classes) if parent_ckpt and job.init else None
    if job.freeze_encoder:
        model.encoder.requires_grad_(False)
    if parent and job.init_label:
        parent = job.init_label
    channels_last = cfg.channels_last  # NHWC: faster convolutions on GPUs and in oneDNN on CPUs
    # Module.to takes memory_format (torch's overloads leave it out when a device is given too)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)  # type: ignore[call-overload]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True if cuda else None)
    ema = Ema(model, cfg.ema) if cfg.ema else None
    loss_fn = job.seg_loss or SegLoss(cfg.dice_weight, cfg.ce_weight)
    state: TrainState = {
        "epoch": 0,
        "step": 0,
        "best_miou": -1.0,
        "bad_epochs": 0,
        "history": [],
        "images_seen": 0,
        "elapsed": 0.0,
    }
    if resumed is not None:
        ckpt = resumed
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema is not None and "ema" in ckpt:
            ema.module.load_state_dict(ckpt["ema"])
            ema.updates = ckpt["step"]
        state = cast(TrainState, {k: ckpt.get(k, v) for k, v in state.items()})
        parent = ckpt.get("parent")
        started -= state["elapsed"]  # the budget counts the time already spent
        job.log(f"resuming {job.out_dir / LAST} after epoch {state['epoch']} (best val mIoU {state['best_miou']:.4f})")
    if primary:
        save_settings(settings, job.out_dir / "settings.yaml")
    # `model` stays the plain module: validation, checkpoints and state_dict keys never see the wrappers.
    net = DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if world > 1 else model
    forward = torch.compile(net) if cfg.compile else net

    loader = training_loader(
        dataset,
        replay,
        job.replay_ratio,
        batch_size,
        cfg.seed,
        cfg.num_workers,
        pin_memory=cuda,
        rank=rank,
        world=world,
        iters=cfg.iters_per_epoch,
    )
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{job.data_dirs[0]}: too few images for one batch of train.batch_size={cfg.batch_size} per process"
        )
    total_steps = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and cfg.bf16 else nullcontext()
    meta = {
        "settings": settings.model_dump(mode="json"),
        "classes": list(settings.data.classes),
        "channels": settings.data.channels,
        "parent": parent,
        **({"widths": widths} if widths else {}),
        **(job.meta or {}),
    }
    resume_saved_at = clock()
    stopped = "completed"
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    kept = ema.module if ema is not None else model  # the weights validated, kept and exported
    job.log(
        f"training {steps_per_epoch} steps/epoch x <= {cfg.epochs} epochs, batch {cfg.batch_size} of "
        f"{settings.data.crop_size}x{settings.data.crop_size}"
        + (f", budget {cfg.max_minutes:g} min" if cfg.max_minutes else "")
        + (f", EMA {cfg.ema:g}" if ema is not None else "")
    )

    sampler = loader.batch_sampler
    assert isinstance(sampler, EpochBatches)  # training_loader's
    for epoch in range(state["epoch"], cfg.epochs):
        torch.manual_seed(cfg.seed * SEED_STRIDE + epoch + 1_000_003 * rank)  # anything else random (dropout)
        sampler.set_epoch(epoch)
        net.train()
        # The last rows of each batch (a replay loader's batches are mixed, the others not).
        n_replayed = sampler.batches.k if isinstance(sampler.batches, MixedBatchSampler) else 0
        if job.freeze_encoder:
            model.get_submodule("encoder").eval()  # frozen means BatchNorm running statistics too
        loss_sum, n_batches, epoch_start = torch.zeros((), device=device), 0, time.monotonic()
        for images, masks in loader:
            # The schedule ends where the budget ends: progress is steps or time, whichever is further.
            lr = cfg.lr * lr_factor(state["step"], total_steps, warmup, cfg, (clock() - started) / budget_s)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            masks = masks.to(device, non_blocking=True)
            with autocast:
                logits = forward(images)
                loss = loss_fn(logits, masks)
                if job.extra_loss is not None:
                    from_replay = torch.arange(images.shape[0], device=device) >= images.shape[0] - n_replayed
                    loss = loss + job.extra_loss(images, logits, masks, from_replay)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update()
            loss_sum += loss.detach()  # stays on device: no per-step sync
            n_batches += 1
            state["step"] += 1
            state["images_seen"] += images.shape[0] * world
            # A host clock, no GPU sync; under DDP every rank must stop at the same step.
            if budget_s < math.inf and any_rank(clock() - started > budget_s, control):
                stopped = "time_budget"
                break
        train_s = time.monotonic() - epoch_start
        loss_mean = mean_over_ranks(float(loss_sum) / max(1, n_batches), control)
        kept.eval()
        per_dir, val_iou = (
            _validate(kept, job.val_dirs, settings, device) if primary else ([0.0] * len(job.val_dirs), [])
        )
        per_dir = from_primary(per_dir, control)  # every rank takes the same early-stopping decision
        val_miou = sum(per_dir) / len(per_dir)
        score = job.select(per_dir) if job.select is not None else val_miou
        state["epoch"] = epoch + 1
        state["elapsed"] = clock() - started
        record = {
            "epoch": epoch + 1,
            "loss": round(loss_mean, 5),
            "val_miou": round(val_miou, 5),
            **(
                {"val_per_folder": [round(m, 5) for m in per_dir], "val_score": round(score, 5)}
                if len(per_dir) > 1 or job.select
                else {}
            ),
            "lr": optimizer.param_groups[0]["lr"],
            "img_per_s": round(n_batches * batch_size * world / max(train_s, 1e-9), 2),
            "seconds": round(state["elapsed"], 1),
        }
        state["history"].append(record)
        if job.on_epoch is not None:
            job.on_epoch(record)
        improved = score > state["best_miou"]
        if improved:
            state["best_miou"], state["bad_epochs"] = score, 0
            if primary:
                save_checkpoint(
                    job.out_dir / BEST,
                    {
                        **meta,
                        "model": kept.state_dict(),
                        "epoch": epoch + 1,
                        "val_miou": val_miou,
                        "val_per_class_iou": val_iou,
                    },
                )
        else:
            state["bad_epochs"] += 1
        last = epoch + 1 == cfg.epochs or stopped == "time_budget" or state["bad_epochs"] >= cfg.patience
        due = cfg.resume_every_s is not None and (last or clock() - resume_saved_at >= cfg.resume_every_s)
        if primary and due:  # a finished run: its last epoch
            resume = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            ema_state = {"ema": ema.module.state_dict()} if ema is not None else {}
            save_checkpoint(job.out_dir / LAST, {**meta, **state, **resume, **ema_state})
            resume_saved_at = clock()
        job.log(
            f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {record['loss']:.4f}  val mIoU {val_miou:.4f}"
            f"{' *' if improved else '  '}  {record['img_per_s']:6.1f} img/s  {record['seconds']:6.1f}s"
        )
        if stopped == "time_budget":
            job.log(f"time budget of {cfg.max_minutes} min reached; keeping best (val mIoU {state['best_miou']:.4f})")
            break
        if state["bad_epochs"] >= cfg.patience:
            stopped = "early_stopping"
            job.log(f"early stopping: no val mIoU gain for {cfg.patience} epochs")
            break

    seconds = clock() - started
    result = TrainResult(
        best_miou=round(state["best_miou"], 5),
        epochs=state["epoch"],
        images_seen=state["images_seen"],
        seconds=round(seconds, 1),
        images_per_s=round(_mean_rate(state["history"]), 2),
        stopped=stopped,
        checkpoint=str(job.out_dir / BEST),
    )
    if primary:
        (job.out_dir / "history.json").write_text(json.dumps(state["history"], indent=1))
        (job.out_dir / "train_metrics.json").write_text(json.dumps(asdict(result), indent=1))
    return result


def _validate(
    model: nn.Module, val_dirs: list[Folders], settings: Settings, device: torch.device
) -> tuple[list[float], list[float]]:
    """(mIoU of each set, per-class IoU averaged over the sets, each set weighing the same)."""
    scores = [miou_on(model, d, settings, device) for d in val_dirs]
    per_class = torch.tensor([iou for _, iou in scores], dtype=torch.float64).nanmean(0)
    return [m for m, _ in scores], per_class.tolist()


def _mean_rate(history: list[dict]) -> float:
    return sum(h["img_per_s"] for h in history) / len(history) if history else 0.0
