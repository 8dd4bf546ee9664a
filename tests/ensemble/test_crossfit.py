"""Cross-fitted post-processing, the holdout, and a dataset without background end to end.

Thresholds fitted on out-of-fold predictions and scored on the same pixels look better than they
are; these tests check that the reported (c) is scored on folds the thresholds were not fitted on,
that a step is kept only on a cross-fitted gain, that the holdout stays out of every fold, and that
a pixel the rule leaves void counts as a miss wherever it is scored.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ensemble.crossfit import fit_cross, kept_rule, step_record, without_min_area
from ensemble.rules import apply_multiclass
from ensemble.thresholds import MulticlassThresholdTuner, MultilabelThresholdTuner, merge_tuners
from trainables.errors import ConfigError
from trainables.folds import make_split, read_holdout, train_val_indices

from tests.ensemble.test_ensemble import VAL_JSON, _check_ok, build_experiment, run_cli

C = 4


def _images(rng, n: int, bias: float):
    """Softmax-like probabilities over C classes for n 16x16 images; ``bias`` > 0 makes class 1
    systematically over-predicted at low confidence (a threshold on it genuinely helps)."""
    out = []
    for _ in range(n):
        truth = rng.integers(0, C, (16, 16))
        logits = rng.normal(0, 1, (C, 16, 16))
        logits[truth, np.arange(16)[:, None], np.arange(16)] += 1.5
        logits[1] += bias
        p = np.exp(logits)
        out.append(((p / p.sum(0)).astype(np.float64), truth))
    return out


def _cross_fitted_score(folds, per_fold, key="miou"):
    """Pooled IoU over folds, each scored with the rule fitted without it (brute force, sklearn)."""
    from sklearn.metrics import confusion_matrix

    cm = np.zeros((C, C + 1), dtype=np.int64)
    for f, images in folds.items():
        for probs, truth in images:
            pred = apply_multiclass(probs, per_fold[f]["thresholds"], 0, per_fold[f]["min_area"], void_label=C)
            cm += confusion_matrix(truth.ravel(), pred.ravel(), labels=range(C + 1))[:C]
    tp = np.diag(cm[:, :C])
    return float(np.nanmean(tp / (cm.sum(1) + cm[:, :C].sum(0) - tp)))


def test_merged_tuners_equal_one_tuner_fed_everything():
    rng = np.random.default_rng(0)
    images = _images(rng, 6, 0.0)
    parts = [MulticlassThresholdTuner(C, tune_min_area=True, bins=20) for _ in range(3)]
    whole = MulticlassThresholdTuner(C, tune_min_area=True, bins=20)
    for k, (p, t) in enumerate(images):
        parts[k % 3].update(p, t)
        whole.update(p, t)
    assert merge_tuners(parts).fit() == whole.fit()
    assert parts[0].fit() != whole.fit()  # merging did not change the parts
    ml = [MultilabelThresholdTuner(2, bins=10) for _ in range(2)]
    one = MultilabelThresholdTuner(2, bins=10)
    for k in range(4):
        p, t = rng.random((2, 8, 8)), rng.random((2, 8, 8)) > 0.5
        ml[k % 2].update(p, t)
        one.update(p, t)
    assert merge_tuners(ml).fit() == one.fit()
    with pytest.raises(ValueError):
        merge_tuners([parts[0], ml[0]])


@pytest.mark.parametrize("bias, helps", [(0.0, False), (1.2, True)])
def test_cross_fitted_gain_decides_and_in_sample_is_optimistic(bias, helps):
    """Noise: thresholds gain in-sample but not on held-out folds (not kept). A real over-prediction
    of class 1: the gain holds out of sample (kept). Checked against a brute-force cross-fit."""
    rng = np.random.default_rng(1)
    folds = {f: _images(rng, 4, bias) for f in range(3)}
    tuners = {}
    for f, images in folds.items():
        tuners[f] = MulticlassThresholdTuner(C, bins=50)
        for p, t in images:
            tuners[f].update(p, t)
    fitted, per_fold = fit_cross(tuners)
    default = _cross_fitted_score(folds, {f: {"thresholds": [0.0] * C, "min_area": None} for f in folds})
    cross = _cross_fitted_score(folds, per_fold)
    assert fitted["miou"] > fitted["default_miou"]  # in-sample, tuning always finds a gain
    assert math.isclose(default, fitted["default_miou"], abs_tol=1e-12)
    assert (cross > default) is helps
    assert fitted["miou"] - fitted["default_miou"] > cross - default  # optimism
    names = [str(c) for c in range(C)]
    metrics = lambda v: {"miou": v, "iou_per_class": [v] * C}  # noqa: E731
    record = step_record("thresholds", "miou", metrics(default), metrics(cross), metrics(fitted["default_miou"]),
                         metrics(fitted["miou"]), names)
    assert record["kept"] is helps and math.isclose(record["gain"], cross - default)
    assert math.isclose(record["optimism"], fitted["miou"] - cross)
    assert kept_rule(fitted, {"thresholds": record}) == (fitted if helps else None)


def test_one_fold_cannot_be_cross_fitted_and_scores_as_default(caplog):
    rng = np.random.default_rng(2)
    tuner = MulticlassThresholdTuner(C, bins=20, tune_min_area=True)
    for p, t in _images(rng, 3, 1.2):
        tuner.update(p, t)
    fitted, per_fold = fit_cross({3: tuner})
    assert any(t > 0 for t in fitted["thresholds"])
    assert per_fold[3]["thresholds"] == [0.0] * C and per_fold[3]["min_area"] == [0] * C
    assert "cannot be cross-fitted" in caplog.text


def test_kept_rule_drops_a_min_area_that_did_not_help():
    rule = {"thresholds": [0, 0.4], "min_area": [0, 64], "fallback": 0}
    yes, no = {"kept": True}, {"kept": False}
    assert kept_rule(rule, {"thresholds": yes, "min_area": yes}) == rule
    assert kept_rule(rule, {"thresholds": yes, "min_area": no}) == without_min_area(rule) != rule
    assert kept_rule(rule, {"thresholds": no, "min_area": yes}) is None
    before = {"miou": 0.5, "iou_per_class": [0.9, 0.1]}
    after = {"miou": 0.6, "iou_per_class": [0.8, 0.4]}
    record = step_record("min_area", "miou", before, after, before, after, ["road", "pole"], allowed=False)
    assert not record["kept"] and record["worse_classes"] == ["road"]


# --------------------------------------------------------------------------- holdout split


IDS = [f"seq{g}_{i:03d}.png" for g in range(6) for i in range(10)]
PRESENCE = np.random.default_rng(0).random((60, 4)) > 0.5


@pytest.mark.parametrize("strategy, regex", [("kfold", None), ("stratified", None), ("multilabel", None),
                                             ("group", r"seq(\d)")])
def test_holdout_is_outside_every_fold_and_never_trained_on(strategy, regex):
    folds, held = make_split(strategy, 3, 0, IDS, PRESENCE, regex, 0.2)
    in_folds = [i for f in folds for i in f]
    assert held and not set(in_folds) & set(held) and len(in_folds) + len(held) == len(IDS)
    for f in range(3):
        train, val = train_val_indices(folds, f, IDS)
        assert not {IDS[i] for i in train + val} & set(held)
    if strategy == "group":  # whole sequences go to the holdout
        assert {h[:4] for h in held}.isdisjoint({i[:4] for i in in_folds})
    else:
        assert len(held) == 12


def test_holdout_by_names_and_regex_and_bad_values():
    _, held = make_split("kfold", 2, 0, IDS, PRESENCE, None, ["seq0_001.png", "seq5_009.png"])
    assert held == ["seq0_001.png", "seq5_009.png"]
    _, held = make_split("kfold", 2, 0, IDS, PRESENCE, None, r"^seq3_")
    assert held == [i for i in IDS if i.startswith("seq3_")]
    for bad, match in ((0.7, "share"), (["nope.png"], "not images"), ("^zzz", "matches no"), (r"seq", "every image"),
                       (True, "expected")):
        with pytest.raises(ConfigError, match=match):
            make_split("kfold", 2, 0, IDS, PRESENCE, None, bad)


# --------------------------------------------------------------------------- no background, end to end


@pytest.fixture(scope="module")
def no_background(tmp_path_factory):
    """A tiny experiment on the sample with unannotated pixels ignored (no background class) and a
    quarter of the images held out; then the ensemble step predicts the sample's val split."""
    exp = build_experiment(tmp_path_factory.mktemp("nobg"), {"unannotated": "ignore"}, {"holdout": 0.25},
                           lrs=(1e-2,))
    out = exp.tmp / "pred"
    proc = run_cli(["--experiment", exp.run_dir, "--top-k", 1, "--predict", VAL_JSON, "--out", out], exp.cache)
    _check_ok(proc)
    exp.out, exp.report, exp.proc = out, exp.run_dir / "ensemble", proc
    return exp


@pytest.mark.slow
def test_no_background_rows_count_void_as_a_miss(no_background):
    exp = no_background
    thresholds = json.loads((exp.report / "thresholds.json").read_text())
    metrics = json.loads((exp.report / "oof_metrics.json").read_text())
    assert thresholds["fallback"] is None and exp.data.num_classes == 11
    assert any(t > 0 for t in thresholds["thresholds"])  # the tuned rule leaves pixels void
    # the reported in-sample (c), scored by SegMetrics on the decided labels, is the tuner's own score
    assert math.isclose(metrics["tuned_in_sample"]["miou"], thresholds["miou"], abs_tol=1e-9)
    assert sum(metrics["tuned_in_sample"]["void_per_class"]) > 0


def test_holdout_rows_and_what_prediction_applies(no_background):
    exp = no_background
    held = read_holdout(exp.run_dir / "folds.json")
    metrics = json.loads((exp.report / "oof_metrics.json").read_text())
    assert len(held) == metrics["holdout"]["images"] == 72 - metrics["oof_images"]
    assert not set(held) & {i for fold in exp.folds for i in fold}
    rows = metrics["holdout"]
    assert {"single", "ensemble", "tuned"} <= set(rows)
    assert rows["applied"] == ("tuned" if metrics["steps"]["thresholds"]["kept"] else "ensemble")
    best = max(exp.rows, key=lambda r: r["best_val_miou"])
    assert rows["single_member"] == best["trial_id"]


def test_no_background_test_metrics_match_an_independent_confusion_matrix(no_background):
    _check_test_metrics(no_background.out, no_background.cache)


def _check_test_metrics(out: Path, cache: Path) -> None:
    """test_metrics.json against the written masks (255 = void) and the val truth, via sklearn."""
    from sklearn.metrics import confusion_matrix

    from trainables.data import load_dataset

    truth = load_dataset(VAL_JSON, unannotated="ignore", cache_dir=cache)
    cm = np.zeros((11, 12), dtype=np.int64)
    for i, image_id in enumerate(truth.ids):
        mask = truth.read_mask(i)
        pred = np.asarray(Image.open(out / "masks" / f"{Path(image_id).stem}.png")).astype(np.int64)
        keep = mask != 255
        cm += confusion_matrix(mask[keep], np.where(pred[keep] == 255, 11, pred[keep]), labels=range(12))[:11]
    tp = np.diag(cm[:, :11])
    with np.errstate(invalid="ignore"):
        iou = tp / (cm.sum(1) + cm[:, :11].sum(0) - tp)
    test = json.loads((out / "test_metrics.json").read_text())
    np.testing.assert_allclose(test["iou_per_class"], iou, equal_nan=True)
    assert math.isclose(test["miou"], float(np.nanmean(iou)), abs_tol=1e-12)


def test_per_image_metric_is_cross_fitted_with_the_image_tuner():
    """A search on val_miou_image: one per-image tuner per fold, merged for the other folds' fit, its
    empty-area rule applied by the ensemble's decision, and steps judged on miou_image."""
    from types import SimpleNamespace

    from ensemble.crossfit import score_key
    from ensemble.image_thresholds import MulticlassImageTuner
    from ensemble.rules import apply_image_rule
    from ensemble.oof import make_tuner
    from ensemble.predictor import Ensemble, Member

    rng = np.random.default_rng(3)
    data = SimpleNamespace(task="multiclass", num_classes=C, has_background=True)
    tuners = {f: make_tuner(data, False, 1000, "val_miou_image", 1.0) for f in range(2)}
    assert all(isinstance(t, MulticlassImageTuner) for t in tuners.values())
    for f in range(2):
        for p, t in _images(rng, 3, 1.2):
            tuners[f].update(p, t)
    fitted, per_fold = fit_cross(tuners)
    assert "empty_area" in fitted and set(per_fold) == {0, 1} and per_fold[0] != per_fold[1]
    assert score_key("multiclass", "val_miou_image") == "miou_image"
    assert score_key("multilabel", "val_dice") == "dice"
    import torch

    member = Member("m", 0, torch.nn.Identity(), (16, 16), "multiclass", [str(c) for c in range(C)])
    probs = _images(rng, 1, 0.0)[0][0]
    rule = {**fitted, "empty_area": [0, 10**6, 0, 0]}  # class 1 emptied from every image
    decided = Ensemble([member], device="cpu").decide(probs.astype(np.float32), rule)
    np.testing.assert_array_equal(decided, apply_image_rule(probs.astype(np.float32), rule, "multiclass"))
    assert not (decided == 1).any() and (probs.argmax(0) == 1).any()


def test_no_background_submission_keeps_class_zero(no_background):
    """Without a background class, class 0 (Sky) is a real class: it has submission rows."""
    import csv

    with open(no_background.out / "submission.csv", newline="") as fh:
        classes = {row["class"] for row in csv.DictReader(fh)}
    assert classes == set(no_background.data.class_names) and no_background.data.class_names[0] == "Sky"


def test_void_masks_are_scored_as_misses_at_prediction(no_background, tmp_path):
    """The tuned rule forced on the val images: its void pixels are written as 255 and scored as
    misses in test_metrics.json, against sklearn on the written masks."""
    import torch

    from ensemble.infer import PredictOptions, predict_folder
    from ensemble.members import top_k
    from ensemble.predictor import Ensemble, load_member

    exp = no_background
    thresholds = json.loads((exp.report / "thresholds.json").read_text())
    members = [load_member(r["checkpoint"], r["trial_id"], torch.device("cpu"))
               for rows in top_k(exp.rows, "val_miou", "max", 1).values() for r in rows]
    out = tmp_path / "forced"
    predict_folder(Ensemble(members, device="cpu"), thresholds,
                   PredictOptions(VAL_JSON, out, task="multiclass", unannotated="ignore",
                                  class_names=exp.data.class_names, cache_dir=exp.cache, has_background=False))
    assert any((np.asarray(Image.open(p)) == 255).any() for p in (out / "masks").glob("*.png"))
    _check_test_metrics(out, exp.cache)


def test_one_fold_per_image_rule_scores_as_the_default_decisions(caplog):
    """One fold with members and a per-image metric: the in-sample empty areas must not be scored as
    cross-fitted, so (c) is (b) on every image and the step is not kept."""
    from ensemble.image_thresholds import MulticlassImageTuner
    from ensemble.rules import decide

    images = []
    for k in range(6):  # class 2: a true 8x8 block on half the images, a false 2x2 speck on the others
        truth = np.zeros((16, 16), dtype=np.int64)
        truth[8:, 8:] = 1
        if k % 2:
            truth[:8, :8] = 2
        probs = np.full((C, 16, 16), 0.1 / (C - 1))
        probs[truth, np.arange(16)[:, None], np.arange(16)] = 0.9
        if not k % 2:
            probs[:, :2, :2] = 0.1 / (C - 1)
            probs[2, :2, :2] = 0.9
        images.append((probs, truth))
    tuner = MulticlassImageTuner(C, fallback=0, bins=20, empty_areas=(0, 2, 8, 32))
    for probs, truth in images:
        tuner.update(probs, truth)
    fitted, per_fold = fit_cross({0: tuner})
    assert any(a > 0 for a in fitted["empty_area"])  # in-sample, an empty area was tuned
    rule = per_fold[0]
    assert rule["empty_area"] == [0] * C and rule["thresholds"] == [0.0] * C
    assert "cannot be cross-fitted" in caplog.text
    for probs, _ in images:  # the "cross-fitted" rule decides as argmax
        np.testing.assert_array_equal(decide(probs, rule, "multiclass"), probs.argmax(0))
