"""Continual strategies, replay buffer and continual metrics."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segloop.checkpoint import load_checkpoint, load_model
from segloop.config import settings_from_dict
from segloop.continual import STRATEGIES, Distillation, continual_metrics, update
from segloop.data.files import list_samples
from segloop.data.replay import MixedBatchSampler, read_manifest, update_buffer
from segloop.data.synthetic import generate
from segloop.evaluate import miou_on
from segloop.train import train


def test_metrics_against_hand_built_matrix():
    r = np.array(
        [
            [0.9, 0.2, 0.1],
            [0.7, 0.8, 0.3],
            [0.6, 0.9, 0.85],
        ]
    )
    m = continual_metrics(r, baseline=np.array([0.0, 0.1, 0.2]))
    assert m["acc"] == pytest.approx((0.6 + 0.9 + 0.85) / 3)
    assert m["bwt"] == pytest.approx(((0.6 - 0.9) + (0.9 - 0.8)) / 2)
    # forgetting: best earlier score minus final, per old domain
    assert m["forgetting"] == pytest.approx(((0.9 - 0.6) + (0.8 - 0.9)) / 2)
    assert m["fwt"] == pytest.approx(((0.2 - 0.1) + (0.3 - 0.2)) / 2)
    assert m["la"] == pytest.approx((0.9 + 0.8 + 0.85) / 3)
    assert continual_metrics(np.array([[0.5]]))["forgetting"] == 0.0


def test_mixed_batches_hold_replay_samples():
    sampler = MixedBatchSampler(
        n_new=20, n_replay=5, batch_size=8, ratio=0.25, generator=torch.Generator().manual_seed(0)
    )
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


def test_balanced_buffer_keeps_equal_shares_and_balanced_mix_follows_it(tmp_path, tiny_raw):
    from collections import Counter

    from segloop.continual import replay_ratio

    buffer = None
    for k, n in enumerate([7, 2, 7]):
        batch = tmp_path / f"batch{k}"
        generate(batch, "base", n=n, seed=k, size=(32, 32))
        out = tmp_path / f"buffer{k}"
        manifest = update_buffer(buffer, batch, f"b{k}", size=10, seed=0, out=out, sampling="balanced")
        assert read_manifest(out) == manifest and manifest["seen"] == sum([7, 2, 7][: k + 1])
        buffer = out
    # the small batch keeps all it has; the others split the rest evenly
    assert Counter(i["source_batch"] for i in manifest["items"]) == {"b0": 4, "b1": 2, "b2": 4}
    tiny_raw["continual"] = {"replay": {"mix": "balanced"}}
    assert replay_ratio(settings_from_dict(tiny_raw), buffer) == pytest.approx(3 / 4)  # 3 old batches + the new one
    tiny_raw["continual"] = {"replay": {"mix": "ratio", "ratio": 0.3}}
    assert replay_ratio(settings_from_dict(tiny_raw), buffer) == 0.3
    with pytest.raises(ValueError, match="sampling"):
        update_buffer(buffer, batch, "b3", size=10, seed=0, out=tmp_path / "x", sampling="fifo")


def test_balanced_buffer_with_domains_shares_by_domain_not_by_batch(tmp_path, tiny_raw):
    """The loop's buffer: two base batches and one fog batch -> half base, half fog."""
    from collections import Counter

    from segloop.continual import replay_ratio

    buffer = None
    for k, domain in enumerate(["base", "base", "fog"]):
        batch = tmp_path / f"batch{k}"
        generate(batch, domain, n=8, seed=k, size=(32, 32))
        update_buffer(
            buffer, batch, f"b{k}", size=10, seed=0, out=tmp_path / f"buffer{k}", sampling="balanced", domain=domain
        )
        buffer = tmp_path / f"buffer{k}"
    items = read_manifest(buffer)["items"]
    assert Counter(i["domain"] for i in items) == {"base": 5, "fog": 5}
    assert set(Counter(i["source_batch"] for i in items)) == {"b0", "b1", "b2"}  # base's share from both batches
    tiny_raw["continual"] = {"replay": {"mix": "balanced"}}
    assert replay_ratio(settings_from_dict(tiny_raw), buffer) == pytest.approx(2 / 3)  # 2 domains + the new batch


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
    import yaml
    from conftest import ROOT, TINY, _merge

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
    result = update(
        settings,
        root / "parent" / "best.pt",
        root / "fog",
        out,
        seen=[base_data],
        replay=root / "buffer",
        log=lambda _: None,
    )
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["strategy"] == strategy
    assert set(ckpt["data_md5"]) == (
        {str(base_data), str(root / "fog")} if strategy == "joint" else {str(root / "fog")}
    )
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
        t = raw["train"]  # epochs of iters_per_epoch fixed-size steps, over both folders
        assert ckpt["parent"] is None and result.images_seen == t["epochs"] * t["iters_per_epoch"] * t["batch_size"]
    else:
        assert ckpt["parent"] == str(root / "parent" / "best.pt")
    if strategy in ("replay", "replay_lwf"):
        # the same number of steps as fine-tuning, half of every batch from the buffer
        t = raw["train"]
        assert result.images_seen == raw["continual"]["epochs"] * t["iters_per_epoch"] * t["batch_size"]
        assert "replay_md5" in ckpt and ckpt["replay_ratio"] == 0.5


def test_replay_strategy_without_buffer_is_an_error(stream):
    raw, root = stream
    raw = json.loads(json.dumps(raw))
    raw["continual"]["strategy"] = "replay"
    with pytest.raises(ValueError, match="needs a replay buffer"):
        update(settings_from_dict(raw), root / "parent" / "best.pt", root / "fog", root / "x")


def test_unknown_strategy_lists_valid(tiny_raw):
    tiny_raw["continual"] = {"strategy": "ewc"}
    with pytest.raises(Exception, match=r"continual.strategy: unknown value 'ewc'; valid: .*replay_lwf"):
        settings_from_dict(tiny_raw)


# Class-incremental updates (MiB)


def _head_model(settings, n_classes, seed=0):
    from segloop.models import build_model

    torch.manual_seed(seed)
    return build_model(settings.model, 3, n_classes).eval()


def test_grown_head_keeps_old_class_logits(tiny_settings):
    from segloop.class_incremental import grow_head

    parent = _head_model(tiny_settings, 3)
    child = _head_model(tiny_settings, 5, seed=1)
    child.load_state_dict(grow_head(parent.state_dict(), 2))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        old, new = parent(x), child(x)
    assert new.shape[1] == 5
    torch.testing.assert_close(new[:, 1:3], old[:, 1:3], rtol=0, atol=1e-5)  # old-class logits unchanged
    # background's share is split evenly with the two new classes; old-class probabilities unchanged
    torch.testing.assert_close(new[:, 0], old[:, 0] - np.log(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(new[:, 3], new[:, 0])
    torch.testing.assert_close(new[:, 4], new[:, 0])
    p_old, p_new = old.softmax(1), new.softmax(1)
    torch.testing.assert_close(p_new[:, 1:3], p_old[:, 1:3], rtol=0, atol=1e-5)
    torch.testing.assert_close(p_new[:, [0, 3, 4]].sum(1), p_old[:, 0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="segmentation_head.0"):
        grow_head({"x": torch.zeros(1)}, 1)


def test_unbiased_loss_is_plain_with_nothing_to_hide_and_reads_background_as_old():
    from segloop.class_incremental import UnbiasedSegLoss
    from segloop.train import SegLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8) * 3
    target = torch.randint(0, 4, (2, 8, 8))
    target[0, :2] = 255
    plain = SegLoss(dice_weight=1.0, ce_weight=1.0)
    torch.testing.assert_close(UnbiasedSegLoss(1, plain)(logits, target), plain(logits, target))
    # a new batch labels only background (0) and the new class 3: background stands for 0, 1 or 2
    target = torch.where(target == 3, 3, torch.where(target == 255, 255, 0))
    p = logits.softmax(1)
    valid = target != 255
    picked = torch.where(target == 3, p[:, 3], p[:, :3].sum(1))
    expected = -(picked.log() * valid).sum() / valid.sum()
    ce_only = UnbiasedSegLoss(3, SegLoss(dice_weight=0.0, ce_weight=1.0))
    torch.testing.assert_close(ce_only(logits, target), expected)
    assert (
        float(expected) < float(F.cross_entropy(logits, target, ignore_index=255)) - 0.5
    )  # plain CE punishes old classes


def test_unbiased_distillation_compares_parent_background_with_background_plus_new(tiny_settings):
    from segloop.class_incremental import grow_head

    teacher = _head_model(tiny_settings, 3)
    student = _head_model(tiny_settings, 4, seed=1)
    student.load_state_dict(grow_head(teacher.state_dict(), 1))
    x = torch.rand(2, 3, 64, 64)
    masks = torch.zeros(2, 64, 64, dtype=torch.long)
    logits = student(x)
    # at T = 1 (where MiB's initialisation is exact) the grown head predicts what its parent did
    unbiased = Distillation(teacher, temperature=1.0, weight=1.0, unbiased=True)(x, logits, masks)
    biased = Distillation(teacher, temperature=1.0, weight=1.0, unbiased=False)(x, logits, masks)
    assert float(unbiased.detach()) == pytest.approx(0.0, abs=1e-5)
    assert float(biased.detach()) > 1e-3  # old channels alone: the background share moved to the new class
    # no new classes: both views are plain LwF
    other = _head_model(tiny_settings, 3, seed=2)(x)
    a = Distillation(teacher, 2.0, 1.0, unbiased=True)(x, other, masks)
    b = Distillation(teacher, 2.0, 1.0, unbiased=False)(x, other, masks)
    assert float(a.detach()) > 1e-4 and float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-6)


def test_replay_only_distillation_sees_replayed_rows_only(tiny_settings):
    teacher = _head_model(tiny_settings, 4)
    x = torch.rand(4, 3, 64, 64)
    logits = _head_model(tiny_settings, 4, seed=1)(x)
    masks = torch.zeros(4, 64, 64, dtype=torch.long)
    rows = torch.tensor([False, False, True, True])
    only = Distillation(teacher, 2.0, 1.0, replay_only=True)
    assert float(only(x, logits, masks, torch.zeros(4, dtype=torch.bool))) == 0.0
    torch.testing.assert_close(
        only(x, logits, masks, rows), Distillation(teacher, 2.0, 1.0)(x[2:], logits[2:], masks[2:])
    )


def test_relabel_maps_masks_and_keeps_images(tmp_path, base_data):
    from segloop.data.files import read_mask
    from segloop.data.relabel import relabel

    assert relabel(base_data, tmp_path / "step", {1: 0, 2: 0}) == 24
    for src, dst in zip(list_samples(base_data), list_samples(tmp_path / "step")):
        before, after = read_mask(src.mask), read_mask(dst.mask)
        assert np.array_equal(after, np.where(np.isin(before, [1, 2]), 0, before))
        assert src.image.read_bytes() == dst.image.read_bytes()
    assert {3} <= set(np.unique(after)) <= {0, 3}
    with pytest.raises(FileExistsError):
        relabel(base_data, tmp_path / "step", {3: 0})
    with pytest.raises(ValueError, match="255"):
        relabel(base_data, tmp_path / "x", {3: 255})


@pytest.fixture(scope="module")
def class_stream(tmp_path_factory, base_data, one_torch_thread):
    """A tiny 3-class parent (speckle pixels labelled background) and a batch labelling only speckle."""
    import yaml
    from conftest import ROOT, TINY, _merge

    from segloop.data.relabel import relabel

    raw = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    raw["data"]["classes"] = ["background", "stripes", "checker"]
    raw["train"]["epochs"] = 1
    root = tmp_path_factory.mktemp("class_stream")
    relabel(base_data, root / "step1", {3: 0})
    train(settings_from_dict(raw), root / "step1", root / "parent", log=lambda _: None)
    generate(root / "full2", "base", n=16, seed=5, size=(72, 80))
    relabel(root / "full2", root / "step2", {1: 0, 2: 0})
    raw["data"]["classes"] = ["background", "stripes", "checker", "speckle"]
    raw["continual"] = {"strategy": "lwf", "epochs": 1, "lr": 1e-3, "new_classes": ["speckle"]}
    return raw, root


@pytest.mark.slow
def test_class_incremental_step_grows_and_trains_the_new_class(class_stream):
    from segloop.class_incremental import HEAD, grow_head

    raw, root = class_stream
    out, settings = root / "update", settings_from_dict(raw)
    vals = [root / "step2", root / "step1"]  # kept: the best epoch on the mean of both
    update(settings, root / "parent" / "best.pt", root / "step2", out, vals, log=lambda _: None)
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["classes"] == ["background", "stripes", "checker", "speckle"] and ckpt["new_classes"] == ["speckle"]
    start = grow_head(load_checkpoint(root / "parent" / "best.pt")["model"], 1)
    assert not torch.equal(ckpt["model"][f"{HEAD}.weight"][3], start[f"{HEAD}.weight"][3])  # new channel trained
    model, _ = load_model(out / "last.pt")  # the grown checkpoint rebuilds a 4-class head
    assert model(torch.rand(1, 3, 64, 64)).shape[1] == 4
    model.load_state_dict(ckpt["ema"])  # what every epoch validates: the weights' moving average (train.ema)
    expected = np.mean([miou_on(model, v, settings, torch.device("cpu"))[0] for v in vals])
    # Validated in channels_last, recomputed here in NCHW: other conv kernels, a few pixels' argmax may differ.
    assert json.loads((out / "history.json").read_text())[-1]["val_miou"] == pytest.approx(expected, abs=1e-3)


def test_class_incremental_refuses_mismatched_classes(class_stream, tiny_raw):
    raw, root = class_stream
    wrong = json.loads(json.dumps(raw))
    wrong["data"]["classes"] = ["background", "stripes", "speckle"]
    wrong["continual"]["new_classes"] = ["speckle"]
    with pytest.raises(ValueError, match=r"classes \['background', 'stripes', 'checker'\] \+ continual.new_classes"):
        update(settings_from_dict(wrong), root / "parent" / "best.pt", root / "step2", root / "x", log=lambda _: None)
    joint = json.loads(json.dumps(raw))
    joint["continual"]["strategy"] = "joint"
    with pytest.raises(ValueError, match="joint"):
        update(settings_from_dict(joint), root / "parent" / "best.pt", root / "step2", root / "y", log=lambda _: None)
    tiny_raw["continual"] = {"new_classes": ["stripes"]}
    with pytest.raises(Exception, match="continual.new_classes .* last entries of data.classes"):
        settings_from_dict(tiny_raw)


# ---------------------------------------------------------------- gate-constrained selection


def test_gate_score_ranks_a_feasible_epoch_above_one_with_a_better_mean():
    from segloop.config import GateSettings
    from segloop.continual import gate_score

    gate, parent = GateSettings(min_gain=0.01, max_forgetting=0.02), [0.20, 0.90]  # [new domain, learnt domain]
    forgets = [0.85, 0.86]  # mean 0.855: the new domain learnt, the learnt one lost 4 pts
    keeps = [0.60, 0.895]  # mean 0.7475: gains 40 pts, loses 0.5 pt (within 0.02 - margin 0.01)
    assert sum(forgets) > sum(keeps)
    assert gate_score(keeps, parent, gate, margin=0.01) > gate_score(forgets, parent, gate, margin=0.01)
    assert 1.0 <= gate_score(keeps, parent, gate, 0.01) <= 2.0 and -1.0 < gate_score(forgets, parent, gate, 0.01) < 0.0
    # the margin is stricter than the gate: 1.5 pts lost passes the gate, not the selection
    assert (
        gate_score([0.60, 0.885], parent, gate, margin=0.01) < 0 <= gate_score([0.60, 0.885], parent, gate, margin=0.0)
    )
    # among infeasible epochs the nearest to the rules wins
    assert gate_score([0.205, 0.90], parent, gate, 0.0) > gate_score([0.20, 0.80], parent, gate, 0.0)


@pytest.mark.slow
def test_update_keeps_the_epoch_the_gate_rules_rank_first(stream, base_data):
    """A real update with continual.select gate: best.pt is the epoch `gate_score` ranks first
    on (new domain val, learnt domain val), measured against the parent on the same folders."""
    from segloop.continual import gate_score, parent_scores

    raw, root = stream
    raw = json.loads(json.dumps(raw))
    raw["continual"] |= {"strategy": "replay", "epochs": 3, "select": "gate", "select_margin": 0.0}
    settings = settings_from_dict(raw)
    vals = [root / "fog", base_data]
    out = root / "update_gate"
    update(settings, root / "parent" / "best.pt", root / "fog", out, vals, replay=root / "buffer", log=lambda _: None)
    history = json.loads((out / "history.json").read_text())
    parent = parent_scores(settings, root / "parent" / "best.pt", vals)
    scores = [gate_score(h["val_per_folder"], parent, settings.registry.gate, 0.0) for h in history]
    assert [h["val_score"] for h in history] == pytest.approx(scores, abs=1e-4)
    assert load_checkpoint(out / "best.pt")["epoch"] == 1 + int(np.argmax(scores))


def test_mix_weights_moves_floats_from_parent_to_child_and_keeps_counters():
    from segloop.continual import mix_weights

    parent = {"w": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(5)}
    child = {"w": torch.ones(3), "bn.num_batches_tracked": torch.tensor(9)}
    assert torch.equal(mix_weights(parent, child, 0.0)["w"], parent["w"])
    assert torch.allclose(mix_weights(parent, child, 0.3)["w"], torch.full((3,), 0.3))
    assert int(mix_weights(parent, child, 0.3)["bn.num_batches_tracked"]) == 9


def test_replay_keeps_same_named_files_of_two_batches_and_pairs_by_exact_name(tmp_path):
    from PIL import Image

    first, second = tmp_path / "first", tmp_path / "second"
    generate(first, "base", n=3, seed=0, size=(32, 32))
    generate(second, "fog", n=3, seed=0, size=(32, 32))
    for f in list(second.rglob("fog-*.png")):  # the same file names as `first`, other pixels
        f.rename(f.with_name(f.name.replace("fog-", "base-")))
    assert sorted(p.name for p in (first / "images").iterdir()) == sorted(p.name for p in (second / "images").iterdir())
    # "frame.001" next to "frame": a pattern `frame.*` would pick the wrong image for "frame"
    for name, value in (("frame", 10), ("frame.001", 200)):
        Image.new("RGB", (32, 32), (value,) * 3).save(first / "images" / f"{name}.png")
        Image.new("L", (32, 32), 1).save(first / "masks" / f"{name}.png")
    b1 = update_buffer(None, first, "01-base", size=20, seed=0, out=tmp_path / "r1")
    b2 = update_buffer(tmp_path / "r1", second, "02-fog", size=20, seed=0, out=tmp_path / "r2")
    assert len(b2["items"]) == 8 and b2["seen"] == 8  # 3 + 2 frames, then 3: nothing overwritten
    assert Counter(i["source_batch"] for i in b2["items"]) == {"01-base": 5, "02-fog": 3}
    files = {(i["source_batch"], i["file"]) for i in b2["items"]}
    assert {("01-base", "base-s0-00000.png"), ("02-fog", "base-s0-00000.png")} <= files  # same name, both kept
    assert len(files) == 8 and ("01-base", "frame.png") in files and ("01-base", "frame.001.png") in files
    for name, value in (("frame", 10), ("frame.001", 200)):
        pixels = np.asarray(Image.open(tmp_path / "r2" / "images" / f"01-base.{name}.png"))
        assert pixels.max() == value  # each stored under its own name, from its own file
    assert read_manifest(tmp_path / "r2") == b2 and b1["items"][0]["stem"].startswith("01-base.")
    # the manifest check counts: a sample listed twice is a mismatch, though the sets agree
    doubled = dict(b2, items=b2["items"] + b2["items"][:1])
    (tmp_path / "r2" / "manifest.json").write_text(json.dumps(doubled))
    with pytest.raises(ValueError, match="lists 9 samples, folder holds 8 images"):
        read_manifest(tmp_path / "r2")
    with pytest.raises(ValueError, match="batch id 'a.b'"):
        update_buffer(None, first, "a.b", size=5, seed=0, out=tmp_path / "r3")
