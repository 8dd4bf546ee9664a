"""Batched ensemble prediction: several members, TTA, soft or hard voting, original sizes back.

All members stay loaded; a batch of images is decoded once and passed through every member (and
every TTA view). A member trained on resized images sees the image resized to its input size; a
member trained on crops at native resolution (``augment.random_crop``) sees it at the training
resolution (after ``data.max_size``) by sliding windows (:mod:`ensemble.tiling`). Probabilities
are accumulated in float32 at the output size as a running sum over members, then divided (soft
voting; nnU-Net's ``average_probabilities``), so memory does not grow with the number of
members. Hard voting averages one-hot votes.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ensemble.tiling import resize_probs, sliding_window, working_size
from trainables.checkpoint import load_checkpoint, model_from_checkpoint
from trainables.dataset import MEAN, STD
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
    input: str = "resize"  # "resize": trained on images resized to image_size; "tiles": on native-resolution crops
    max_size: int | None = None  # data.max_size of its training (the resolution crops were taken at)
    mean: tuple[float, ...] = tuple(float(v) for v in MEAN)  # normalisation, in 0..255 pixel units
    std: tuple[float, ...] = tuple(float(v) for v in STD)


def best_member_index(members: list["Member"], mode: str) -> int:
    """Index of the member with the best validation score in the search's ``mode``; NaN scores last,
    ties to the first."""
    sign = -1.0 if mode == "max" else 1.0
    return min(range(len(members)), key=lambda k: (math.isnan(members[k].score),
                                                    sign * (0.0 if math.isnan(members[k].score) else members[k].score)))


def input_mode(config: dict) -> str:
    """How a member saw its training images: native-resolution crops or resized whole images."""
    augment = config.get("augment") or {}
    return "tiles" if augment.get("random_crop") and not augment.get("albumentations") else "resize"


def load_member(path: str | Path, name: str, device: torch.device, channels_last: bool = False) -> Member:
    member = member_from_checkpoint(load_checkpoint(path), name, device, channels_last)
    member.meta["path"] = str(path)  # copied into the bundle
    return member


def member_from_checkpoint(ckpt: dict, name: str, device: torch.device, channels_last: bool = False) -> Member:
    model = model_from_checkpoint(ckpt).to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    cfg = ckpt["config"]
    size = tuple(int(v) for v in cfg["train"]["image_size"])
    return Member(name, int(ckpt["fold"] if ckpt["fold"] is not None else -1), model, size, ckpt["task"],
                  ckpt["class_names"], ckpt["score"], {"config": cfg, "epoch": ckpt["epoch"]},
                  input=input_mode(cfg), max_size=(cfg.get("data") or {}).get("max_size"))


def normalise_as(images_uint8: np.ndarray, mean, std) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> normalised float32 (B, 3, H, W)."""
    x = (images_uint8.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


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
        self.device = resolve_device(str(device))
        self.amp = resolve_amp(amp, self.device)
        self.task = members[0].task
        self.num_classes = len(members[0].class_names)
        self.tile, self.overlap = tile, overlap

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        if self.task == "multilabel":
            return torch.sigmoid(logits)
        if self.voting == "hard":
            return F.one_hot(logits.argmax(1), self.num_classes).permute(0, 3, 1, 2).float()
        return torch.softmax(logits, 1)

    def _forward(self, member: Member, inp: torch.Tensor, flip: bool) -> torch.Tensor:
        if flip:
            inp = inp.flip(-1)
        with torch.autocast(device_type=self.device.type, dtype=self.amp or torch.float32,
                            enabled=self.amp is not None):
            logits = member.model(inp).float()
        return logits.flip(-1) if flip else logits

    @torch.no_grad()
    def _add_resized(self, member: Member, x: torch.Tensor, acc: torch.Tensor) -> None:
        """Resized-input member: add its probabilities of every TTA view into ``acc`` (B, C, H, W)."""
        out_size = tuple(acc.shape[-2:])
        for scale, flip in self.tta.views():
            size = member.image_size if scale == 1.0 else tuple(max(32, round(s * scale / 32) * 32)
                                                                for s in member.image_size)
            inp = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            logits = self._forward(member, inp, flip)
            acc += self._activate(F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False))

    @torch.no_grad()
    def _add_tiled(self, member: Member, images: np.ndarray, acc: torch.Tensor) -> None:
        """Native-resolution member: add its probabilities of every TTA view into ``acc``. The
        images are taken to its training resolution (after ``data.max_size``) and predicted by
        sliding windows of its crop size (or ``self.tile``); a TTA scale resizes the whole image.
        At the output size the windows add straight into ``acc``; otherwise through one map of
        the working size."""
        out_size = tuple(acc.shape[-2:])
        h, w = working_size(*out_size, member.max_size)
        if (h, w) != out_size:  # as trainables.dataset.downscale did in training
            images = np.stack([cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA) for im in images])
        x = normalise_as(images, member.mean, member.std).to(self.device)
        pad = -torch.tensor(member.mean) / torch.tensor(member.std)  # black, as RandomCrop padded
        tile = self.tile or member.image_size
        views = self.tta.views()
        flips = sorted({f for _, f in views})

        def tile_probs(inp: torch.Tensor) -> torch.Tensor:  # summed over the flips
            return sum(self._activate(self._forward(member, inp, f)) for f in flips)

        for scale in sorted({s for s, _ in views}):
            size = (h, w) if scale == 1.0 else (max(8, round(h * scale)), max(8, round(w * scale)))
            if size == out_size:
                sliding_window(tile_probs, x, tile, self.num_classes, self.overlap, pad, out=acc)
            else:
                probs = sliding_window(tile_probs, resize_probs(x, size), tile, self.num_classes, self.overlap, pad)
                acc += resize_probs(probs, out_size)
                del probs

    def _add_member(self, member: Member, images: np.ndarray, x: torch.Tensor | None, acc: torch.Tensor) -> None:
        if member.input == "tiles":
            self._add_tiled(member, images, acc)
        else:
            self._add_resized(member, normalise_as(images, member.mean, member.std).to(self.device) if x is None else x,
                              acc)

    def _zeros(self, images: np.ndarray) -> torch.Tensor:
        return torch.zeros((images.shape[0], self.num_classes, *images.shape[1:3]), device=self.device)

    @torch.no_grad()
    def member_probs(self, member: Member, images: np.ndarray, x: torch.Tensor | None = None) -> torch.Tensor:
        """One member's (B, C, H, W) probabilities of the uint8 batch ``images`` (B, H, W, 3),
        averaged over the TTA views; ``x``: the batch normalised as ``member`` expects, if at hand."""
        acc = self._zeros(images)
        self._add_member(member, images, x, acc)
        return acc.div_(len(self.tta.views()))

    @torch.no_grad()
    def _accumulate(self, images: np.ndarray, keep: int | None = None, per_member: bool = False):
        """(mean of member probabilities, member ``keep``'s probabilities or None) of one
        same-size batch, as one running sum: memory is one probability map whatever the number
        of members (nnU-Net's ``average_probabilities``). The (B, M, C, H, W) stack instead
        when ``per_member``."""
        normalised: dict[tuple, torch.Tensor] = {}  # one normalisation per distinct mean/std

        def x_for(member: Member) -> torch.Tensor | None:
            if member.input == "tiles":
                return None
            key = (member.mean, member.std)
            if key not in normalised:
                normalised[key] = normalise_as(images, member.mean, member.std).to(self.device)
            return normalised[key]

        if per_member:
            return torch.stack([self.member_probs(m, images, x_for(m)) for m in self.members], 1), None
        views = len(self.tta.views())
        acc, kept = self._zeros(images), None
        for k, member in enumerate(self.members):
            if k == keep:  # summed over its views apart, then into the running sum
                kept = self._zeros(images)
                self._add_member(member, images, x_for(member), kept)
                acc += kept
                kept.div_(views)
            else:
                self._add_member(member, images, x_for(member), acc)
        return acc.div_(len(self.members) * views), kept

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
        (:func:`ensemble.thresholds.decide`)."""
        from ensemble.thresholds import decide

        return decide(probs, thresholds, self.task, void_label)
