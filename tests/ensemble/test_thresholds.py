"""Streaming threshold tuners against brute force, on seeded synthetic predictions."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ensemble.rules import apply_multiclass, apply_multilabel
from ensemble.thresholds import (
    MulticlassThresholdTuner,
    MultilabelThresholdTuner,
    brute_force_multiclass_class,
    brute_force_multilabel,
    threshold_grid,
)

BINS = 200
IGNORE = 255


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=0))
    return e / e.sum(axis=0)


def _rectangles(rng, truth: np.ndarray, classes: list[int], count: int) -> None:
    size = truth.shape[0]
    for _ in range(count):
        y, x = rng.integers(0, size - 6, 2)
        h, w = rng.integers(4, 16, 2)
        truth[y : y + h, x : x + w] = rng.choice(classes)


def _multiclass_data(seed: int, background: bool, n_images: int = 6, size: int = 40):
    """Noisy one-hot logits with per-class biases, so argmax over-predicts classes 1 and 3."""
    rng = np.random.default_rng(seed)
    bias = np.array([0.0, 1.2, -0.3, 0.8])
    probs, targets = [], []
    for _ in range(n_images):
        base = 0 if background else int(rng.integers(4))
        truth = np.full((size, size), base)
        _rectangles(rng, truth, [1, 2, 3] if background else [0, 1, 2, 3], 4)
        logits = 2.0 * (truth[None] == np.arange(4)[:, None, None])
        logits = logits + rng.normal(0.0, 1.2, logits.shape) + bias[:, None, None]
        truth[:2] = IGNORE  # an ignored stripe
        probs.append(_softmax(logits).astype(np.float32))
        targets.append(truth)
    return probs, targets


def _multilabel_data(seed: int, n_images: int = 6, size: int = 40):
    """Sigmoid scores with biases (-1.5, 0, +1.5); channel 3 is never positive."""
    rng = np.random.default_rng(seed)
    bias = np.array([-1.5, 0.0, 1.5, 0.0])
    probs, targets = [], []
    for _ in range(n_images):
        truth = np.zeros((4, size, size), dtype=np.uint8)
        for c in range(3):
            plane = truth[c].astype(np.int64)
            _rectangles(rng, plane, [1], 3)
            truth[c] = plane
        logits = 2.5 * (2.0 * truth - 1.0) + rng.normal(0.0, 1.5, truth.shape) + bias[:, None, None]
        probs.append((1.0 / (1.0 + np.exp(-logits))).astype(np.float32))
        targets.append(truth)
    return probs, targets


def _label_miou(preds, targets, num_classes: int) -> tuple[float, np.ndarray]:
    """mIoU straight from label maps: IoU per class over all images, absent classes NaN."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    for pred, truth in zip(preds, targets):
        valid = truth != IGNORE
        for c in range(num_classes):
            p, t = (pred == c) & valid, truth == c
            inter[c] += (p & t).sum()
            union[c] += (p | t).sum()
    iou = np.array([i / u if u else np.nan for i, u in zip(inter, union)])
    return float(np.nanmean(iou)), iou


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    tp = (pred & truth).sum()
    return 2 * tp / (2 * tp + (pred & ~truth).sum() + (~pred & truth).sum())


def _state_nbytes(tuner) -> int:
    return sum(v.nbytes for v in vars(tuner).values() if isinstance(v, np.ndarray))


# --------------------------------------------------------------------------- multilabel


@pytest.mark.parametrize("metric", ["dice", "iou"])
def test_multilabel_matches_brute_force(metric):
    probs, targets = _multilabel_data(seed=1)
    tuner = MultilabelThresholdTuner(4, bins=BINS, metric=metric)
    for p, t in zip(probs, targets):
        tuner.update(p, t)
    result = tuner.fit()
    best_t, best_score = brute_force_multilabel(probs, targets, threshold_grid(BINS), metric)
    assert np.allclose(result["thresholds"], best_t, rtol=0, atol=1.0 / BINS + 1e-12)
    assert np.allclose(result["score_per_class"][:3], best_score[:3], rtol=0, atol=1e-12)
    assert result["metric"] == metric
    assert len(result["curves"]["thresholds"]) == BINS + 1
    assert np.array(result["curves"]["score"]).shape == (4, BINS + 1)


def test_multilabel_tuning_beats_default_in_the_biased_direction():
    probs, targets = _multilabel_data(seed=2)
    tuner = MultilabelThresholdTuner(4, bins=1000)
    for p, t in zip(probs, targets):
        tuner.update(p, t)
    result = tuner.fit()
    tuned, default = result["score_per_class"], result["default_score_per_class"]
    assert all(a >= b for a, b in zip(tuned[:3], default[:3]))
    assert tuned[0] > default[0] and tuned[2] > default[2]
    assert result["thresholds"][0] < 0.4  # negative bias: scores too low
    assert result["thresholds"][2] > 0.6  # positive bias: scores too high
    assert result["thresholds"][3] == 0.5  # never positive: keeps the default
    # apply_multilabel with the tuned thresholds reproduces the tuned Dice.
    pred = apply_multilabel(np.stack(probs), result["thresholds"])
    truth = np.stack(targets).astype(bool)
    for c in range(3):
        assert math.isclose(_dice(pred[:, c], truth[:, c]), tuned[c], abs_tol=1e-12)


def test_multilabel_scores_on_grid_edges_and_ties():
    rng = np.random.default_rng(6)
    # Scores that are exactly grid values (k / 8 with 200 bins) must count as ">= threshold".
    probs = [rng.integers(0, 9, (2, 10, 10)) / 8 for _ in range(3)]
    targets = [(p + rng.normal(0, 0.3, p.shape) > 0.5).astype(np.uint8) for p in probs]
    tuner = MultilabelThresholdTuner(2, bins=BINS)
    for p, t in zip(probs, targets):
        tuner.update(p, t)
    result = tuner.fit()
    best_t, best_score = brute_force_multilabel(probs, targets, threshold_grid(BINS), "dice")
    assert result["thresholds"] == list(best_t)
    assert np.allclose(result["score_per_class"], best_score, rtol=0, atol=1e-12)
    assert np.allclose(result["curves"]["score"][0][::25], [
        brute_force_multilabel(probs, targets, [k / 8], "dice")[1][0] for k in range(9)
    ], rtol=0, atol=1e-12)
    # Perfect separation for every t in (0.1, 0.9]: the tie goes to the threshold nearest 0.5.
    separable = MultilabelThresholdTuner(1, bins=BINS)
    truth = np.zeros((1, 4, 4), dtype=np.uint8)
    truth[0, :2] = 1
    separable.update(np.where(truth == 1, 0.9, 0.1), truth)
    fitted = separable.fit()
    assert fitted["thresholds"] == [0.5] and fitted["score_per_class"] == [1.0]


def test_multilabel_valid_mask_and_batches():
    probs, targets = _multilabel_data(seed=3)
    valid = np.zeros((40, 40), dtype=bool)
    valid[:, :25] = True
    masked = MultilabelThresholdTuner(4, bins=BINS)
    for p, t in zip(probs, targets):
        masked.update(p, t, valid)
    cropped = brute_force_multilabel(
        [p[:, :, :25] for p in probs], [t[:, :, :25] for t in targets], threshold_grid(BINS), "dice"
    )
    assert np.allclose(masked.fit()["score_per_class"][:3], cropped[1][:3], rtol=0, atol=1e-12)
    batched = MultilabelThresholdTuner(4, bins=BINS)
    batched.update(np.stack(probs), np.stack(targets), np.broadcast_to(valid, (6, 40, 40)))
    assert np.array_equal(batched.positive_hist, masked.positive_hist)
    assert np.array_equal(batched.negative_hist, masked.negative_hist)
    assert batched.positive_hist.sum() == 6 * 25 * 40 * 4 - batched.negative_hist.sum()


def test_multilabel_rejects_bad_input():
    with pytest.raises(ValueError):
        MultilabelThresholdTuner(2, metric="f1")
    with pytest.raises(ValueError):
        MultilabelThresholdTuner(2).update(np.full((2, 4, 4), 1.5), np.zeros((2, 4, 4)))


# --------------------------------------------------------------------------- multiclass


def _fit_multiclass(fallback, seed=4, **kwargs):
    probs, targets = _multiclass_data(seed, background=fallback is not None)
    tuner = MulticlassThresholdTuner(4, fallback=fallback, bins=BINS, **kwargs)
    for p, t in zip(probs, targets):
        tuner.update(p, t, ignore_index=IGNORE)
    return probs, targets, tuner.fit()


@pytest.mark.parametrize("fallback", [0, None])
def test_multiclass_matches_brute_force(fallback):
    probs, targets, result = _fit_multiclass(fallback)
    thresholds = result["thresholds"]
    for c in range(4):
        if c == fallback:
            assert thresholds[c] == 0.0
            continue
        # The tuned threshold is optimal for its class given the others, on the real pixels ...
        _, best_miou = brute_force_multiclass_class(
            probs, targets, c, threshold_grid(BINS), thresholds, fallback
        )
        assert math.isclose(best_miou, result["miou"], abs_tol=1e-12)
        # ... and the streamed mIoU at the tuned thresholds is the real one.
        t, miou = brute_force_multiclass_class(
            probs, targets, c, [thresholds[c]], thresholds, fallback
        )
        assert t == thresholds[c] and math.isclose(miou, result["miou"], abs_tol=1e-12)


@pytest.mark.parametrize("fallback", [0, None])
def test_multiclass_tuning_improves_and_apply_reproduces(fallback):
    probs, targets, result = _fit_multiclass(fallback)
    assert result["fallback"] == fallback
    assert result["miou"] > result["default_miou"] + 0.005
    assert result["thresholds"][1] > 0.3  # the most over-predicted class gets cut
    assert result["min_area"] == [0, 0, 0, 0]
    void = 255
    default_labels = [apply_multiclass(p, [0.0] * 4, fallback) for p in probs]
    default_miou, default_iou = _label_miou(default_labels, targets, 4)
    assert math.isclose(default_miou, result["default_miou"], abs_tol=1e-12)
    assert np.allclose(default_iou, result["default_iou_per_class"], rtol=0, atol=1e-12)
    labels = [apply_multiclass(p, result["thresholds"], fallback, void_label=void) for p in probs]
    miou, iou = _label_miou(labels, targets, 4)
    assert math.isclose(miou, result["miou"], abs_tol=1e-12)
    assert np.allclose(iou, result["iou_per_class"], rtol=0, atol=1e-12)
    fill = void if fallback is None else fallback
    assert any((lab == fill).sum() > (d == fill).sum() for lab, d in zip(labels, default_labels))


@pytest.mark.parametrize("fallback", [0, None])
def test_min_area_estimate_is_exact_and_never_lowers_miou(fallback):
    probs, targets, plain = _fit_multiclass(fallback)
    _, _, result = _fit_multiclass(fallback, tune_min_area=True)
    assert result["thresholds"] == plain["thresholds"]
    assert result["miou"] > plain["miou"]  # noise specks of the over-predicted classes go
    assert result["min_area"][1] == 64
    labels = [
        apply_multiclass(p, result["thresholds"], fallback, result["min_area"]) for p in probs
    ]
    assert math.isclose(_label_miou(labels, targets, 4)[0], result["miou"], abs_tol=1e-12)


def test_apply_multiclass_hand_worked():
    probs = np.zeros((3, 3, 4))
    probs[0] = 0.2
    probs[1] = [[0.7, 0.7, 0.5, 0.2], [0.7, 0.7, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]]
    probs[2] = 1.0 - probs[0] - probs[1]  # class 2 wins where class 1 is 0.2
    thresholds = [0.9, 0.6, 0.0]  # the fallback's own threshold has no effect
    expected_fallback = [[1, 1, 0, 2], [1, 1, 2, 2], [2, 2, 2, 2]]
    assert apply_multiclass(probs, thresholds, 0).tolist() == expected_fallback
    expected_void = [[1, 1, 9, 2], [1, 1, 2, 2], [2, 2, 2, 2]]
    assert apply_multiclass(probs, thresholds, None, void_label=9).tolist() == expected_void
    # Min area works on argmax components: class 1's component has 5 pixels (the 0.5 included).
    assert apply_multiclass(probs, thresholds, 0, [0, 5, 0]).tolist() == expected_fallback
    removed = [[0, 0, 0, 2], [0, 0, 2, 2], [2, 2, 2, 2]]
    assert apply_multiclass(probs, thresholds, 0, [0, 6, 0]).tolist() == removed
    # Class 2 covers 7 pixels here; everything else stays, the other class is not "small".
    assert apply_multiclass(probs, thresholds, 0, [0, 0, 7]).tolist() == expected_fallback
    assert apply_multiclass(probs, thresholds, 0, [0, 0, 8]).tolist() == [
        [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]
    ]


def test_tuner_state_does_not_grow_with_images():
    probs, targets = _multiclass_data(5, background=True, n_images=20)
    multiclass = MulticlassThresholdTuner(4, bins=BINS, tune_min_area=True)
    ml_probs, ml_targets = _multilabel_data(5, n_images=20)
    multilabel = MultilabelThresholdTuner(4, bins=BINS)
    sizes = []
    for i in range(20):
        multiclass.update(probs[i], targets[i])
        multilabel.update(ml_probs[i], ml_targets[i])
        if i in (0, 19):
            sizes.append((_state_nbytes(multiclass), _state_nbytes(multilabel)))
    assert sizes[0] == sizes[1]
    assert multiclass.confusion.sum() == 20 * 38 * 40  # pixels were counted, not stored


def test_min_area_removes_planted_specks():
    """Tiny confident false positives can't be thresholded away, but a minimum area removes them."""
    probs, targets = [], []
    for shift in range(3):
        truth = np.zeros((32, 32), dtype=np.int64)
        truth[4 + shift : 16 + shift, 4:16] = 1  # a 144-pixel object of class 1
        p = np.empty((3, 32, 32))
        p[:] = np.array([0.9, 0.06, 0.04])[:, None, None]
        p[:, truth == 1] = np.array([0.15, 0.8, 0.05])[:, None]
        for y, x in [(24, 24), (24, 29), (28, 4), (4, 26)]:  # 2x2 specks, class 1, truth 0
            p[:, y : y + 2, x : x + 2] = np.array([0.03, 0.95, 0.02])[:, None, None]
        probs.append(p)
        targets.append(truth)
    tuner = MulticlassThresholdTuner(3, fallback=0, bins=BINS, tune_min_area=True)
    for p, t in zip(probs, targets):
        tuner.update(p, t)
    result = tuner.fit()
    assert result["thresholds"] == [0.0, 0.0, 0.0]
    assert result["min_area"] == [0, 16, 0]
    assert result["curves"]["min_area"] == [0, 16, 64, 256, 1024]
    assert math.isnan(result["iou_per_class"][2])  # class 2 never appears: left out of the mean
    assert result["miou"] == 1.0 and result["default_miou"] < 0.95
    labels = [apply_multiclass(p, result["thresholds"], 0, result["min_area"]) for p in probs]
    assert _label_miou(labels, targets, 3)[0] == 1.0
    plain = [apply_multiclass(p, result["thresholds"], 0) for p in probs]
    assert math.isclose(_label_miou(plain, targets, 3)[0], result["default_miou"], abs_tol=1e-12)


def test_multiclass_results_are_json_serialisable():
    import json

    _, _, result = _fit_multiclass(0, tune_min_area=True)
    assert json.loads(json.dumps(result))["thresholds"] == result["thresholds"]
    with pytest.raises(ValueError):
        apply_multiclass(np.full((3, 2, 2), 1 / 3), [0.0] * 3, None, void_label=1)


def _upsample(a: np.ndarray, k: int) -> np.ndarray:
    return a.repeat(k, axis=-2).repeat(k, axis=-1)


@pytest.mark.parametrize("per_image", [False, True])
def test_pixel_areas_tuned_at_max_size_hold_at_the_image_size(per_image):
    """Minimum areas and per-image empty areas are pixel counts at the resolution the out-of-fold
    predictions were tuned at (``data.max_size``); prediction decides at the image's own size. The
    decision on probabilities upsampled 4x (nearest, so every component grows exactly 16x) must be the
    upsampled decision at max_size; without the rule's ``max_size`` the areas stay as they are."""
    from ensemble.rules import decide

    rng = np.random.default_rng(3)
    labels = np.zeros((12, 16), np.int64)
    labels[1:3, 1:3] = 1    # 4 px: below min_area 6
    labels[5:8, 5:8] = 1    # 9 px: kept
    labels[9:11, 10:12] = 2  # 4 px: kept (min_area 3)
    labels[0, 14] = 2       # 1 px: below min_area 3
    probs = np.full((3, 12, 16), 0.1) + rng.uniform(0, 0.05, (3, 12, 16))
    np.put_along_axis(probs, labels[None], 0.8, axis=0)
    probs /= probs.sum(0, keepdims=True)
    rule = {"thresholds": [0.0, 0.3, 0.3], "fallback": 0, "min_area": [0, 6, 3], "max_size": 16}
    if per_image:
        rule["empty_area"] = [0, 0, 5]  # class 2 keeps 4 px after the areas: dropped from the image
    at_max_size = decide(probs, rule, "multiclass")
    assert (at_max_size == 1).sum() == 9 and (at_max_size == 2).sum() == (0 if per_image else 4)
    big = decide(_upsample(probs, 4), rule, "multiclass")
    np.testing.assert_array_equal(big, _upsample(at_max_size, 4))
    # a rule without max_size (tuned at the images' own size) is applied as it is
    unscaled = decide(_upsample(probs, 4), {k: v for k, v in rule.items() if k != "max_size"}, "multiclass")
    assert (unscaled == 1).sum() == 16 * 13 and (unscaled == 2).sum() == 16 * 5
