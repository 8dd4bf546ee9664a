"""Class thresholds and image-level "empty" areas tuned for per-image scores, streamed.

Why: Kaggle-style scores (Severstal, SIIM, UW-Madison) average over images: each image x class
pair scores IoU or Dice on that image's pixels, an empty truth with an empty prediction scores 1
(or is left out), and the score is the mean over images of each image's mean over classes
(``trainables/metrics.py``: :func:`~trainables.metrics.pair_scores`,
:func:`~trainables.metrics.image_score`, ``SegMetrics(per_image=True)``). Under that score one
false-positive speck in an image without the class costs a whole pair, so besides thresholds the
decision that matters is whether a class is present in an image at all.

Rule: the rules of ``ensemble/thresholds.py`` (multiclass: argmax, below ``t_c`` to the fallback
class or void; multilabel: ``p_c >= t_c``), then the **empty area**: when fewer than
``empty_area[c]`` pixels of the image are predicted as ``c`` after thresholding, the image's
prediction of ``c`` is emptied (multiclass: those pixels fall to the fallback class, or void
without one, as thresholded pixels do; multilabel: the channel becomes all False). The area
counts every pixel of the image, ignored truth included, as the rule sees them at prediction
time. :func:`ensemble.rules.apply_image_rule` applies it (prediction side; this module fits it);
:func:`ensemble.rules.apply_empty_area` is the last step alone.

Streaming, exact on the grid: per image, per class and per score slot (the histograms and grid of
``ensemble/thresholds.py``; ``bins=100`` by default, coarser than its 1000 since the state is per
image), the tuner counts pixels by truth category (multiclass: of the argmax class, the fallback
class, another class, ignored; multilabel: positive, negative, ignored). For every candidate
threshold the per-image predicted area and TP/FP/FN follow from cumulative sums, so the empty
decision and the score are exact for every (threshold, area) candidate. Memory:
``images x classes x 4 x (bins + 1)`` int32 counts (about 16 KB per image for 10 classes at 100
bins), plus an int64 working copy while fitting.

Fit: coordinate ascent over classes (sweeps until no class changes, as in ``thresholds.py``);
each step scores, for one class, every pair (empty area, threshold) jointly in one vectorised
pass with the other classes fixed (the score is not separable: with ``empty=nan`` which pairs
count depends on every class, and in multiclass a class's removals change the fallback class).
A class moves only on a gain above 1e-12. Ties go to the smallest area, then (multilabel) the
threshold closest to 0.5 or (multiclass) the lowest threshold. The start, and the default the
gain is measured against, is the untuned rule (multiclass thresholds 0, multilabel 0.5, no empty
area). The fit is in-sample; ``ensemble/crossfit.py`` cross-fits these tuners like the
others (:func:`~ensemble.thresholds.merge_tuners` concatenates their per-image lists).
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Sequence

import numpy as np

from ensemble.thresholds import (
    FALLBACK,
    OTHER,
    SAME,
    as_probabilities,
    floats,
    removal_stats,
    score_slot,
    threshold_grid,
)
from trainables.metrics import IMAGE_METRICS, empty_score, image_score, mean_defined, pair_scores, ratio

logger = logging.getLogger(__name__)

DEFAULT_EMPTY_AREAS = (0, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_IGNORED = 3  # multiclass truth category of pixels whose truth is ignore_index
_POS, _NEG, _ML_IGNORED = 0, 1, 2  # multilabel truth categories
_TOLERANCE = 1e-12  # a class moves only on a larger gain (rounding must not make the ascent cycle)
_MAX_SWEEPS = 100
_CHUNK_ELEMENTS = 2**19  # candidates x images scored at once


class _ImageTuner:
    """State and coordinate ascent shared by both tasks; subclasses count and score one class."""

    COUNTS: tuple[str, ...] = ()  # per-image lists; :func:`merge_tuners` concatenates them

    def __init__(self, num_classes: int, metric: str = "miou_image", empty: float = 1.0, bins: int = 100,
                 empty_areas: Sequence[int] = DEFAULT_EMPTY_AREAS, tune_empty_area: bool = True):
        metric = metric.removeprefix("val_")  # the search metric's name works too
        if metric not in IMAGE_METRICS:
            raise ValueError(f"metric must be one of {', '.join(IMAGE_METRICS)}, got {metric!r}")
        if empty_score(empty) is None:
            raise ValueError(f"empty must be 1 or NaN, got {empty!r}")
        self.num_classes = num_classes
        self.metric = metric
        self.empty = empty_score(empty)
        self.grid = threshold_grid(bins)
        areas = sorted({0, *map(int, empty_areas)}) if tune_empty_area else [0]
        self.areas = np.array(areas, dtype=np.int64)
        self.hists: list[np.ndarray] = []  # one (C, categories, bins + 1) int32 array per image

    # -- to be provided by the task
    def _tunable(self) -> list[int]:
        raise NotImplementedError

    def _default_k(self) -> int:
        raise NotImplementedError

    def _k_order(self, k: np.ndarray) -> np.ndarray:
        """Tie-break key of threshold indices (smaller is preferred)."""
        raise NotImplementedError

    def _prepare(self) -> dict:
        raise NotImplementedError

    def _stats(self, data: dict, choice: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """TP, FP, FN ``(images, C)`` under ``choice`` (class -> (area index, threshold index))."""
        raise NotImplementedError

    def _candidates(self, data: dict, c: int, choice: dict, images: slice):
        """(columns, TP, FP, FN ``(areas, thresholds, images, columns)``) of the classes that class
        ``c``'s candidates change, for the images in ``images``."""
        raise NotImplementedError

    # -- shared
    @property
    def _kind(self) -> str:
        return "iou" if self.metric == "miou_image" else "dice"

    def _class_curve(self, data: dict, c: int, choice: dict) -> np.ndarray:
        """The score for every (area, threshold) of class ``c``, the other classes as in ``choice``."""
        tp_all, fp_all, fn_all = self._stats(data, choice)
        n_images = len(tp_all)
        shape = (len(self.areas), len(self.grid))
        total, count = np.zeros(shape), np.zeros(shape)
        step = max(1, _CHUNK_ELEMENTS // (shape[0] * shape[1]))
        for start in range(0, n_images, step):
            images = slice(start, start + step)
            cols, tp, fp, fn = self._candidates(data, c, choice, images)
            rest = np.ones(self.num_classes, dtype=bool)
            rest[cols] = False
            fixed = pair_scores(tp_all[images][:, rest], fp_all[images][:, rest], fn_all[images][:, rest],
                                self._kind, self.empty)
            moving = pair_scores(tp, fp, fn, self._kind, self.empty)
            fixed_ok, moving_ok = ~np.isnan(fixed), ~np.isnan(moving)
            per_image = ratio(np.where(fixed_ok, fixed, 0.0).sum(-1) + np.where(moving_ok, moving, 0.0).sum(-1),
                              fixed_ok.sum(-1) + moving_ok.sum(-1))  # (areas, thresholds, images)
            defined = ~np.isnan(per_image)
            total += np.where(defined, per_image, 0.0).sum(-1)
            count += defined.sum(-1)
        return ratio(total, count)

    def _pick(self, curve: np.ndarray, current: tuple[int, int]) -> tuple[int, int]:
        if np.isnan(curve).all():
            return current
        best = np.nanmax(curve)
        if not np.isnan(curve[current]) and best <= curve[current] + _TOLERANCE:
            return current
        j, k = np.nonzero(curve == best)
        first = np.lexsort((k, self._k_order(k), j))[0]  # smallest area, then preferred threshold
        return int(j[first]), int(k[first])

    def _without_areas(self) -> _ImageTuner:
        """The same counts with no empty-area candidate but 0 (thresholds alone)."""
        plain = copy.copy(self)  # shares the per-image lists, which fitting only reads
        plain.areas = np.zeros(1, dtype=np.int64)
        return plain

    def _fit_rule(self) -> tuple[dict, dict, dict, dict]:
        """(choice, default choice, final curves per class, data) by coordinate ascent."""
        if not self.hists:
            raise ValueError("no image was added to the tuner")
        data = self._prepare()
        start = {c: (0, self._default_k()) for c in self._tunable()}
        choice = dict(start)
        curves: dict[int, np.ndarray] = {}
        for sweep in range(1, _MAX_SWEEPS + 1):
            changed = False
            for c in self._tunable():
                curves[c] = self._class_curve(data, c, choice)
                new = self._pick(curves[c], choice[c])
                changed |= new != choice[c]
                choice[c] = new
            if not changed:
                logger.debug("per-image coordinate ascent stable after %d sweeps", sweep)
                break
        else:
            logger.warning("per-image threshold tuning stopped after %d sweeps without settling", _MAX_SWEEPS)
        return choice, start, curves, data

    def _summary(self, choice: dict, start: dict, curves: dict, data: dict) -> dict:
        """The result fields both tasks share."""
        thresholds = np.full(self.num_classes, self.grid[self._default_k()])
        empty_area = [0] * self.num_classes
        score_curves, area_curves = [None] * self.num_classes, [None] * self.num_classes
        for c, (j, k) in choice.items():
            thresholds[c], empty_area[c] = self.grid[k], int(self.areas[j])
            score_curves[c], area_curves[c] = floats(curves[c][j]), floats(curves[c][:, k])
        tuned, default = self._stats(data, choice), self._stats(data, start)
        result = {
            "thresholds": floats(thresholds),
            "empty_area": empty_area,
            "metric": self.metric,
            "empty": "nan" if math.isnan(self.empty) else 1,
            "score": float(image_score(*tuned, self._kind, self.empty)),
            "default_score": float(image_score(*default, self._kind, self.empty)),
            "score_per_class": floats(mean_defined(pair_scores(*tuned, self._kind, self.empty), axis=0)),
            "default_score_per_class": floats(mean_defined(pair_scores(*default, self._kind, self.empty), axis=0)),
            "images": len(self.hists),
            "curves": {"thresholds": floats(self.grid), "score": score_curves,
                       "empty_area": [int(a) for a in self.areas], "score_empty_area": area_curves},
        }
        logger.debug("per-image thresholds: %s %.4f -> %.4f (in-sample)", self.metric, result["default_score"],
                     result["score"])
        return result


def _emptied(area: np.ndarray, areas: np.ndarray) -> np.ndarray:
    """``(areas, images, thresholds)``: the predicted area (images, thresholds) is below each candidate."""
    return area[None] < areas[:, None, None]


# --------------------------------------------------------------------------- multiclass


class MulticlassImageTuner(_ImageTuner):
    """Per-class softmax thresholds and empty areas maximising ``miou_image`` or ``dice_image``."""

    COUNTS = ("hists", "truths")

    def __init__(self, num_classes: int, fallback: int | None = 0, metric: str = "miou_image", empty: float = 1.0,
                 bins: int = 100, empty_areas: Sequence[int] = DEFAULT_EMPTY_AREAS, tune_empty_area: bool = True):
        if fallback is not None and not 0 <= fallback < num_classes:
            raise ValueError(f"fallback {fallback} is not a class index below {num_classes}")
        super().__init__(num_classes, metric, empty, bins, empty_areas, tune_empty_area)
        self.fallback = fallback
        self.truths: list[np.ndarray] = []  # one (C,) array per image: its true pixels of each class

    def update(self, probs: np.ndarray, target: np.ndarray, ignore_index: int = 255) -> None:
        """Add one image: ``probs`` ``(C, H, W)`` softmax output, ``target`` ``(H, W)`` labels."""
        probs = as_probabilities(probs)
        target = np.asarray(target)
        n, k = self.num_classes, len(self.grid)
        if probs.ndim != 3 or probs.shape[0] != n or target.shape != probs.shape[1:]:
            raise ValueError(f"expected probs ({n}, H, W) and target (H, W), got {probs.shape} and {target.shape}")
        pred = probs.argmax(axis=0)
        slots = score_slot(self.grid, np.take_along_axis(probs, pred[None], axis=0)[0])
        valid = target != ignore_index
        truth = np.where(valid, target, 0).astype(np.int64)
        if truth.size and (truth.min() < 0 or truth.max() >= n):
            raise ValueError(f"target labels must be below {n} or {ignore_index}")
        fallback = -1 if self.fallback is None else self.fallback
        category = np.where(truth == pred, SAME, np.where(truth == fallback, FALLBACK, OTHER))
        category = np.where(valid, category, _IGNORED)
        index = (pred * 4 + category) * k + slots
        self.hists.append(np.bincount(index.ravel(), minlength=n * 4 * k).reshape(n, 4, k).astype(np.int32))
        self.truths.append(np.bincount(truth[valid], minlength=n))

    def _tunable(self) -> list[int]:
        return [c for c in range(self.num_classes) if c != self.fallback]

    def _default_k(self) -> int:
        return 0

    def _k_order(self, k: np.ndarray) -> np.ndarray:
        return k

    def _prepare(self) -> dict:
        hist = np.stack(self.hists)  # (images, C, 4, slots)
        cumulative = np.cumsum(hist, axis=-1, dtype=np.int64)
        tp0 = cumulative[:, :, SAME, -1]
        fp0 = cumulative[:, :, FALLBACK, -1] + cumulative[:, :, OTHER, -1]
        return {"cumulative": cumulative, "tp0": tp0, "fp0": fp0, "fn0": np.stack(self.truths) - tp0}

    def _removed(self, data: dict, c: int, images: slice) -> np.ndarray:
        """``(areas, thresholds, images, 3)``: pixels class ``c`` loses, by truth category."""
        cumulative = data["cumulative"][images, c]  # (images, 4, slots)
        total = cumulative[..., -1]  # (images, 4)
        below = np.concatenate([np.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], axis=-1)
        area = total.sum(-1)[:, None] - below.sum(1)  # predicted pixels of c kept by each threshold
        emptied = _emptied(area, self.areas)[..., None]  # (areas, images, thresholds, 1)
        removed = np.where(emptied, total[None, :, None, :3], below[None, :, :3].transpose(0, 1, 3, 2))
        return removed.transpose(0, 2, 1, 3)

    def _removed_all(self, data: dict, choice: dict, images: slice = slice(None)) -> np.ndarray:
        n_images = len(data["tp0"][images])
        removed = np.zeros((n_images, self.num_classes, 3), dtype=np.int64)
        for c, (j, k) in choice.items():
            cumulative = data["cumulative"][images, c]
            total = cumulative[..., -1]
            below = cumulative[..., k - 1] if k > 0 else np.zeros_like(total)
            emptied = total.sum(-1) - below.sum(-1) < self.areas[j]
            removed[:, c] = np.where(emptied[:, None], total[:, :3], below[:, :3])
        return removed

    def _stats(self, data: dict, choice: dict):
        return removal_stats(data["tp0"], data["fp0"], data["fn0"], self._removed_all(data, choice), self.fallback)

    def _candidates(self, data: dict, c: int, choice: dict, images: slice):
        others = {d: v for d, v in choice.items() if d != c}
        base = removal_stats(data["tp0"][images], data["fp0"][images], data["fn0"][images],
                             self._removed_all(data, others, images), self.fallback)
        cols = [c] if self.fallback is None else [c, self.fallback]
        removed = self._removed(data, c, images)
        local = np.zeros((*removed.shape[:3], len(cols), 3), dtype=np.int64)
        local[..., 0, :] = removed
        tp, fp, fn = removal_stats(*(x[:, cols] for x in base), local, None if self.fallback is None else 1)
        return cols, tp, fp, fn

    def fit(self, with_empty_area: bool = True) -> dict:
        """Tuned thresholds and empty areas with the score before and after (in-sample);
        ``with_empty_area=False``: thresholds alone (every empty area 0), from the same counts."""
        if not with_empty_area:
            return self._without_areas().fit()
        result = self._summary(*self._fit_rule())
        return {**result, "min_area": [0] * self.num_classes, "fallback": self.fallback}


# --------------------------------------------------------------------------- multilabel


class MultilabelImageTuner(_ImageTuner):
    """Per-class sigmoid thresholds and empty areas maximising ``dice_image`` or ``miou_image``."""

    COUNTS = ("hists",)

    def update(self, probs: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Add one image ``(C, H, W)`` or a batch ``(B, C, H, W)`` of probabilities; ``target`` the
        same shape in {0, 1}; ``valid`` ``(H, W)`` or ``(B, H, W)``, False where truth is ignored."""
        probs = as_probabilities(probs)
        target = np.asarray(target).astype(bool)
        if probs.ndim == 3:
            probs, target = probs[None], target[None]
            valid = None if valid is None else np.asarray(valid)[None]
        n, k = self.num_classes, len(self.grid)
        if probs.ndim != 4 or probs.shape[1] != n or target.shape != probs.shape:
            raise ValueError(f"expected probs and target of shape ([B,] {n}, H, W), "
                             f"got {probs.shape} and {target.shape}")
        shape = probs.shape[:1] + probs.shape[2:]
        valid = np.ones(shape, bool) if valid is None else np.broadcast_to(np.asarray(valid, dtype=bool), shape)
        offsets = (np.arange(n) * 3)[:, None, None]
        for p, t, v in zip(probs, target, valid):
            category = np.where(v[None], np.where(t, _POS, _NEG), _ML_IGNORED)
            index = (offsets + category) * k + score_slot(self.grid, p)
            self.hists.append(np.bincount(index.ravel(), minlength=n * 3 * k).reshape(n, 3, k).astype(np.int32))

    def _tunable(self) -> list[int]:
        return list(range(self.num_classes))

    def _default_k(self) -> int:
        return int(np.argmin(np.abs(self.grid - 0.5)))

    def _k_order(self, k: np.ndarray) -> np.ndarray:
        return np.abs(self.grid[k] - 0.5)

    def _prepare(self) -> dict:
        # kept[i, c, category, k]: pixels with score >= grid[k], a reverse cumulative sum over slots
        hist = np.stack(self.hists)
        return {"kept": np.cumsum(hist[..., ::-1], axis=-1, dtype=np.int64)[..., ::-1]}

    def _stats(self, data: dict, choice: dict):
        kept = data["kept"]  # (images, C, 3, slots)
        counts = np.zeros((3, len(kept), self.num_classes), dtype=np.int64)
        for c, (j, k) in choice.items():
            at = kept[:, c, :, k]  # (images, 3)
            emptied = at.sum(-1) < self.areas[j]
            counts[0, :, c] = np.where(emptied, 0, at[:, _POS])
            counts[1, :, c] = np.where(emptied, 0, at[:, _NEG])
            counts[2, :, c] = kept[:, c, _POS, 0] - counts[0, :, c]
        return counts[0], counts[1], counts[2]

    def _candidates(self, data: dict, c: int, choice: dict, images: slice):
        kept = data["kept"][images, c]  # (images, 3, slots)
        keep = ~_emptied(kept.sum(1), self.areas)  # (areas, images, slots)
        tp = np.where(keep, kept[None, :, _POS], 0)
        fp = np.where(keep, kept[None, :, _NEG], 0)
        fn = kept[None, :, _POS, :1] - tp
        return [c], *(x.transpose(0, 2, 1)[..., None] for x in (tp, fp, fn))

    def fit(self, with_empty_area: bool = True) -> dict:
        """Tuned thresholds and empty areas with the score before and after (in-sample);
        ``with_empty_area=False``: thresholds alone (every empty area 0), from the same counts."""
        if not with_empty_area:
            return self._without_areas().fit()
        return self._summary(*self._fit_rule())


# --------------------------------------------------------------------------- public API


def make_image_tuner(task: str, num_classes: int, fallback: int | None = 0, metric: str = "miou_image",
                     empty: float = 1.0, bins: int = 100, empty_areas: Sequence[int] = DEFAULT_EMPTY_AREAS,
                     tune_empty_area: bool = True) -> _ImageTuner:
    """A per-image tuner for ``task``; ``fallback`` is ignored for multilabel."""
    if task == "multiclass":
        return MulticlassImageTuner(num_classes, fallback, metric, empty, bins, empty_areas, tune_empty_area)
    if task == "multilabel":
        return MultilabelImageTuner(num_classes, metric, empty, bins, empty_areas, tune_empty_area)
    raise ValueError(f"task must be 'multiclass' or 'multilabel', not {task!r}")
