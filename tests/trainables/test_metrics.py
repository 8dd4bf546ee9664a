"""SegMetrics against hand-computed confusion matrices, boundary regions and multilabel counts."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from trainables import metrics
from trainables.metrics import SegMetrics, background_near_torch, boundary_region, summary_line

NAN = math.nan


def lists_close(actual: list[float], expected: list[float]) -> bool:
    return np.allclose(actual, expected, equal_nan=True)


def run(pred, target, num_classes=3, **kwargs) -> dict:
    m = SegMetrics(num_classes, **kwargs)
    m.update(torch.as_tensor(pred), torch.as_tensor(target))
    return m.compute()


# ---------------------------------------------------------------- multiclass

CASES = {
    # pairs (true, pred): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0)
    "mixed": dict(
        target=[[[0, 0, 1], [1, 2, 2]]], pred=[[[0, 1, 1], [1, 2, 0]]],
        confusion=[[1, 1, 0], [0, 2, 0], [1, 0, 1]],
        iou=[1 / 3, 2 / 3, 1 / 2], dice=[2 / 4, 4 / 5, 2 / 3], acc=4 / 6),
    "perfect": dict(
        target=[[[0, 1, 2], [2, 1, 0]]], pred=[[[0, 1, 2], [2, 1, 0]]],
        confusion=[[2, 0, 0], [0, 2, 0], [0, 0, 2]],
        iou=[1.0, 1.0, 1.0], dice=[1.0, 1.0, 1.0], acc=1.0),
    # the two ignored pixels (255) would otherwise add a 0->2 and a 1->1 pair
    "ignore": dict(
        target=[[[0, 255, 1], [1, 255, 2]]], pred=[[[2, 2, 1], [0, 1, 2]]],
        confusion=[[0, 0, 1], [1, 1, 0], [0, 0, 1]],
        iou=[0.0, 1 / 2, 1 / 2], dice=[0.0, 2 / 3, 2 / 3], acc=2 / 4),
    # two images in one batch; class 1 only ever predicted, never true
    "batch": dict(
        target=[[[0, 0, 0], [2, 2, 2]], [[0, 0, 2], [2, 2, 2]]],
        pred=[[[0, 1, 0], [2, 2, 1]], [[0, 0, 0], [2, 2, 2]]],
        confusion=[[4, 1, 0], [0, 0, 0], [1, 1, 5]],
        iou=[4 / 6, 0.0, 5 / 7], dice=[8 / 10, 0.0, 10 / 12], acc=9 / 12),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_multiclass_against_hand_computed(case):
    r = run(case["pred"], case["target"], boundary=False)
    assert r["confusion"] == case["confusion"]
    assert lists_close(r["iou_per_class"], case["iou"])
    assert lists_close(r["dice_per_class"], case["dice"])
    assert r["miou"] == pytest.approx(np.mean(case["iou"]))
    assert r["dice"] == pytest.approx(np.mean(case["dice"]))
    assert r["pixel_acc"] == pytest.approx(case["acc"])
    assert "biou" not in r


def test_mixed_case_literal_means():
    r = run(CASES["mixed"]["pred"], CASES["mixed"]["target"], boundary=False)
    assert r["miou"] == pytest.approx(0.5)
    assert r["dice"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_absent_class_is_nan_and_excluded_from_mean():
    r = run(CASES["mixed"]["pred"], CASES["mixed"]["target"], num_classes=4)
    assert math.isnan(r["iou_per_class"][3])
    assert math.isnan(r["dice_per_class"][3])
    assert math.isnan(r["biou_per_class"][3])
    assert r["miou"] == pytest.approx(0.5)  # mean over classes 0..2 only, not /4
    assert r["confusion"][3] == [0, 0, 0, 0]


def test_everything_excluded_gives_nan():
    r = SegMetrics(3).compute()  # no update at all
    assert math.isnan(r["miou"]) and math.isnan(r["dice"]) and math.isnan(r["pixel_acc"])
    assert math.isnan(r["biou"])
    all_ignored = run([[[0, 1]]], [[[255, 255]]])
    assert math.isnan(all_ignored["miou"])
    assert all_ignored["confusion"] == [[0, 0, 0]] * 3


def test_logits_same_as_labels():
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (2, 9, 11), generator=gen)
    target[0, :2] = 255
    labels = torch.randint(0, 4, (2, 9, 11), generator=gen)
    logits = torch.randn(2, 4, 9, 11, generator=gen) + 10 * torch.nn.functional.one_hot(
        labels, 4).permute(0, 3, 1, 2)
    a, b = SegMetrics(4), SegMetrics(4)
    a.update(labels, target)
    b.update(logits, target)
    assert a.compute() == b.compute()


def test_two_updates_equal_one_concatenated():
    gen = torch.Generator().manual_seed(1)
    target = torch.randint(0, 3, (4, 16, 16), generator=gen)
    target[1, 3:6, 3:6] = 255
    pred = torch.randint(0, 3, (4, 16, 16), generator=gen)
    split, whole = SegMetrics(3), SegMetrics(3)
    split.update(pred[:1], target[:1])
    split.update(pred[1:], target[1:])
    whole.update(pred, target)
    assert split.compute() == whole.compute()
    assert sum(map(sum, whole.compute()["confusion"])) == 4 * 16 * 16 - 9
    split.reset()
    assert math.isnan(split.compute()["miou"])


def test_multiclass_valid_mask_excludes_pixels():
    valid = torch.tensor([[[True, True, True], [True, True, False]]])  # drops the (2, 0) pair
    m = SegMetrics(3, boundary=False)
    m.update(torch.tensor(CASES["mixed"]["pred"]), torch.tensor(CASES["mixed"]["target"]),
             valid=valid)
    r = m.compute()
    assert r["confusion"] == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    assert r["pixel_acc"] == pytest.approx(4 / 5)


def test_class_chunking_gives_same_counts(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    target = torch.randint(0, 5, (2, 12, 12), generator=gen)
    pred = torch.randint(0, 5, (2, 12, 12), generator=gen)
    whole = SegMetrics(5)
    whole.update(pred, target)
    monkeypatch.setattr(metrics, "_BOUNDARY_CHUNK_ELEMENTS", 2 * 2 * 12 * 12)  # 2 classes a pass
    chunked = SegMetrics(5)
    chunked.update(pred, target)
    assert chunked.compute() == whole.compute()


def test_out_of_range_target_is_not_scored(caplog):
    r = run([[[0, 1, 1]]], [[[0, 7, 1]]], num_classes=2, boundary=False)
    assert r["confusion"] == [[1, 0], [0, 1]]
    assert "1 target pixels" in caplog.text


def test_result_is_json_serialisable():
    r = run(CASES["mixed"]["pred"], CASES["mixed"]["target"], num_classes=4)
    assert json.loads(json.dumps(r))["confusion"] == r["confusion"]


# ---------------------------------------------------------------- boundary IoU

def reference_boundary(mask: np.ndarray, d: int) -> np.ndarray:
    """Mask minus its erosion by a (2d+1)-square, outside the image counted as foreground."""
    padded = np.pad(mask, d, constant_values=True)
    h, w = mask.shape
    eroded = np.ones_like(mask)
    for dy in range(2 * d + 1):
        for dx in range(2 * d + 1):
            eroded &= padded[dy:dy + h, dx:dx + w]
    return mask & ~eroded


def square(top: int, left: int, size: int = 4, shape=(8, 8)) -> np.ndarray:
    m = np.zeros(shape, dtype=np.int64)
    m[top:top + size, left:left + size] = 1
    return m


def test_boundary_perfect_prediction_is_one():
    target = torch.tensor(square(2, 2))[None]
    m = SegMetrics(2, boundary_dilation=0.1)
    m.update(target, target)
    r = m.compute()
    assert r["biou_per_class"] == [1.0, 1.0]
    assert r["biou"] == 1.0


def test_boundary_shifted_square_matches_hand_computation():
    true, pred = square(2, 2), square(2, 3)  # 4x4 square, prediction one pixel to the right
    d = 1  # round(0.1 * hypot(8, 8)) = round(1.13)
    expected = []
    for c in (0, 1):
        g, p = reference_boundary(true == c, d), reference_boundary(pred == c, d)
        expected.append((g & p).sum() / (g | p).sum())
    # by hand: class 1 rings of 12 px share 3+3 px -> 6/18; class 0 rings of 20 px share
    # 5+5 px (rows 1 and 6) -> 10/30
    assert expected == pytest.approx([1 / 3, 1 / 3])
    m = SegMetrics(2, boundary_dilation=0.1)
    m.update(torch.tensor(pred)[None], torch.tensor(true)[None])
    r = m.compute()
    assert r["biou_per_class"] == pytest.approx(expected)
    assert r["biou"] == pytest.approx(1 / 3)
    assert r["iou_per_class"][1] == pytest.approx(12 / 20)  # region IoU is much kinder


def test_boundary_region_matches_reference_on_random_masks():
    gen = torch.Generator().manual_seed(2)
    masks = torch.rand(3, 2, 13, 10, generator=gen) > 0.4
    masks[1, 1] = True  # one plane without background: no boundary
    for d in (1, 2, 3, 7):  # 7: the square is wider than the 10-pixel image
        got = boundary_region(masks, d).numpy()
        torch_way = (masks & background_near_torch(~masks, d)).numpy()  # the path a GPU takes
        for i in range(3):
            for k in range(2):
                np.testing.assert_array_equal(got[i, k], reference_boundary(masks[i, k].numpy(), d))
                np.testing.assert_array_equal(torch_way[i, k], reference_boundary(masks[i, k].numpy(), d))


def test_boundary_region_of_a_strided_mask():
    """A multilabel target arrives permuted (B, H, W, C) -> (B, C, H, W), not contiguous."""
    gen = torch.Generator().manual_seed(3)
    for batch in (1, 2):  # one image: its planes are a strided view, not a copy
        masks = (torch.rand(batch, 9, 11, 3, generator=gen) > 0.5).permute(0, 3, 1, 2)
        assert not masks.is_contiguous()
        check_against_reference(masks, 2)


def check_against_reference(masks: torch.Tensor, d: int) -> None:
    got = boundary_region(masks, d).numpy()
    for i in range(masks.shape[0]):
        for k in range(masks.shape[1]):
            np.testing.assert_array_equal(got[i, k], reference_boundary(masks[i, k].numpy(), d))


def test_image_border_is_not_a_boundary():
    left = torch.zeros(1, 1, 4, 8, dtype=torch.bool)
    left[..., :4] = True
    region = boundary_region(left, 1)[0, 0]
    expected = torch.zeros(4, 8, dtype=torch.bool)
    expected[:, 3] = True  # only the column touching the other half, not rows 0/3 or column 0
    assert torch.equal(region, expected)
    # a class that fills the whole image has no boundary at all: its boundary IoU is undefined
    full = torch.zeros(1, 8, 8, dtype=torch.long)
    r = run(full, full, num_classes=2)
    assert math.isnan(r["biou_per_class"][0]) and math.isnan(r["biou"])
    assert r["iou_per_class"][0] == 1.0


def test_boundary_ignores_ignored_pixels():
    true, pred = square(2, 2), square(2, 3)
    true[:, 6:] = 255  # hides pred's right-hand boundary column (6) and background beyond it
    keep = true != 255
    expected = []
    for c in (0, 1):
        g, p = reference_boundary(true == c, 1), reference_boundary(pred == c, 1)
        expected.append((g & p & keep).sum() / ((g | p) & keep).sum())
    # class 1: the 4 pred-ring pixels in column 6 leave the union, 6 / (18 - 4)
    assert expected[1] == pytest.approx(3 / 7)
    m = SegMetrics(2, boundary_dilation=0.1)
    m.update(torch.tensor(pred)[None], torch.tensor(true)[None])
    assert m.compute()["biou_per_class"] == pytest.approx(expected)


# ---------------------------------------------------------------- multilabel

ML_TARGET = torch.tensor([[[[1, 1, 0], [0, 0, 0]],
                           [[1, 0, 0], [1, 1, 0]]]])  # channels overlap at pixel (0, 0)
ML_PROB = torch.tensor([[[[0.9, 0.4, 0.6], [0.1, 0.2, 0.5]],  # 0.5 is not > 0.5
                         [[0.8, 0.7, 0.1], [0.6, 0.3, 0.2]]]])


def test_multilabel_against_hand_counts():
    m = SegMetrics(2, task="multilabel", boundary=False)
    m.update(ML_PROB, ML_TARGET)
    r = m.compute()
    # c0: TP 1, FP 1, FN 1, TN 3;  c1: TP 2, FP 1, FN 1, TN 2
    assert r["iou_per_class"] == pytest.approx([1 / 3, 2 / 4])
    assert r["dice_per_class"] == pytest.approx([2 / 4, 4 / 6])
    assert r["miou"] == pytest.approx(5 / 12)
    assert r["dice"] == pytest.approx(7 / 12)
    assert r["pixel_acc"] == pytest.approx(4 / 6)
    assert "confusion" not in r


@pytest.mark.parametrize("form", ["logits", "bool"])
def test_multilabel_logits_and_bool_match_probabilities(form):
    ref = SegMetrics(2, task="multilabel")
    ref.update(ML_PROB, ML_TARGET)
    m = SegMetrics(2, task="multilabel")
    if form == "logits":
        m.update(torch.logit(ML_PROB.double()), ML_TARGET, from_logits=True)
    else:
        m.update(ML_PROB > 0.5, ML_TARGET)
    assert m.compute() == ref.compute()


def test_multilabel_valid_mask_and_absent_class():
    target = torch.cat([ML_TARGET, torch.zeros(1, 1, 2, 3, dtype=torch.long)], 1)
    prob = torch.cat([ML_PROB, torch.zeros(1, 1, 2, 3)], 1)
    valid = torch.tensor([[[True, True, False], [True, True, False]]])  # drop column 2
    m = SegMetrics(3, task="multilabel", boundary=False)
    m.update(prob, target, valid=valid)
    r = m.compute()
    # c0: TP 1, FP 0, FN 1, TN 2;  c1: TP 2, FP 1, FN 1, TN 0;  c2: nothing anywhere
    assert lists_close(r["iou_per_class"], [1 / 2, 2 / 4, NAN])
    assert lists_close(r["dice_per_class"], [2 / 3, 4 / 6, NAN])
    assert r["miou"] == pytest.approx(1 / 2)
    # c2 has a defined accuracy (all 4 valid pixels are true negatives)
    assert r["pixel_acc"] == pytest.approx((3 / 4 + 2 / 4 + 4 / 4) / 3)


def test_multilabel_boundary_per_channel():
    target = torch.tensor(np.stack([square(2, 2), square(2, 2)]))[None]
    pred = torch.tensor(np.stack([square(2, 3), square(2, 2)]))[None].float()
    m = SegMetrics(2, task="multilabel", boundary_dilation=0.1)
    m.update(pred, target)
    r = m.compute()
    assert r["biou_per_class"] == pytest.approx([1 / 3, 1.0])
    assert r["biou"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------- formatting and errors

def test_summary_line():
    result = {"miou": 0.5124, "dice": 0.6149, "pixel_acc": 0.8333, "biou": 0.4,
              "iou_per_class": [0.912, NAN, 0.7]}
    assert (summary_line(result, ["Sky", "Road", "Building"])
            == "mIoU 0.512 | Dice 0.61 | acc 0.83 | bIoU 0.40 | Sky 0.91 Road - Building 0.70")
    del result["biou"]
    assert summary_line(result, ["a", "b", "c"]).startswith("mIoU 0.512 | Dice 0.61 | acc 0.83 | a")


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="task"):
        SegMetrics(3, task="binary")
    with pytest.raises(ValueError, match="class names"):
        SegMetrics(3, class_names=["a"])
    with pytest.raises(ValueError, match="channels"):
        SegMetrics(3).update(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="must both be"):
        SegMetrics(2, task="multilabel").update(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4))


# ---------------------------------------------------------------- void predictions


def test_void_prediction_is_a_miss_not_a_left_out_pixel():
    """A pixel predicted as void (255, datasets without a background class) is a false negative of
    its true class, as in smp / mmseg / torchmetrics: abstaining must not raise the score."""
    r = run([[[0, 255, 1, 1]]], [[[0, 0, 1, 1]]], num_classes=2, boundary=False)
    assert lists_close(r["iou_per_class"], [0.5, 1.0])
    assert lists_close(r["dice_per_class"], [2 / 3, 1.0])
    assert r["pixel_acc"] == pytest.approx(3 / 4)


def test_void_predictions_match_an_independent_confusion_matrix():
    """Random labels with a share of void predictions, against sklearn's confusion matrix over the
    labels plus void (a column no truth has): IoU = tp / (row sum + column sum - tp)."""
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(0)
    c = 4
    target = rng.integers(0, c, (3, 16, 16))
    target[0, :2] = 255  # ignored truth stays out
    pred = rng.integers(0, c, (3, 16, 16))
    pred[rng.random(pred.shape) < 0.3] = 255
    r = run(pred, target, num_classes=c, boundary=False)
    keep = target != 255
    cm = confusion_matrix(target[keep], pred[keep], labels=[*range(c), 255])
    tp = np.diag(cm)[:c]
    iou = tp / (cm[:c].sum(1) + cm[:, :c].sum(0) - tp)
    assert np.allclose(r["iou_per_class"], iou)
    assert r["pixel_acc"] == pytest.approx(tp.sum() / keep.sum())


def test_void_prediction_counts_in_boundary_iou():
    """The true boundary of a class predicted as void is in the union and not the intersection."""
    target = torch.zeros((1, 12, 12), dtype=torch.long)
    target[0, 3:9, 3:9] = 1
    pred = target.clone()
    pred[0, 3:9, 3:9] = 255
    r = run(pred, target, num_classes=2)
    assert r["biou_per_class"][1] == 0.0
