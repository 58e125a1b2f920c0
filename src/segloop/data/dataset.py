"""The PyTorch side of a dataset folder (segloop.data.files is its contract): tensors,
training augmentations and the loader's Dataset. The loader assumes a validated folder and
fails clearly when it is not one.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from segloop.config import AugmentSettings, ForegroundSettings
from segloop.data.files import IGNORE_INDEX, list_samples, read_image, read_mask


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8 -> (C, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


class _RandomGamma(v2.Transform):
    """Gamma in [1-g, 1+g] on float images; masks pass through untouched."""

    def __init__(self, g: float):
        super().__init__()
        self.g = g

    def make_params(self, flat_inputs):
        return {"gamma": float(torch.empty(1).uniform_(1 - self.g, 1 + self.g))}

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Image):
            return v2.functional.adjust_gamma(inpt, params["gamma"])
        return inpt


class _ForegroundCrop(v2.RandomCrop):
    """RandomCrop that, `share` of the time, centres the crop on a random pixel of one of
    `classes` present in the mask (rare classes would otherwise be in few crops)."""

    def __init__(self, crop: int, fill, fg: ForegroundSettings):
        super().__init__(crop, pad_if_needed=True, fill=fill)
        self.classes, self.share = torch.tensor(fg.classes, dtype=torch.int64), fg.share

    def make_params(self, flat_inputs):
        params = super().make_params(flat_inputs)
        if not self.share or params["needs_pad"] or float(torch.rand(())) >= self.share:
            return params
        mask = next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask)), None)
        hits = torch.isin(mask, self.classes).nonzero() if mask is not None else torch.empty(0, 2)
        if len(hits):
            y, x = hits[int(torch.randint(len(hits), ()))].tolist()[-2:]
            h, w = mask.shape[-2:]
            params["top"] = min(max(0, y - params["height"] // 2), h - params["height"])
            params["left"] = min(max(0, x - params["width"] // 2), w - params["width"])
            params["needs_crop"] = True
        return params


class _RandomRot90(v2.Transform):
    """A quarter turn (1-3 times) with probability p, of image and mask alike (square crops)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def make_params(self, flat_inputs):
        return {"k": int(torch.randint(1, 4, ())) if float(torch.rand(())) < self.p else 0}

    def transform(self, inpt, params):
        if not params["k"] or not isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return inpt
        return tv_tensors.wrap(torch.rot90(inpt.as_subclass(torch.Tensor), params["k"], dims=(-2, -1)), like=inpt)


def train_transform(crop: int, aug: AugmentSettings, fg: ForegroundSettings | None = None) -> v2.Compose:
    """Joint image+mask augmentation: geometry hits both, photometry only the image."""
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
    steps: list[v2.Transform] = [_ForegroundCrop(crop, fill, fg or ForegroundSettings())]
    if aug.rot90:
        steps.append(_RandomRot90(aug.rot90))
    if aug.hflip:
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.vflip:
        steps.append(v2.RandomVerticalFlip(aug.vflip))
    if aug.rotate_degrees:
        steps.append(v2.RandomRotation(aug.rotate_degrees, fill=fill))
    if aug.brightness or aug.contrast:
        steps.append(v2.ColorJitter(brightness=aug.brightness, contrast=aug.contrast))
    if aug.gamma:
        steps.append(_RandomGamma(aug.gamma))
    if aug.blur_sigma:
        # The kernel covers +-3 sigma of the largest blur (an odd size, as torchvision requires).
        size = 2 * math.ceil(3 * aug.blur_sigma) + 1
        steps.append(v2.RandomApply([v2.GaussianBlur(size, sigma=(1e-3, aug.blur_sigma))], p=1 / 3))
    if aug.noise_sigma:
        steps += [v2.GaussianNoise(sigma=aug.noise_sigma, clip=True)]
    return v2.Compose(steps)


class SegmentationDataset(Dataset):
    """Yields (image (C, H, W) float in [0, 1], mask (H, W) int64 with 255 = ignore)."""

    def __init__(self, root: Path, channels: int, transform: v2.Transform | None = None):
        self.samples = list_samples(Path(root))
        self.channels = channels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.samples[idx]
        image = tv_tensors.Image(to_tensor(read_image(sample.image, self.channels)))
        mask = tv_tensors.Mask(torch.from_numpy(read_mask(sample.labels).astype(np.int64)))
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
