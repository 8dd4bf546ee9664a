"""Batched ensemble prediction: several members, TTA, soft or hard voting, original sizes back.

All members stay loaded; a batch of images is decoded once and passed through every member (and
every TTA view). Each member's input is made as its training validated it
(:class:`trainables.preprocess.InputSpec`: area-shrunk to ``data.max_size``, then resized to its
input size, or stepped over by sliding windows of its crop size when trained on native-resolution
crops), so a bundle predicts on the tensors every reported number was measured on.
Probabilities are accumulated in float32 at the output size as a running sum over members, then
divided (soft voting; nnU-Net's ``average_probabilities``), so memory does not grow with the
number of members. Each member counts ``Member.weight`` times (1 by default; a bundle's weights
are decided on the holdout by ``ensemble/combine.py``) and the sum is divided by the total
weight. Hard voting averages votes the same way: each member-view decides at the output size
(argmax, or p >= 0.5 per class for multilabel), and the default decision of the average is the
(weighted) plurality (multiclass) or at least half of the member-views' weight (multilabel).
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from trainables.checkpoint import load_checkpoint, model_from_checkpoint
from trainables.device import resolve_amp, resolve_device
from trainables.preprocess import MEAN, STD, InputSpec, activate, add_probs

logger = logging.getLogger(__name__)


@dataclass
class Member:
    name: str
    fold: int
    model: torch.nn.Module
    image_size: tuple[int, int]
    task: str
    class_names: list[str]
    score: float = float("nan")
    meta: dict = field(default_factory=dict)
    input: str = "resize"  # "resize": trained on images resized to image_size; "tiles": on native-resolution crops
    max_size: int | None = None  # data.max_size of its training (the resolution crops were taken at)
    mean: tuple[float, ...] = MEAN  # normalisation, in 0..255 pixel units
    std: tuple[float, ...] = STD
    weight: float = 1.0  # its share of the soft average (the holdout's combination, ensemble/combine.py); 0: left out

    @property
    def spec(self) -> InputSpec:
        """How an image becomes this member's input (the one definition training validated with)."""
        return InputSpec(self.image_size, self.max_size, self.input, self.mean, self.std)


def check_weights(weights: list[float]) -> float:
    """The total of members' weights, each finite and >= 0 with a positive total; ValueError otherwise."""
    bad = [w for w in weights if not (isinstance(w, numbers.Real) and math.isfinite(w) and w >= 0)]
    if bad:
        raise ValueError(f"member weights must be finite numbers >= 0, got {bad[0]!r}")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError("member weights sum to 0: an ensemble needs a member of positive weight")
    return total


def best_member_index(members: list["Member"], mode: str) -> int:
    """Index of the member with the best validation score in the search's ``mode``; NaN scores last,
    ties to the first."""
    sign = -1.0 if mode == "max" else 1.0
    return min(range(len(members)), key=lambda k: (math.isnan(members[k].score),
                                                    sign * (0.0 if math.isnan(members[k].score) else members[k].score)))


def load_member(path: str | Path, name: str, device: torch.device, channels_last: bool = False) -> Member:
    member = member_from_checkpoint(load_checkpoint(path), name, device, channels_last)
    member.meta["path"] = str(path)  # copied into the bundle
    return member


def member_from_checkpoint(ckpt: dict, name: str, device: torch.device, channels_last: bool = False) -> Member:
    model = model_from_checkpoint(ckpt).to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    cfg = ckpt["config"]
    spec = InputSpec.from_config(cfg)
    return Member(name, int(ckpt["fold"] if ckpt["fold"] is not None else -1), model, spec.image_size, ckpt["task"],
                  ckpt["class_names"], ckpt["score"], {"config": cfg, "epoch": ckpt["epoch"]},
                  input=spec.mode, max_size=spec.max_size)


@dataclass
class TTA:
    hflip: bool = False
    scales: tuple[float, ...] = (1.0,)

    @classmethod
    def parse(cls, text: str | None) -> "TTA":
        """``"none"``, ``"hflip"``, ``"hflip,scales=0.75:1:1.25"``."""
        tta = cls()
        for part in filter(None, (text or "none").split(",")):
            if part == "hflip":
                tta.hflip = True
            elif part.startswith("scales="):
                tta.scales = tuple(float(s) for s in part[len("scales="):].split(":"))
            elif part != "none":
                raise ValueError(f"unknown TTA {part!r}: use none, hflip, scales=0.75:1:1.25")
        return tta

    def views(self) -> list[tuple[float, bool]]:
        return [(s, f) for s in self.scales for f in ((False, True) if self.hflip else (False,))]


class Ensemble:
    """``tile``: the sliding-window size of members trained on native-resolution crops (None:
    each one's training crop size); ``overlap`` between neighbouring windows."""

    def __init__(self, members: list[Member], tta: TTA | None = None, voting: str = "soft",
                 device: str | torch.device = "auto", amp: str = "auto", tile: tuple[int, int] | None = None,
                 overlap: float = 0.5):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members, self.tta, self.voting = members, tta or TTA(), voting
        self.total_weight = check_weights([m.weight for m in members])
        self.device = resolve_device(str(device))
        self.amp = resolve_amp(amp, self.device)
        self.task = members[0].task
        self.num_classes = len(members[0].class_names)
        self.tile, self.overlap = tile, overlap

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        return activate(logits, self.task)

    def _vote(self, probs: torch.Tensor) -> torch.Tensor:
        """A member-view's vote from its probabilities at the output size: its own default decision
        (argmax, or p >= 0.5 per class) as 0/1."""
        if self.task == "multilabel":
            return (probs >= 0.5).float()
        return F.one_hot(probs.argmax(1), self.num_classes).permute(0, 3, 1, 2).float()

    def _forward(self, member: Member, inp: torch.Tensor, flip: bool) -> torch.Tensor:
        """Probabilities of one view: ``inp`` flipped when asked, the output flipped back."""
        if flip:
            inp = inp.flip(-1)
        with torch.autocast(device_type=self.device.type, dtype=self.amp or torch.float32,
                            enabled=self.amp is not None):
            logits = member.model(inp).float()
        probs = self._activate(logits)
        return probs.flip(-1) if flip else probs

    def _inputs(self, images: np.ndarray, inputs: dict, spec: InputSpec) -> Callable[[float], torch.Tensor]:
        """``scale -> model input`` of ``spec``, made once per batch for each distinct spec and scale
        (``inputs`` holds them)."""
        def at(scale: float) -> torch.Tensor:
            key = (spec, scale)
            if key not in inputs:
                inputs[key] = spec.model_input(images, scale).to(self.device)
            return inputs[key]
        return at

    @torch.no_grad()
    def _add_member(self, member: Member, images: np.ndarray, acc: torch.Tensor, inputs: dict) -> None:
        """Add ``member``'s probabilities of every TTA view of the uint8 batch ``images`` into ``acc``."""
        def forward(x: torch.Tensor, flip: bool) -> torch.Tensor:
            return self._forward(member, x, flip)

        at = self._inputs(images, inputs, member.spec)
        if self.voting == "soft":
            add_probs(forward, member.spec, at, acc, self.tta.views(), self.tile, self.overlap)
            return
        for view in self.tta.views():  # hard: each view votes at the output size
            probs = torch.zeros_like(acc)
            add_probs(forward, member.spec, at, probs, [view], self.tile, self.overlap)
            acc += self._vote(probs)

    def _zeros(self, images: np.ndarray) -> torch.Tensor:
        return torch.zeros((images.shape[0], self.num_classes, *images.shape[1:3]), device=self.device)

    @torch.no_grad()
    def member_probs(self, member: Member, images: np.ndarray) -> torch.Tensor:
        """One member's (B, C, H, W) probabilities of the uint8 batch ``images`` (B, H, W, 3),
        averaged over the TTA views."""
        acc = self._zeros(images)
        self._add_member(member, images, acc, {})
        return acc.div_(len(self.tta.views()))

    @torch.no_grad()
    def _accumulate(self, images: np.ndarray, keep: int | None = None, per_member: bool = False):
        """(weighted mean of member probabilities, member ``keep``'s probabilities or None) of one
        same-size batch, as one running sum: memory is one probability map whatever the number
        of members (nnU-Net's ``average_probabilities``). Each member counts ``weight`` times
        (default 1: the plain mean), the sum divided by the total weight. The (B, M, C, H, W)
        stack of unweighted member probabilities instead when ``per_member``."""
        inputs: dict = {}  # one input per distinct spec and scale, shared by the members
        views = len(self.tta.views())
        if per_member:
            stack = []
            for member in self.members:
                acc = self._zeros(images)
                self._add_member(member, images, acc, inputs)
                stack.append(acc.div_(views))
            return torch.stack(stack, 1), None
        acc, kept = self._zeros(images), None
        for k, member in enumerate(self.members):
            weight = member.weight
            if k == keep:  # summed over its views apart, then into the running sum
                kept = self._zeros(images)
                self._add_member(member, images, kept, inputs)
                if weight > 0:
                    acc.add_(kept, alpha=weight)
                kept.div_(views)
            elif weight == 1.0:
                self._add_member(member, images, acc, inputs)
            elif weight > 0:  # weighted: its own sum first (a member of weight 0 is not run)
                part = self._zeros(images)
                self._add_member(member, images, part, inputs)
                acc.add_(part, alpha=weight)
        return acc.div_(self.total_weight * views), kept

    def _by_size(self, images: list[np.ndarray]) -> dict[tuple[int, int], list[int]]:
        groups: dict[tuple[int, int], list[int]] = {}  # images of one size are batched together
        for i, img in enumerate(images):
            groups.setdefault(img.shape[:2], []).append(i)
        return groups

    @torch.no_grad()
    def predict_batch(self, images: list[np.ndarray], per_member: bool = False) -> list[np.ndarray]:
        """Probabilities at each image's own size: (C, H, W) float32 averaged over members and views,
        or (M, C, H, W) with one slice per member when ``per_member``."""
        results: dict[int, np.ndarray] = {}
        for idx in self._by_size(images).values():
            probs, _ = self._accumulate(np.stack([images[i] for i in idx]), per_member=per_member)
            for j, i in enumerate(idx):
                results[i] = probs[j].cpu().numpy()
        return [results[i] for i in range(len(images))]

    @torch.no_grad()
    def predict_batch_and_member(self, images: list[np.ndarray], keep: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ensemble probabilities, member ``keep``'s probabilities) per image, from one pass."""
        results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for idx in self._by_size(images).values():
            probs, kept = self._accumulate(np.stack([images[i] for i in idx]), keep=keep)
            for j, i in enumerate(idx):
                results[i] = (probs[j].cpu().numpy(), kept[j].cpu().numpy())
        return [results[i] for i in range(len(images))]

    def decide(self, probs: np.ndarray, thresholds: dict | None = None, void_label: int = 255) -> np.ndarray:
        """Labels (H, W) for multiclass, booleans (C, H, W) for multilabel, with tuned thresholds if given
        (:func:`ensemble.rules.decide`)."""
        from ensemble.rules import decide

        return decide(probs, thresholds, self.task, void_label)
