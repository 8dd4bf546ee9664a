"""Training on a teacher's probabilities (knowledge distillation): one network, soft targets.

    items = [SoftItem(probs=Path("p/3.npy"), index=3), SoftItem(probs=Path("p/u0.npy"), image=Path("u/0.jpg"))]
    trainer = DistillTrainer(cfg, data, items, temperature=2.0, alpha=0.5)
    for record in trainer.epochs():
        ...
    trainer.best_checkpoint()            # the last epoch's weights, as a FoldTrainer checkpoint

Each item is an image with the teacher's probabilities of it, float16 (C, H, W) at the image's
working size (``data.max_size`` applied, as :class:`trainables.dataset.SegDataset` loads it):
an image of ``data`` (``index``: its labels join the loss) or an image file without labels
(``image``). The labels and the probabilities travel through the configured augmentation as one
multi-channel mask (nearest-neighbour, as masks are), so a flip or a crop moves both alike; what
an augmentation fills in (255) has neither label nor teacher. :class:`trainables.losses.DistillLoss`
mixes the two terms.

The student is trained with :class:`trainables.loop.FoldTrainer` (its optimiser, AMP, clipping,
schedule, EMA) over these items instead of a fold's images; there are no validation images, so
the checkpoint is the last epoch's (score NaN): a student is scored where its teacher is, after
training. Single process only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from trainables.data import IGNORE_INDEX, SegData, read_image
from trainables.dataset import SegDataset, build_transforms, downscale
from trainables.errors import InputError
from trainables.loop import FoldTrainer
from trainables.losses import DistillLoss
from trainables.preprocess import normalise
from trainables.sampling import Draw, EpochSampler

logger = logging.getLogger(__name__)


def working_image(path: Path, max_size: int | None) -> np.ndarray:
    """The image file at its working size: ``max_size`` applied as :class:`SegDataset` applies it."""
    image = read_image(path)
    return downscale(image, np.zeros(image.shape[:2], np.uint8), max_size)[0]


@dataclass(frozen=True)
class SoftItem:
    """One training image of the student: ``index`` into the dataset (labelled) or an ``image`` file
    (unlabeled), and ``probs``, the teacher's float16 (C, H, W) probabilities at its working size."""
    probs: Path
    index: int | None = None
    image: Path | None = None


class SoftTargetSet(Dataset):
    """(normalised image, packed target) pairs of :class:`SoftItem` s, augmented by ``transform``
    with the per-sample seeding of :class:`trainables.dataset.SegDataset`. The packed target is what
    :class:`trainables.losses.DistillLoss` unpacks: (K + C, h, w) float32, the labels (255 where
    ignored; all 255 for an unlabeled image) then the teacher's probabilities."""

    def __init__(self, data: SegData, items: list[SoftItem], *, transform, max_size: int | None,
                 seed: int | None = None):
        self.data, self.items, self.max_size = data, list(items), max_size
        labelled = [it.index for it in self.items if it.index is not None]
        self.images = SegDataset(data, labelled, transform, max_size, seed=seed)
        self.transform = transform

    def set_epoch(self, epoch: int) -> None:
        self.images.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``k``'s working-size image (H, W, 3) uint8 and packed mask (H, W, K + C) float32."""
        item = self.items[k]
        num = self.data.num_classes
        if item.index is not None:
            image, mask = self.images.load(item.index)
        else:
            image = working_image(item.image, self.max_size)
            shape = image.shape[:2] if self.data.task == "multiclass" else (*image.shape[:2], num)
            mask = np.full(shape, IGNORE_INDEX, np.uint8)
        probs = np.load(item.probs)
        if probs.shape != (num, *image.shape[:2]):
            raise InputError(item.probs, f"teacher probabilities of shape {probs.shape}, expected "
                                         f"{(num, *image.shape[:2])} (classes, the image's working size)")
        labels = mask[..., None] if mask.ndim == 2 else mask
        return image, np.concatenate([labels.astype(np.float32), probs.astype(np.float32).transpose(1, 2, 0)], -1)

    def __getitem__(self, key: int | Draw) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, position, k = key if isinstance(key, tuple) else (self.images.epoch, key, key)
        self.images._reseed(epoch, position)
        image, packed = self.load(k)
        out = self.transform(image=image, mask=packed)
        return (normalise(out["image"][None])[0],
                torch.from_numpy(np.ascontiguousarray(out["mask"].transpose(2, 0, 1))).float())


class DistillTrainer(FoldTrainer):
    """:class:`trainables.loop.FoldTrainer` over :class:`SoftItem` s with :class:`DistillLoss`
    (the configured loss as its hard term), no validation images, the last epoch kept. Copy-paste
    and rare-class oversampling are off (they would need the teacher on pasted pixels)."""

    def __init__(self, cfg: dict, data: SegData, items: list[SoftItem], *, temperature: float, alpha: float,
                 device: str | torch.device | None = None):
        labelled = [it.index for it in items if it.index is not None]
        if not labelled:
            raise ValueError("distillation needs at least one labelled image")
        self.items = list(items)
        # the labelled images weigh the hard term's classes; the items are what the loader draws
        super().__init__(cfg, data, labelled, [], fold=None, device=device)
        self.loss_fn = DistillLoss(self.loss_fn, data.task, data.num_classes, temperature=temperature, alpha=alpha,
                                   ignore_index=data.ignore_index).to(self.device)

    def _training_set(self, train_idx: list[int], seed: int) -> tuple[SoftTargetSet, EpochSampler]:
        """The items with their teacher's probabilities, drawn uniformly (no copy-paste, no oversampling)."""
        if self.world_size > 1:
            raise RuntimeError("a student is trained in one process")
        cfg = self.cfg
        train_set = SoftTargetSet(self.data, self.items, seed=seed, max_size=cfg["data"]["max_size"],
                                  transform=build_transforms(cfg["augment"], cfg["train"]["image_size"], True, seed))
        return train_set, EpochSampler(len(self.items), seed)

    def validate(self) -> dict:
        return {}  # no validation images: nothing to score

    def _improved(self, score) -> bool:
        return True  # the last epoch is kept
