"""The ensemble on PyTorch: members' networks as torch modules, probabilities as tensors on a device.

The bookkeeping (TTA views, soft or hard voting, weights, batches of one size) is
:class:`ensemble.voting.Voting`'s, shared with the torch-free onnx runtime; this module runs the
networks (with autocast on CUDA) and loads members from checkpoints.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ensemble.member import TTA, Member, best_member_index, check_weights  # noqa: F401  (imported from here)
from ensemble.voting import Voting
from trainables.checkpoint import load_checkpoint, model_from_checkpoint
from trainables.device import resolve_amp, resolve_device
from trainables.preprocess import InputSpec, activate, add_probs

logger = logging.getLogger(__name__)


def load_member(path: str | Path, name: str, device: str | torch.device, channels_last: bool = False) -> Member:
    """The member of the checkpoint at ``path`` on ``device`` ("auto": CUDA when there is one)."""
    member = member_from_checkpoint(load_checkpoint(path), name, device, channels_last)
    member.meta["path"] = str(path)  # copied into the bundle
    return member


def member_from_checkpoint(ckpt: dict, name: str, device: str | torch.device, channels_last: bool = False) -> Member:
    model = model_from_checkpoint(ckpt).to(resolve_device(str(device))).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    cfg = ckpt["config"]
    spec = InputSpec.from_config(cfg)
    return Member(name, int(ckpt["fold"] if ckpt["fold"] is not None else -1), model, spec.image_size, ckpt["task"],
                  ckpt["class_names"], ckpt["score"], {"config": cfg, "epoch": ckpt["epoch"]},
                  input=spec.mode, max_size=spec.max_size)


class Ensemble(Voting):
    """:class:`ensemble.voting.Voting` with PyTorch members on ``device`` (autocast per ``amp``)."""

    def __init__(self, members: list[Member], tta: TTA | None = None, voting: str = "soft",
                 device: str | torch.device = "auto", amp: str = "auto", tile: tuple[int, int] | None = None,
                 overlap: float = 0.5):
        super().__init__(members, tta, voting, tile, overlap)
        self.device = resolve_device(str(device))
        self.amp = resolve_amp(amp, self.device)

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        return activate(logits, self.task)

    def _vote(self, probs: torch.Tensor) -> torch.Tensor:
        """A member-view's vote from its probabilities at the output size: its own default decision
        (argmax, or p >= 0.5 per class) as 0/1."""
        if self.task == "multilabel":
            return (probs >= 0.5).float()
        return F.one_hot(probs.argmax(1), self.num_classes).permute(0, 3, 1, 2).float()

    @torch.no_grad()
    def _forward(self, member: Member, inp: torch.Tensor, flip: bool) -> torch.Tensor:
        """Probabilities of one view: ``inp`` flipped when asked, the output flipped back."""
        if flip:
            inp = inp.flip(-1)
        with torch.autocast(device_type=self.device.type, dtype=self.amp or torch.float32,
                            enabled=self.amp is not None):
            logits = member.model(inp).float()
        probs = self._activate(logits)
        return probs.flip(-1) if flip else probs

    def _input(self, spec: InputSpec, images: np.ndarray, scale: float) -> torch.Tensor:
        return spec.model_input(images, scale).to(self.device)

    def _add_probs(self, forward, spec: InputSpec, at, acc: torch.Tensor, views) -> None:
        add_probs(forward, spec, at, acc, views, self.tile, self.overlap)

    def _add(self, acc: torch.Tensor, x: torch.Tensor, weight: float) -> None:
        acc.add_(x, alpha=weight)

    def _zeros(self, images: np.ndarray) -> torch.Tensor:
        return torch.zeros((images.shape[0], self.num_classes, *images.shape[1:3]), device=self.device)

    def _stack(self, arrays: list) -> torch.Tensor:
        return torch.stack(arrays, 1)

    def _numpy(self, x: torch.Tensor) -> np.ndarray:
        return x.cpu().numpy()

    @torch.no_grad()
    def member_probs(self, member: Member, images: np.ndarray) -> torch.Tensor:
        return super().member_probs(member, images)

    @torch.no_grad()
    def _accumulate(self, images: np.ndarray, keep: int | None = None, per_member: bool = False):
        return super()._accumulate(images, keep, per_member)
