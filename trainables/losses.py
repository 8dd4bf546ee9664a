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

:class:`DistillLoss` trains a student on a teacher's probabilities (knowledge distillation): a
temperature-softened soft term mixed with any of the losses above on the true labels.
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


def soft_targets(teacher: torch.Tensor, task: str, temperature: float, eps: float = 1e-8) -> torch.Tensor:
    """The teacher's probabilities (B, C, H, W) softened by ``temperature``: multiclass
    ``softmax(log p / T)`` over the classes (``p`` itself at T=1), multilabel
    ``sigmoid(logit p / T)`` per class. Probabilities are all a teacher stored, so its logits are
    read back as ``log p`` (``logit p``), which is what they are up to a per-pixel constant."""
    if task == "multilabel":
        p = teacher.clamp(eps, 1.0 - eps)
        return torch.sigmoid((torch.log(p) - torch.log1p(-p)) / temperature)
    return torch.softmax(torch.log(teacher.clamp_min(eps)) / temperature, dim=1)


def kd_term(logits: torch.Tensor, teacher: torch.Tensor, task: str, temperature: float,
            valid: torch.Tensor) -> torch.Tensor:
    """The soft-target term without the T^2 factor, averaged over the ``valid`` (B, H, W) pixels:
    multiclass ``KL(teacher_T || softmax(logits / T))`` summed over classes, multilabel the binary
    cross-entropy of ``sigmoid(logits / T)`` against ``teacher_T`` averaged over classes."""
    target = soft_targets(teacher, task, temperature)
    scaled = logits / temperature
    if task == "multilabel":
        per_pixel = F.binary_cross_entropy_with_logits(scaled, target, reduction="none").mean(1)
    else:
        per_pixel = F.kl_div(F.log_softmax(scaled, dim=1), target, reduction="none").sum(1)
    weight = valid.float()
    return (per_pixel * weight).sum() / weight.sum().clamp_min(1.0)


class DistillLoss(nn.Module):
    """Knowledge distillation (Hinton et al. 2015): ``alpha * T^2 * soft term + (1 - alpha) * hard``.

    The target is packed in one tensor, so that one augmentation moves labels and teacher alike:
    (B, K + C, H, W) float with K hard channels (multiclass: K = 1, the label as a float, 255
    ignored; multilabel: K = C, 0/1 with 255 ignored) followed by the teacher's C probabilities.
    A pixel whose teacher values are above 1 (an augmentation's fill, 255) has no teacher: it is
    left out of the soft term. The hard term is ``hard(logits, labels)`` (the configured loss) over
    the images that have a labelled pixel (images without labels, e.g. unlabeled images the teacher
    predicted, add to the soft term only); 0 when none has. ``alpha`` 0 is the hard loss alone,
    1 the soft term alone (the labels are not read).
    """

    def __init__(self, hard: nn.Module, task: str, num_classes: int, *, temperature: float = 1.0, alpha: float = 0.5,
                 ignore_index: int = 255):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.hard, self.task, self.num_classes = hard, task, num_classes
        self.temperature, self.alpha, self.ignore_index = float(temperature), float(alpha), ignore_index

    def unpack(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hard labels as the hard loss takes them, teacher probabilities (B, C, H, W))."""
        k = 1 if self.task == "multiclass" else self.num_classes
        if packed.shape[1] != k + self.num_classes:
            raise ValueError(f"expected {k} label and {self.num_classes} teacher channels, got {packed.shape[1]}")
        labels, teacher = packed[:, :k], packed[:, k:]
        return (labels[:, 0].round().long() if self.task == "multiclass" else labels), teacher

    def forward(self, logits: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits, packed = logits.float(), packed.float()
            labels, teacher = self.unpack(packed)
            total = logits.new_zeros(())
            if self.alpha > 0:
                valid = (teacher <= 1.0).all(1)
                total = total + self.alpha * self.temperature ** 2 * kd_term(
                    logits, teacher.clamp(0.0, 1.0), self.task, self.temperature, valid)
            if self.alpha < 1:
                labelled = (labels != self.ignore_index).flatten(1).any(1)
                if bool(labelled.all()):
                    total = total + (1.0 - self.alpha) * self.hard(logits, labels)
                elif bool(labelled.any()):
                    total = total + (1.0 - self.alpha) * self.hard(logits[labelled], labels[labelled])
            return total
