"""Evaluate a model on a dataset folder; predict masks for a folder of images.

Metrics come from per-image confusion matrices (segloop.metrics), summed over
the dataset, then reduced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from segloop.checkpoint import load_checkpoint, model_from_checkpoint
from segloop.config import EvalSettings, Settings, save_settings
from segloop.data.dataset import to_tensor
from segloop.data.files import Folders, Sample, folders, list_samples, read_image, read_mask, samples_of
from segloop.inference import Backend, OnnxBackend, pick_device, predict_logits
from segloop.metrics import confusion_matrix, nanmean, per_class_iou, summarize
from segloop.plots import palette, save_confusion, save_overlay

BACKENDS = ("torch", "onnx")


def _predict(
    model: Backend, sample: Sample, channels: int, cfg: EvalSettings, device: torch.device
) -> tuple[np.ndarray, torch.Tensor]:
    """(image (H, W, C) uint8, predicted mask (H, W) int64 on CPU)."""
    image = read_image(sample.image, channels)
    x = to_tensor(image)[None].to(device)
    pred = predict_logits(model, x, cfg.max_size, cfg.overlap).argmax(1)[0].cpu()
    return image, pred


def confusion_over(
    model: Backend,
    samples: list[Sample],
    channels: int,
    num_classes: int,
    cfg: EvalSettings,
    device: torch.device,
    progress: bool = False,
    on_image=None,
) -> torch.Tensor:
    """Summed (K, K) confusion of `model` over labelled `samples`; `on_image(i, image, truth, pred)` sees each."""
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for i, sample in enumerate(tqdm(samples, desc="evaluate", disable=not progress, leave=False)):
        image, pred = _predict(model, sample, channels, cfg, device)
        truth = torch.from_numpy(read_mask(sample.mask).astype(np.int64))
        cm += confusion_matrix(pred, truth, num_classes)
        if on_image is not None:
            on_image(i, image, truth.numpy(), pred.numpy())
    return cm


def miou_on(model: Backend, data: Folders, settings: Settings, device: torch.device) -> tuple[float, list[float]]:
    """(mIoU, per-class IoU) of `model` on the labelled folder(s) `data`, with settings' classes and eval."""
    cm = confusion_over(model, samples_of(data), settings.data.channels, settings.num_classes, settings.eval, device)
    iou = per_class_iou(cm)
    return nanmean(iou), iou.tolist()


def evaluate(model_path: Path, data: Folders, out_dir: Path, cfg: EvalSettings, label: str | None = None) -> dict:
    """Write metrics.json, confusion.png and overlays for `model_path` on `data` (a folder, or
    several scored as one set).

    `label` names the model in metrics.json (e.g. the `models:/` ref it was resolved from).
    """
    ckpt = load_checkpoint(model_path)
    model, settings = model_from_checkpoint(ckpt, str(model_path))
    device = pick_device()
    model.to(device)
    classes = list(ckpt["classes"])
    out_dir.mkdir(parents=True, exist_ok=True)

    def overlay(i, image, truth, pred):
        if i < cfg.n_overlays:
            save_overlay(out_dir / f"overlay_{i:02d}.png", image, truth, pred, len(classes), classes)

    samples = samples_of(data)
    cm = confusion_over(model, samples, ckpt["channels"], len(classes), cfg, device, progress=True, on_image=overlay)
    metrics = summarize(cm, classes, len(samples))
    metrics["model"] = label or str(model_path)
    paths = [str(f) for f in folders(data)]
    metrics["data"] = paths[0] if len(paths) == 1 else paths
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    np.savetxt(out_dir / "confusion.csv", cm.numpy(), fmt="%d", delimiter=",", header=",".join(classes))
    save_confusion(out_dir / "confusion.png", cm.numpy(), classes)
    save_settings(settings.model_copy(update={"eval": cfg}), out_dir / "settings.yaml")
    return metrics


def load_backend(model_path: Path, backend: str = "torch") -> tuple[Backend, int, torch.device, list[str]]:
    """(model returning logits for a padded batch, image channels, device its inputs go to, class names).

    "torch": a segloop checkpoint, eager; "onnx": a `segloop export` file in ONNX Runtime (CPU).
    """
    if backend == "torch":
        ckpt = load_checkpoint(model_path)
        model, _ = model_from_checkpoint(ckpt, str(model_path))
        device = pick_device()
        return model.to(device), ckpt["channels"], device, list(ckpt["classes"])
    if backend == "onnx":
        onnx_model = OnnxBackend(model_path)
        return onnx_model, onnx_model.channels, torch.device("cpu"), onnx_model.classes
    raise ValueError(f"--backend {backend!r}: unknown backend; valid: {list(BACKENDS)}")


def check_predict_out(input_dir: Path, out_dir: Path, overwrite: bool = False) -> None:
    """Refuse an output folder that could destroy data: the input itself or inside it (never
    allowed: masks would replace or mix with the images), or a non-empty one (unless `overwrite`)."""
    inp, out = Path(input_dir).resolve(), Path(out_dir).resolve()
    if out == inp or inp in out.parents:
        raise FileExistsError(
            f"--out {out_dir}: is {'the input folder' if out == inp else f'inside the input folder {input_dir}'}; "
            "masks would be written among the images; choose a folder outside it"
        )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out_dir}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--out {out_dir}: exists and is not empty; refusing to overwrite it (pass --overwrite, or choose a new "
            "folder)"
        )


def save_mask(path: Path | BinaryIO, mask: np.ndarray, num_classes: int, compress_level: int = 6) -> None:
    """A palette PNG: pixel values are the class ids (read back as such), shown in the class colours."""
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(palette(num_classes).reshape(-1).tolist())
    img.save(path, format="PNG", compress_level=compress_level)  # also into a file object (segloop serve's answers)


def predict_folder(
    model_path: Path, input_dir: Path, out_dir: Path, cfg: EvalSettings, backend: str = "torch", overwrite: bool = False
) -> int:
    """Write one palette mask PNG (class ids) per image of `input_dir` (or its images/ subfolder)."""
    check_predict_out(input_dir, out_dir, overwrite)  # before the model loads: a refusal costs nothing
    model, channels, device, classes = load_backend(model_path, backend)
    samples = list_samples(input_dir, require_masks=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    for sample in tqdm(samples, desc="predict"):
        _, pred = _predict(model, sample, channels, cfg, device)
        save_mask(out_dir / f"{sample.stem}.png", pred.numpy(), len(classes))
    return len(samples)
