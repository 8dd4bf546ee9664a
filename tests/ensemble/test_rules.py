"""The decision rules as prediction applies them (ensemble/rules.py), against brute force.

The rule objects are read from ``bundle.json``'s ``rule`` as older bundles wrote it, round-trip
through ``to_dict``/``from_dict``, and decide exactly as a pixel-by-pixel reference written here.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from ensemble.rules import CrfRule, DecisionRule, ThresholdRule, areas_at, decide

C = 3


def _reference_multiclass(probs: np.ndarray, rule: dict | None, void: int = 255) -> np.ndarray:
    """Argmax; below the class's threshold, or in a too-small 8-connected argmax component, to
    the fallback (void without one); then classes on fewer pixels than their empty area emptied.
    Areas scaled from ``max_size`` to the image by the ratio of pixel counts."""
    c, h, w = probs.shape
    argmax = probs.argmax(0)
    if not rule:
        return argmax.astype(np.uint8)
    scale = 1.0
    if rule.get("max_size") and max(h, w) > rule["max_size"]:
        s = rule["max_size"] / max(h, w)
        scale = h * w / (max(1, round(h * s)) * max(1, round(w * s)))
    fill = void if rule["fallback"] is None else rule["fallback"]
    out = argmax.copy()
    for y in range(h):
        for x in range(w):
            k = argmax[y, x]
            if probs[k, y, x] < rule["thresholds"][k] and k != rule["fallback"]:
                out[y, x] = fill
    for k, area in enumerate(rule.get("min_area") or []):
        area = int(round(area * scale))
        if area <= 0 or k == rule["fallback"]:
            continue
        components, n = ndimage.label(argmax == k, structure=np.ones((3, 3)))
        for j in range(1, n + 1):
            if (components == j).sum() < area:
                out[components == j] = fill
    for k, area in enumerate(rule.get("empty_area") or []):
        area = int(round(area * scale))
        count = (out == k).sum()
        if k != rule["fallback"] and 0 < count < area:
            out[out == k] = fill
    return out.astype(np.uint8)


def _reference_multilabel(probs: np.ndarray, rule: dict | None) -> np.ndarray:
    if not rule:
        return probs >= 0.5
    out = np.stack([probs[k] >= t for k, t in enumerate(rule["thresholds"])])
    for k, area in enumerate(rule.get("empty_area") or []):
        if out[k].sum() < area:
            out[k] = False
    return out


def _probs(rng, h: int, w: int, task: str) -> np.ndarray:
    logits = ndimage.uniform_filter(rng.normal(size=(C, h, w)) * 3, size=(1, 3, 3))
    if task == "multilabel":
        return 1 / (1 + np.exp(-logits))
    e = np.exp(logits - logits.max(0))
    return e / e.sum(0)


MULTICLASS_RULES = [
    None,
    {"thresholds": [0.0, 0.45, 0.6], "fallback": 0},
    {"thresholds": [0.0, 0.45, 0.6], "fallback": 0, "min_area": [0, 4, 9], "metric": "miou", "curves": {}},
    {"thresholds": [0.3, 0.45, 0.6], "fallback": None, "min_area": [3, 0, 5]},
    {"thresholds": [0.0, 0.4, 0.5], "fallback": 0, "min_area": [0, 0, 0], "empty_area": [0, 30, 60]},
    {"thresholds": [0.0, 0.4, 0.5], "fallback": 0, "min_area": [0, 3, 0], "max_size": 16},
    {"thresholds": [0.0, 0.4, 0.5], "fallback": None, "min_area": [0, 0, 0], "empty_area": [20, 0, 40],
     "max_size": 20},
]


@pytest.mark.parametrize("rule", MULTICLASS_RULES)
def test_multiclass_rules_decide_as_the_brute_force_reference(rule):
    rng = np.random.default_rng(0)
    for shape in ((24, 32), (9, 13)):
        probs = _probs(rng, *shape, "multiclass")
        want = _reference_multiclass(probs, rule)
        np.testing.assert_array_equal(decide(probs, rule, "multiclass"), want)
        if rule is not None:
            obj = ThresholdRule.from_dict(rule)
            np.testing.assert_array_equal(obj.apply(probs, "multiclass"), want)
            np.testing.assert_array_equal(decide(probs, obj, "multiclass"), want)
            assert ThresholdRule.from_dict(obj.to_dict()) == obj
            assert json.loads(json.dumps(obj.to_dict())) == obj.to_dict()


@pytest.mark.parametrize("rule", [None, {"thresholds": [0.3, 0.5, 0.7]},
                                  {"thresholds": [0.3, 0.5, 0.7], "empty_area": [0, 40, 10], "fallback": None}])
def test_multilabel_rules_decide_as_the_brute_force_reference(rule):
    probs = _probs(np.random.default_rng(1), 20, 30, "multilabel")
    want = _reference_multilabel(probs, rule)
    np.testing.assert_array_equal(decide(probs, rule, "multilabel"), want)
    if rule is not None:
        np.testing.assert_array_equal(ThresholdRule.from_dict(rule).apply(probs, "multilabel"), want)


def test_areas_at_scales_by_the_pixel_ratio():
    rule = {"thresholds": [0, 0.5], "fallback": 0, "min_area": [0, 10], "empty_area": [0, 7], "max_size": 50}
    assert areas_at(rule, 40, 50) is rule  # at max_size: unchanged
    scaled = areas_at(rule, 100, 200)  # tuned at 25 x 50: 16 times the pixels
    assert scaled["min_area"] == [0, 160] and scaled["empty_area"] == [0, 112]
    assert areas_at({k: v for k, v in rule.items() if k != "max_size"}, 100, 200)["min_area"] == [0, 10]
    obj = ThresholdRule.from_dict(rule)
    assert obj.at(100, 200) == ThresholdRule([0, 0.5], 0, [0, 160], [0, 112], None)
    assert obj.at(40, 50) == ThresholdRule([0, 0.5], 0, [0, 10], [0, 7], None)


def test_decision_rule_reads_bundle_json_as_written(tmp_path):
    """The ``rule`` of bundle.json (a tuner's whole fit, CRF parameters, max_size) loads, keeps
    what decides, and its thresholds decide as the dict the bundle gave prediction before."""
    fit = {"thresholds": [0.0, 0.4, 0.6], "fallback": 0, "min_area": [0, 5, 0], "miou": 0.5, "default_miou": 0.4,
           "iou_per_class": [0.1, 0.2, 0.3], "curves": {"thresholds": [0.0, 0.5, 1.0], "miou": [None, [1], [2]]}}
    crf = {"sxy_gaussian": 3, "compat_gaussian": 3, "sxy_bilateral": 20, "srgb": 5, "compat_bilateral": 3,
           "iterations": 5}
    stored = json.loads(json.dumps({"thresholds": fit, "crf": crf, "max_size": 16}))
    rule = DecisionRule.from_dict(stored)
    assert rule.thresholds == ThresholdRule([0.0, 0.4, 0.6], 0, [0, 5, 0], None, 16)
    assert rule.crf == CrfRule.from_dict(crf, 16) and rule.crf.to_dict() == crf and rule.max_size == 16
    assert DecisionRule.from_dict(rule.to_dict()) == rule
    assert rule.to_dict() == {"thresholds": {"thresholds": [0.0, 0.4, 0.6], "fallback": 0, "min_area": [0, 5, 0]},
                              "crf": crf, "max_size": 16}
    assert DecisionRule.from_dict({"thresholds": None}) == DecisionRule() and DecisionRule().refiner() is None
    probs = _probs(np.random.default_rng(2), 30, 40, "multiclass")
    np.testing.assert_array_equal(decide(probs, rule.thresholds, "multiclass"),
                                  _reference_multiclass(probs, {**fit, "max_size": 16}))

    def smooth(p, image, params):  # a stand-in CRF: the parameters it gets, the shape it keeps
        assert params == crf and image.shape[:2] == p.shape[1:]
        return np.full_like(p, 1 / len(p))

    image = np.zeros((30, 40, 3), np.uint8)
    refined = rule.refiner(smooth)(probs, image)  # run at max_size, back to the image's size
    assert refined.shape == probs.shape
    np.testing.assert_allclose(refined, 1 / 3, atol=1e-6)


def test_bundle_rule_loads_from_an_older_bundle(tmp_path):
    """A bundle written before the rule objects: Bundle.rule, thresholds and refiner from its json."""
    import torch

    from ensemble.bundle import load_bundle, write_bundle
    from ensemble.predictor import load_member
    from tests.ensemble.test_bundle import RULE, _checkpoint

    member = load_member(_checkpoint(tmp_path, "m0", 0, 0.4), "m0", torch.device("cpu"))
    bundle = load_bundle(write_bundle(tmp_path / "b", [member], tta="none", voting="soft", rule=RULE,
                                      metric="val_miou", mode="max"))
    assert bundle.rule == DecisionRule.from_dict(RULE)
    assert bundle.rule.thresholds.to_dict() == {**RULE["thresholds"], "max_size": RULE["max_size"]}
    assert bundle.thresholds == {**RULE["thresholds"], "max_size": RULE["max_size"]} and bundle.refiner() is None
