"""Class-wise decision thresholds tuned on out-of-fold predictions, in bounded memory.

Why: a network trained with softmax or sigmoid outputs is scored with argmax or a 0.5 cut-off,
yet Dice and mIoU often improve when each class gets its own cut-off (rare or over-predicted
classes especially). Tuned on out-of-fold predictions and scored on the same pixels, the gain is
optimistic (in-sample): ``ensemble/crossfit.py`` fits one tuner per fold and scores each fold with
thresholds fitted on the others (:func:`merge_tuners` adds their histograms).

Streaming: the tuners never keep pixels. Each ``update`` bins the scores into fixed histograms
(``bins`` intervals over [0, 1] plus one slot for a score of exactly 1.0), so their state depends
on the number of classes and bins only, not on pixels x images. The candidate thresholds are
the bin edges ``k / bins`` (k = 0..bins). A score ``s`` sits in slot ``k`` when
``edge[k] <= s < edge[k + 1]``, hence ``s >= edge[k]`` exactly when its slot is ``>= k``: the
counts for all candidates come from one cumulative sum and equal what thresholding the raw
pixels gives (comparisons are made in float64). Probabilities must lie in [0, 1].

The rules themselves are applied by ``ensemble/rules.py`` (prediction side; this module fits them).

Multilabel rule (:func:`ensemble.rules.apply_multilabel`): a pixel is positive for class ``c`` iff
``p_c >= t_c``. Each class is tuned on its own for Dice or IoU over all pixels seen; ties go to
the threshold closest to 0.5; a class never positive in the data keeps 0.5.

Multiclass rule (:func:`ensemble.rules.apply_multiclass`):

1. ``label = argmax_c p_c`` (the first maximum on ties).
2. If ``p_label < t_label`` the pixel falls to ``fallback``: the background class (normally 0,
   whose own threshold is always 0). With ``fallback=None`` (datasets without a background
   class) it becomes ``void_label`` instead, which is never correct: such a pixel counts as a
   false negative for its true class and as a false positive for no class.
3. Optionally, pixels in an 8-connected component of the *argmax map* (step 1) of class ``c``
   smaller than ``min_area[c]`` pixels also fall to ``fallback`` / ``void_label``. Components
   are taken before thresholding on purpose: the tuner can then count exactly what the rule
   does (components of the thresholded map depend on the thresholds, unknown while streaming;
   estimating them on the argmax map overstated mIoU by 0.14 on noisy synthetic data, where
   thresholds shatter components into specks that the area rule then erased).

A threshold ``t_c`` only touches pixels whose argmax is ``c``, so the multiclass tuner keeps,
per class and per score slot of ``p_c`` (pixels with argmax ``c``), how many of them are truly
``c``, truly the fallback class, or truly another class. From these and the argmax confusion
matrix it derives TP/FP/FN of every class for every candidate. IoU of a non-fallback class
depends on its own threshold only, IoU of the fallback class on all of them, so mIoU is
maximised by coordinate ascent over classes (sweeps until no class changes), each step scoring
all candidates of one class in one vectorised pass. Classes absent from both truth and
prediction have IoU NaN and are left out of the mean, as in standard mIoU.

Minimum areas (``tune_min_area=True``) are tuned after the thresholds, the same way: at update
time the tuner labels the components of the argmax map and records, per class, per
component-size bin (between consecutive candidate areas) and per score slot, the truth
category of pixels in small components. Given the tuned thresholds, the pixels an area removes
on top of them are those in small components whose score the threshold keeps, so the reported
mIoU is exact for rule 3. Thresholds and areas are tuned one after the other, not jointly.

Areas (``min_area``, and the per-image rule's ``empty_area``) are pixel counts at the resolution
the out-of-fold predictions were tuned at: images downscaled to ``data.max_size``. A rule that
carries ``max_size`` (the bundle's, the one ``ensemble/run.py`` predicts with) has them scaled to
each image's own size by :func:`ensemble.rules.areas_at` when :func:`ensemble.rules.decide` applies it, so a component counts
the same share of the image as where it was tuned.

:func:`brute_force_multilabel` and :func:`brute_force_multiclass_class` are the slow references:
they threshold the stored pixels for every candidate (tests and the benchmark compare against
them).
"""
from __future__ import annotations

import copy
import logging
from typing import Sequence

import numpy as np
from scipy import ndimage

from ensemble.rules import EIGHT_CONNECTED, apply_multiclass
from trainables.metrics import dice_from_counts, iou_from_counts, mean_defined

logger = logging.getLogger(__name__)

METRICS = ("dice", "iou")
# Truth category of a pixel relative to its argmax class (second axis of the histograms; the
# per-image tuner of ensemble/image_thresholds.py counts by them too).
SAME, FALLBACK, OTHER = 0, 1, 2


def threshold_grid(bins: int) -> np.ndarray:
    """The candidate thresholds ``k / bins`` for k = 0..bins; ``bins`` is even so 0.5 is one."""
    if bins < 2 or bins % 2:
        raise ValueError(f"bins must be an even number >= 2, got {bins}")
    return np.arange(bins + 1, dtype=np.float64) / bins


def as_probabilities(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs)
    if probs.dtype not in (np.float32, np.float64):
        probs = probs.astype(np.float64)
    if probs.size and (probs.min() < 0.0 or probs.max() > 1.0):
        raise ValueError("probabilities must lie in [0, 1]")
    return probs


def score_slot(grid: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Index of the largest grid value <= score, so that ``score >= grid[k]`` iff slot >= k.

    The evenly spaced grid gives the slot arithmetically (``floor(score * bins)``, 6x faster than
    a binary search); one comparison each way against the grid corrects rounding, so the result
    is exactly ``searchsorted(grid, scores, side="right") - 1``.
    """
    bins = len(grid) - 1
    slot = (scores * bins).astype(np.intp)  # scores lie in [0, 1]: already >= 0
    np.minimum(slot, bins, out=slot)
    edges = np.append(grid, np.inf)
    slot -= scores < edges[slot]
    slot += scores >= edges[slot + 1]
    return slot


def _metric(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, metric: str) -> np.ndarray:
    return dice_from_counts(tp, fp, fn) if metric == "dice" else iou_from_counts(tp, fp, fn)


def _nanmean(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN where every value is NaN (no warning)."""
    return mean_defined(values, axis=-1)


def floats(values) -> list[float]:
    return [float(v) for v in np.asarray(values).ravel()]


def _pick_near_half(grid: np.ndarray, curve: np.ndarray, has_positives: bool) -> int:
    """Index of the best score on ``curve``; ties go to the threshold closest to 0.5.

    A class without positive pixels has nothing to gain and keeps the threshold nearest 0.5.
    """
    if not has_positives:
        return int(np.argmin(np.abs(grid - 0.5)))
    tied = np.flatnonzero(curve == np.max(curve))
    return int(tied[np.argmin(np.abs(grid[tied] - 0.5))])


def merge_tuners(tuners: Sequence) -> object:
    """One tuner holding the counts of all ``tuners`` (same class and settings): their histograms add,
    so fitting it equals fitting one tuner fed every image of theirs."""
    tuners = list(tuners)
    if not tuners:
        raise ValueError("nothing to merge")
    first = tuners[0]
    merged = copy.deepcopy(first)
    for other in tuners[1:]:
        if type(other) is not type(first) or not np.array_equal(other.grid, first.grid):
            raise ValueError("tuners of different kinds or grids cannot be merged")
        for name in first.COUNTS:
            mine = getattr(merged, name)
            if mine is not None:
                mine += getattr(other, name)
    return merged


# --------------------------------------------------------------------------- multilabel


class MultilabelThresholdTuner:
    """Per-class sigmoid thresholds maximising Dice or IoU, from streamed histograms."""

    COUNTS = ("positive_hist", "negative_hist")  # the state :func:`merge_tuners` adds

    def __init__(self, num_classes: int, bins: int = 1000, metric: str = "dice"):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.num_classes = num_classes
        self.metric = metric
        self.grid = threshold_grid(bins)
        self.positive_hist = np.zeros((num_classes, len(self.grid)), dtype=np.int64)
        self.negative_hist = np.zeros_like(self.positive_hist)

    def update(
        self, probs: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None
    ) -> None:
        """Add one image ``(C, H, W)`` or a batch ``(B, C, H, W)`` of probabilities.

        ``target`` has the same shape with values in {0, 1}; ``valid`` is ``(H, W)`` or
        ``(B, H, W)``, False where pixels are to be ignored.
        """
        probs = as_probabilities(probs)
        target = np.asarray(target).astype(bool)
        if probs.ndim == 3:
            probs, target = probs[None], target[None]
        if probs.ndim != 4 or probs.shape[1] != self.num_classes or target.shape != probs.shape:
            raise ValueError(
                f"expected probs and target of shape ([B,] {self.num_classes}, H, W), "
                f"got {probs.shape} and {target.shape}"
            )
        slots = len(self.grid)
        # one bincount over (class, slot, truth): positive and negative histograms together;
        # index = (class * slots + slot) * 2 + truth, built in place (no pixel-sized temporaries)
        index = score_slot(self.grid, probs)
        index *= 2
        index += target
        index += (np.arange(self.num_classes) * (slots * 2))[None, :, None, None]
        if valid is not None:
            valid = np.asarray(valid, dtype=bool)
            valid = valid[None, None] if valid.ndim == 2 else valid[:, None]
            index = index[np.broadcast_to(valid, probs.shape)]
        counts = np.bincount(index.ravel(), minlength=self.num_classes * slots * 2).reshape(-1, slots, 2)
        self.negative_hist += counts[..., 0]
        self.positive_hist += counts[..., 1]

    def fit(self) -> dict:
        """Best threshold per class, its score, the score at 0.5, and the full curves."""
        # tp[c, k]: positives with score >= grid[k], a reverse cumulative sum over slots.
        tp = np.cumsum(self.positive_hist[:, ::-1], axis=1)[:, ::-1]
        fp = np.cumsum(self.negative_hist[:, ::-1], axis=1)[:, ::-1]
        positives = self.positive_hist.sum(axis=1)
        curves = _metric(tp, fp, positives[:, None] - tp, self.metric)
        best = [
            _pick_near_half(self.grid, curves[c], positives[c] > 0) for c in range(self.num_classes)
        ]
        rows = np.arange(self.num_classes)
        default = int(np.argmin(np.abs(self.grid - 0.5)))
        result = {
            "thresholds": floats(self.grid[best]),
            "metric": self.metric,
            "score_per_class": floats(curves[rows, best]),
            "default_score_per_class": floats(curves[:, default]),
            "curves": {"thresholds": floats(self.grid), "score": [floats(c) for c in curves]},
        }
        logger.debug("multilabel thresholds %s (%s)", result["thresholds"], self.metric)
        return result


def brute_force_multilabel(
    probs_list: Sequence[np.ndarray],
    targets_list: Sequence[np.ndarray],
    grid: Sequence[float],
    metric: str = "dice",
) -> tuple[np.ndarray, np.ndarray]:
    """Slow reference: threshold every stored pixel at every grid value.

    Takes ``(C, H, W)`` probabilities and targets; returns the best threshold and its score per
    class, chosen by the same rule as :class:`MultilabelThresholdTuner`.
    """
    grid = np.asarray(grid, dtype=np.float64)
    scores = np.concatenate([np.asarray(p, np.float64).reshape(len(p), -1) for p in probs_list], 1)
    truth = np.concatenate([np.asarray(t, bool).reshape(len(t), -1) for t in targets_list], 1)
    curves = np.empty((len(scores), len(grid)))
    for k, threshold in enumerate(grid):
        pred = scores >= threshold
        tp = (pred & truth).sum(axis=1)
        curves[:, k] = _metric(tp, (pred & ~truth).sum(axis=1), (~pred & truth).sum(axis=1), metric)
    best = [_pick_near_half(grid, curves[c], truth[c].any()) for c in range(len(scores))]
    return grid[best], curves[np.arange(len(scores)), best]


# --------------------------------------------------------------------------- multiclass


def _confusion_stats(
    confusion: np.ndarray, removed: np.ndarray, fallback: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP, FP, FN per class after pixels leave their argmax class.

    ``confusion`` is the argmax confusion matrix (truth x prediction); ``removed[..., c, :]``
    counts the pixels taken from class ``c`` whose truth is c / the fallback / another class.
    """
    tp0 = np.diag(confusion)
    return removal_stats(tp0, confusion.sum(axis=0) - tp0, confusion.sum(axis=1) - tp0, removed, fallback)


def removal_stats(
    tp0: np.ndarray, fp0: np.ndarray, fn0: np.ndarray, removed: np.ndarray, fallback: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP, FP, FN per class (last axis) from the argmax counts ``tp0``/``fp0``/``fn0`` when the pixels
    ``removed[..., c, :]`` (by truth category) leave class ``c`` for the fallback class or void."""
    same, to_fallback, other = removed[..., SAME], removed[..., FALLBACK], removed[..., OTHER]
    tp = tp0 - same
    fp = fp0 - to_fallback - other
    fn = fn0 + same
    if fallback is not None:
        tp[..., fallback] += to_fallback.sum(axis=-1)
        fp[..., fallback] += (same + other).sum(axis=-1)
        fn[..., fallback] -= to_fallback.sum(axis=-1)
    return tp, fp, fn


_iou = iou_from_counts


def _coordinate_ascent(
    confusion: np.ndarray, fallback: int | None, candidates: dict[int, np.ndarray]
) -> tuple[dict[int, int], dict[int, np.ndarray], np.ndarray]:
    """Pick one candidate per class maximising mIoU, one class at a time until stable.

    ``candidates[c]`` is ``(K_c, 3)``: the pixels class ``c`` loses under each candidate, by
    truth category; candidate 0 is the starting point. A class moves only on a strict gain, so
    the loop ends. Returns the chosen indices, each class's mIoU curve at the final choice, and
    the final removal table ``(C, 3)``.
    """
    removed = np.zeros((len(confusion), 3), dtype=np.int64)
    for c, table in candidates.items():
        removed[c] = table[0]
    choice = {c: 0 for c in candidates}
    curves: dict[int, np.ndarray] = {}
    changed, sweeps = True, 0
    while changed:
        changed, sweeps = False, sweeps + 1
        for c, table in candidates.items():
            trial = np.repeat(removed[None], len(table), axis=0)
            trial[:, c] = table
            curves[c] = _nanmean(_iou(*_confusion_stats(confusion, trial, fallback)))
            best = int(np.argmax(curves[c]))
            if curves[c][best] > curves[c][choice[c]]:
                choice[c], removed[c], changed = best, table[best], True
    logger.debug("coordinate ascent stable after %d sweeps", sweeps)
    return choice, curves, removed


class MulticlassThresholdTuner:
    """Per-class softmax thresholds (and optional minimum areas) maximising mIoU, streamed."""

    COUNTS = ("confusion", "score_hist", "area_hist")  # the state :func:`merge_tuners` adds

    def __init__(
        self,
        num_classes: int,
        fallback: int | None = 0,
        bins: int = 1000,
        min_area_candidates: Sequence[int] = (0, 16, 64, 256, 1024),
        tune_min_area: bool = False,
    ):
        if fallback is not None and not 0 <= fallback < num_classes:
            raise ValueError(f"fallback {fallback} is not a class index below {num_classes}")
        self.num_classes = num_classes
        self.fallback = fallback
        self.grid = threshold_grid(bins)
        self.areas = np.array(sorted({0, *map(int, min_area_candidates)}), dtype=np.int64)
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        # [argmax class, truth category, slot of the argmax probability]
        self.score_hist = np.zeros((num_classes, 3, len(self.grid)), dtype=np.int64)
        # [argmax class, truth category, size bin (areas[i] <= size < areas[i+1]), score slot]
        self.area_hist = (
            np.zeros((num_classes, 3, len(self.areas) - 1, len(self.grid)), dtype=np.int64)
            if tune_min_area
            else None
        )

    def update(self, probs: np.ndarray, target: np.ndarray, ignore_index: int = 255) -> None:
        """Add one image: ``probs`` ``(C, H, W)`` softmax output, ``target`` ``(H, W)`` labels."""
        probs = as_probabilities(probs)
        target = np.asarray(target)
        if probs.ndim != 3 or probs.shape[0] != self.num_classes or target.shape != probs.shape[1:]:
            raise ValueError(
                f"expected probs ({self.num_classes}, H, W) and target (H, W), "
                f"got {probs.shape} and {target.shape}"
            )
        pred = probs.argmax(axis=0)
        slots = score_slot(self.grid, np.take_along_axis(probs, pred[None], axis=0)[0])
        valid = target != ignore_index
        truth = target[valid].astype(np.int64)
        if truth.size and (truth.min() < 0 or truth.max() >= self.num_classes):
            raise ValueError(f"target labels must be below {self.num_classes} or {ignore_index}")
        n, k = self.num_classes, len(self.grid)
        self.confusion += np.bincount(truth * n + pred[valid], minlength=n * n).reshape(n, n)
        category = self._category(pred[valid], truth)
        index = (pred[valid] * 3 + category) * k + slots[valid]
        self.score_hist += np.bincount(index, minlength=n * 3 * k).reshape(n, 3, k)
        if self.area_hist is not None:
            self._update_areas(pred, slots, valid, category)

    def _category(self, pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
        fallback = -1 if self.fallback is None else self.fallback
        return np.where(truth == pred, SAME, np.where(truth == fallback, FALLBACK, OTHER))

    def _update_areas(
        self, pred: np.ndarray, slots: np.ndarray, valid: np.ndarray, category: np.ndarray
    ) -> None:
        """Record truth categories of pixels in argmax components smaller than the top area."""
        size = np.full(pred.shape, self.areas[-1], dtype=np.int64)  # never removed
        for c in np.unique(pred):
            if c == self.fallback:
                continue
            components, _ = ndimage.label(pred == c, structure=EIGHT_CONNECTED)
            inside = components > 0
            size[inside] = np.bincount(components[inside])[components[inside]]
        size_bin = np.searchsorted(self.areas, size[valid], side="right") - 1
        small = size_bin < len(self.areas) - 1
        n, bins_a, k = self.num_classes, len(self.areas) - 1, len(self.grid)
        index = ((pred[valid] * 3 + category) * bins_a + size_bin) * k + slots[valid]
        counts = np.bincount(index[small], minlength=n * 3 * bins_a * k)
        self.area_hist += counts.reshape(n, 3, bins_a, k)

    def fit(self) -> dict:
        """Tuned thresholds (and minimum areas), with mIoU before and after.

        ``curves["miou"][c]`` is mIoU against ``t_c`` with the other thresholds at their tuned
        values and no minimum area (``None`` for the fallback class); with minimum areas tuned,
        ``curves["miou_min_area"][c]`` is mIoU against the candidates in ``curves["min_area"]``.
        """
        tunable = [c for c in range(self.num_classes) if c != self.fallback]
        # removed[c, k, :]: pixels with argmax c and score < grid[k], per truth category.
        cumulative = np.cumsum(self.score_hist, axis=-1)
        removed = np.concatenate([np.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], -1)
        removed = removed.transpose(0, 2, 1)
        chosen, curves, final = _coordinate_ascent(
            self.confusion, self.fallback, {c: removed[c] for c in tunable}
        )
        thresholds = np.zeros(self.num_classes)
        for c, k in chosen.items():
            thresholds[c] = self.grid[k]
        min_area = [0] * self.num_classes
        result_curves: dict = {
            "thresholds": floats(self.grid),
            "miou": [floats(curves[c]) if c in curves else None for c in range(self.num_classes)],
        }
        if self.area_hist is not None:
            area_choice, area_curves, final = self._tune_areas(removed, chosen)
            for c, j in area_choice.items():
                min_area[c] = int(self.areas[j])
            result_curves["min_area"] = [int(a) for a in self.areas]
            result_curves["miou_min_area"] = [
                floats(area_curves[c]) if c in area_curves else None
                for c in range(self.num_classes)
            ]
        iou = _iou(*_confusion_stats(self.confusion, final, self.fallback))
        default_iou = _iou(*_confusion_stats(self.confusion, np.zeros_like(final), self.fallback))
        result = {
            "thresholds": floats(thresholds),
            "min_area": min_area,
            "fallback": self.fallback,
            "miou": float(_nanmean(iou)),
            "default_miou": float(_nanmean(default_iou)),
            "iou_per_class": floats(iou),
            "default_iou_per_class": floats(default_iou),
            "curves": result_curves,
        }
        logger.debug(
            "multiclass thresholds: mIoU %.4f -> %.4f (in-sample)", result["default_miou"], result["miou"]
        )
        return result

    def _tune_areas(
        self, removed: np.ndarray, chosen: dict[int, int]
    ) -> tuple[dict[int, int], dict[int, np.ndarray], np.ndarray]:
        """Coordinate ascent over minimum areas with the tuned thresholds held fixed.

        Only pixels the threshold keeps (score slot >= the chosen one) can be removed by area.
        """
        candidates = {}
        for c, k in chosen.items():
            kept = self.area_hist[c, :, :, k:].sum(axis=-1)  # (3, size bins)
            by_area = np.concatenate([np.zeros((3, 1), np.int64), np.cumsum(kept, axis=1)], 1)
            candidates[c] = removed[c, k] + by_area.T
        return _coordinate_ascent(self.confusion, self.fallback, candidates)


def _label_confusion(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int):
    """Truth x prediction counts; prediction column ``num_classes`` collects void pixels."""
    valid = target != ignore_index
    pred = np.where(pred[valid] < num_classes, pred[valid], num_classes)
    index = target[valid].astype(np.int64) * (num_classes + 1) + pred
    return np.bincount(index, minlength=num_classes * (num_classes + 1)).reshape(num_classes, -1)


def brute_force_multiclass_class(
    probs_list: Sequence[np.ndarray],
    targets_list: Sequence[np.ndarray],
    cls: int,
    grid: Sequence[float],
    other_thresholds: Sequence[float],
    fallback: int | None,
    ignore_index: int = 255,
) -> tuple[float, float]:
    """Slow reference: best ``t_cls`` on ``grid`` with the other thresholds fixed.

    Applies :func:`apply_multiclass` to every image for every candidate and scores mIoU from the
    resulting labels; returns the first best threshold and its mIoU.
    """
    num_classes = len(probs_list[0])
    curve = []
    for threshold in np.asarray(grid, dtype=np.float64):
        thresholds = np.array(other_thresholds, dtype=np.float64)
        thresholds[cls] = threshold
        confusion = sum(
            _label_confusion(
                apply_multiclass(p, thresholds, fallback, void_label=num_classes),
                np.asarray(t),
                num_classes,
                ignore_index,
            )
            for p, t in zip(probs_list, targets_list)
        )
        tp = np.diag(confusion[:, :num_classes])
        fp = confusion[:, :num_classes].sum(axis=0) - tp
        curve.append(float(_nanmean(_iou(tp, fp, confusion.sum(axis=1) - tp))))
    best = int(np.argmax(curve))
    return float(np.asarray(grid, dtype=np.float64)[best]), curve[best]
