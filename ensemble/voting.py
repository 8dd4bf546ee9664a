"""Batched ensemble prediction without the array library: members, TTA, soft or hard voting.

All members stay loaded; a batch of images is decoded once and passed through every member (and
every TTA view). Each member's input is made as its training validated it
(:class:`trainables.inputs.InputSpec`: area-shrunk to ``data.max_size``, then resized to its
input size, or stepped over by sliding windows of its crop size when trained on native-resolution
crops), so a bundle predicts on the numbers every reported number was measured on.
Probabilities are accumulated in float32 at the output size as a running sum over members, then
divided (soft voting; nnU-Net's ``average_probabilities``), so memory does not grow with the
number of members. Each member counts ``Member.weight`` times (1 by default; a bundle's weights
are decided on the holdout by ``ensemble/combine.py``) and the sum is divided by the total
weight. Hard voting averages votes the same way: each member-view decides at the output size
(argmax, or p >= 0.5 per class for multilabel), and the default decision of the average is the
(weighted) plurality (multiclass) or at least half of the member-views' weight (multilabel).

:class:`Voting` holds that bookkeeping once; a runtime says how a member is run and where
probabilities accumulate: :class:`NumpyEnsemble` here (onnxruntime sessions, numpy arrays: the
``--runtime onnx`` predictor imports no torch) and :class:`ensemble.predictor.Ensemble` (PyTorch
modules and tensors, on a device).
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from ensemble.member import TTA, Member, check_weights
from ensemble.rules import decide
from trainables.inputs import InputSpec, activate_array, add_probs

logger = logging.getLogger(__name__)


class Voting:
    """The members' weighted running sum over TTA views and batches of one size. Subclasses give
    ``_zeros``, ``_forward``, ``_input``, ``_add_probs``, ``_vote``, ``_stack`` and ``_numpy``.
    ``tile``: the sliding-window size of members trained on native-resolution crops (None: each
    one's training crop size); ``overlap`` between neighbouring windows."""

    def __init__(self, members: list[Member], tta: TTA | None = None, voting: str = "soft",
                 tile: tuple[int, int] | None = None, overlap: float = 0.5):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members, self.tta, self.voting = members, tta or TTA(), voting
        self.total_weight = check_weights([m.weight for m in members])
        self.task = members[0].task
        self.num_classes = len(members[0].class_names)
        self.tile, self.overlap = tile, overlap

    # -- the runtime's
    def _zeros(self, images: np.ndarray):
        raise NotImplementedError

    def _forward(self, member: Member, inp, flip: bool):
        """Probabilities of one view: ``inp`` flipped when asked, the output flipped back."""
        raise NotImplementedError

    def _input(self, spec: InputSpec, images: np.ndarray, scale: float):
        raise NotImplementedError

    def _add_probs(self, forward, spec: InputSpec, at, acc, views) -> None:
        raise NotImplementedError

    def _vote(self, probs):
        raise NotImplementedError

    def _stack(self, arrays: list):
        raise NotImplementedError

    def _numpy(self, x) -> np.ndarray:
        raise NotImplementedError

    def _add(self, acc, x, weight: float) -> None:
        """``acc += weight * x`` in place."""
        acc += x * weight

    # -- shared
    def _inputs(self, images: np.ndarray, inputs: dict, spec: InputSpec) -> Callable[[float], object]:
        """``scale -> model input`` of ``spec``, made once per batch for each distinct spec and scale
        (``inputs`` holds them)."""
        def at(scale: float):
            key = (spec, scale)
            if key not in inputs:
                inputs[key] = self._input(spec, images, scale)
            return inputs[key]
        return at

    def _add_member(self, member: Member, images: np.ndarray, acc, inputs: dict) -> None:
        """Add ``member``'s probabilities of every TTA view of the uint8 batch ``images`` into ``acc``."""
        def forward(x, flip: bool):
            return self._forward(member, x, flip)

        at = self._inputs(images, inputs, member.spec)
        if self.voting == "soft":
            self._add_probs(forward, member.spec, at, acc, self.tta.views())
            return
        for view in self.tta.views():  # hard: each view votes at the output size
            probs = self._zeros(images)
            self._add_probs(forward, member.spec, at, probs, [view])
            acc += self._vote(probs)

    def member_probs(self, member: Member, images: np.ndarray):
        """One member's (B, C, H, W) probabilities of the uint8 batch ``images`` (B, H, W, 3),
        averaged over the TTA views."""
        acc = self._zeros(images)
        self._add_member(member, images, acc, {})
        acc /= len(self.tta.views())
        return acc

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
                acc /= views
                stack.append(acc)
            return self._stack(stack), None
        acc, kept = self._zeros(images), None
        for k, member in enumerate(self.members):
            weight = member.weight
            if k == keep:  # summed over its views apart, then into the running sum
                kept = self._zeros(images)
                self._add_member(member, images, kept, inputs)
                if weight > 0:
                    self._add(acc, kept, weight)
                kept /= views
            elif weight == 1.0:
                self._add_member(member, images, acc, inputs)
            elif weight > 0:  # weighted: its own sum first (a member of weight 0 is not run)
                part = self._zeros(images)
                self._add_member(member, images, part, inputs)
                self._add(acc, part, weight)
        acc /= self.total_weight * views
        return acc, kept

    def _by_size(self, images: list[np.ndarray]) -> dict[tuple[int, int], list[int]]:
        groups: dict[tuple[int, int], list[int]] = {}  # images of one size are batched together
        for i, img in enumerate(images):
            groups.setdefault(img.shape[:2], []).append(i)
        return groups

    def predict_batch(self, images: list[np.ndarray], per_member: bool = False) -> list[np.ndarray]:
        """Probabilities at each image's own size: (C, H, W) float32 averaged over members and views,
        or (M, C, H, W) with one slice per member when ``per_member``."""
        results: dict[int, np.ndarray] = {}
        for idx in self._by_size(images).values():
            probs, _ = self._accumulate(np.stack([images[i] for i in idx]), per_member=per_member)
            for j, i in enumerate(idx):
                results[i] = self._numpy(probs[j])
        return [results[i] for i in range(len(images))]

    def predict_batch_and_member(self, images: list[np.ndarray], keep: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ensemble probabilities, member ``keep``'s probabilities) per image, from one pass."""
        results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for idx in self._by_size(images).values():
            probs, kept = self._accumulate(np.stack([images[i] for i in idx]), keep=keep)
            for j, i in enumerate(idx):
                results[i] = (self._numpy(probs[j]), self._numpy(kept[j]))
        return [results[i] for i in range(len(images))]

    def decide(self, probs: np.ndarray, thresholds=None, void_label: int = 255) -> np.ndarray:
        """Labels (H, W) for multiclass, booleans (C, H, W) for multilabel, with tuned thresholds if given
        (:func:`ensemble.rules.decide`)."""
        return decide(probs, thresholds, self.task, void_label)


class NumpyEnsemble(Voting):
    """The ensemble on numpy arrays, its members' networks called as ``model(x) -> logits`` on
    (B, 3, h, w) float32 arrays (onnxruntime sessions: :class:`ensemble.onnx_runtime.OnnxModel`)."""

    def _zeros(self, images: np.ndarray) -> np.ndarray:
        return np.zeros((images.shape[0], self.num_classes, *images.shape[1:3]), dtype=np.float32)

    def _forward(self, member: Member, inp: np.ndarray, flip: bool) -> np.ndarray:
        if flip:
            inp = np.ascontiguousarray(inp[..., ::-1])
        probs = activate_array(member.model(inp), self.task)
        return np.ascontiguousarray(probs[..., ::-1]) if flip else probs

    def _input(self, spec: InputSpec, images: np.ndarray, scale: float) -> np.ndarray:
        return spec.input_array(images, scale)

    def _add_probs(self, forward, spec: InputSpec, at, acc: np.ndarray, views) -> None:
        add_probs(forward, spec, at, acc, views, self.tile, self.overlap)

    def _vote(self, probs: np.ndarray) -> np.ndarray:
        if self.task == "multilabel":
            return (probs >= 0.5).astype(np.float32)
        return (probs.argmax(1)[:, None] == np.arange(self.num_classes)[None, :, None, None]).astype(np.float32)

    def _stack(self, arrays: list) -> np.ndarray:
        return np.stack(arrays, 1)

    def _numpy(self, x) -> np.ndarray:
        return x
