"""Continual strategies, replay buffer and continual metrics."""
import json

import numpy as np
import pytest
import torch

from segloop.checkpoint import load_checkpoint, load_model
from segloop.config import settings_from_dict
from segloop.continual import STRATEGIES, Distillation, continual_metrics, update
from segloop.data.dataset import list_samples
from segloop.data.replay import MixedBatchSampler, read_manifest, update_buffer
from segloop.data.synthetic import generate
from segloop.train import train


def test_metrics_against_hand_built_matrix():
    r = np.array([
        [0.9, 0.2, 0.1],
        [0.7, 0.8, 0.3],
        [0.6, 0.9, 0.85],
    ])
    m = continual_metrics(r, baseline=np.array([0.0, 0.1, 0.2]))
    assert m["acc"] == pytest.approx((0.6 + 0.9 + 0.85) / 3)
    assert m["bwt"] == pytest.approx(((0.6 - 0.9) + (0.9 - 0.8)) / 2)
    # forgetting: best earlier score minus final, per old domain
    assert m["forgetting"] == pytest.approx(((0.9 - 0.6) + (0.8 - 0.9)) / 2)
    assert m["fwt"] == pytest.approx(((0.2 - 0.1) + (0.3 - 0.2)) / 2)
    assert continual_metrics(np.array([[0.5]]))["forgetting"] == 0.0


def test_mixed_batches_hold_replay_samples():
    sampler = MixedBatchSampler(n_new=20, n_replay=5, batch_size=8, ratio=0.25, generator=torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(batches) == len(sampler) == 20 // 6
    for batch in batches:
        assert len(batch) == 8
        assert sum(i >= 20 for i in batch) == 2  # round(0.25 * 8) old samples per batch
    new = [i for b in batches for i in b if i < 20]
    assert len(new) == len(set(new))  # new data: each at most once per epoch


def test_replay_buffer_is_bounded_and_matches_manifest(tmp_path):
    buffer = None
    for k, domain in enumerate(["base", "fog", "noise"]):
        batch = tmp_path / f"batch{k}"
        generate(batch, domain, n=7, seed=k, size=(32, 32))
        out = tmp_path / f"buffer{k}"
        manifest = update_buffer(buffer, batch, f"b{k}", size=10, seed=0, out=out)
        assert len(manifest["items"]) == min(10, 7 * (k + 1)) and manifest["seen"] == 7 * (k + 1)
        assert read_manifest(out) == manifest  # files and manifest agree
        for item in manifest["items"]:
            assert item["source_batch"] == f"b{int(item['stem'].split('-s')[1].split('-')[0])}"
        buffer = out
    assert {i["source_batch"] for i in manifest["items"]} >= {"b1", "b2"}
    with pytest.raises(FileExistsError):
        update_buffer(buffer, batch, "again", size=10, seed=0, out=buffer)
    (buffer / "images" / f"{manifest['items'][0]['stem']}.png").unlink()
    with pytest.raises(ValueError, match="mismatch"):
        read_manifest(buffer)


def test_distillation_is_zero_against_identical_teacher(tiny_settings):
    from segloop.models import build_model

    model = build_model(tiny_settings.model, 3, 4).eval()
    teacher = build_model(tiny_settings.model, 3, 4)
    teacher.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 64, 64)
    masks = torch.zeros(2, 64, 64, dtype=torch.long)
    loss = Distillation(teacher, temperature=2.0, weight=1.0)(x, model(x), masks)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    other = build_model(tiny_settings.model, 3, 4).eval()
    assert float(Distillation(teacher, 2.0, 1.0)(x, other(x), masks)) > 1e-4


@pytest.fixture(scope="module")
def stream(tmp_path_factory, base_data):
    """A tiny parent trained on base, a fog batch, and a replay buffer of base samples."""
    from conftest import ROOT, TINY, _merge
    import yaml

    raw = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    raw["train"]["epochs"] = 2
    raw["continual"] = {"epochs": 1, "lr": 1e-3, "replay": {"size": 12, "ratio": 0.5}}
    root = tmp_path_factory.mktemp("stream")
    train(settings_from_dict(raw), base_data, root / "parent", log=lambda _: None)
    generate(root / "fog", "fog", n=16, seed=3, size=(72, 80))
    update_buffer(None, base_data, "base", size=12, seed=0, out=root / "buffer")
    return raw, root


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_each_strategy_runs_one_step(stream, base_data, strategy):
    raw, root = stream
    raw = json.loads(json.dumps(raw))
    raw["continual"]["strategy"] = strategy
    settings = settings_from_dict(raw)
    out = root / f"update_{strategy}"
    result = update(settings, root / "parent" / "best.pt", root / "fog", out,
                    seen=[base_data], replay=root / "buffer", log=lambda _: None)
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["strategy"] == strategy
    assert set(ckpt["data_md5"]) == ({str(base_data), str(root / "fog")} if strategy == "joint" else {str(root / "fog")})
    parent_state = load_checkpoint(root / "parent" / "best.pt")["model"]
    enc = [k for k in parent_state if k.startswith("encoder.")]
    dec = [k for k in parent_state if k.startswith("decoder.") and parent_state[k].is_floating_point()]
    changed = lambda keys: any(not torch.equal(parent_state[k], ckpt["model"][k]) for k in keys)  # noqa: E731
    assert changed(dec)
    if strategy == "freeze_encoder":
        assert not changed(enc)  # weights and BatchNorm statistics bit-identical
    else:
        assert changed(enc)
    if strategy == "joint":
        assert ckpt["parent"] is None and result.images_seen == (24 + 16) // 4 * 4 * 2
    else:
        assert ckpt["parent"] == str(root / "parent" / "best.pt")
    if strategy in ("replay", "replay_lwf"):
        # half of every batch came from the buffer: twice the steps of plain fine-tuning
        assert result.images_seen == 16 // 2 * 4
        assert "replay_md5" in ckpt


def test_replay_strategy_without_buffer_is_an_error(stream):
    raw, root = stream
    raw = json.loads(json.dumps(raw))
    raw["continual"]["strategy"] = "replay"
    with pytest.raises(ValueError, match="needs a replay buffer"):
        update(settings_from_dict(raw), root / "parent" / "best.pt", root / "fog", root / "x")


def test_unknown_strategy_lists_valid(tiny_raw):
    tiny_raw["continual"] = {"strategy": "ewc"}
    with pytest.raises(Exception, match=r"continual.strategy: .*unknown strategy 'ewc'.*replay_lwf"):
        settings_from_dict(tiny_raw)
