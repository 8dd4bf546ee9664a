"""The decision rules the tuners fit, as prediction applies them: no tuner, no torch.

What ``bundle.json``'s ``rule`` holds (``{"thresholds": <tuner fit or null>, "crf": <params or
null>, "max_size": ...}``) and what :meth:`ensemble.predictor.Ensemble.decide` applies:

* :class:`ThresholdRule`: class-wise thresholds with the multiclass fallback, minimum component
  areas and per-image empty areas; the fit of ``ensemble/thresholds.py`` (pixel tuner) or
  ``ensemble/image_thresholds.py`` (per-image tuner). The rules themselves are documented there;
  :func:`apply_multiclass`, :func:`apply_multilabel`, :func:`apply_empty_area` and
  :func:`apply_image_rule` apply them to one image.
* :class:`CrfRule`: the DenseCRF's parameters (``ensemble/crf.py`` fits them;
  :mod:`ensemble.crf_apply` runs it).
* :class:`DecisionRule`: both, at the resolution they were tuned at (``max_size``): areas are pixel
  counts there (:func:`areas_at` scales them to each image's size) and the CRF runs there.

Each rule is a frozen dataclass read from and written to the ``bundle.json`` form
(``from_dict``/``to_dict``; the tuners' informational fields, curves and scores, are not part of
the decision and not kept) with ``apply(...)``. The functions take the same rules as plain dicts
(what the tuners' ``fit()`` returns), as ``ensemble/run.py`` and the tuners pass them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from ensemble.crf_apply import refine_at
from trainables.inputs import working_size

logger = logging.getLogger(__name__)

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
AREA_KEYS = ("min_area", "empty_area")


def _ints(values) -> tuple[int, ...] | None:
    return None if values is None else tuple(int(v) for v in values)


def _as_dict(rule) -> dict | None:
    return rule.to_dict() if isinstance(rule, ThresholdRule) else rule


# --------------------------------------------------------------------------- the decisions


def apply_multilabel(probs: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Binary masks ``p_c >= t_c`` for ``(C, H, W)`` or ``(B, C, H, W)`` probabilities."""
    probs = np.asarray(probs, dtype=np.float64)
    return probs >= np.asarray(thresholds, dtype=np.float64)[:, None, None]


def apply_multiclass(probs: np.ndarray, thresholds: Sequence[float], fallback: int | None,
                     min_area: Sequence[int] | None = None, void_label: int = 255) -> np.ndarray:
    """Labels ``(H, W)`` from softmax ``probs`` ``(C, H, W)``: argmax; below ``t_label`` (or in an
    8-connected argmax component of class c smaller than ``min_area[c]``) to ``fallback``, or to
    ``void_label`` without one (``ensemble/thresholds.py`` describes the rule)."""
    probs = np.asarray(probs, dtype=np.float64)
    if fallback is None and 0 <= void_label < len(probs):
        raise ValueError(f"void_label {void_label} is a class index")
    # A pixel of the fallback class below its threshold would fall to itself: no effect.
    thresholds = np.asarray(thresholds, dtype=np.float64)
    fill = void_label if fallback is None else fallback
    argmax = probs.argmax(axis=0)
    confidence = np.take_along_axis(probs, argmax[None], axis=0)[0]
    drop = confidence < thresholds[argmax]
    for c, area in enumerate(() if min_area is None else min_area):
        if area <= 0 or c == fallback:
            continue
        components, _ = ndimage.label(argmax == c, structure=EIGHT_CONNECTED)
        small = np.bincount(components.ravel()) < area
        small[0] = False  # the pixels outside class c
        drop |= small[components]
    return np.where(drop, fill, argmax)


def apply_empty_area(decision: np.ndarray, empty_area: Sequence[int] | None, task: str,
                     fallback: int | None = None, void_label: int = 255) -> np.ndarray:
    """Empty each class predicted on fewer than ``empty_area[c]`` pixels of an image.

    multiclass: ``decision`` ``(H, W)`` labels; those pixels become ``fallback`` (or ``void_label``).
    multilabel: ``decision`` ``(C, H, W)`` or ``(B, C, H, W)`` booleans; the channel becomes False.
    """
    if not empty_area or not any(a > 0 for a in empty_area):
        return decision
    decision = np.array(decision, copy=True)
    if task == "multilabel":
        batch = decision if decision.ndim == 4 else decision[None]
        area = batch.sum(axis=(2, 3))  # (B, C)
        batch &= ~(area < np.asarray(empty_area))[:, :, None, None]
        return batch if decision.ndim == 4 else batch[0]
    fill = void_label if fallback is None else fallback
    area = np.bincount(decision.ravel().astype(np.int64), minlength=len(empty_area))
    for c, minimum in enumerate(empty_area):
        if c != fallback and 0 < area[c] < minimum:
            decision[decision == c] = fill
    return decision


def apply_image_rule(probs: np.ndarray, rule: Mapping, task: str, void_label: int = 255) -> np.ndarray:
    """The decision of a fitted rule (either tuner's ``fit()``) on one image's probabilities
    ``(C, H, W)``: thresholds (and minimum areas), then empty areas when present."""
    if task == "multilabel":
        return apply_empty_area(apply_multilabel(probs, rule["thresholds"]), rule.get("empty_area"), task)
    labels = apply_multiclass(probs, rule["thresholds"], rule["fallback"], rule.get("min_area"), void_label)
    return apply_empty_area(labels, rule.get("empty_area"), task, rule["fallback"], void_label)


def areas_at(rule: Mapping | None, height: int, width: int) -> dict | None:
    """``rule`` with its pixel areas for an image of ``height x width``: the areas were counted at
    that image downscaled to ``rule["max_size"]`` (as training and the out-of-fold predictions saw
    it), so they grow by the ratio of the two pixel counts. No ``max_size``: ``rule`` as it is."""
    if not rule or not rule.get("max_size"):
        return rule
    h, w = working_size(height, width, rule["max_size"])
    factor = height * width / (h * w)
    if factor == 1:
        return rule
    return {**rule, **{key: [int(round(a * factor)) for a in rule[key]] for key in AREA_KEYS if rule.get(key)}}


def decide(probs: np.ndarray, rule, task: str, void_label: int = 255) -> np.ndarray:
    """The decision on one image's probabilities ``(C, H, W)``: labels ``(H, W)`` uint8 (multiclass)
    or booleans ``(C, H, W)`` (multilabel); ``rule`` (a dict or a :class:`ThresholdRule`) None is
    argmax / 0.5. A per-image rule (with ``empty_area``) or a pixel rule, its areas at the image's
    size (:func:`areas_at`)."""
    rule = areas_at(_as_dict(rule), *np.shape(probs)[-2:])
    if rule and "empty_area" in rule:
        out = apply_image_rule(probs, rule, task, void_label)
        return out if task == "multilabel" else out.astype(np.uint8)
    if task == "multilabel":
        return apply_multilabel(probs, rule["thresholds"] if rule else [0.5] * len(probs))
    if not rule:
        return np.asarray(probs).argmax(0).astype(np.uint8)
    return apply_multiclass(probs, rule["thresholds"], rule["fallback"], rule.get("min_area"),
                            void_label=void_label).astype(np.uint8)


# --------------------------------------------------------------------------- the rule objects


@dataclass(frozen=True)
class ThresholdRule:
    """Class-wise thresholds (``fallback``: the multiclass background class, None: void), minimum
    component areas and per-image empty areas (None: not part of the rule), areas counted at
    ``max_size`` (None: at the image's own size)."""

    thresholds: tuple[float, ...]
    fallback: int | None = None
    min_area: tuple[int, ...] | None = None
    empty_area: tuple[int, ...] | None = None
    max_size: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        object.__setattr__(self, "min_area", _ints(self.min_area))
        object.__setattr__(self, "empty_area", _ints(self.empty_area))

    @classmethod
    def from_dict(cls, d: Mapping) -> "ThresholdRule":
        """From a tuner's fit (``bundle.json``'s ``rule.thresholds``, plus ``max_size``)."""
        return cls(d["thresholds"], d.get("fallback"), d.get("min_area"), d.get("empty_area"), d.get("max_size"))

    def to_dict(self) -> dict:
        out: dict = {"thresholds": list(self.thresholds), "fallback": self.fallback}
        for key in AREA_KEYS:
            if getattr(self, key) is not None:
                out[key] = list(getattr(self, key))
        if self.max_size is not None:
            out["max_size"] = self.max_size
        return out

    def at(self, height: int, width: int) -> "ThresholdRule":
        """This rule with its areas for an image of ``height x width`` (:func:`areas_at`), no
        ``max_size`` left to scale by."""
        scaled = areas_at(self.to_dict(), height, width)
        return ThresholdRule.from_dict({**scaled, "max_size": None})

    def apply(self, probs: np.ndarray, task: str, void_label: int = 255) -> np.ndarray:
        """:func:`decide` with this rule."""
        return decide(probs, self.to_dict(), task, void_label)


@dataclass(frozen=True)
class CrfRule:
    """The DenseCRF's kernel parameters, run at ``max_size`` (:func:`ensemble.crf_apply.refine_at`)."""

    params: tuple[tuple[str, float], ...]
    max_size: int | None = None

    def __post_init__(self):
        if isinstance(self.params, Mapping):
            object.__setattr__(self, "params", tuple(sorted(self.params.items())))

    @classmethod
    def from_dict(cls, params: Mapping, max_size: int | None = None) -> "CrfRule":
        return cls(tuple(sorted(params.items())), max_size)

    def to_dict(self) -> dict:
        return dict(self.params)

    def apply(self, probs: np.ndarray, image: np.ndarray, refine: Callable | None = None) -> np.ndarray:
        """Refined probabilities; ``refine(probs, image, params)``: the CRF (default
        :func:`ensemble.crf_apply.refine`)."""
        return refine_at(probs, image, self.to_dict(), self.max_size, refine)


@dataclass(frozen=True)
class DecisionRule:
    """A bundle's decision rule: thresholds (None: argmax / 0.5), CRF (None: none) and the
    resolution both were tuned at."""

    thresholds: ThresholdRule | None = None
    crf: CrfRule | None = None
    max_size: int | None = None

    @classmethod
    def from_dict(cls, rule: Mapping | None) -> "DecisionRule":
        """From ``bundle.json``'s ``rule`` (``{"thresholds", "crf", "max_size"}``; missing keys: none)."""
        rule = rule or {}
        max_size = rule.get("max_size")
        thresholds = ThresholdRule.from_dict({**rule["thresholds"], "max_size": max_size}) \
            if rule.get("thresholds") else None
        crf = CrfRule.from_dict(rule["crf"], max_size) if rule.get("crf") else None
        return cls(thresholds, crf, max_size)

    def to_dict(self) -> dict:
        thresholds = None
        if self.thresholds is not None:
            thresholds = {k: v for k, v in self.thresholds.to_dict().items() if k != "max_size"}
        return {"thresholds": thresholds, "crf": None if self.crf is None else self.crf.to_dict(),
                "max_size": self.max_size}

    def refiner(self, refine: Callable | None = None) -> Callable | None:
        """``refine(probs, image)`` of the CRF, or None without one."""
        if self.crf is None:
            return None
        return lambda probs, image: self.crf.apply(probs, image, refine)

    def apply(self, probs: np.ndarray, image: np.ndarray | None, task: str, void_label: int = 255) -> np.ndarray:
        """The decision on one image: refined by the CRF when there is one, then thresholded."""
        if self.crf is not None:
            probs = self.crf.apply(probs, image)
        return decide(probs, self.thresholds, task, void_label)
