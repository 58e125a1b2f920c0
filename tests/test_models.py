"""Code tests: models by name, local encoder weights, full-image inference."""

import pytest
import torch
from torch import nn

from segloop.config import ModelSettings
from segloop.inference import predict_logits
from segloop.models import build_model


@pytest.mark.parametrize("arch", ["Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus"])
@pytest.mark.parametrize("channels", [1, 3])
def test_archs_by_name(arch, channels):
    model = build_model(ModelSettings(arch=arch, encoder="resnet18"), channels, 5).eval()
    with torch.no_grad():
        out = model(torch.rand(1, channels, 64, 96))
    assert out.shape == (1, 5, 64, 96)


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match=r"model.arch: unknown architecture 'Unet3'.*DeepLabV3Plus.*Unet"):
        build_model(ModelSettings(arch="Unet3"), 3, 4)
    with pytest.raises(ValueError, match=r"model.encoder: unknown encoder 'resnet19'.*resnet18"):
        build_model(ModelSettings(encoder="resnet19"), 3, 4)
    with pytest.raises(ValueError, match="decoder_channels applies only to"):
        build_model(ModelSettings(arch="FPN", decoder_channels=[8, 8, 8, 8, 8]), 3, 4)


def test_encoder_weights_from_local_file(tmp_path):
    donor = build_model(ModelSettings(), 3, 4)
    path = tmp_path / "encoder.pt"
    torch.save(donor.encoder.state_dict(), path)
    model = build_model(ModelSettings(encoder_weights=str(path)), 3, 4)
    for key, value in donor.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match="hub names are not fetched"):
        build_model(ModelSettings(encoder_weights="imagenet"), 3, 4)
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="matches none"):
        build_model(ModelSettings(encoder_weights=str(tmp_path / "other.pt")), 3, 4)


class _Pointwise(nn.Module):
    """A per-pixel model: tiled and whole-image inference must agree exactly."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        assert x.shape[-1] % 32 == 0 and x.shape[-2] % 32 == 0, "input not padded to 32"
        return self.conv(x)


def test_padding_and_sliding_window():
    torch.manual_seed(0)
    model = _Pointwise()
    x = torch.rand(2, 3, 150, 201)
    whole = predict_logits(model, x, max_size=256)
    tiled = predict_logits(model, x, max_size=64, overlap=0.5)
    assert whole.shape == tiled.shape == (2, 4, 150, 201)
    assert torch.allclose(whole, tiled, atol=1e-6)
    assert torch.allclose(whole, model.conv(x), atol=1e-6)


def test_per_image_norm_cancels_a_global_gain_offset_and_tint():
    """model.norm.kind image: a darker, hazier, tinted copy of an image gives the model the same input."""
    from segloop.config import NormSettings
    from segloop.models import InputNorm

    norm = InputNorm(NormSettings(kind="image"), 3)
    x = torch.rand(2, 3, 32, 48)
    shifted = x * torch.tensor([0.3, 0.5, 0.4]).view(1, 3, 1, 1) + torch.tensor([0.4, 0.3, 0.35]).view(1, 3, 1, 1)
    out = norm(x)
    assert torch.allclose(norm(shifted), out, atol=1e-4)
    assert torch.allclose(out.mean(dim=(2, 3)), torch.zeros(2, 3), atol=1e-5)
    assert torch.allclose(out.std(dim=(2, 3), unbiased=False), torch.ones(2, 3), atol=1e-3)
    assert not torch.allclose(InputNorm(NormSettings(kind="zscore"), 3)(shifted), InputNorm(NormSettings(), 3)(x))
