"""Rare-class oversampling: draw training images that contain rare classes more often.

Each image's weight comes from the frequency of its rarest class, frequency being the share of
training images that contain the class (background left out)::

    weight_i = min(cap, (f_common / f_rarest(i)) ** strength)

where ``f_common`` is the frequency of the most common class, so an image holding only common
classes keeps weight 1 and none gets more than ``cap``. ``train.oversample`` is the strength
(0 = off: plain shuffling; 0.5 is the square-root repeat factor of LVIS, 1 inverse frequency),
``train.oversample_cap`` the cap. The trainer draws ``len(train_set)`` images per epoch with
replacement through a ``WeightedRandomSampler`` on its seeded generator.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from trainables.errors import ConfigError

logger = logging.getLogger(__name__)


def check_settings(train: dict) -> tuple[float, float]:
    strength, cap = train["oversample"], train["oversample_cap"]
    if strength is False or strength is None:
        strength = 0.0
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength < 0:
        raise ConfigError("config", "train.oversample", f"expected a strength >= 0 (0 = off), got {strength!r}")
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap < 1:
        raise ConfigError("config", "train.oversample_cap", f"expected a weight cap >= 1, got {cap!r}")
    return float(strength), float(cap)


def rare_class_weights(presence: np.ndarray, strength: float, cap: float, has_background: bool = True) -> np.ndarray:
    """(N,) float64 weights of the images whose (N, C) class presence is given."""
    presence = np.asarray(presence, dtype=bool)
    if has_background:
        presence = presence[:, 1:]
    freq = presence.mean(0)
    present = freq > 0
    if not present.any() or strength == 0:
        return np.ones(len(presence))
    rarest = np.where(presence, freq, np.inf).min(1)  # inf: an image with no (non-background) class
    ratio = np.where(np.isfinite(rarest), freq.max() / rarest, 1.0)
    return np.minimum(ratio ** strength, cap)


def build_sampler(train: dict, presence: np.ndarray, has_background: bool,
                  generator: torch.Generator) -> WeightedRandomSampler | None:
    """The configured sampler over the training images (rows of ``presence``), or None when off."""
    strength, cap = check_settings(train)
    if strength == 0:
        return None
    weights = rare_class_weights(presence, strength, cap, has_background)
    logger.info("oversampling rare classes: image weights %.2f..%.2f (strength %g, cap %g)",
                weights.min(), weights.max(), strength, cap)
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples=len(weights),
                                 replacement=True, generator=generator)
