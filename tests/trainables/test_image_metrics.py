"""Per-image scores (Kaggle style) and the per-image threshold / empty-area tuner.

SegMetrics(per_image=True) is checked against scores worked out by hand below; the tuner against
a brute force that applies the rule to the stored pixels for every candidate and scores the
result with SegMetrics.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ensemble.image_thresholds import make_image_tuner
from ensemble.rules import apply_empty_area, apply_image_rule
from ensemble.thresholds import merge_tuners
from tests.conftest import tiny_config
from trainables.errors import ConfigError
from trainables.metrics import SegMetrics

NAN = float("nan")

# ---------------------------------------------------------------- SegMetrics, by hand

# Three 2x3 images, classes 0 (background), 1, 2; 255 = void prediction / ignored truth.
MC_TARGET = [[[0, 0, 1], [1, 1, 0]],
             [[2, 2, 255], [0, 0, 0]],
             [[255, 255, 255], [255, 255, 255]]]  # nothing scored: every pair is empty-empty
MC_PRED = [[[0, 1, 1], [1, 255, 0]],
           [[2, 0, 2], [0, 0, 2]],
           [[1, 1, 2], [0, 0, 0]]]
# image 1: class 0 tp 2 fp 0 fn 1 (IoU 2/3, Dice 4/5); class 1 tp 2 fp 1 fn 1 (the void pixel;
#          IoU 1/2, Dice 2/3); class 2 empty-empty.
# image 2: class 0 tp 2 fp 1 fn 1 (1/2, 2/3); class 1 empty-empty; class 2 tp 1 fp 1 fn 1 (1/3, 1/2),
#          the prediction on the ignored pixel left out.
# image 3: all three pairs empty-empty.
MC_EXPECTED = {
    1.0: {"miou_image": ((2 / 3 + 1 / 2 + 1) / 3 + (1 / 2 + 1 + 1 / 3) / 3 + 1) / 3,
          "dice_image": ((4 / 5 + 2 / 3 + 1) / 3 + (2 / 3 + 1 + 1 / 2) / 3 + 1) / 3,
          "iou_image_per_class": [(2 / 3 + 1 / 2 + 1) / 3, (1 / 2 + 1 + 1) / 3, (1 + 1 / 3 + 1) / 3]},
    NAN: {"miou_image": ((2 / 3 + 1 / 2) / 2 + (1 / 2 + 1 / 3) / 2) / 2,  # image 3 is left out
          "dice_image": ((4 / 5 + 2 / 3) / 2 + (2 / 3 + 1 / 2) / 2) / 2,
          "iou_image_per_class": [(2 / 3 + 1 / 2) / 2, 1 / 2, 1 / 3]},
}


@pytest.mark.parametrize("empty", [1.0, NAN], ids=["empty=1", "empty=nan"])
@pytest.mark.parametrize("batched", [True, False], ids=["one-batch", "per-image"])
def test_multiclass_per_image_scores_by_hand(empty, batched):
    metrics = SegMetrics(3, boundary=False, per_image=True, empty=empty)
    target, pred = torch.tensor(MC_TARGET), torch.tensor(MC_PRED)
    if batched:
        metrics.update(pred, target)
    else:
        for p, t in zip(pred, target):
            metrics.update(p[None], t[None])
    r = metrics.compute()
    expected = MC_EXPECTED[1.0 if empty == 1.0 else NAN]
    assert r["miou_image"] == pytest.approx(expected["miou_image"], abs=1e-12)
    assert r["dice_image"] == pytest.approx(expected["dice_image"], abs=1e-12)
    assert r["iou_image_per_class"] == pytest.approx(expected["iou_image_per_class"], abs=1e-12)
    assert r["images"] == 3
    np.testing.assert_array_equal(metrics.image_counts()[0], [[2, 2, 0], [0, 1, 0], [1, 1, 0]])
    # the dataset-level scores do not change
    plain = SegMetrics(3, boundary=False)
    plain.update(pred, target)
    base = plain.compute()
    assert {k: r[k] for k in base} == base


ML_TARGET = [[[[1, 1], [0, 0]], [[0, 0], [0, 0]]],
             [[[0, 0], [0, 0]], [[1, 0], [1, 1]]]]
ML_PRED = [[[[1, 0], [1, 0]], [[0, 0], [0, 0]]],
           [[[0, 0], [0, 1]], [[1, 1], [1, 1]]]]
ML_VALID = [[[1, 1], [1, 1]], [[1, 1], [1, 0]]]
# image 1: class 0 tp 1 fp 1 fn 1 (IoU 1/3, Dice 1/2), class 1 empty-empty.
# image 2: class 0 predicted only on the ignored pixel: empty-empty; class 1 tp 2 fp 1 (IoU 2/3, Dice 4/5).
ML_EXPECTED = {1.0: ((1 / 3 + 1) / 2 / 2 + (1 + 2 / 3) / 2 / 2, (1 / 2 + 1) / 4 + (1 + 4 / 5) / 4),
               NAN: ((1 / 3 + 2 / 3) / 2, (1 / 2 + 4 / 5) / 2)}


@pytest.mark.parametrize("empty", [1.0, NAN], ids=["empty=1", "empty=nan"])
def test_multilabel_per_image_scores_by_hand(empty):
    metrics = SegMetrics(2, task="multilabel", boundary=False, per_image=True, empty=empty)
    metrics.update(torch.tensor(ML_PRED).bool(), torch.tensor(ML_TARGET), valid=torch.tensor(ML_VALID).bool())
    r = metrics.compute()
    miou, dice = ML_EXPECTED[1.0 if empty == 1.0 else NAN]
    assert r["miou_image"] == pytest.approx(miou, abs=1e-12)
    assert r["dice_image"] == pytest.approx(dice, abs=1e-12)


def test_per_image_is_off_by_default_and_empty_is_checked():
    metrics = SegMetrics(3, boundary=False)
    metrics.update(torch.tensor(MC_PRED), torch.tensor(MC_TARGET))
    assert "miou_image" not in metrics.compute()
    with pytest.raises(ValueError, match="empty must be 1 or NaN"):
        SegMetrics(3, per_image=True, empty=0.5)


# ---------------------------------------------------------------- trial settings and the loop


def _per_image_reference(trainer) -> dict:
    """mIoU / Dice per image written out with numpy loops over the validation images."""
    scores = {"iou": [], "dice": []}
    trainer.model.eval()
    with torch.no_grad():
        for batch in trainer.val_loader:  # (input, working-size mask) pairs; scored at the mask's size
            pred = [trainer.working_probs([x], t.shape[:2]).argmax(1)[0].numpy() for x, t in batch]
            for p, t in zip(pred, [t for _, t in batch]):
                per = {"iou": [], "dice": []}
                keep = t != trainer.data.ignore_index
                for c in range(trainer.data.num_classes):
                    tp = np.sum(keep & (p == c) & (t == c))
                    fp = np.sum(keep & (p == c) & (t != c))
                    fn = np.sum(keep & (p != c) & (t == c))
                    per["iou"].append(tp / (tp + fp + fn) if tp + fp + fn else 1.0)
                    per["dice"].append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
                for kind in per:
                    scores[kind].append(np.mean(per[kind]))
    return {"val_miou_image": np.mean(scores["iou"]), "val_dice_image": np.mean(scores["dice"])}


@pytest.fixture(scope="module")
def trainer(sample):
    """One untrained tiny model on 4 validation images (validate() reads the settings each time)."""
    from trainables.folds import make_folds, train_val_indices
    from trainables.loop import FoldTrainer

    train_idx, val_idx = train_val_indices(make_folds("kfold", 5, 0, sample.ids, sample.presence), 0, sample.ids)
    return FoldTrainer(tiny_config(**{"train.boundary_iou": "off"}), sample, train_idx, val_idx[:4], fold=0)


def test_loop_reports_per_image_scores(trainer, monkeypatch):
    dataset = trainer.validate()
    assert "val_miou_image" not in dataset and "val_dice_image" not in dataset  # metrics.average: dataset
    monkeypatch.setitem(trainer.cfg, "metrics", {"average": "image", "empty": 1})
    record = trainer.validate()
    reference = _per_image_reference(trainer)
    assert record["val_miou_image"] == pytest.approx(reference["val_miou_image"], abs=1e-9)
    assert record["val_dice_image"] == pytest.approx(reference["val_dice_image"], abs=1e-9)
    assert record["val_miou_image"] != pytest.approx(record["val_miou"])  # a different number
    assert dataset["val_miou"] == record["val_miou"]  # which keeps its meaning
    # the selection metric is always computed, as boundary IoU is
    monkeypatch.setitem(trainer.cfg, "metrics", {"average": "dataset", "empty": 1})
    monkeypatch.setattr(trainer, "metric", "val_dice_image")
    assert trainer.validate()["val_dice_image"] == pytest.approx(record["val_dice_image"])


def test_loop_checks_the_metrics_settings(trainer, monkeypatch):
    monkeypatch.setitem(trainer.cfg, "metrics", {"average": "image", "empty": 0})
    with pytest.raises(ConfigError, match=r"^config: metrics.empty: expected 1 or nan, got 0$"):
        trainer.validate()
    monkeypatch.setitem(trainer.cfg, "metrics", {"average": "images", "empty": 1})
    with pytest.raises(ConfigError, match=r"^config: metrics.average: expected dataset or image, got 'images'$"):
        trainer.validate()


def test_the_metrics_settings_are_checked():
    from trainables.config import setting_problem

    assert setting_problem("metrics.average", "image") is None
    assert "expected dataset or image" in setting_problem("metrics.average", "per-image")
    for ok in (1, 1.0, "nan", "NaN", NAN):
        assert setting_problem("metrics.empty", ok) is None, ok
    for bad in (0, 0.5, "one", True, None):
        assert "expected 1 or nan" in setting_problem("metrics.empty", bad), bad


def test_search_metric_per_image_names_are_checked(tmp_path):
    from tune.space import load_space

    path = tmp_path / "space.yaml"
    path.write_text("search: {metric: val_iou_image}\nspace:\n  optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    with pytest.raises(ConfigError, match="search.metric: unknown per-image metric 'val_iou_image'; "
                                          "known: val_miou_image, val_dice_image"):
        load_space(str(path), tmp_path)
    path.write_text("fixed: {metrics: {average: image, empty: nan}}\nsearch: {metric: val_dice_image}\n"
                    "space:\n  optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    spec = load_space(str(path), tmp_path)
    base = spec.base_config()
    assert base["train"]["metric"] == "val_dice_image" and spec.search["mode"] == "max"
    assert base["metrics"] == {"average": "image", "empty": "nan"}


# ---------------------------------------------------------------- the tuner against a brute force


AREAS = (0, 2, 4, 8, 16, 40)
BINS = 10


def _multiclass_images(seed: int, n: int = 6, size: int = 12, classes: int = 3, void_truth: bool = True):
    """Blocky truth, noisy softmax outputs; class 2 absent from half the images (specks predicted)."""
    rng = np.random.default_rng(seed)
    probs, targets = [], []
    for i in range(n):
        truth = np.kron(rng.integers(0, classes, (3, 3)), np.ones((size // 3, size // 3), dtype=np.int64))
        if i % 2:
            truth[truth == 2] = 0
        logits = rng.normal(0, 1.2, (classes, size, size)) + 2.0 * np.eye(classes)[truth].transpose(2, 0, 1)
        p = np.exp(logits) / np.exp(logits).sum(0)
        if void_truth:
            truth[0, :3] = 255
        probs.append(p)
        targets.append(truth)
    return probs, targets


def _multilabel_images(seed: int, n: int = 6, size: int = 12, classes: int = 3):
    rng = np.random.default_rng(seed)
    probs, targets, valids = [], [], []
    for i in range(n):
        truth = np.kron(rng.random((classes, 3, 3)) < 0.4, np.ones((size // 3, size // 3), dtype=bool))
        if i % 2:
            truth[1] = False
        p = 1 / (1 + np.exp(-(rng.normal(0, 1.5, truth.shape) + np.where(truth, 1.5, -1.5))))
        valid = np.ones((size, size), bool)
        valid[-2:, :4] = False
        probs.append(p)
        targets.append(truth.astype(np.int64))
        valids.append(valid)
    return probs, targets, valids


def _score(rule, task, probs, targets, valids, metric, empty, num_classes):
    """Apply ``rule`` to the stored pixels of every image and score it with SegMetrics per image."""
    metrics = SegMetrics(num_classes, task, boundary=False, per_image=True, empty=empty)
    for i, (p, t) in enumerate(zip(probs, targets)):
        if rule is None:  # default decisions
            decision = p.argmax(0) if task == "multiclass" else p >= 0.5
        else:
            decision = apply_image_rule(p, rule, task)
        if task == "multiclass":
            metrics.update(torch.from_numpy(decision.astype(np.int64))[None], torch.from_numpy(t)[None])
        else:
            metrics.update(torch.from_numpy(decision)[None], torch.from_numpy(t)[None],
                           valid=torch.from_numpy(valids[i])[None])
    return metrics.compute()[metric]


def _check_against_brute_force(tuner, result, task, probs, targets, valids, metric, empty, num_classes):
    grid = np.arange(BINS + 1) / BINS
    assert result["score"] == pytest.approx(_score(result, task, probs, targets, valids, metric, empty, num_classes),
                                            abs=1e-12)
    assert result["default_score"] == pytest.approx(
        _score(None, task, probs, targets, valids, metric, empty, num_classes), abs=1e-12)
    tunable = [c for c in range(num_classes) if task == "multilabel" or c != result.get("fallback")]
    moved = False
    for c in tunable:
        curve = np.empty((len(AREAS), len(grid)))
        for j, area in enumerate(AREAS):
            for k, threshold in enumerate(grid):
                rule = copy.deepcopy(result)
                rule["thresholds"][c], rule["empty_area"][c] = threshold, area
                curve[j, k] = _score(rule, task, probs, targets, valids, metric, empty, num_classes)
        j, k = AREAS.index(result["empty_area"][c]), int(round(result["thresholds"][c] * BINS))
        # the tuner's curves are exact, and its choice is a best one for this class (coordinate-wise optimum)
        np.testing.assert_allclose(result["curves"]["score"][c], curve[j], atol=1e-12)
        np.testing.assert_allclose(result["curves"]["score_empty_area"][c], curve[:, k], atol=1e-12)
        assert curve[j, k] == pytest.approx(np.nanmax(curve), abs=1e-12)
        moved |= (j, k) != (0, 0 if task == "multiclass" else BINS // 2)
    assert moved and result["score"] > result["default_score"]  # the data are made so that tuning helps


@pytest.mark.parametrize("metric, fallback, empty", [
    ("miou_image", 0, 1.0), ("miou_image", 0, NAN), ("dice_image", None, 1.0), ("dice_image", None, NAN),
], ids=["miou-background-empty=1", "miou-background-empty=nan", "dice-void-empty=1", "dice-void-empty=nan"])
def test_multiclass_tuner_matches_brute_force(metric, fallback, empty):
    probs, targets = _multiclass_images(seed=1)
    tuner = make_image_tuner("multiclass", 3, fallback=fallback, metric=metric, empty=empty, bins=BINS,
                             empty_areas=AREAS)
    for p, t in zip(probs, targets):
        tuner.update(p, t)
    result = tuner.fit()
    assert result["fallback"] == fallback and result["min_area"] == [0, 0, 0] and result["metric"] == metric
    _check_against_brute_force(tuner, result, "multiclass", probs, targets, None, metric, empty, 3)


@pytest.mark.parametrize("metric, empty", [("dice_image", 1.0), ("dice_image", NAN), ("miou_image", NAN)],
                         ids=["dice-empty=1", "dice-empty=nan", "miou-empty=nan"])
def test_multilabel_tuner_matches_brute_force(metric, empty):
    probs, targets, valids = _multilabel_images(seed=2)
    tuner = make_image_tuner("multilabel", 3, metric=metric, empty=empty, bins=BINS, empty_areas=AREAS)
    tuner.update(np.stack(probs[:2]), np.stack(targets[:2]), valid=np.stack(valids[:2]))  # a batch ...
    for p, t, v in zip(probs[2:], targets[2:], valids[2:]):  # ... and single images
        tuner.update(p, t, valid=v)
    result = tuner.fit()
    assert "fallback" not in result and result["images"] == 6
    _check_against_brute_force(tuner, result, "multilabel", probs, targets, valids, metric, empty, 3)


def _specks(task: str):
    """4 images of 8x8, one foreground class: two without it in the truth but with a predicted speck of
    3 pixels, two with a 20-pixel object predicted exactly; every prediction at probability 0.9."""
    probs, targets = [], []
    for i in range(4):
        fg = np.zeros((8, 8), bool)
        if i < 2:
            fg[0, :3] = True
            truth = np.zeros((8, 8), np.int64)
        else:
            fg[2:6, 1:6] = True
            truth = fg.astype(np.int64)
        p1 = np.where(fg, 0.9, 0.1)
        probs.append(np.stack([1 - p1, p1]) if task == "multiclass" else p1[None])
        targets.append(truth if task == "multiclass" else truth[None])
    return probs, targets


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_empty_area_removes_specks_in_images_without_the_class(task):
    """Area 0 scores images 0-1 at 0 (a speck where nothing is), the others at 1; any empty area in
    (3, 20] scores all four at 1 (a class is emptied below the area, not at it); the smallest such
    candidate wins the tie."""
    probs, targets = _specks(task)
    tuner = make_image_tuner(task, len(probs[0]), fallback=0, metric="miou_image", empty=1.0, bins=BINS,
                             empty_areas=(0, 2, 3, 4, 8, 20, 32))  # 3 and 20: the areas predicted
    for p, t in zip(probs, targets):
        tuner.update(p, t)
    result = tuner.fit()
    c = 1 if task == "multiclass" else 0
    assert result["empty_area"][c] == 4
    assert result["thresholds"][c] == (0.0 if task == "multiclass" else 0.5)
    assert result["score"] == pytest.approx(1.0)
    # multiclass at argmax: images 0-1 score background 61/64 and the speck 0
    expected_default = (2 * (61 / 64 + 0) / 2 + 2) / 4 if task == "multiclass" else 0.5
    assert result["default_score"] == pytest.approx(expected_default)
    assert result["curves"]["score_empty_area"][c] == pytest.approx(
        [expected_default, expected_default, expected_default, 1.0, 1.0, 1.0,  # emptied below, not at, the area
         0.5 if task == "multilabel" else (2 + 2 * (44 / 64 + 0) / 2) / 4])


def test_merged_tuners_fit_like_one_tuner():
    """merge_tuners (what cross-fitting uses) concatenates the per-image state of the parts."""
    probs, targets = _multiclass_images(seed=3)

    def tuner():
        return make_image_tuner("multiclass", 3, 0, "dice_image", bins=BINS, empty_areas=AREAS)

    whole, halves = tuner(), []
    for part in (slice(0, 3), slice(3, 6)):
        halves.append(tuner())
        for p, t in zip(probs[part], targets[part]):
            halves[-1].update(p, t)
            whole.update(p, t)
    merged = merge_tuners(halves)
    assert len(halves[0].hists) == 3 and len(merged.hists) == 6  # the parts are left unchanged
    assert merged.fit() == whole.fit()


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_thresholds_alone_from_the_same_counts(task):
    """fit(with_empty_area=False) equals a tuner that never had empty-area candidates."""
    probs, targets = _multiclass_images(seed=4) if task == "multiclass" else _multilabel_images(seed=4)[:2]
    both, plain = (make_image_tuner(task, 3, 0, "val_miou_image", bins=BINS, empty_areas=AREAS, tune_empty_area=t)
                   for t in (True, False))
    for p, t in zip(probs, targets):
        both.update(p, t)
        plain.update(p, t)
    alone = both.fit(with_empty_area=False)
    assert alone == plain.fit() and alone["empty_area"] == [0, 0, 0] and alone["metric"] == "miou_image"
    full = both.fit()
    assert any(full["empty_area"]) and full["score"] > alone["score"]  # the areas matter on these images


def test_apply_empty_area():
    labels = np.array([[1, 1, 2], [2, 2, 0]])
    out = apply_empty_area(labels, [0, 3, 3], "multiclass", fallback=0)
    np.testing.assert_array_equal(out, [[0, 0, 2], [2, 2, 0]])  # class 1 has 2 < 3 pixels, class 2 has 3
    np.testing.assert_array_equal(apply_empty_area(labels, [0, 3, 0], "multiclass", fallback=None),
                                  [[255, 255, 2], [2, 2, 0]])
    masks = np.zeros((2, 2, 4, 4), bool)
    masks[0, 0, :1] = True  # 4 pixels
    masks[1, 0, :2] = True  # 8 pixels
    masks[:, 1] = True
    out = apply_empty_area(masks, [5, 0], "multilabel")
    assert not out[0, 0].any() and out[1, 0].sum() == 8 and out[:, 1].all()
    assert masks[0, 0].sum() == 4  # the input is left alone
    np.testing.assert_array_equal(apply_empty_area(masks[1], [5, 0], "multilabel"), masks[1])
