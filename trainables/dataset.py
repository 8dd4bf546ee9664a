"""torch Datasets over :class:`trainables.data.SegData`, with albumentations from configuration."""
from __future__ import annotations

import logging
import random

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from trainables.data import IGNORE_INDEX, SegData
from trainables.errors import ConfigError, InputError
from trainables.preprocess import InputSpec, normalise, working_size
from trainables.sampling import Draw, draw_seed

logger = logging.getLogger(__name__)


def build_transforms(augment: dict, image_size, train: bool, seed: int | None = None) -> A.Compose:
    """Albumentations pipeline: resize (or crop) to ``image_size`` plus the configured augmentations.

    ``augment.albumentations`` (a dict in ``A.to_dict`` form) replaces the built-in list; the
    final resize to ``image_size`` is always appended so batches stack. ``seed`` makes the
    augmentation stream reproducible (albumentations keeps its own generator); a seeded
    :class:`SegDataset` reseeds the pipeline for every sample instead.
    """
    height, width = int(image_size[0]), int(image_size[1])
    mask_interp = cv2.INTER_NEAREST
    if not train:  # a plain resize; validation and prediction make inputs with trainables.preprocess.InputSpec
        return A.Compose([A.Resize(height, width, mask_interpolation=mask_interp)])
    if augment.get("albumentations"):
        try:
            custom = A.from_dict(augment["albumentations"])
        except Exception as exc:  # albumentations raises many types for a bad dict
            raise ConfigError("config", "augment.albumentations", f"cannot build pipeline: {exc}") from None
        return A.Compose([custom, A.Resize(height, width, mask_interpolation=mask_interp)], seed=seed)
    steps: list = []
    if augment["random_crop"]:
        # at native resolution (after data.max_size), padded when smaller: large images are then
        # predicted by sliding windows of this size (ensemble/tiling.py), not squashed
        steps.append(A.RandomCrop(height, width, pad_if_needed=True, fill=0, fill_mask=IGNORE_INDEX))
    else:
        steps.append(A.Resize(height, width, mask_interpolation=mask_interp))
    if augment["hflip"] > 0:
        steps.append(A.HorizontalFlip(p=augment["hflip"]))
    if augment["vflip"] > 0:
        steps.append(A.VerticalFlip(p=augment["vflip"]))
    if augment["scale_rotate"] > 0:
        lim = augment["scale_limit"]
        steps.append(A.Affine(scale=(1 - lim, 1 + lim), rotate=(-augment["rotate_limit"], augment["rotate_limit"]),
                              translate_percent=(-0.0625, 0.0625), fill_mask=IGNORE_INDEX,
                              mask_interpolation=mask_interp, p=augment["scale_rotate"]))
    if augment["color"] > 0:
        steps.append(A.ColorJitter(0.2, 0.2, 0.2, 0.05, p=augment["color"]))
    if augment["elastic"] > 0:
        steps.append(A.ElasticTransform(p=augment["elastic"], mask_interpolation=mask_interp))
    if augment["grid_distortion"] > 0:
        steps.append(A.GridDistortion(p=augment["grid_distortion"], mask_interpolation=mask_interp))
    return A.Compose(steps, seed=seed)


def downscale(image: np.ndarray, mask: np.ndarray, max_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Shrink so the longer side is at most ``max_size`` (area for images, nearest for masks)."""
    h, w = image.shape[:2]
    height, width = working_size(h, w, max_size)
    if (height, width) == (h, w):
        return image, mask
    size = (width, height)
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    resized = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    mask = resized.reshape(*resized.shape[:2], *mask.shape[2:])  # cv2 drops a single channel axis
    return image, mask


class SegDataset(Dataset):
    """Items of a :class:`SegData` subset as (image float32 CHW normalised, target) tensors.

    Decoded (and downscaled) images and masks are kept in memory after their first read when
    ``cache`` is set, so later epochs pay only for augmentation. ``copy_paste`` (a
    :class:`trainables.copypaste.CopyPaste`) pastes instances before ``transform``.

    With a ``seed``, every sample's augmentation and copy-paste are drawn from (seed, epoch,
    position) alone: a key is a :class:`trainables.sampling.Draw` (what the trainer's sampler
    yields; it carries the epoch to persistent workers) or an int k, read as position k of the
    epoch last given to :meth:`set_epoch`. Any worker or a resumed run then augments a
    sample alike. Without a seed the pipeline's own stream runs on (validation: no randomness).
    """

    def __init__(self, data: SegData, indices: list[int], transform: A.Compose, max_size: int | None = None,
                 cache: bool = True, copy_paste=None, seed: int | None = None):
        self.data, self.indices, self.transform = data, list(indices), transform
        self.max_size, self.cache, self.copy_paste = max_size, cache, copy_paste
        self.seed, self.epoch = seed, 0
        self._store: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image (H, W, 3) uint8 and mask of dataset item ``i`` (not augmented)."""
        if i in self._store:
            return self._store[i]
        image, mask = self.data.read_image(i), self.data.read_mask(i)
        if image.shape[:2] != mask.shape[:2]:
            raise InputError(self.data.mask_paths[i], f"mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                                                      f"{self.data.image_paths[i].name} is {image.shape[1]}x{image.shape[0]}")
        image, mask = downscale(image, mask, self.max_size)
        if self.cache:
            self._store[i] = (image, mask)
        return image, mask

    def _reseed(self, epoch: int, position: int) -> np.random.Generator | None:
        """Seed the pipeline for one sample; returns the sample's copy-paste generator."""
        if self.seed is None:
            return None
        seq = draw_seed(self.seed, "augment", epoch, position)
        # PCG64(seq) takes the first four 64-bit words (state, increment); the next two seed the
        # others: independent streams, cheaper than seq.spawn
        python_word, paste_word = seq.generate_state(6, np.uint64)[4:].tolist()
        self.transform.set_random_state(np.random.Generator(np.random.PCG64(seq)), random.Random(python_word))
        return np.random.default_rng(paste_word)

    def __getitem__(self, key: int | Draw) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, position, k = key if isinstance(key, tuple) else (self.epoch, key, key)
        paste_rng = self._reseed(epoch, position)
        image, mask = self.load(self.indices[k])
        if self.copy_paste is not None:
            image, mask = self.copy_paste(image, mask, index=self.indices[k], rng=paste_rng)
        out = self.transform(image=image, mask=mask)
        image_t = normalise(out["image"][None])[0]
        mask = out["mask"]
        if self.data.task == "multiclass":
            target = torch.from_numpy(np.ascontiguousarray(mask)).long()
        else:
            target = torch.from_numpy(np.ascontiguousarray(mask.transpose(2, 0, 1))).float()
        return image_t, target


class WorkingImages(Dataset):
    """Items of a :class:`SegData` subset for validation: (the network's input for ``spec``, float32
    (3, h, w), from :meth:`trainables.preprocess.InputSpec.model_input`; the mask at the working size,
    where scores are counted). Batches are lists (:func:`as_list`): sizes may differ."""

    def __init__(self, data: SegData, indices: list[int], spec: InputSpec, cache: bool = True):
        self.images = SegDataset(data, indices, transform=None, max_size=spec.max_size, cache=cache)
        self.data, self.indices, self.spec = data, self.images.indices, spec

    def __len__(self) -> int:
        return len(self.images)

    def load(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Position ``k``'s working-size image (H, W, 3) uint8 and mask."""
        return self.images.load(self.indices[k])

    def __getitem__(self, k: int) -> tuple[torch.Tensor, np.ndarray]:
        image, mask = self.load(k)
        return self.spec.model_input(image[None])[0], mask


def as_list(batch: list) -> list:
    """DataLoader collate of :class:`WorkingImages`: the items as they are."""
    return batch
