"""Losses by name, with class weights, ignore_index and weighted combinations.

``loss.name`` is one registered name (``ce``, ``focal``, ``dice``, ``jaccard``, ``lovasz``,
``tversky``, ``bce``) or a weighted sum such as ``"0.5*focal+0.5*dice"``. smp's losses are used
wherever smp has one. Every loss runs in float32 on float32 logits, also under autocast: smp's
soft Dice overflows in fp16 on large inputs (qubvel/segmentation_models.pytorch#463).

Class weights (``loss.class_weights``): ``none``, ``inverse`` (1/frequency over all training
pixels), ``sqrt_inverse``, ``median`` (median frequency balancing, Eigen & Fergus 2015: a class's
frequency is its pixels over the pixels of the training images that contain it, and its weight
the median of these frequencies over its own), or an explicit vector with one weight per class;
normalised to mean 1. Lovasz takes no weights.
"""
from __future__ import annotations

import logging
import re
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainables.config import check_setting
from trainables.errors import ConfigError

logger = logging.getLogger(__name__)


def class_weights(spec, pixel_counts: np.ndarray, image_pixels: np.ndarray | None = None) -> list[float] | None:
    """Resolve a weighting scheme or vector into per-class weights with mean 1 (None: unweighted).

    ``image_pixels[c]``: pixels of the images containing class ``c`` (for ``median``; without it
    every image counts, which makes ``median`` the same as ``inverse``)."""
    num_classes = len(pixel_counts)
    check_setting("loss.class_weights", spec, num_classes)
    if spec is None or (isinstance(spec, str) and spec == "none"):
        return None
    if isinstance(spec, (list, tuple)):
        weights = np.asarray(spec, dtype=float)
    else:  # a scheme
        freq = np.asarray(pixel_counts, dtype=float) / max(float(np.sum(pixel_counts)), 1.0)
        present = freq > 0
        weights = np.ones(num_classes)
        if spec == "inverse":
            weights[present] = 1.0 / freq[present]
        elif spec == "sqrt_inverse":
            weights[present] = 1.0 / np.sqrt(freq[present])
        else:
            if image_pixels is not None:
                freq = np.asarray(pixel_counts, dtype=float) / np.maximum(np.asarray(image_pixels, dtype=float), 1.0)
            weights[present] = np.median(freq[present]) / freq[present]
        weights[present] /= weights[present].mean()
    return (weights / weights.mean()).tolist()


class MultilabelBCE(nn.Module):
    """Binary cross-entropy per class channel, with per-class weights and ignored pixels."""

    def __init__(self, weights: list[float] | None, ignore_index: int):
        super().__init__()
        self.register_buffer("weights", torch.tensor(weights) if weights else None)
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = (target != self.ignore_index).float()
        loss = F.binary_cross_entropy_with_logits(logits, target.float() * valid, reduction="none") * valid
        if self.weights is not None:
            loss = loss * self.weights.view(1, -1, 1, 1)
        return loss.sum() / valid.sum().clamp_min(1.0)


class MultilabelFocal(nn.Module):
    """smp's focal loss for multilabel targets, masking ignored pixels per channel (smp's own
    FocalLoss indexes (B, H, W) channels with a (B, C, H, W) mask and fails in multilabel mode)."""

    def __init__(self, gamma: float, weights: list[float] | None, ignore_index: int):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weights", torch.tensor(weights) if weights else None)
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = (target != self.ignore_index).float()
        bce = F.binary_cross_entropy_with_logits(logits, target.float() * valid, reduction="none")
        focal = (1.0 - torch.exp(-bce)).pow(self.gamma) * bce * valid
        per_class = focal.sum((0, 2, 3)) / valid.sum((0, 2, 3)).clamp_min(1.0)
        if self.weights is None:
            return per_class.mean()
        return (per_class * self.weights).sum() / self.weights.sum()


def _ce(task, weights, cfg, ignore_index):
    if task == "multilabel":
        return MultilabelBCE(weights, ignore_index)
    weight = torch.tensor(weights, dtype=torch.float32) if weights else None
    return nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index, label_smoothing=cfg["label_smoothing"])


def _smp(name: str) -> Callable:
    def build(task, weights, cfg, ignore_index):
        from segmentation_models_pytorch import losses as L

        if name == "focal":
            if task == "multilabel":
                return MultilabelFocal(cfg["focal_gamma"], weights, ignore_index)
            return L.FocalLoss(task, gamma=cfg["focal_gamma"], ignore_index=ignore_index, class_weights=weights)
        if name == "dice":
            return L.DiceLoss(task, ignore_index=ignore_index, class_weights=weights)
        if name == "jaccard":
            return L.JaccardLoss(task, ignore_index=ignore_index, class_weights=weights)
        if name == "tversky":
            return L.TverskyLoss(task, alpha=cfg["tversky_alpha"], beta=cfg["tversky_beta"],
                                 ignore_index=ignore_index, class_weights=weights)
        return L.LovaszLoss(task, ignore_index=ignore_index)

    return build


LOSSES: dict[str, Callable] = {
    "ce": _ce,
    "bce": _ce,
    "focal": _smp("focal"),
    "dice": _smp("dice"),
    "jaccard": _smp("jaccard"),
    "lovasz": _smp("lovasz"),
    "tversky": _smp("tversky"),
}

_TERM = re.compile(r"^\s*(?:(\d*\.?\d+(?:e-?\d+)?)\s*\*\s*)?([a-z_]+)\s*$")


def parse_combo(name: str) -> list[tuple[float, str]]:
    """``"0.5*focal+0.5*dice"`` -> ``[(0.5, "focal"), (0.5, "dice")]``; a bare name has weight 1."""
    terms = []
    for part in str(name).split("+"):
        match = _TERM.match(part.lower())
        if not match or match.group(2) not in LOSSES:
            raise ConfigError("config", "loss.name", f"cannot read {part.strip()!r} in {name!r}; "
                                                     f"losses: {', '.join(LOSSES)}, combined as '0.5*focal+0.5*dice'")
        terms.append((float(match.group(1) or 1.0), match.group(2)))
    return terms


class CombinedLoss(nn.Module):
    """Weighted sum of losses, computed in float32 outside autocast."""

    def __init__(self, terms: list[tuple[float, str, nn.Module]], task: str):
        super().__init__()
        self.weights = [w for w, _, _ in terms]
        self.names = [n for _, n, _ in terms]
        self.losses = nn.ModuleList([m for _, _, m in terms])
        self.task = task

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            total = logits.new_zeros(())
            for weight, loss in zip(self.weights, self.losses):
                total = total + weight * loss(logits, target)
            return total


def build_loss(loss_cfg: dict, task: str, num_classes: int, pixel_counts: np.ndarray,
               ignore_index: int = 255, image_pixels: np.ndarray | None = None) -> CombinedLoss:
    weights = class_weights(loss_cfg.get("class_weights"), np.asarray(pixel_counts), image_pixels)
    terms = [(w, n, LOSSES[n](task, weights, loss_cfg, ignore_index)) for w, n in parse_combo(loss_cfg["name"])]
    return CombinedLoss(terms, task)
