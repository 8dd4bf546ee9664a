"""Cross-fitted post-processing: each decision is scored on a fold it was not fitted on.

Thresholds, minimum areas and the CRF are fitted on out-of-fold (OOF) predictions. Scored on the
same pixels, their gain is in-sample and optimistic: with many thresholds and few images of a
rare class, a tuned rule can look better than it is. So every post-processing step is fitted k
times, each time on the OOF predictions of k-1 folds, and the rule fitted without fold f is
applied to fold f: the pooled score over all folds is the **cross-fitted** score, the number a
user can expect on new images. The in-sample score (fitted and scored on all OOF) is reported
beside it; their difference is the step's **optimism**.

A step is kept for prediction only when its cross-fitted gain over what precedes it is positive
(nnU-Net's ``determine_postprocessing`` keeps a step only if it helps); the classes it made
worse are named. The rule written for prediction is then fitted on all OOF predictions.

Order of the steps: (b) default decisions (argmax / 0.5) -> thresholds -> minimum areas (on top
of the thresholds, so only when they are kept) -> CRF (refined probabilities with thresholds of
their own, compared with the best rule kept before it).
"""
from __future__ import annotations

import copy
import logging
import math

from ensemble.thresholds import merge_tuners

logger = logging.getLogger(__name__)


def fit_cross(tuners: dict[int, object]) -> tuple[dict, dict[int, dict]]:
    """(rule fitted on every fold's counts, {fold f: rule fitted on the other folds' counts})."""
    folds = sorted(tuners)
    everything = merge_tuners(tuners[f] for f in folds).fit()
    if len(folds) < 2:  # e.g. every other fold lacks a completed trial: nothing to fit on for it
        logger.warning("only fold %s has members: post-processing cannot be cross-fitted, so it is scored as the "
                       "default decisions and not kept", folds)
        return everything, {f: default_rule(everything) for f in folds}
    without = {f: merge_tuners(tuners[g] for g in folds if g != f).fit() for f in folds}
    return everything, without


DECISION_KEYS = ("thresholds", "fallback", "min_area", "empty_area", "metric", "empty")


def default_rule(rule: dict) -> dict:
    """The default decisions in ``rule``'s form: thresholds 0 (argmax) for multiclass, 0.5 for
    multilabel, no minimum area and no empty area; none of the fit's (in-sample) numbers."""
    out = {k: copy.copy(v) for k, v in rule.items() if k in DECISION_KEYS}
    out["thresholds"] = [0.0 if "fallback" in rule else 0.5] * len(rule["thresholds"])
    for key in ("min_area", "empty_area"):
        if key in out:
            out[key] = [0] * len(out[key])
    return out


def without_min_area(rule: dict) -> dict:
    """The same thresholds with no minimum area (the rule before the area step)."""
    out = copy.copy(rule)
    if "min_area" in out:
        out["min_area"] = [0] * len(out["min_area"])
    return out


def score_key(task: str, metric: str = "val_miou") -> str:
    """What the tuners maximise, hence what a step must improve: the per-image score when the search
    optimised one (miou_image, dice_image), else mIoU (multiclass) or mean Dice (multilabel)."""
    name = metric.removeprefix("val_")
    if name in ("miou_image", "dice_image"):
        return name
    return "miou" if task == "multiclass" else "dice"


PER_CLASS = {"miou": "iou_per_class", "dice": "dice_per_class", "miou_image": "iou_image_per_class",
             "dice_image": "dice_image_per_class"}


def _per_class(metrics: dict, key: str) -> list[float]:
    return metrics[PER_CLASS[key]]


def step_record(step: str, key: str, before: dict, after: dict, before_in_sample: dict, after_in_sample: dict,
                class_names: list[str], allowed: bool = True) -> dict:
    """The keep decision of one step from the metrics before and after it, cross-fitted and in-sample.

    ``allowed=False``: the step depends on one that was not kept (it is reported, never kept)."""
    gain = after[key] - before[key]
    gain_in_sample = after_in_sample[key] - before_in_sample[key]
    worse = [name for name, a, b in zip(class_names, _per_class(after, key), _per_class(before, key))
             if not (math.isnan(a) or math.isnan(b)) and a < b - 1e-12]
    kept = bool(allowed and gain > 0)
    record = {"step": step, "metric": key, "kept": kept, "cross_fitted": after[key], "in_sample": after_in_sample[key],
              "optimism": after_in_sample[key] - after[key], "gain": gain, "gain_in_sample": gain_in_sample,
              "worse_classes": worse}
    logger.info("%s: cross-fitted %s %+.4f (in-sample %+.4f): %s%s", step, key, gain, gain_in_sample,
                "kept" if kept else "not kept", f"; worse for {', '.join(worse)}" if worse else "")
    return record


def kept_rule(fitted: dict | None, steps: dict) -> dict | None:
    """The thresholds prediction applies: the rule fitted on all OOF less the steps that were not kept;
    None (default decisions) when the thresholds were not kept."""
    if fitted is None or not steps.get("thresholds", {}).get("kept"):
        return None
    area = steps.get("min_area")
    return fitted if area is None or area["kept"] else without_min_area(fitted)


def applied_thresholds(fitted: dict | None, post: dict) -> dict | None:
    """The thresholds prediction applies: the CRF's (fitted on refined probabilities) when it was kept,
    else those fitted on all OOF predictions less the steps not kept (:func:`kept_rule`); None
    (argmax / 0.5) when the thresholds were not kept."""
    crf = post.get("crf")
    if crf and crf["kept"]:
        return crf["thresholds"]
    return kept_rule(fitted, post.get("steps", {}))


def prediction_rule(fitted: dict | None, post: dict, max_size: int | None) -> dict:
    """The decision rule prediction applies, as the bundle records it: ``{"thresholds", "crf",
    "max_size"}`` (``max_size``: data.max_size, the resolution the pixel areas and the CRF were fitted
    at). :func:`ensemble.bundle.rule_thresholds` and :func:`~ensemble.bundle.rule_refiner` turn it
    into the decision; the bundle and the holdout both score it through them."""
    crf = post.get("crf")
    return {"thresholds": applied_thresholds(fitted, post), "crf": crf["params"] if crf and crf["kept"] else None,
            "max_size": max_size}


def optimism_summary(steps: dict) -> str:
    """One line per step for the console: cross-fitted and in-sample gain, kept or not."""
    lines = []
    for record in steps.values():
        lines.append(f"{record['step']:<11} gain {record['gain']:+.4f} cross-fitted, {record['gain_in_sample']:+.4f} "
                     f"in-sample (optimism {record['optimism']:+.4f}): {'kept' if record['kept'] else 'not kept'}"
                     + (f"; worse: {', '.join(record['worse_classes'])}" if record["worse_classes"] else ""))
    return "\n".join(lines)

