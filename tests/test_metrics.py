"""Code tests: metrics against hand-computed confusion matrices."""

import math

import pytest
import torch

from segloop.metrics import confusion_matrix, per_class_dice, per_class_iou, pixel_accuracy, summarize

T = torch.tensor


def test_confusion_counts_and_ignore():
    target = T([[0, 0, 1], [1, 2, 255]])
    pred = T([[0, 1, 1], [1, 1, 0]])
    cm = confusion_matrix(pred, target, 3)
    # rows truth, cols prediction; the 255 pixel (predicted 0) is not counted
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]


def test_iou_dice_accuracy_by_hand():
    cm = T([[1, 1, 0], [0, 2, 0], [0, 1, 0]])
    iou = per_class_iou(cm).tolist()
    assert iou[0] == pytest.approx(1 / 2)  # tp 1, fp 0, fn 1
    assert iou[1] == pytest.approx(2 / 4)  # tp 2, fp 2, fn 0
    assert iou[2] == 0.0  # present in truth, never predicted
    dice = per_class_dice(cm).tolist()
    assert dice == pytest.approx([2 / 3, 4 / 6, 0.0])
    assert pixel_accuracy(cm) == pytest.approx(3 / 5)


def test_absent_class_is_nan_and_left_out_of_mean():
    target = T([0, 0, 1, 1])
    pred = T([0, 0, 1, 0])
    m = summarize(confusion_matrix(pred, target, 3), ["bg", "a", "b"], n_images=1)
    assert m["per_class_iou"] == {"bg": pytest.approx(2 / 3), "a": 0.5, "b": None}
    assert m["miou"] == pytest.approx((2 / 3 + 0.5) / 2, abs=1e-6)
    assert m["dice"] == pytest.approx((0.8 + 2 / 3) / 2, abs=1e-6)
    assert m["pixel_accuracy"] == 0.75


def test_per_image_counts_sum_to_dataset_counts():
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 4, (5, 9, 7), generator=g)
    targets[:, 0, :] = 255
    preds = torch.randint(0, 4, (5, 9, 7), generator=g)
    total = sum(confusion_matrix(p, t, 4) for p, t in zip(preds, targets))
    assert torch.equal(total, confusion_matrix(preds, targets, 4))
    assert int(total.sum()) == 5 * 8 * 7


def test_all_ignored_gives_no_metric():
    m = summarize(confusion_matrix(T([1, 2]), T([255, 255]), 3), ["a", "b", "c"], 1)
    assert m["miou"] is None and m["pixel_accuracy"] is None
    assert math.isnan(pixel_accuracy(torch.zeros(3, 3, dtype=torch.int64)))


def test_out_of_range_target_is_an_error():
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix(T([0, 1]), T([0, 3]), 3)
