"""Data tests: the generator is deterministic and its domains shift images, not labels."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from segloop.data.synthetic import CLASSES, DOMAINS, apply_domain, generate, make_scene


def _digests(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))
    }


def test_same_seed_same_bytes(tmp_path):
    generate(tmp_path / "a", "fog", n=4, seed=7, size=(50, 70))
    generate(tmp_path / "b", "fog", n=4, seed=7, size=(50, 70))
    generate(tmp_path / "c", "fog", n=4, seed=8, size=(50, 70))
    a, b, c = _digests(tmp_path / "a"), _digests(tmp_path / "b"), _digests(tmp_path / "c")
    assert a == b and len(a) == 8
    assert set(a.values()).isdisjoint(c.values())


def test_contract_and_classes(tmp_path):
    generate(tmp_path, "base", n=12, seed=0, size=(50, 70))
    seen = set()
    for mask_path in (tmp_path / "masks").iterdir():
        image = Image.open(tmp_path / "images" / mask_path.name)
        mask = Image.open(mask_path)
        assert image.mode == "RGB" and mask.mode == "L" and image.size == mask.size == (70, 50)
        seen |= set(np.unique(np.asarray(mask)).tolist())
    assert seen == set(range(len(CLASSES)))  # every class appears, nothing else


@pytest.mark.parametrize("domain", sorted(set(DOMAINS) - {"base"}))
def test_domains_keep_masks_and_change_images(tmp_path, domain):
    generate(tmp_path / "base", "base", n=3, seed=2, size=(48, 48))
    generate(tmp_path / domain, domain, n=3, seed=2, size=(48, 48))
    for name in (tmp_path / "base" / "masks").iterdir():
        shifted_name = name.name.replace("base", domain)
        assert (tmp_path / "base" / "masks" / name.name).read_bytes() == (
            tmp_path / domain / "masks" / shifted_name
        ).read_bytes()
        base_img = np.asarray(Image.open(tmp_path / "base" / "images" / name.name), dtype=float)
        shifted = np.asarray(Image.open(tmp_path / domain / "images" / shifted_name), dtype=float)
        assert np.abs(base_img - shifted).mean() > 10  # a real change, not rounding


def test_strength_scales_the_shift():
    image, _ = make_scene(np.random.default_rng(0), (64, 64))
    base = apply_domain(image, "base", np.random.default_rng(1)).astype(float)
    gaps = [
        np.abs(apply_domain(image, "lowlight", np.random.default_rng(1), s).astype(float) - base).mean()
        for s in (0.0, 0.25, 0.5, 1.0)
    ]
    assert gaps[0] < 1.0 and gaps[1] < gaps[2] < gaps[3]


def test_colour_alone_does_not_separate_classes():
    """A per-class hue histogram overlaps with every other class's: texture must decide."""
    hues = {k: [] for k in range(len(CLASSES))}
    for i in range(20):
        image, mask = make_scene(np.random.default_rng([3, i, 0]), (64, 64))
        hsv = np.asarray(Image.fromarray((image * 255).astype(np.uint8)).convert("HSV"), dtype=int)
        for k in hues:
            hues[k].extend(hsv[..., 0][mask == k].tolist())
    hist = {k: np.histogram(v, bins=18, range=(0, 256))[0] > 0 for k, v in hues.items()}
    for a in hist:
        for b in hist:
            assert (hist[a] & hist[b]).any(), (CLASSES[a], CLASSES[b])


def test_unknown_domain(tmp_path):
    with pytest.raises(ValueError, match="valid: .*fog"):
        generate(tmp_path, "rain", n=1, seed=0)
