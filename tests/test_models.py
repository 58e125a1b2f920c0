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


def test_local_norm_cancels_haze_that_thickens_across_the_image():
    """model.norm.kind local: a gain and offset varying smoothly over the image (haze with
    depth) mostly cancel, where the dataset's mean and std (zscore) change nothing."""
    from segloop.config import NormSettings
    from segloop.models import InputNorm

    x = torch.rand(1, 3, 96, 96)
    t = torch.linspace(1.0, 0.3, 96).view(1, 1, 96, 1)  # transmission falls towards the top
    hazy = x * t + 0.85 * (1 - t)
    local, zscore = InputNorm(NormSettings(kind="local", window=17), 3), InputNorm(NormSettings(kind="zscore"), 3)
    assert (local(hazy) - local(x)).abs().mean() < 0.05 < (zscore(hazy) - zscore(x)).abs().mean()
    assert (local(x * 0.3 + 0.5) - local(x)).abs().mean() < 0.01  # a global gain and offset too
    assert local(torch.rand(1, 3, 5, 7)).shape == (1, 3, 5, 7)  # smaller than the window
    with pytest.raises(ValueError, match="window must be odd"):
        NormSettings(kind="local", window=16)
