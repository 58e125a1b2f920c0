"""Typed settings loaded from params.yaml: the single source of configuration.

Every key is declared here; an unknown key, a wrong type or an impossible value
fails at load time with the key's dotted name. Nothing here touches the disk
except `load_settings` / `save_settings`, and only when called.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = Path("params.yaml")
# The project's MLflow store when tracking.uri is null: mlruns/mlflow.db (runs, registry)
# and mlruns/artifacts/ (files), relative to the folder segloop runs in (the project root).
DEFAULT_MLRUNS = Path("mlruns")

# Names validated here, implemented below (segloop.data.synthetic.DOMAINS,
# segloop.continual.STRATEGIES). Declared as Literals so that loading settings never
# imports torch; each lower layer asserts that its registry matches the names here.
Domain = Literal["base", "lowlight", "fog", "noise", "colorshift"]
Strategy = Literal["finetune", "joint", "replay", "lwf", "replay_lwf", "freeze_encoder"]
LabelStrategy = Literal["random", "entropy", "margin", "coreset", "hybrid"]  # segloop.labels.STRATEGIES


class SettingsError(ValueError):
    """A params file or override is invalid; the message names file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class DataSettings(_Strict):
    classes: list[str] = Field(min_length=2)
    channels: Literal[1, 3] = 3
    crop_size: int | None = Field(None, gt=0)  # null: planned from the training data (segloop.plan)
    # Ingest refuses images later steps cannot handle: a side below min_side (drift's
    # features and crops need some extent) or more than max_pixels (decoding and drift
    # features grow with the pixel count).
    min_side: int = Field(16, ge=1)
    max_pixels: int = Field(4096 * 4096, gt=0)

    @field_validator("crop_size")
    @classmethod
    def _multiple_of_32(cls, v: int | None) -> int | None:
        if v is not None and v % 32:
            raise ValueError(f"must be a multiple of 32 (the encoder downsamples 5 times), got {v}")
        return v

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"class names must be unique, got {v}")
        if len(v) > 255:
            raise ValueError("at most 255 classes (255 is the ignore index)")
        return v


class GenerateSettings(_Strict):
    n: int = Field(300, gt=0)
    image_size: tuple[int, int] = (144, 144)
    seed: int = 0
    strength: float = Field(1.0, ge=0.0, le=2.0)
    domains: list[Domain] = ["base", "lowlight", "fog", "noise", "colorshift"]

    @field_validator("image_size")
    @classmethod
    def _min_size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 32:
            raise ValueError(f"image sides must be >= 32 px, got {list(v)}")
        return v


class SplitSettings(_Strict):
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _leaves_train(self) -> SplitSettings:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave images for training (< 1)")
        return self


class NormSettings(_Strict):
    """Input normalisation inside the model: x in [0, 1] -> (clip(x, *clip) - mean) / std per channel.

    kind `local`: mean and std over a `window` x `window` neighbourhood of each pixel instead
    of the dataset's (local contrast normalisation; mean/std unused), so a gain and offset of a
    new camera or exposure cancel out, even when they vary smoothly across the image (haze
    thickening with depth, vignetting, uneven light)."""

    kind: Literal["none", "zscore", "local"] = "zscore"
    mean: list[float] = [0.0]
    std: list[float] = [1.0]
    clip: tuple[float, float] | None = None
    window: int = Field(17, ge=3)  # kind local: odd neighbourhood side, pixels

    @model_validator(mode="after")
    def _shapes(self) -> NormSettings:
        if len(self.mean) != len(self.std) or min(self.std) <= 0:
            raise ValueError("mean and std need one value per channel, std > 0")
        if self.window % 2 == 0:
            raise ValueError(f"window must be odd (a pixel's neighbourhood is centred on it), got {self.window}")
        if self.clip is not None and not self.clip[0] < self.clip[1]:
            raise ValueError(f"clip must be [low, high] with low < high, got {list(self.clip)}")
        return self


class ModelSettings(_Strict):
    arch: str = "Unet"
    encoder: str = "resnet18"
    # None (random init) or the path of a local encoder state_dict; never a hub name.
    encoder_weights: str | None = None
    decoder_channels: list[int] | None = None
    # null: planned from the training data; a transfer/update keeps its parent's.
    norm: NormSettings | None = None


class AugmentSettings(_Strict):
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    vflip: float = Field(0.5, ge=0.0, le=1.0)
    rot90: float = Field(0.0, ge=0.0, le=1.0)  # probability of a random quarter turn (square crops)
    rotate_degrees: float = Field(0.0, ge=0.0, le=180.0)
    brightness: float = Field(0.1, ge=0.0, lt=1.0)
    contrast: float = Field(0.1, ge=0.0, lt=1.0)
    gamma: float = Field(0.1, ge=0.0, lt=1.0)
    noise_sigma: float = Field(0.0, ge=0.0, le=1.0)
    # Gaussian blur of sigma uniform in [0, blur_sigma] px on a third of the crops (nnU-Net's
    # blur augmentation; loop_stream: a base champion so trained already segments foggy images)
    blur_sigma: float = Field(0.0, ge=0.0, le=8.0)


class ForegroundSettings(_Strict):
    """Crops centred on a pixel of a rare class, `share` of the time (nnU-Net's oversampling)."""

    classes: list[int] = []
    share: float = Field(0.0, ge=0.0, le=1.0)


class TrainSettings(_Strict):
    # Cap on epochs; `max_minutes` is the budget that normally ends training, and the lr
    # schedule ends with whichever comes first.
    epochs: int = Field(40, gt=0)
    batch_size: int | None = Field(None, gt=0)  # null: planned (memory budget)
    iters_per_epoch: int | None = Field(None, gt=0)  # optimiser steps per epoch; null: planned
    memory_mb: float = Field(1536.0, gt=0.0)  # training memory the plan may use for one batch
    ema: float | None = Field(0.99, gt=0.0, lt=1.0)  # decay of the weight average validated and kept; null: off
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    schedule: Literal["cosine", "poly"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0.0)
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0)
    dice_weight: float = Field(1.0, ge=0.0)
    ce_weight: float = Field(1.0, ge=0.0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    patience: int = Field(10, gt=0)
    max_minutes: float | None = Field(5.0, gt=0.0)
    # last.pt (model, EMA and optimizer: 4x best.pt) is written at most this often, and after
    # the last epoch: a killed run redoes at most this much (every epoch: 43% of a tiny run's time).
    # None: never (runs that are never resumed, like the loop's DVC stages, which rerun from scratch).
    resume_every_s: float | None = Field(60.0, ge=0.0)
    seed: int = 0
    num_workers: int = Field(1, ge=0)
    bf16: bool = True  # CUDA only; CPU always trains in fp32
    channels_last: bool = True  # NHWC tensors: faster on GPUs and on CPUs (oneDNN)
    # torch.compile the training forward (pays off on CUDA for long runs; the first steps compile).
    compile: bool = False
    augment: AugmentSettings | None = None  # null: planned (modality, layout)
    foreground: ForegroundSettings | None = None  # null: planned (rare classes)

    @model_validator(mode="after")
    def _loss_weights(self) -> TrainSettings:
        if self.dice_weight == 0 and self.ce_weight == 0:
            raise ValueError("dice_weight and ce_weight cannot both be 0")
        return self


class EvalSettings(_Strict):
    max_size: int = Field(512, gt=0)
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    batch_size: int = Field(8, gt=0)
    n_overlays: int = Field(4, ge=0)

    @field_validator("max_size")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"must be a multiple of 32, got {v}")
        return v


class ReplaySettings(_Strict):
    size: int = Field(200, gt=0)  # samples kept in the buffer
    # How the buffer is filled: reservoir (each sample seen equally likely) or balanced (equal
    # share per domain; batches of unknown domain: per batch).
    sampling: Literal["reservoir", "balanced"] = "balanced"
    ratio: float = Field(0.5, gt=0.0, lt=1.0)  # share of each training batch drawn from the buffer (mix: ratio)
    # ratio: as above; balanced: b / (b + 1) for a buffer of b domains (or source batches), so
    # every one seen so far, the new batch included, gets an equal share of each training batch.
    mix: Literal["ratio", "balanced"] = "ratio"


class LwFSettings(_Strict):
    temperature: float = Field(2.0, gt=0.0)
    weight: float = Field(0.3, ge=0.0)
    # With a replay buffer: distil the replayed (old-domain) samples only, where the parent is right.
    replay_only: bool = True


class ContinualSettings(_Strict):
    strategy: Strategy = "replay_lwf"
    epochs: int = Field(10, gt=0)  # per update step (joint uses train.epochs)
    lr: float = Field(2e-4, gt=0.0)
    replay: ReplaySettings = ReplaySettings()
    lwf: LwFSettings = LwFSettings()
    # Class-incremental update: classes the batch adds, the last entries of data.classes
    # (the parent has the others); the head grows by one output channel each.
    new_classes: list[str] = []
    # MiB's background-shift fix for those updates: unbiased cross-entropy and distillation.
    unbiased: bool = True
    # Which epoch an update keeps: `mean` (best mean validation mIoU) or `gate` (the best that
    # passes the promotion gate's rules on validation against the parent; segloop.continual.gate_score).
    select: Literal["mean", "gate"] = "mean"
    select_margin: float = Field(0.0, ge=0.0, le=1.0)  # stricter than the gate by this on validation
    # With select gate: move the kept weights towards the parent's (WiSE-FT) as far as the rules need.
    interpolate: bool = False
    # A trained domain whose held-out mIoU is under this share of the champion's best domain is
    # weak: its next labelled batch is trained on whether it drifted or not.
    learnt_ratio: float = Field(0.8, ge=0.0, le=1.0)
    # A labelled batch whose data drifted is not trained on when the champion's mIoU on its
    # labels is at most this below its held-out mIoU (covered: its split joins the domain's
    # pool); None: every drifted batch is trained on.
    covered_drop: float | None = Field(0.02, ge=0.0, le=1.0)


class TrackingSettings(_Strict):
    enabled: bool = True
    # null: $MLFLOW_TRACKING_URI if set, else sqlite:///<project>/mlruns/mlflow.db
    uri: str | None = None
    experiment: str = Field("segloop", min_length=1)
    # how long to wait for a tracking server before failing (before any training starts)
    connect_timeout_s: float = Field(5.0, gt=0.0)


class GateSettings(_Strict):
    # mIoU the target domain must gain over the champion; negative: the loss it may take
    # (-1: any candidate that keeps the old domains, e.g. to test the loop's plumbing)
    min_gain: float = Field(0.01, ge=-1.0, le=1.0)
    max_forgetting: float = Field(0.02, ge=0.0, le=1.0)  # mIoU any old domain may lose
    floor_miou: float = Field(0.3, ge=0.0, le=1.0)  # every domain, when there is no champion yet
    # Servability (segloop.serve.servability): the candidate must load on serve.backend and answer
    # a sample request, and its median latency there may be at most this times the champion's
    # (null or 0: no latency rule; loading and answering are always checked).
    max_latency_ratio: float | None = Field(1.5, ge=0.0)


class RegistrySettings(_Strict):
    model_name: str = Field("segloop", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    gate: GateSettings = GateSettings()


class DriftSettings(_Strict):
    """Drift detection (segloop.drift): features, decision rule and its thresholds."""

    # Family-wise false-alarm rate of the data-drift decision (Bonferroni over all tests).
    alpha: float = Field(0.01, gt=0.0, lt=0.5)
    # Per-column two-sample test run by Evidently (a p-value test; the benchmark's fast
    # path re-implements it exactly, so only Kolmogorov-Smirnov for now).
    stat_test: Literal["ks"] = "ks"
    # Columns that must drift (at the corrected level) before the batch counts as drifted.
    min_drifted_columns: int = Field(1, ge=1)
    # Share of alpha spent on the multivariate MMD test of the champion embeddings.
    embedding_alpha_share: float = Field(0.5, gt=0.0, lt=1.0)
    embedding_components: int = Field(8, ge=1, le=64)
    mmd_permutations: int = Field(1000, ge=100)
    # The champion sees one centre crop of this side (native scale, like its training
    # crops) instead of the whole image: the forward pass dominates the cost. null = whole image.
    model_crop: int | None = Field(96, gt=0)
    batch_size: int = Field(32, gt=0)
    min_images: int = Field(20, ge=8)
    reference_size: int = Field(256, gt=0)
    reference_seed: int = 0
    # Labelled batch: a champion mIoU drop larger than this (absolute) is performance drift.
    max_quality_drop: float = Field(0.05, gt=0.0, lt=1.0)
    # The loop writes each batch's check as a snapshot into this Evidently workspace (one project
    # per registered model, with its dashboard; `make evidently-ui`) and its latest.json, which
    # the service's /metrics exposes. null: off.
    evidently_workspace: Path | None = None

    @field_validator("model_crop")
    @classmethod
    def _crop_multiple_of_32(cls, v: int | None) -> int | None:
        if v is not None and v % 32:
            raise ValueError(f"must be a multiple of 32 (or null for the whole image), got {v}")
        return v

    @model_validator(mode="after")
    def _reference_not_smaller_than_batches(self) -> DriftSettings:
        if self.reference_size < self.min_images:
            raise ValueError("reference_size must be >= min_images")
        # A permutation p-value is at least 1 / (permutations + 1): below its alpha the MMD test could never fire.
        if 1 / (self.mmd_permutations + 1) > self.alpha * self.embedding_alpha_share:
            raise ValueError(
                f"mmd_permutations={self.mmd_permutations} cannot reach p <= alpha * embedding_alpha_share "
                f"= {self.alpha * self.embedding_alpha_share:g}; use at least "
                f"{int(1 / (self.alpha * self.embedding_alpha_share))}"
            )
        return self


class FlowSettings(_Strict):
    """The continual loop (flows/): where batches arrive, the loop's own repo, the schedule."""

    # The loop's working repo (its own git + DVC; ignored by the project's git): accepted
    # batches, models, replay buffers, references, step reports, state.json.
    workspace: Path = Path("workspace")
    incoming: Path | None = None  # batch folders arrive here; null: <workspace>/incoming
    schedule: str = "0 * * * *"  # cron of the served monitor deployment
    retries: int = Field(2, ge=0)  # for tasks that do I/O that can fail transiently (DVC, git, MLflow)
    retry_delay_s: float = Field(5.0, ge=0.0)
    # A batch whose step fails (or dies) this many times moves to <workspace>/failed/<batch>/
    # with its error, and the loop goes on with the next batch.
    max_attempts: int = Field(3, ge=1)
    # The workspace's remotes, so a step can run on any host (README "From one machine to many"):
    # a git URL or path (a bare repo) and a DVC remote URL (a path, ssh://...). Both or neither:
    # a step pulls both at its start and pushes both after its commit (DVC with --run-cache first).
    git_remote: str | None = None
    dvc_remote: str | None = None

    @model_validator(mode="after")
    def _both_remotes(self) -> FlowSettings:
        if (self.git_remote is None) != (self.dvc_remote is None):
            raise ValueError("git_remote and dvc_remote: set both (a step's commit needs its data) or neither")
        return self

    @field_validator("schedule")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError(f"expected a 5-field cron expression (minute hour day month weekday), got {v!r}")
        return v

    @property
    def incoming_dir(self) -> Path:
        return self.incoming if self.incoming is not None else self.workspace / "incoming"


class ExportSettings(_Strict):
    """`segloop export`: ONNX opset, parity tolerance, static int8 calibration, ExecuTorch's input bound."""

    opset: int = Field(17, ge=13, le=20)  # the TorchScript exporter writes opsets <= 20
    # `segloop export` fails (exit 1) when fp32 logits differ from eager by more than this anywhere.
    tolerance: float = Field(1e-3, gt=0.0)
    calib_images: int = Field(64, gt=0)  # seeded sample of --calib images that sets activation ranges
    calib_seed: int = 0
    # Per-tensor weight scales run fastest on CPU; per-channel ones stay a bit closer to fp32.
    per_channel: bool = False
    # --format pte: the largest height and width the ExecuTorch program takes (its memory is
    # planned for that size); at least eval.max_size, the tile inference feeds it.
    pte_max_side: int = Field(1024, ge=64, multiple_of=32)


class DistillSettings(_Strict):
    """`segloop distill`: a smaller student trained on a teacher's soft pixel predictions and the labels.

    The student trains with `train.*` (it starts from scratch); its loss is
    (1 - alpha) * (Dice + CE on the labels) + alpha * T^2 * KL(teacher || student) at temperature T."""

    # The student's architecture (null norm: the teacher's, so both read the same input).
    student: ModelSettings = ModelSettings(encoder="mobilenet_v2", decoder_channels=[64, 32, 16, 16, 8])
    temperature: float = Field(2.0, gt=0.0)
    alpha: float = Field(0.5, ge=0.0, le=1.0)


class PruneSettings(_Strict):
    """`segloop prune`: structured L1-magnitude channel pruning, then a short fine-tune."""

    ratio: float = Field(0.5, gt=0.0, lt=1.0)  # share of channels removed in each prunable layer
    # kept channels rounded down to a multiple of this (a layer narrower than it stays whole): ONNX
    # Runtime's CPU convolutions work in blocks of 8-16 channels, so odd widths waste the cut (null: off)
    round_to: int | None = Field(16, gt=0)
    epochs: int = Field(30, gt=0)  # fine-tune epochs from the pruned weights, within train.max_minutes
    lr: float = Field(2e-4, gt=0.0)


class ParamSpace(_Strict):
    """One dimension of `tune.space`: `choices` (categorical) or a `low`..`high` range
    (uniform, log-uniform with `log`, whole numbers with `integer`).

    The sampled value sets the setting the entry is named after (a dotted key such as
    `train.lr`), or every key in `sets` (one value for several settings: an augmentation
    strength setting brightness, contrast and gamma alike)."""

    choices: list[bool | int | float | str] | None = Field(None, min_length=1)
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    # not `keys`: Prefect (and dict()) would take a model with a `keys` attribute for a mapping
    sets: list[str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_kind(self) -> ParamSpace:
        ranged = self.low is not None or self.high is not None
        if (self.choices is None) == (not ranged):
            raise ValueError("give either choices or low and high")
        if ranged:
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(f"a range needs low < high, got low={self.low} high={self.high}")
            if self.log and self.low <= 0:
                raise ValueError(f"log: low must be > 0, got {self.low}")
        elif self.log or self.integer:
            raise ValueError("log and integer apply to low/high ranges, not choices")
        return self


def is_setting(key: str, model: type[BaseModel] | None = None) -> bool:
    """Whether dotted `key` names a setting (or a section) of `Settings`."""
    model = model or Settings
    head, _, rest = key.partition(".")
    field = model.model_fields.get(head)
    if field is None:
        return False
    if not rest:
        return True
    options = get_args(field.annotation) or (field.annotation,)  # X | None: X
    sections = [a for a in options if isinstance(a, type) and get_origin(a) is None]
    return any(issubclass(a, BaseModel) and is_setting(rest, a) for a in sections)


class TuneSettings(_Strict):
    """`segloop tune`: an Optuna study over `space`, each trial one `train` run scored by its best val mIoU."""

    trials: int = Field(20, gt=0)  # trials one `segloop tune` process runs (several processes share a study)
    timeout_min: float | None = Field(None, gt=0.0)  # ...or until this many minutes have passed
    study: str = Field("segloop", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # Optuna RDB storage URL; null: sqlite optuna.db beside the MLflow sqlite store (mlruns/),
    # or e.g. postgresql://user:pw@host/db when the stack runs a server.
    storage: str | None = None
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    startup_trials: int = Field(3, ge=0)  # median: trials completed before any is pruned (TPE: random ones first)
    warmup_epochs: int = Field(1, ge=0)  # median: a trial's first epochs are never pruned
    grid_points: int = Field(3, ge=2)  # grid sampler: values per low..high range (evenly, log-evenly with log)
    # Sampler seed, plus the number of trials the study holds when a process starts (a resumed study or a
    # second process draws new points); null: unseeded. Processes started at the same moment: give each its own.
    seed: int | None = 0
    space: dict[str, ParamSpace] = {}

    @field_validator("space")
    @classmethod
    def _known_keys(cls, v: dict[str, ParamSpace]) -> dict[str, ParamSpace]:
        for name, spec in v.items():
            for key in spec.sets or [name]:
                if key.split(".")[0] == "tune" or not is_setting(key):
                    where = f"{name}.sets" if spec.sets else name
                    raise ValueError(f"{where}: {key!r} is not a setting that can be tuned")
        return v


class CaptureSettings(_Strict):
    """`segloop serve` keeps a sample of what it sees and hands it to the loop as unlabelled batches."""

    rate: float = Field(0.0, ge=0.0, le=1.0)  # share of served images kept (0: capture off)
    batch_size: int = Field(32, gt=0)  # captures per batch folder written to flows.incoming
    # An older first capture rolls a batch early, once it holds drift.min_images (the loop's minimum).
    max_age_s: float = Field(3600.0, gt=0.0)
    max_pending_mb: float = Field(256.0, gt=0.0)  # disk the not-yet-rolled captures may fill; beyond: dropped, counted
    seed: int | None = None  # sampling seed (null: random)
    # The domain batch.json claims (the loop reads it; "default" is its name for a batch that claims none).
    domain: str = Field("default", pattern=r"^[A-Za-z0-9_-]+$")


class LabelSettings(_Strict):
    """Label requests for unlabelled drifted batches (segloop.labels): which images, how many."""

    # How many images of a drifted unlabelled batch to ask labels for: a count (an integer >= 1)
    # or a share of the batch (a number in (0, 1], e.g. 0.25); at least one image, at most all.
    budget: int | float = 0.25
    # random; entropy: highest mean pixel entropy of the champion first; margin: lowest mean
    # top1 - top2 probability first; coreset: k-center greedy on the champion's pooled
    # embeddings (spread out); hybrid: the `hybrid_pool` x budget most uncertain, then k-center among them.
    strategy: LabelStrategy = "entropy"
    hybrid_pool: float = Field(3.0, ge=1.0)
    seed: int = 0  # random's draw and coreset's first pick

    @field_validator("budget", mode="before")
    @classmethod
    def _count_or_share(cls, v: Any) -> Any:
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1 or isinstance(v, float) and 0 < v <= 1
        if not ok:
            raise ValueError(f"a count (integer >= 1) or a share in (0, 1], got {v!r}")
        return v


class ServeSettings(_Strict):
    """`segloop serve`: which model, on which backend, how it follows the registry, input limits."""

    model: str | None = None  # null: models:/<registry.model_name>@champion
    backend: Literal["onnx", "torch"] = "onnx"  # onnx: the `segloop export` file, made and cached per version
    precision: Literal["fp32", "int8"] = "fp32"  # onnx only; int8 needs `calib`
    calib: Path | None = None  # training images calibrating int8 exports
    cache: Path = Path(".cache/serve")  # exports per model version
    cache_keep: int = Field(8, ge=1)  # the most recently used exports kept; older ones are removed
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    poll_s: float | None = Field(30.0, gt=0.0)  # how often the alias is re-read (null: only POST /v1/reload)
    max_pixels: int = Field(16_777_216, gt=0)  # larger images get 413
    max_body_mb: float = Field(32.0, gt=0.0)  # larger request bodies get 413
    threads: int | None = Field(None, gt=0)  # intra-op threads of the backend (null: torch's default)
    capture: CaptureSettings = CaptureSettings()

    @model_validator(mode="after")
    def _int8_needs_calibration(self) -> ServeSettings:
        if self.precision == "int8" and (self.backend != "onnx" or self.calib is None):
            raise ValueError("precision int8 needs backend onnx and calib (a folder of training images)")
        return self


class Settings(_Strict):
    data: DataSettings
    generate: GenerateSettings = GenerateSettings()
    split: SplitSettings = SplitSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    eval: EvalSettings = EvalSettings()
    continual: ContinualSettings = ContinualSettings()
    tracking: TrackingSettings = TrackingSettings()
    registry: RegistrySettings = RegistrySettings()
    drift: DriftSettings = DriftSettings()
    flows: FlowSettings = FlowSettings()
    export: ExportSettings = ExportSettings()
    distill: DistillSettings = DistillSettings()
    prune: PruneSettings = PruneSettings()
    tune: TuneSettings = TuneSettings()
    serve: ServeSettings = ServeSettings()
    labels: LabelSettings = LabelSettings()

    @model_validator(mode="after")
    def _new_classes_last(self) -> Settings:
        new, classes = self.continual.new_classes, self.data.classes
        if new and (len(new) >= len(classes) or classes[-len(new) :] != new):
            raise ValueError(
                f"continual.new_classes {new} must be the last entries of data.classes {classes} "
                "(the head grows at its end) and leave background and the parent's classes before them"
            )
        return self

    @property
    def num_classes(self) -> int:
        return len(self.data.classes)


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid settings"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "literal_error":  # a name from a fixed set (domains, strategies, ...)
            msg = f"unknown value {e['input']!r}; valid: {e['ctx']['expected']}"
        else:
            msg = e["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `key.path=value` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise SettingsError(f"--set {assignment!r}: expected key.path=value")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:  # an auto (null) section: the override makes it explicit
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise SettingsError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as err:
        # One line: the parser's own message spans lines and points into a one-line "document".
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SettingsError(
            f"--set {assignment!r}: the value is not valid YAML ({problem}); quote it as a string or close its brackets"
        ) from None


def settings_from_dict(raw: dict[str, Any], source: str = "<settings>") -> Settings:
    try:
        return Settings.model_validate(raw)
    except ValidationError as err:
        raise SettingsError(_format_errors(source, err)) from None


def load_settings(path: Path | str = DEFAULT_PARAMS, overrides: Sequence[str] = ()) -> Settings:
    """Read params.yaml, apply `key.path=value` overrides, validate."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise SettingsError(f"{path}: params file not found") from None
    except yaml.YAMLError as err:
        raise SettingsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: top level must be a mapping of sections")
    for assignment in overrides:
        apply_override(raw, assignment)
    source = f"{path}" + (f" with --set {' '.join(overrides)}" if overrides else "")
    return settings_from_dict(raw, source)


# Settings that may hold a URL with a password or token.
SECRET_URLS = (("tracking", "uri"), ("tune", "storage"))


def redact_settings(raw: dict[str, Any]) -> dict[str, Any]:
    """A settings dict fit to write, log or embed: a password or token in tracking.uri or tune.storage masked."""
    from segloop.redaction import redact

    for section, key in SECRET_URLS:
        node = raw.get(section)
        if isinstance(node, dict) and node.get(key):
            raw = {**raw, section: {**node, key: redact(node[key])}}
    return raw


def settings_record(settings: Settings) -> dict[str, Any]:
    """`settings` as the JSON-able dict written beside artifacts and logged (secrets masked)."""
    return redact_settings(settings.model_dump(mode="json"))


def save_settings(settings: Settings, path: Path) -> None:
    """Write the resolved settings beside the artifact they produced."""
    path.write_text(yaml.safe_dump(settings_record(settings), sort_keys=False))
