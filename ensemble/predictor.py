"""Batched ensemble prediction: several members, TTA, soft or hard voting, original sizes back.

All members stay loaded; a batch of images is decoded once, resized to each member's input size,
passed through every member (and every TTA view), and the probabilities are accumulated in
float32 at the output size, then divided (soft voting). Hard voting averages one-hot votes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainables.checkpoint import load_checkpoint, model_from_checkpoint
from trainables.dataset import normalise
from trainables.loop import resolve_amp, resolve_device

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


def load_member(path: str | Path, name: str, device: torch.device, channels_last: bool = False) -> Member:
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt).to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    size = tuple(int(v) for v in ckpt["config"]["train"]["image_size"])
    return Member(name, int(ckpt["fold"] if ckpt["fold"] is not None else -1), model, size, ckpt["task"],
                  ckpt["class_names"], ckpt["score"], {"config": ckpt["config"], "epoch": ckpt["epoch"]})


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
    def __init__(self, members: list[Member], tta: TTA | None = None, voting: str = "soft",
                 device: str | torch.device = "auto", amp: str = "auto"):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members, self.tta, self.voting = members, tta or TTA(), voting
        self.device = resolve_device(str(device))
        self.amp = resolve_amp(amp, self.device)
        self.task = members[0].task
        self.num_classes = len(members[0].class_names)

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        if self.task == "multilabel":
            return torch.sigmoid(logits)
        if self.voting == "hard":
            return F.one_hot(logits.argmax(1), self.num_classes).permute(0, 3, 1, 2).float()
        return torch.softmax(logits, 1)

    @torch.no_grad()
    def _member_probs(self, member: Member, x: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        acc = torch.zeros((x.shape[0], self.num_classes, *out_size), device=self.device)
        views = self.tta.views()
        for scale, flip in views:
            size = member.image_size if scale == 1.0 else tuple(max(32, round(s * scale / 32) * 32)
                                                                for s in member.image_size)
            inp = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            if flip:
                inp = inp.flip(-1)
            with torch.autocast(device_type=self.device.type, dtype=self.amp or torch.float32,
                                enabled=self.amp is not None):
                logits = member.model(inp).float()
            if flip:
                logits = logits.flip(-1)
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
            acc += self._activate(logits)
        return acc / len(views)

    @torch.no_grad()
    def predict_batch(self, images: list[np.ndarray], per_member: bool = False) -> list[np.ndarray]:
        """Probabilities at each image's own size: (C, H, W) float32 averaged over members and views,
        or (M, C, H, W) with one slice per member when ``per_member``."""
        groups: dict[tuple[int, int], list[int]] = {}  # images of one size are batched together
        for i, img in enumerate(images):
            groups.setdefault(img.shape[:2], []).append(i)
        results: dict[int, np.ndarray] = {}
        for size, idx in groups.items():
            x = normalise(np.stack([images[i] for i in idx])).to(self.device)
            probs = torch.stack([self._member_probs(m, x, size) for m in self.members], 1)  # (B, M, C, H, W)
            probs = probs if per_member else probs.mean(1)
            for j, i in enumerate(idx):
                results[i] = probs[j].cpu().numpy()
        return [results[i] for i in range(len(images))]

    def decide(self, probs: np.ndarray, thresholds: dict | None = None, void_label: int = 255) -> np.ndarray:
        """Labels (H, W) for multiclass, booleans (C, H, W) for multilabel, with tuned thresholds if given."""
        from ensemble.thresholds import apply_multiclass, apply_multilabel

        if self.task == "multilabel":
            t = thresholds["thresholds"] if thresholds else [0.5] * self.num_classes
            return apply_multilabel(probs, t)
        if not thresholds:
            return probs.argmax(0).astype(np.uint8)
        return apply_multiclass(probs, thresholds["thresholds"], thresholds["fallback"], thresholds.get("min_area"),
                                void_label=void_label).astype(np.uint8)
