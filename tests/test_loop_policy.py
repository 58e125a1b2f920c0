"""The loop's policy without training: when a step trains, which domains are weak."""

from pathlib import Path

from segloop.loop import Workspace, covered, fold_step, learnt_domains, summary_line, update_reason
from segloop.records import LoopState, StepRecord

WS = Workspace(Path("/ws"), Path("/ws/incoming"))
CHAMP = ("3", Path("/ws/models/x/best.pt"))
NO_DRIFT = {"drift": False}


def promoted(batch: str, domain: str, after: dict[str, float]) -> StepRecord:
    return StepRecord(
        batch,
        domain,
        "t",
        10,
        0,
        updated=True,
        promoted=True,
        candidate_version="4",
        champion_version="4",
        miou_after=after,
    )


def test_a_weak_domain_is_trained_on_at_its_next_batch_until_the_champion_is_good_there():
    state = fold_step(LoopState(), WS, promoted("00-base", "base", {"base": 0.90}), "replay/00-base", 0.8)
    assert learnt_domains(state) == ["base"] and state.weak == []
    # fog promoted at 0.55 < 0.8 x 0.90: learnt (protected from now on) but weak
    state = fold_step(state, WS, promoted("01-fog", "fog", {"base": 0.89, "fog": 0.55}), "replay/01-fog", 0.8)
    assert learnt_domains(state) == ["base", "fog"] and state.weak == ["fog"]
    assert update_reason(CHAMP, NO_DRIFT, state, "fog").startswith("domain fog weak")
    assert update_reason(CHAMP, NO_DRIFT, state, "base") == ""  # learnt, no drift: the champion serves it
    assert update_reason(CHAMP, {"drift": True}, state, "base") == "drift"
    assert update_reason(None, None, state, "fog") == "bootstrap"
    # the second fog update reaches the bar: no longer weak, its next batch needs drift to train
    state = fold_step(state, WS, promoted("02-fog", "fog", {"base": 0.89, "fog": 0.80}), "replay/02-fog", 0.8)
    assert state.weak == [] and update_reason(CHAMP, NO_DRIFT, state, "fog") == ""
    # a later promotion that lets fog slip under the bar makes it weak again
    state = fold_step(state, WS, promoted("03-noise", "noise", {"base": 0.90, "fog": 0.70, "noise": 0.8}), "r", 0.8)
    assert state.weak == ["fog"]


def test_a_refused_domain_is_trained_on_at_its_next_batch_without_drift():
    state = fold_step(LoopState(), WS, promoted("00-base", "base", {"base": 0.90}), "replay/00-base", 0.8)
    refused = StepRecord(
        "01-fog",
        "fog",
        "t",
        10,
        0,
        updated=True,
        promoted=False,
        champion_version="4",
        miou_after={"base": 0.90, "fog": 0.2},
        kept_in_pool=True,
    )
    state = fold_step(state, WS, refused, None, 0.8)
    assert state.pool == {"fog": ["batches/01-fog/split/train"]} and learnt_domains(state) == ["base"]
    assert update_reason(CHAMP, NO_DRIFT, state, "fog").startswith("domain fog not learnt yet")
    assert update_reason(CHAMP, NO_DRIFT, state, "noise") == ""  # never met, no drift: nothing says it is needed


def test_a_domain_the_champion_already_segments_is_covered_protected_and_not_retrained():
    state = fold_step(LoopState(), WS, promoted("00-base", "base", {"base": 0.90}), "replay/00-base", 0.8)
    # lowlight's update was refused (no gain: the base champion already segments it)
    refused = StepRecord(
        "01-lowlight",
        "lowlight",
        "t",
        10,
        0,
        updated=True,
        champion_version="4",
        miou_after={"base": 0.9, "lowlight": 0.8},
        kept_in_pool=True,
    )
    state = fold_step(state, WS, refused, None, 0.8)
    # 0.80 >= 0.8 x 0.90: covered, so the gate protects it and a later batch needs drift to train
    assert state.covered == ["lowlight"] and learnt_domains(state) == ["base", "lowlight"]
    assert update_reason(CHAMP, NO_DRIFT, state, "lowlight") == ""
    # a promotion (of fog) after which the champion falls under the bar on lowlight: no longer covered
    state = fold_step(state, WS, promoted("02-fog", "fog", {"base": 0.9, "lowlight": 0.6, "fog": 0.8}), "r", 0.8)
    assert state.covered == [] and learnt_domains(state) == ["base", "fog"]
    assert update_reason(CHAMP, NO_DRIFT, state, "lowlight").startswith("domain lowlight not learnt yet")


def test_a_drifted_batch_the_champion_covers_is_not_trained_on_but_pooled():
    state = fold_step(LoopState(), WS, promoted("00-base", "base", {"base": 0.90}), "replay/00-base", 0.8)
    holds = {"drift": True, "data_drift": True, "performance_drift": False, "score": 1e-4, "closest_domain": "base"}
    holds |= {"quality": "mIoU drop +0.0100 vs allowed 0.05", "quality_drop": 0.01}
    gap = {**holds, "quality_drop": 0.0497}  # no performance drift, but 5 points an update can win
    unchecked = {**holds, "quality_drop": None}  # no held-out score to compare with
    assert update_reason(CHAMP, holds, state, "lowlight", covered_drop=0.02) == ""
    assert update_reason(CHAMP, holds, state, "lowlight", covered_drop=None) == "drift"
    assert update_reason(CHAMP, gap, state, "lowlight", covered_drop=0.02) == "drift"
    assert update_reason(CHAMP, unchecked, state, "lowlight", covered_drop=0.02) == "drift"
    # the step that was not trained on: its split joins the pool, the summary says why
    rec = StepRecord(
        "01-lowlight", "lowlight", "t", 10, 0, drift=holds, champion_version="3", kept_in_pool=covered(holds, 0.02)
    )
    rec.miou_after = {"base": 0.9, "lowlight": 0.88}
    assert "no update: the champion keeps its quality" in summary_line(rec)
    state = fold_step(state, WS, rec, None, 0.8)
    assert state.pool == {"lowlight": ["batches/01-lowlight/split/train"]} and state.covered == ["lowlight"]
    # a weak learnt domain is still trained on when only its data drifted
    state = fold_step(state, WS, promoted("02-fog", "fog", {"base": 0.89, "fog": 0.55, "lowlight": 0.8}), "r", 0.8)
    assert update_reason(CHAMP, holds, state, "fog", covered_drop=0.02).startswith("domain fog weak")


def test_every_batch_of_a_domain_adds_its_test_split_to_the_domain_s_held_out_set(tmp_path):
    state = fold_step(LoopState(), WS, promoted("00-base", "base", {"base": 0.90}), "replay/00-base", 0.8)
    state = fold_step(state, WS, promoted("01-fog", "fog", {"base": 0.89, "fog": 0.70}), "replay/01-fog", 0.8)
    assert state.scores["4"] == {"base": 0.89, "fog": 0.70}
    # a base batch without drift, not trained on: its test split joins base's set, the score on
    # the smaller set is dropped and replaced by the step's own (scored on the pooled set)
    rec = StepRecord("02-base", "base", "t", 10, 0, drift=NO_DRIFT, champion_version="4")
    state.scores["3"] = {"base": 0.93}  # an earlier champion's, on the old set: stale too
    rec.miou_after = {"base": 0.91, "fog": 0.70}
    state = fold_step(state, WS, rec, None, 0.8)
    assert state.heldout == {
        "base": ["batches/00-base/split/test", "batches/02-base/split/test"],
        "fog": ["batches/01-fog/split/test"],
    }
    assert state.scores == {"3": {}, "4": {"base": 0.91, "fog": 0.70}}
    assert fold_step(state, WS, rec, None, 0.8).heldout["base"][1:] == ["batches/02-base/split/test"]  # once
    # a state.json written before (schema 2: one split per domain) reads as a one-split set
    old = tmp_path / "state.json"
    old.write_text('{"schema": 2, "heldout": {"fog": "batches/01-fog/split/test"}}')
    assert LoopState.read(old).heldout == {"fog": ["batches/01-fog/split/test"]}
