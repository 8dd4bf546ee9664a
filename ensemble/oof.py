"""Out-of-fold evaluation: every image is predicted once, by the members of the fold that held
it out; thresholds are tuned on those predictions and the numbers are reported on the same pixels:

(a) the best single trial of each fold, (b) the ensemble at default decisions (argmax / 0.5),
(c) the ensemble with tuned class-wise thresholds (and minimum areas, if asked), cross-fitted:
each fold scored with thresholds fitted on the other folds (``ensemble/crossfit.py``), and
in-sample (fitted on all folds, scored on the same pixels) beside it.

Pass 1 predicts, scores (a) and (b), feeds one streaming threshold tuner per fold and stores the
ensemble probabilities (float16) per image; pass 2 reads them back to score (c) both ways.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ensemble.crossfit import fit_cross, score_key, step_record, without_min_area
from ensemble.image_thresholds import make_image_tuner
from ensemble.predictor import Ensemble
from ensemble.scoring import score_into, target_of
from ensemble.thresholds import MulticlassThresholdTuner, MultilabelThresholdTuner
from trainables.data import SegData
from trainables.dataset import SegDataset
from trainables.folds import train_val_indices
from trainables.io import atomic_path
from trainables.metrics import IMAGE_METRICS, SegMetrics
from trainables.runfiles import EnsembleFiles

logger = logging.getLogger(__name__)


def make_tuner(data: SegData, tune_min_area: bool, bins: int, metric: str = "val_miou", empty: float | None = 1.0):
    """The threshold tuner for what the search optimised: a per-image metric (``metrics.average:
    image``) gets the per-image tuner with its image-level empty decision (``empty_area``; minimum
    component areas are not tuned then); otherwise dataset-level mIoU / Dice."""
    if image_metric(metric):
        return make_image_tuner(data.task, data.num_classes, 0 if data.has_background else None, metric,
                                empty=empty, bins=min(bins, 100))
    if data.task == "multilabel":
        return MultilabelThresholdTuner(data.num_classes, bins=bins, metric="dice")
    return MulticlassThresholdTuner(data.num_classes, fallback=0 if data.has_background else None, bins=bins,
                                    tune_min_area=tune_min_area)


def image_metric(metric: str) -> bool:
    """Whether the search metric is a per-image score (val_miou_image, val_dice_image)."""
    return metric.removeprefix("val_") in IMAGE_METRICS


def oof_evaluate(ensembles: dict[int, Ensemble], data: SegData, *, folds: list[list[str]], max_size: int | None,
                 out_dir: Path, batch_size: int = 8, tune_min_area: bool = False, bins: int = 1000,
                 max_per_fold: int | None = None, metric: str = "val_miou", empty: float | None = 1.0) -> dict:
    """Run both passes; returns metrics (a)/(b)/(c) (cross-fitted and in-sample), the thresholds fitted
    on all out-of-fold predictions, the keep decision of each step and bookkeeping for the report.
    ``max_per_fold`` evaluates only the first images of each fold (quick checks)."""
    task, ignore = data.task, data.ignore_index
    per_image = image_metric(metric)

    def new_metrics() -> SegMetrics:
        return SegMetrics(data.num_classes, task, ignore, per_image=per_image, empty=1.0 if empty is None else empty)
    single, default = new_metrics(), new_metrics()
    tuners = {fold: make_tuner(data, tune_min_area, bins, metric, empty) for fold in ensembles}
    prob_dir = EnsembleFiles(out_dir).oof_probs_dir
    prob_dir.mkdir(parents=True, exist_ok=True)
    seen: list[tuple[int, int, Path]] = []  # (image index, fold, stored probabilities)
    for fold, ens in sorted(ensembles.items()):
        _, val_idx = train_val_indices(folds, fold, data.ids)
        val_idx = val_idx[:max_per_fold] if max_per_fold else val_idx
        loader = SegDataset(data, val_idx, transform=None, max_size=max_size, cache=False)
        for start in tqdm(range(0, len(val_idx), batch_size), desc=f"out-of-fold fold {fold}", leave=False, disable=None):
            idx = val_idx[start:start + batch_size]
            pairs = [loader.load(i) for i in idx]
            # one running sum over the members, with member 0's probabilities kept apart for (a):
            # memory is two probability maps per image, whatever the number of members
            outs = ens.predict_batch_and_member([img for img, _ in pairs], keep=0)
            for i, (_, mask), (mean_probs, first) in zip(idx, pairs, outs):
                target, valid = target_of(mask, task, ignore)
                # Pass 2 reads these back from float16: round once here so that (b), the tuner
                # and (c) see the same values (else (c) is not what the thresholds were tuned for).
                probs = mean_probs.astype(np.float16).astype(np.float32)
                score_into(single, ens.decide(first), target, valid, task)
                score_into(default, ens.decide(probs), target, valid, task)
                feed_tuner(tuners[fold], probs, mask, valid, task, ignore)
                path = prob_dir / f"{i}.npy"
                with atomic_path(path) as tmp:
                    with open(tmp, "wb") as fh:
                        np.save(fh, probs.astype(np.float16))
                seen.append((i, fold, path))
    if sorted(i for i, _, _ in seen) != sorted(set(i for i, _, _ in seen)):
        raise RuntimeError("an image was predicted by more than one fold")
    fitted, per_fold = fit_cross(tuners)
    # the rules scored in pass 2: the full tuned rule and, with minimum areas, the thresholds alone
    variants = {"tuned": lambda rule: rule}
    if tune_min_area and task == "multiclass" and not per_image:
        variants["thresholds_only"] = without_min_area
    scored = {(name, how): new_metrics() for name in variants
              for how in ("cross_fitted", "in_sample")}
    any_ens = next(iter(ensembles.values()))
    for i, fold, path in tqdm(seen, desc="scoring tuned thresholds", leave=False, disable=None):
        probs = np.load(path).astype(np.float32)
        mask = SegDataset(data, [i], transform=None, max_size=max_size, cache=False).load(i)[1]
        target, valid = target_of(mask, task, ignore)
        for name, variant in variants.items():
            for how, rule in (("cross_fitted", per_fold[fold]), ("in_sample", fitted)):
                score_into(scored[name, how], any_ens.decide(probs, variant(rule)), target, valid, task)
    result = {"single": single.compute(), "ensemble": default.compute(),
              **{(name if how == "cross_fitted" else f"{name}_in_sample"): m.compute() for (name, how), m in scored.items()},
              "thresholds": fitted, "thresholds_per_fold": {str(f): r for f, r in per_fold.items()},
              "images": [i for i, _, _ in seen], "image_folds": {i: f for i, f, _ in seen}}
    result["steps"] = post_processing_steps(result, data.task, data.class_names, metric)
    return result


def feed_tuner(tuner, probs: np.ndarray, mask: np.ndarray, valid, task: str, ignore: int) -> None:
    """One image's averaged probabilities (C, H, W) and data mask into a threshold tuner."""
    if task == "multiclass":
        tuner.update(probs.astype(np.float64), mask.astype(np.int64), ignore_index=ignore)
    else:
        tuner.update(probs.astype(np.float64), np.minimum(mask.transpose(2, 0, 1), 1), valid=valid[0].numpy())


def post_processing_steps(result: dict, task: str, class_names: list[str], metric: str = "val_miou") -> dict:
    """Keep decisions of the thresholds and (when tuned) the minimum areas, from cross-fitted gains."""
    key = score_key(task, metric)
    b = result["ensemble"]  # default decisions: nothing fitted, the same in and out of sample
    with_areas = "thresholds_only" in result  # minimum areas were tuned on top of the thresholds
    thr, thr_in = (result["thresholds_only"], result["thresholds_only_in_sample"]) if with_areas \
        else (result["tuned"], result["tuned_in_sample"])
    steps = {"thresholds": step_record("thresholds", key, b, thr, b, thr_in, class_names)}
    if with_areas:
        steps["min_area"] = step_record("min_area", key, thr, result["tuned"], thr_in, result["tuned_in_sample"],
                                        class_names, allowed=steps["thresholds"]["kept"])
    return steps
