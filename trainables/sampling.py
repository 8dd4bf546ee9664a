"""Rare-class oversampling: draw training images that contain rare classes more often.

Each image's weight comes from the frequency of its rarest class, frequency being the share of
training images that contain the class (background left out)::

    weight_i = min(cap, (f_common / f_rarest(i)) ** strength)

where ``f_common`` is the frequency of the most common class, so an image holding only common
classes keeps weight 1 and none gets more than ``cap``. ``train.oversample`` is the strength
(0 = off: plain shuffling; 0.5 is the square-root repeat factor of LVIS, 1 inverse frequency),
``train.oversample_cap`` the cap. The trainer draws ``len(train_set)`` images per epoch with
replacement (``torch.multinomial``, as ``WeightedRandomSampler`` does).

Draws, shuffled or weighted, come from an :class:`EpochSampler`: each epoch's order is a function
of (seed, epoch) alone, and every draw carries its epoch and position to the dataset, which seeds
that sample's augmentation from them. Persistent DataLoader workers thus learn the epoch from the
indices they are sent, and the batches do not depend on the number of workers or on resuming::

    sampler.set_epoch(epoch)      # before each epoch, like DistributedSampler
    for images, target in loader: ...

Data-parallel training (``rank``, ``world_size``): every rank computes the same epoch order and
keeps the draws whose position ``% world_size == rank``. The ranks' draws are then exactly the
single-process epoch, split without padding or repeats (``DistributedSampler`` pads to equal
lengths), and a weighted epoch is the same multinomial draw on every rank: oversampling is a
distributed weighted sampler. With a per-rank batch of ``batch_size // world_size``, step k of
the ranks together is the single-process batch k.
"""
from __future__ import annotations

import logging
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import Sampler

from trainables.config import check_setting

logger = logging.getLogger(__name__)


def check_settings(train: dict) -> tuple[float, float]:
    """(strength, cap) of ``train.oversample`` and ``train.oversample_cap`` (null or false: off)."""
    strength, cap = train["oversample"], train["oversample_cap"]
    check_setting("train.oversample", strength)
    check_setting("train.oversample_cap", cap)
    return float(strength or 0.0), float(cap)


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


class Draw(NamedTuple):
    """One sample of an epoch: what the dataset reads (``item``) and what seeds its augmentation."""
    epoch: int
    position: int  # place in the epoch's order: two draws of one image are augmented differently
    item: int  # index into the dataset


STREAMS = {"order": 0, "augment": 1}  # what a seed is for: an epoch's draw order, a sample's augmentation


def draw_seed(seed: int, stream: str, *keys: int) -> np.random.SeedSequence:
    """Independent streams for (seed, stream, epoch[, position]); ``seed`` is the trainer's
    (train.seed + fold). The stream tag comes before the keys: SeedSequence pads entropy with
    zeros, so (seed, epoch) and (seed, epoch, 0) alone would give the same stream."""
    return np.random.SeedSequence([int(seed) % 2 ** 64, STREAMS[stream], *(int(k) for k in keys)])


class EpochSampler(Sampler[Draw]):
    """A shuffle of ``num_items`` (``weights=None``), or ``num_draws`` weighted draws with replacement,
    freshly seeded from (seed, epoch) each epoch: no generator state to carry between epochs,
    processes or a resume. Yields :class:`Draw` tuples that :class:`SegDataset` understands."""

    def __init__(self, num_items: int, seed: int, weights: torch.Tensor | None = None, num_draws: int | None = None,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got {rank=} {world_size=}")
        self.num_items, self.seed, self.weights = num_items, int(seed), weights
        self.num_draws = num_items if num_draws is None else num_draws
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(range(self.rank, self.num_draws, self.world_size))  # this rank's draws

    def order(self, epoch: int) -> list[int]:
        seed = int(draw_seed(self.seed, "order", epoch).generate_state(1, np.uint64)[0])
        generator = torch.Generator().manual_seed(seed)
        if self.weights is None:
            return torch.randperm(self.num_items, generator=generator).tolist()
        return torch.multinomial(self.weights, self.num_draws, replacement=True, generator=generator).tolist()

    def __iter__(self) -> Iterator[Draw]:
        epoch = self.epoch  # read now: the DataLoader asks for the iterator when an epoch starts
        order = self.order(epoch)
        return iter([Draw(epoch, position, order[position])
                     for position in range(self.rank, len(order), self.world_size)])


def build_sampler(train: dict, presence: np.ndarray, has_background: bool, seed: int,
                  rank: int = 0, world_size: int = 1) -> EpochSampler:
    """The epoch sampler over the training images (rows of ``presence``): weighted when
    ``train.oversample`` is on, a plain shuffle otherwise; ``rank``'s share of it in data-parallel training."""
    strength, cap = check_settings(train)
    shard = {"rank": rank, "world_size": world_size}
    if strength == 0:
        return EpochSampler(len(presence), seed, **shard)
    weights = rare_class_weights(presence, strength, cap, has_background)
    logger.info("oversampling rare classes: image weights %.2f..%.2f (strength %g, cap %g)",
                weights.min(), weights.max(), strength, cap)
    return EpochSampler(len(weights), seed, torch.as_tensor(weights, dtype=torch.double), **shard)
