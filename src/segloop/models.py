"""Segmentation models built by name over segmentation_models_pytorch.

Nothing is downloaded: encoders start random (`encoder_weights: null`) or from a
local state_dict file given by path.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from segloop.config import ModelSettings, NormSettings

ARCHS: dict[str, type[nn.Module]] = {
    "Unet": smp.Unet,
    "UnetPlusPlus": smp.UnetPlusPlus,
    "FPN": smp.FPN,
    "DeepLabV3Plus": smp.DeepLabV3Plus,
    "Linknet": smp.Linknet,
    "PSPNet": smp.PSPNet,
    "MAnet": smp.MAnet,
    "PAN": smp.PAN,
}
# Archs whose decoder takes `decoder_channels` as a per-stage list.
_LIST_DECODERS = {"Unet", "UnetPlusPlus"}


def takes_decoder_channels(arch: str) -> bool:
    """Whether `model.decoder_channels` (a per-stage list) applies to `arch`."""
    return arch in _LIST_DECODERS


class InputNorm(nn.Module):
    """(N, C, H, W) float in [0, 1] -> clipped and z-scored per channel (`model.norm`).

    Part of the model, so export, serving and drift features see the same input contract
    ([0, 1] images) whatever the recipe chose. The statistics live in the settings, not the
    state_dict (non-persistent buffers): checkpoints keep their keys."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, norm: NormSettings | None, channels: int):
        super().__init__()
        self.kind = "none" if norm is None else norm.kind
        if norm is not None and norm.kind != "none" and len(norm.mean) not in (1, channels):
            raise ValueError(f"model.norm: {len(norm.mean)} mean/std values for {channels} input channels")
        mean, std = (norm.mean, norm.std) if norm is not None else ([0.0], [1.0])
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.clip = None if norm is None or norm.clip is None else tuple(norm.clip)
        self.window = 17 if norm is None else norm.window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return x
        if self.clip is not None:
            x = x.clamp(*self.clip)
        if self.kind == "local":  # borders: the part of the window inside the image
            pool = partial(F.avg_pool2d, kernel_size=self.window, stride=1, padding=self.window // 2)
            mean = pool(x, count_include_pad=False)
            var = (pool(x.square(), count_include_pad=False) - mean.square()).clamp_min(0.0)
            return (x - mean) / (var + 1e-4).sqrt()
        return (x - self.mean) / self.std


_NORMALIZED: dict[type, type] = {}


def _normalized(cls: type[nn.Module]) -> type[nn.Module]:
    """`cls` whose forward first applies `self.input_norm` (an SMP model otherwise unchanged)."""
    if cls not in _NORMALIZED:

        def forward(self, x):
            return cls.forward(self, self.input_norm(x))

        _NORMALIZED[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": __name__})
    return _NORMALIZED[cls]


# Channel counts of a structurally pruned model, by module name: a Conv2d's
# [in_channels, out_channels, groups], a BatchNorm2d's [num_features]. Plain ints, so
# the checkpoint stays loadable with `weights_only=True` and without the pruning library.
Widths = dict[str, list[int]]


def check_model_settings(settings: ModelSettings, key: str = "model") -> None:
    """Raise a one-line ValueError naming `key` if `settings` name no buildable model."""
    if settings.arch not in ARCHS:
        raise ValueError(f"{key}.arch: unknown architecture {settings.arch!r}; valid: {sorted(ARCHS)}")
    encoders = smp.encoders.get_encoder_names()
    if settings.encoder not in encoders:
        raise ValueError(
            f"{key}.encoder: unknown encoder {settings.encoder!r}; valid include "
            f"{sorted(e for e in encoders if e.startswith(('resnet', 'mobilenet', 'efficientnet-b')))} "
            f"(all {len(encoders)}: segmentation_models_pytorch.encoders.get_encoder_names())"
        )
    if settings.decoder_channels is not None and settings.arch not in _LIST_DECODERS:
        raise ValueError(f"{key}.decoder_channels applies only to {sorted(_LIST_DECODERS)}")
    if settings.encoder_weights is not None and not Path(settings.encoder_weights).is_file():
        raise FileNotFoundError(
            f"{key}.encoder_weights: {settings.encoder_weights} does not exist (hub names are not fetched)"
        )


def build_model(settings: ModelSettings, in_channels: int, num_classes: int, widths: Widths | None = None) -> nn.Module:
    """Model mapping (N, in_channels, H, W) float in [0, 1], H and W multiples of 32,
    to logits (N, num_classes, H, W). `model.input_norm` is its first step (see InputNorm).
    `widths` (from `layer_widths` of a pruned model) narrows its layers to those channel counts."""
    check_model_settings(settings)
    kwargs = {}
    if settings.decoder_channels is not None:
        kwargs["decoder_channels"] = tuple(settings.decoder_channels)
    model = _normalized(ARCHS[settings.arch])(
        encoder_name=settings.encoder,
        encoder_weights=None,
        in_channels=in_channels,
        classes=num_classes,
        **kwargs,
    )
    model.input_norm = InputNorm(settings.norm, in_channels)
    if settings.encoder_weights is not None:
        load_encoder_weights(model, Path(settings.encoder_weights))
    if widths:
        apply_widths(model, widths)
    return model


def layer_widths(model: nn.Module) -> Widths:
    """The channel counts of every Conv2d and BatchNorm2d of `model` (see Widths)."""
    widths: Widths = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            widths[name] = [module.in_channels, module.out_channels, module.groups]
        elif isinstance(module, nn.BatchNorm2d):
            widths[name] = [module.num_features]
    return widths


def apply_widths(model: nn.Module, widths: Widths) -> None:
    """Replace each layer whose channel counts differ from `widths` by a fresh one of those counts
    (same kernel, stride, padding...); its weights come from the checkpoint's state_dict next."""
    for name, counts in widths.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"widths: the model has no layer {name!r} (checkpoint of another architecture?)") from None
        if isinstance(module, nn.Conv2d) and len(counts) == 3:
            if [module.in_channels, module.out_channels, module.groups] != counts:
                in_ch, out_ch, groups = counts
                same: dict[str, Any] = {
                    k: getattr(module, k) for k in ("kernel_size", "stride", "padding", "dilation", "padding_mode")
                }
                narrow: nn.Module = nn.Conv2d(in_ch, out_ch, groups=groups, bias=module.bias is not None, **same)
                model.set_submodule(name, narrow)
        elif isinstance(module, nn.BatchNorm2d) and len(counts) == 1:
            if module.num_features != counts[0]:
                narrow = nn.BatchNorm2d(counts[0], module.eps, module.momentum, module.affine)
                model.set_submodule(name, narrow)
        else:
            raise ValueError(f"widths: {name!r} is a {type(module).__name__}, not a layer of {counts} channels")


def load_encoder_weights(model: nn.Module, path: Path) -> None:
    """Load a local encoder state_dict (tensors only; never unpickles objects)."""
    if not path.is_file():
        raise FileNotFoundError(f"model.encoder_weights: {path} does not exist (hub names are not fetched)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    # Classification heads of ImageNet-style checkpoints have no place in an encoder.
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    encoder = model.get_submodule("encoder")
    if not set(state) & set(encoder.state_dict()):
        raise ValueError(f"model.encoder_weights: {path} matches none of the encoder's parameters")
    _, unexpected = nn.Module.load_state_dict(encoder, state, strict=False)
    if unexpected:
        raise ValueError(f"model.encoder_weights: {path} has keys the encoder lacks: {unexpected[:5]}")
