"""`segloop serve`: the champion answers segmentation requests, follows its alias live,
exposes Prometheus metrics and hands a sample of what it sees back to the loop.

Rules this module keeps:
- A request finishes on the model it started on. A handler takes one reference to the
  loaded model (`Service.current`); a new version is loaded beside it, in a thread, and
  swapped in by one assignment. A promotion or a rollback never fails or mixes a request.
- The registry is asked, never told: the poll (`serve.poll_s`) and `POST /v1/reload` (the
  target of an MLflow webhook on alias changes) both re-read the alias; a webhook's
  payload is not trusted, so the endpoint needs no secret. A registry that fails during a
  check is counted and the loaded version keeps serving.
- Inference is the code `segloop predict` runs (`segloop.inference.predict_logits` with
  `eval.max_size` / `eval.overlap`), on the version's ONNX export (`segloop.export`, made
  once per checkpoint and cached) or its eager checkpoint.
- Bad input is a JSON error with a 4xx status, never a crash.
- The gate asks the same runtime whether a candidate serves (`servability`): loaded as a
  version is loaded here, one sample request answered, latency timed against the champion's.
Nothing here trains, decides promotions or moves aliases.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from fastapi import Query, Request  # module level: FastAPI resolves the handlers' annotations here
from PIL import Image, UnidentifiedImageError

from segloop.capture import Capture
from segloop.config import Settings
from segloop.data.dataset import to_tensor
from segloop.inference import Backend, predict_logits

log = logging.getLogger("segloop.serve")

FORMATS = ("PNG", "JPEG")  # decoders exposed to requests
MULTIPART_FIELDS = ("image", "file")  # form fields read from a multipart body, else its first file
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UNIT_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # confidence, entropy, class area in [0, 1]
PIXEL_BUCKETS = tuple(float(4**i) for i in range(6, 14))  # 4096 .. 67M pixels
SIGNAL_STRIDE = 4  # confidence and entropy are estimated on a 1-in-16 pixel grid (see `predict`)


class RequestError(Exception):
    """A request the service refuses: HTTP `status` with a JSON body {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def default_ref(settings: Settings) -> str:
    return settings.serve.model or f"models:/{settings.registry.model_name}@champion"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------- loading a version


@dataclass(frozen=True)
class LoadedModel:
    """One model version ready to answer: the backend and what describes it."""

    ref: str  # what the service follows: models:/name@alias, models:/name/N or a checkpoint path
    name: str | None
    version: str  # the registry version, or "local" for a checkpoint path
    alias: str | None
    backend_name: str  # "onnx-fp32", "onnx-int8" or "torch"
    model: Backend
    device: torch.device
    channels: int
    classes: list[str]
    file: str  # what the backend runs
    loaded_at: str
    load_s: float

    def describe(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "backend": self.backend_name,
            "classes": self.classes,
            "channels": self.channels,
            "file": self.file,
            "loaded_at": self.loaded_at,
            "load_s": round(self.load_s, 3),
        }


def onnx_export(checkpoint: Path, settings: Settings, label: str) -> Path:
    """The ONNX export of `checkpoint` (fp32, or int8 with serve.precision), made once and cached.

    The cache key is the checkpoint's sha256 (a registered version's file never changes) and
    the export settings; the folder is built aside and renamed into place, so a crash leaves
    no half export that a later load would trust. An export that does not match eager
    within export.tolerance is refused.
    """
    from segloop.export import EXPORT_RECIPE, export_model, int8_path
    from segloop.registry import file_sha256

    cfg = settings.serve
    # What makes the file: the export code's recipe, every export setting and the calibration images.
    how = json.dumps([EXPORT_RECIPE, settings.export.model_dump(mode="json"), str(cfg.calib)], sort_keys=True)
    key = f"{file_sha256(checkpoint)[:16]}-{cfg.precision}-{hashlib.sha256(how.encode()).hexdigest()[:8]}"
    folder = cfg.cache / key
    fp32 = folder / "model.onnx"
    path = int8_path(fp32) if cfg.precision == "int8" else fp32
    if path.is_file():
        os.utime(folder)  # recently used: the last to be evicted
        return path
    tmp = cfg.cache / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        report = export_model(
            checkpoint,
            tmp / fp32.name,
            settings.export,
            settings.eval,
            quantize="int8" if cfg.precision == "int8" else None,
            calib=cfg.calib,
            label=label,
            log=log.info,
        )
        if not report["fp32"]["within_tolerance"]:
            raise ValueError(
                f"{label}: ONNX export differs from eager by {report['fp32']['max_abs_logit_diff']:.3g} "
                f"> export.tolerance {settings.export.tolerance:g}; not serving it"
            )
        try:
            os.rename(tmp, folder)
        except OSError:  # another process cached it meanwhile: theirs is as good
            if not path.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _evict(cfg.cache, cfg.cache_keep, folder)
    return path


def _evict(cache: Path, keep: int, made: Path) -> None:
    """Remove all but the `keep` most recently used exports (never `made`): every gate and
    every new champion adds one, and a long-running loop would otherwise fill the disk."""
    folders = sorted(
        (f for f in cache.iterdir() if f.is_dir() and not f.name.startswith(".") and f != made),
        key=lambda f: f.stat().st_mtime,
        reverse=True,
    )
    for old in folders[max(keep - 1, 0) :]:
        shutil.rmtree(old, ignore_errors=True)


def load_model(settings: Settings, ref: str, checkpoint: Path, mv=None, alias: str | None = None) -> LoadedModel:
    """Load `checkpoint` (the version `mv` of `ref`, or a plain file) on serve.backend."""
    from segloop.evaluate import load_backend
    from segloop.inference import OnnxBackend

    started = time.perf_counter()
    cfg = settings.serve
    version = str(mv.version) if mv is not None else "local"
    label = f"models:/{mv.name}/{mv.version}" if mv is not None else str(checkpoint)
    model: Backend
    if cfg.backend == "onnx":
        file = onnx_export(checkpoint, settings, label)
        backend = OnnxBackend(file, threads=cfg.threads)
        model, channels, device, classes = backend, backend.channels, torch.device("cpu"), backend.classes
        name = f"onnx-{cfg.precision}"
    else:
        file = checkpoint
        model, channels, device, classes = load_backend(checkpoint, "torch")
        name = "torch"
    return LoadedModel(
        ref=ref,
        name=mv.name if mv is not None else None,
        version=version,
        alias=alias,
        backend_name=name,
        model=model,
        device=device,
        channels=channels,
        classes=list(classes),
        file=str(file),
        loaded_at=_now(),
        load_s=time.perf_counter() - started,
    )


# ---------------------------------------------------------------- one request


@dataclass
class Prediction:
    """What the model said about one image."""

    mask: np.ndarray  # (H, W) uint8 class ids
    class_area: dict[str, float]  # class -> share of the image's pixels
    mean_confidence: float  # mean over pixels of the top softmax probability
    mean_entropy: float  # mean over pixels of the softmax entropy / log(K), in [0, 1]
    inference_s: float


def decode_image(data: bytes, channels: int, max_pixels: int) -> np.ndarray:
    """Request body -> (H, W, channels) uint8, as `segloop predict` reads a file (segloop.data.dataset.read_image).

    Any PNG/JPEG mode is converted to the model's channels; errors are RequestErrors.
    """
    if not data:
        raise RequestError(400, "empty body: send a PNG or JPEG image (raw body or multipart field 'image')")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise RequestError(
            415, f"not a {' or '.join(FORMATS)} image ({len(data)} bytes that no decoder recognises)"
        ) from None
    except Image.DecompressionBombError as err:
        raise RequestError(413, f"image too large to decode safely ({err})") from None
    with img:
        w, h = img.size
        if w * h > max_pixels:
            raise RequestError(413, f"image of {w}x{h} = {w * h} pixels exceeds serve.max_pixels = {max_pixels}")
        try:
            arr = np.array(img.convert("L" if channels == 1 else "RGB"))
        except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data past the header
            raise RequestError(422, f"{img.format} image of {w}x{h} could not be decoded: {err}") from None
    return arr[..., None] if channels == 1 else arr


def predict(loaded: LoadedModel, image: np.ndarray, max_size: int, overlap: float) -> Prediction:
    """The mask and its label-free quality signals for one (H, W, C) uint8 image.

    The mask and class areas use every pixel; confidence and entropy are means over every
    SIGNAL_STRIDE-th pixel of every SIGNAL_STRIDE-th row (a softmax over all of them would cost
    a third of the model's own time; the means move by far less than their spread over requests).
    """
    started = time.perf_counter()
    x = to_tensor(image)[None].to(loaded.device)
    logits = predict_logits(loaded.model, x, max_size, overlap)  # (1, K, H, W), as `segloop predict`
    with torch.inference_mode():
        pred = logits[0].argmax(0)
        k = logits.shape[1]
        logp = logits[0, :, ::SIGNAL_STRIDE, ::SIGNAL_STRIDE].log_softmax(0)
        p = logp.exp()
        confidence = float(p.amax(0).mean())
        entropy = float(-(p * logp).sum(0).mean()) / math.log(k)
        counts = torch.bincount(pred.flatten(), minlength=k).tolist()
    n = pred.numel()
    return Prediction(
        mask=pred.to(torch.uint8).cpu().numpy(),
        inference_s=time.perf_counter() - started,
        class_area={c: counts[i] / n for i, c in enumerate(loaded.classes)},
        mean_confidence=confidence,
        mean_entropy=min(1.0, max(0.0, entropy)),
    )


def mask_png(mask: np.ndarray, num_classes: int) -> bytes:
    """The palette PNG `segloop predict` writes (segloop.evaluate.save_mask), in memory."""
    from segloop.evaluate import save_mask

    buf = io.BytesIO()
    save_mask(buf, mask, num_classes, compress_level=1)  # same pixels; zlib level 1 is several times faster
    return buf.getvalue()


def image_from_body(body: bytes, content_type: str) -> bytes:
    """The image bytes of a raw body, or of a multipart/form-data body's image field."""
    if not content_type.lower().startswith("multipart/form-data"):
        return body
    import multipart

    _, options = multipart.parse_options_header(content_type)
    if "boundary" not in options:
        raise RequestError(400, "multipart/form-data without a boundary")
    try:
        parts = list(multipart.MultipartParser(io.BytesIO(body), options["boundary"], content_length=len(body)))
    except multipart.MultipartError as err:
        raise RequestError(400, f"malformed multipart body: {err}") from None
    named = {p.name: p for p in parts}
    for name in MULTIPART_FIELDS:
        if name in named:
            return named[name].raw
    files = [p for p in parts if p.filename]
    if not files:
        raise RequestError(
            400, f"multipart body has no file part (send the image as field 'image'; got {sorted(named)})"
        )
    return files[0].raw


# ---------------------------------------------------------------- servability (the gate's InfraValidator)

SERVABILITY_WARMUP = 2  # untimed requests per model before timing (the first is the checked answer)
SERVABILITY_RUNS = 7  # timed requests per model per round, candidate and champion alternating; the median counts
SERVABILITY_ROUNDS = 3  # a ratio over the limit is timed again, up to this many rounds in all; the best round counts


def _error_text(err: BaseException, limit: int = 400) -> str:
    """An exception on one line (a reason is one line), cut at `limit` characters."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def servability(
    settings: Settings, candidate: tuple[Path, Any], champion: tuple[Path, Any] | None, sample: Path
) -> dict[str, Any]:
    """Can the candidate be served, and how fast compared with the champion (TFX's InfraValidator idea).

    `candidate`, `champion`: (checkpoint, model version). Each is loaded as `segloop serve` loads
    a version (`load_model`: serve.backend, the ONNX export made and cached per checkpoint) and
    answers `sample` as a request is answered (decode_image -> predict -> mask_png). Then both are
    timed in this process the same way: SERVABILITY_WARMUP untimed requests each, then
    SERVABILITY_RUNS timed `predict` calls at batch 1, alternating the models so that load from
    other processes hits both alike; the medians are compared. Latency rule: candidate <=
    registry.gate.max_latency_ratio x champion (null or 0: off). A round over the limit is
    timed again (at most SERVABILITY_ROUNDS rounds; the lowest ratio counts): a burst of load
    from another process does not refuse a model, a slower one fails every round. Without a
    champion, or with one that cannot be loaded or answer itself, only load + answer are checked.

    Never raises for a model's failure: the returned `passed` and one-line `reason` (PASS/FAIL
    servability: ...) say what happened, with the error of a candidate that cannot load or answer.
    """
    started = time.perf_counter()
    cfg = settings.serve
    limit = settings.registry.gate.max_latency_ratio or None
    backend = f"onnx-{cfg.precision}" if cfg.backend == "onnx" else cfg.backend
    out: dict[str, Any] = {
        "passed": False,
        "backend": backend,
        "sample": str(sample),
        "sample_size": None,
        "candidate_ms": None,
        "champion_ms": None,
        "ratio": None,
        "max_latency_ratio": limit,
        "warmup": SERVABILITY_WARMUP,
        "runs": SERVABILITY_RUNS,
        "rounds": [],
        "error": None,
        "champion_error": None,
    }
    data = Path(sample).read_bytes()

    def load(path: Path, mv) -> LoadedModel:
        return load_model(settings, f"models:/{mv.name}/{mv.version}" if mv is not None else str(path), path, mv)

    def answer(loaded: LoadedModel) -> np.ndarray:
        """One request, as the service answers it: the decoded image, checked mask and PNG."""
        image = decode_image(data, loaded.channels, cfg.max_pixels)
        p = predict(loaded, image, settings.eval.max_size, settings.eval.overlap)
        if p.mask.shape != image.shape[:2]:
            raise ValueError(f"mask of shape {p.mask.shape} for an image of {image.shape[1]}x{image.shape[0]}")
        if not mask_png(p.mask, len(loaded.classes)):
            raise ValueError("empty mask PNG")
        return image

    def done(passed: bool, reason: str) -> dict[str, Any]:
        out.update(
            passed=passed,
            reason=f"{'PASS' if passed else 'FAIL'} servability: {reason}",
            seconds=round(time.perf_counter() - started, 3),
        )
        return out

    try:
        cand = load(*candidate)
    except Exception as err:
        out["error"] = _error_text(err)
        return done(False, f"candidate could not be loaded on {backend} ({out['error']}); not servable, not evaluated")
    out["backend"] = backend = cand.backend_name
    try:
        image = answer(cand)
    except Exception as err:
        out["error"] = _error_text(err)
        return done(
            False,
            f"loaded on {backend} but could not answer the sample request {Path(sample).name} "
            f"({out['error']}); not servable, not evaluated",
        )
    out["sample_size"] = [int(image.shape[1]), int(image.shape[0])]
    timed = {"candidate": cand}
    if champion is not None:
        try:
            champ = load(*champion)
            answer(champ)
            timed["champion"] = champ
        except Exception as err:  # the champion's trouble is not the candidate's: no latency to compare with
            out["champion_error"] = _error_text(err)

    def time_round(runs: int) -> dict[str, float]:
        times: dict[str, list[float]] = {role: [] for role in timed}
        for _ in range(runs):
            for role, loaded in timed.items():
                t0 = time.perf_counter()
                predict(loaded, image, settings.eval.max_size, settings.eval.overlap)
                times[role].append(time.perf_counter() - t0)
        return {role: 1000 * float(np.median(t)) for role, t in times.items()}

    def over(ms: dict[str, float]) -> bool:
        return "champion" in ms and limit is not None and ms["candidate"] / ms["champion"] > limit

    time_round(SERVABILITY_WARMUP - 1)  # the answer above was the first warm-up
    rounds = [time_round(SERVABILITY_RUNS)]
    while over(rounds[-1]) and len(rounds) < SERVABILITY_ROUNDS:
        rounds.append(time_round(SERVABILITY_RUNS))
    ms = min(rounds, key=lambda r: r["candidate"] / r["champion"] if "champion" in r else 0.0)
    out["rounds"] = [{role: round(v, 3) for role, v in r.items()} for r in rounds]
    out["candidate_ms"] = round(ms["candidate"], 3)
    # The reason shows the recorded (rounded) figures, so the two never disagree in a last digit.
    answered = f"loaded on {backend}, answered in {out['candidate_ms']:.2f} ms"
    if champion is None:
        return done(True, f"{answered} (no champion: latency not compared)")
    if "champion" not in timed:
        return done(
            True,
            f"{answered}; the champion could not be loaded or answer ({out['champion_error']}): latency not compared",
        )
    out["champion_ms"] = round(ms["champion"], 3)
    out["ratio"] = ratio = ms["candidate"] / ms["champion"]
    versus = f"{answered} vs champion {out['champion_ms']:.2f} ms (ratio {ratio:.2f}"
    if limit is None:
        return done(True, f"{versus}, registry.gate.max_latency_ratio off: latency not limited)")
    best = f"; best of {len(rounds)} timing rounds" if len(rounds) > 1 else ""
    return done(ratio <= limit, f"{versus}, registry.gate.max_latency_ratio {limit:g}{best})")


# ---------------------------------------------------------------- metrics


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per service)."""

    def __init__(self, drift_workspace: Path | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = r = CollectorRegistry()
        if drift_workspace is not None:
            # The loop's last drift check per model (segloop_drift_*): Prometheus already scrapes
            # this service, while the monitor flow is a short batch job with nothing to scrape.
            from segloop.drift.history import DriftGauges

            r.register(DriftGauges(drift_workspace))
        self.requests = Counter(
            "segloop_serve_requests",
            "POST /v1/segment requests by HTTP status and model version",
            ["status", "version"],
            registry=r,
        )
        self.latency = Histogram(
            "segloop_serve_request_seconds",
            "POST /v1/segment latency (body read to response)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "segloop_serve_inference_seconds",
            "Model time of one request (predict_logits + summary)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.pixels = Histogram(
            "segloop_serve_image_pixels", "Pixels of the images answered", buckets=PIXEL_BUCKETS, registry=r
        )
        self.confidence = Histogram(
            "segloop_serve_confidence",
            "Mean top softmax probability of a request's pixels",
            ["version"],
            buckets=UNIT_BUCKETS,
            registry=r,
        )
        self.entropy = Histogram(
            "segloop_serve_entropy",
            "Mean softmax entropy / log(K) of a request's pixels",
            ["version"],
            buckets=UNIT_BUCKETS,
            registry=r,
        )
        self.class_area = Histogram(
            "segloop_serve_class_area",
            "Share of a request's pixels predicted as each class",
            ["class_name", "version"],
            buckets=UNIT_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("segloop_serve_in_flight", "POST /v1/segment requests being answered", registry=r)
        self.model = Info("segloop_serve_model", "The model version being served", registry=r)
        self.version = Gauge(
            "segloop_serve_model_version", "The registry version being served (NaN: a local file)", registry=r
        )
        self.reloads = Counter(
            "segloop_serve_reloads",
            "Alias checks by trigger and result (loaded, unchanged, failed)",
            ["trigger", "result"],
            registry=r,
        )
        self.registry_failures = Counter(
            "segloop_serve_registry_failures", "Alias checks the registry did not answer", registry=r
        )
        self.load_seconds = Histogram(
            "segloop_serve_load_seconds",
            "Time to load (and export) a new version",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.captured = Counter("segloop_serve_captured", "Images kept for the loop", registry=r)
        self.capture_dropped = Counter(
            "segloop_serve_capture_dropped", "Images not kept: pending captures at their bound", registry=r
        )
        self.capture_batches = Counter(
            "segloop_serve_capture_batches", "Unlabelled batches handed to the loop", registry=r
        )

    def served(self, m: LoadedModel) -> None:
        self.model.info(
            {
                "name": m.name or "",
                "version": m.version,
                "alias": m.alias or "",
                "backend": m.backend_name,
                "ref": m.ref,
            }
        )
        self.version.set(float(m.version) if m.version.isdigit() else float("nan"))

    def observe(self, version: str, pixels: int, p: Prediction) -> None:
        self.pixels.observe(pixels)
        self.inference.observe(p.inference_s)
        self.confidence.labels(version).observe(p.mean_confidence)
        self.entropy.labels(version).observe(p.mean_entropy)
        for c, share in p.class_area.items():
            self.class_area.labels(c, version).observe(share)


# ---------------------------------------------------------------- the service


@dataclass
class Check:
    """The outcome of one alias check."""

    trigger: str  # start | poll | reload
    result: Literal["loaded", "unchanged", "failed"]
    version: str | None  # serving after the check
    previous: str | None = None
    error: str | None = None
    time: str = field(default_factory=_now)


class Service:
    """Holds the served model and follows `ref` in the registry; app-independent.

    `current` is read once per request; `check` loads a changed version in a worker
    thread and replaces `current` in one assignment.
    """

    def __init__(self, settings: Settings, ref: str | None = None):
        from segloop.registry import is_model_ref, parse_ref

        self.settings = settings
        self.ref = ref or default_ref(settings)
        self.follows = is_model_ref(self.ref)
        self.alias = parse_ref(self.ref)[1] if self.follows else None
        self.current: LoadedModel | None = None
        self.last_check: Check | None = None
        self.metrics: Metrics | None = None
        self._client = self._store = None
        self._lock = asyncio.Lock()
        # One inference at a time: a backend already spreads one image over every core.
        self.inference_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segloop-infer")
        self.capture = (
            Capture(settings.serve.capture, settings.flows.incoming_dir, self.ref, settings.drift.min_images)
            if settings.serve.capture.rate > 0
            else None
        )

    # -- registry

    def _registry(self):
        if self._client is None:
            from segloop.registry import registry_client

            # A remote registry must fail fast: MLflow's client would retry for minutes.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault(
                "MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(math.ceil(self.settings.tracking.connect_timeout_s)))
            )
            self._client, self._store = registry_client(self.settings)
        return self._client, self._store

    def target(self):
        """The registry version `ref` points at now (None for a checkpoint path)."""
        from segloop.registry import get_version

        if not self.follows:
            return None
        client, _ = self._registry()
        return get_version(client, self.ref)

    def load(self, mv) -> LoadedModel:
        from segloop.registry import download_checkpoint

        if mv is None:
            return load_model(self.settings, self.ref, Path(self.ref))
        client, store = self._registry()
        return load_model(self.settings, self.ref, download_checkpoint(client, store, mv), mv, self.alias)

    def start(self) -> LoadedModel:
        """Resolve and load the first model (blocking); errors name the registry or the ref."""
        loaded = self.load(self.target())
        self._swap(loaded)  # self.current is loaded
        self.last_check = Check("start", "loaded", loaded.version)
        return loaded

    def _swap(self, loaded: LoadedModel) -> None:
        previous, self.current = self.current, loaded  # the swap: one assignment
        if self.metrics is not None:
            self.metrics.served(loaded)
            self.metrics.load_seconds.observe(loaded.load_s)
        log.info(
            "serving %s version %s (%s, loaded in %.1fs)%s",
            loaded.ref,
            loaded.version,
            loaded.backend_name,
            loaded.load_s,
            f", was {previous.version}" if previous else "",
        )

    async def check(self, trigger: str) -> Check:
        """Re-read the alias; load and swap in a changed version. Never raises."""
        from anyio import to_thread

        async with self._lock:
            serving = self.current.version if self.current else None
            try:
                mv = await to_thread.run_sync(self.target)
            except Exception as err:  # the registry is down or the ref vanished: keep serving
                result = Check(trigger, "failed", serving, serving, f"registry: {type(err).__name__}: {err}")
                if self.metrics is not None:
                    self.metrics.registry_failures.inc()
            else:
                if mv is None or (self.current is not None and str(mv.version) == self.current.version):
                    result = Check(trigger, "unchanged", serving, serving)
                else:
                    try:
                        loaded = await to_thread.run_sync(self.load, mv)
                    except Exception as err:  # a version that cannot load is not served; the old one stays
                        result = Check(
                            trigger,
                            "failed",
                            serving,
                            serving,
                            f"loading version {mv.version}: {type(err).__name__}: {err}",
                        )
                    else:
                        self._swap(loaded)
                        result = Check(trigger, "loaded", loaded.version, serving)
            if result.error:
                log.warning("alias check (%s) failed, still serving %s: %s", trigger, serving, result.error)
            if self.metrics is not None:
                self.metrics.reloads.labels(trigger, result.result).inc()
            if self.capture is not None:  # an idle service still rolls old captures
                try:
                    await to_thread.run_sync(self.capture.roll_if_due)
                except OSError as err:  # a full disk must not stop the checks (or the serving)
                    log.warning("capture: could not roll the pending captures: %s", err)
            self.last_check = result
            return result

    async def follow(self) -> None:
        """Check every serve.poll_s until cancelled."""
        poll_s = self.settings.serve.poll_s
        if poll_s is None:
            raise ValueError("serve.poll_s is null: the service does not poll")
        while True:
            await asyncio.sleep(poll_s)
            await self.check("poll")


class ModelVersionHeader:
    """ASGI middleware: every response carries X-Model-Version (the one that answered, or the one loaded)."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_version(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-model-version" for k, _ in headers):
                    current = self.service.current
                    headers.append((b"x-model-version", (current.version if current else "none").encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_version)


def create_app(service: Service):
    """The FastAPI app over `service` (whose first model may already be loaded by `start`)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.background import BackgroundTask
    from starlette.concurrency import run_in_threadpool

    settings = service.settings
    cfg = settings.serve
    metrics = service.metrics = Metrics(settings.drift.evidently_workspace)
    if service.current is not None:
        metrics.served(service.current)
    if service.capture is not None:
        service.capture.on_capture = metrics.captured.inc
        service.capture.on_drop = metrics.capture_dropped.inc
        service.capture.on_batch = metrics.capture_batches.inc
    max_body = int(cfg.max_body_mb * 2**20)

    @asynccontextmanager
    async def lifespan(app):
        if service.current is None:
            await run_in_threadpool(service.start)
        poller = asyncio.create_task(service.follow()) if cfg.poll_s and service.follows else None
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()
            service.inference_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="segloop serve",
        version="1",
        lifespan=lifespan,
        description="Semantic segmentation by the registry's champion, followed live.",
    )
    app.add_middleware(ModelVersionHeader, service=service)

    def error(status: int, message: str, version: str | None) -> JSONResponse:
        return JSONResponse(
            {"error": message, "status": status}, status_code=status, headers={"X-Model-Version": version or "none"}
        )

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body:
            raise RequestError(413, f"body of {declared} bytes exceeds serve.max_body_mb = {cfg.max_body_mb:g} MiB")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise RequestError(413, f"body exceeds serve.max_body_mb = {cfg.max_body_mb:g} MiB")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/v1/segment", summary="Segment one image (PNG/JPEG body or multipart field 'image')")
    async def segment(request: Request, format: Literal["png", "json"] = Query("png")):
        started = time.perf_counter()
        loaded = service.current  # the request finishes on this model, whatever is swapped in meanwhile
        version = loaded.version if loaded else "none"
        metrics.in_flight.inc()
        status = 500
        try:
            if loaded is None:
                raise RequestError(503, "no model loaded yet (see /readyz)")
            body = await read_body(request)
            data = image_from_body(body, request.headers.get("content-type", ""))
            image = await run_in_threadpool(decode_image, data, loaded.channels, cfg.max_pixels)
            loop = asyncio.get_running_loop()
            p = await loop.run_in_executor(
                service.inference_pool, predict, loaded, image, settings.eval.max_size, settings.eval.overlap
            )
            h, w = image.shape[:2]
            metrics.observe(version, h * w, p)
            summary = {
                "model": loaded.name,
                "version": version,
                "ref": loaded.ref,
                "backend": loaded.backend_name,
                "image": {"height": h, "width": w, "channels": loaded.channels},
                "class_area": p.class_area,
                "mean_confidence": p.mean_confidence,
                "mean_entropy": p.mean_entropy,
            }
            task = None
            if service.capture is not None and service.capture.wants():
                task = BackgroundTask(
                    service.capture.offer,
                    image,
                    {k: summary[k] for k in ("version", "class_area", "mean_confidence", "mean_entropy")},
                )
            headers = {"X-Model-Version": version}
            status = 200
            if format == "json":
                return JSONResponse(
                    {**summary, "inference_ms": round(1000 * p.inference_s, 2)}, headers=headers, background=task
                )
            png = await run_in_threadpool(mask_png, p.mask, len(loaded.classes))
            return Response(png, media_type="image/png", headers=headers, background=task)
        except RequestError as err:
            status = err.status
            return error(err.status, err.message, version)
        except Exception as err:  # a bug, not the client's fault: answer and count it, keep serving
            log.exception("segment failed")
            return error(500, f"internal error: {type(err).__name__}: {err}", version)
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(str(status), version).inc()
            metrics.latency.observe(time.perf_counter() - started)

    @app.get("/v1/model", summary="The served model: name, version, alias, classes, channels, backend, loaded at")
    async def model():
        if service.current is None:
            return error(503, "no model loaded yet", None)
        return {
            **service.current.describe(),
            "follows": service.ref if service.follows else None,
            "poll_s": cfg.poll_s if service.follows else None,
            "last_check": None if service.last_check is None else service.last_check.__dict__,
        }

    @app.post("/v1/reload", summary="Re-read the alias now (an MLflow webhook's target); ?wait=true answers when done")
    async def reload(wait: bool = False):
        if not wait:
            asyncio.get_running_loop().create_task(service.check("reload"))
            return JSONResponse(
                {"status": "scheduled", "serving": service.current.version if service.current else None},
                status_code=202,
            )
        result = await service.check("reload")
        return JSONResponse(result.__dict__, status_code=503 if result.result == "failed" else 200)

    @app.get("/healthz", summary="The process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="A model is loaded")
    async def readyz():
        if service.current is None:
            return error(503, "no model loaded yet", None)
        return {"ready": True, "version": service.current.version}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def run(settings: Settings, ref: str | None = None) -> None:
    """`segloop serve`: load the model (errors before the port opens), then serve until stopped."""
    import uvicorn

    if settings.serve.threads:
        torch.set_num_threads(settings.serve.threads)
    service = Service(settings, ref)
    loaded = service.start()
    print(
        f"serving {service.ref} version {loaded.version} ({loaded.backend_name}) on "
        f"http://{settings.serve.host}:{settings.serve.port}"
        + (
            f"; following the alias every {settings.serve.poll_s:g}s and on POST /v1/reload"
            if service.follows and settings.serve.poll_s
            else "; following the alias on POST /v1/reload"
            if service.follows
            else ""
        ),
        flush=True,
    )
    uvicorn.run(
        create_app(service), host=settings.serve.host, port=settings.serve.port, log_level="warning", access_log=False
    )
