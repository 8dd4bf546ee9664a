"""Copy-paste augmentation (Ghiasi et al. 2021, "Simple Copy-Paste is a Strong Data Augmentation").

Object instances of a few chosen classes are cut from other training images of the fold and
pasted onto the current one, each with its own large-scale jitter (a random scale in
``augment.copy_paste_scale``), a random horizontal flip and a random position; the pasted
pixels overwrite the target's image and mask. An instance is a connected component of one
class in the (downscaled) mask, so COCO and mask-folder data work alike::

    paste = build_copy_paste(cfg["augment"], data, train_idx, train_set.load, pixel_counts, seed)
    image, mask = paste(image, mask, index=i, rng=rng)   # copies; the cached arrays stay untouched

The training dataset passes each sample's own generator (seeded from seed, epoch and position,
trainables/dataset.py), so what is pasted does not depend on DataLoader workers or on resuming;
without ``rng`` the paste's own seeded stream is used.

Settings (``augment.*``): ``copy_paste`` (probability per training image; 0 = off),
``copy_paste_classes`` (an int n: the n rarest classes by pixel share of the training images,
background never; or a list of class names/indices), ``copy_paste_scale`` ([low, high] scale
range), ``copy_paste_max`` (1..max instances per pasted image; a class is drawn uniformly among
the chosen ones, then one of its instances). Multilabel masks paste the source's whole label
vector under the instance, so overlapping super-categories stay consistent.

The instance index (bounding box and pixel mask of each component) is built once per trainer
from the training indices only: validation images are never read, let alone pasted.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np
from scipy import ndimage

from trainables.data import SegData
from trainables.config import check_setting
from trainables.errors import ConfigError

logger = logging.getLogger(__name__)

MIN_AREA = 8  # components smaller than this (pixels at load resolution) are not worth pasting


@dataclass
class Instance:
    index: int  # dataset item the instance is cut from
    cls: int
    box: tuple[int, int, int, int]  # y0, y1, x0, x1 at load resolution
    pixels: np.ndarray  # (y1 - y0, x1 - x0) bool: the component inside its box


def check_settings(augment: dict) -> tuple[float, tuple[float, float], int]:
    """Probability, scale range and instance cap, validated in the user's words."""
    for name in ("copy_paste", "copy_paste_scale", "copy_paste_max"):
        check_setting(f"augment.{name}", augment[name])
    p, scale, most = augment["copy_paste"], augment["copy_paste_scale"], augment["copy_paste_max"]
    return float(p), (float(scale[0]), float(scale[1])), most


def choose_classes(spec, data: SegData, pixel_counts: np.ndarray) -> list[int]:
    """Class indices to paste: the ``spec`` rarest by pixel share (an int), or named/indexed ones."""
    key = "augment.copy_paste_classes"
    check_setting(key, spec)
    first = 1 if data.has_background else 0  # background is never an object to paste
    if isinstance(spec, int):
        present = [c for c in range(first, data.num_classes) if pixel_counts[c] > 0]  # fewer: all of them
        return sorted(sorted(present, key=lambda c: (pixel_counts[c], c))[:spec])
    chosen = []
    for item in spec:
        if isinstance(item, str) and item in data.class_names:
            c = data.class_names.index(item)
        elif isinstance(item, int) and not isinstance(item, bool) and 0 <= item < data.num_classes:
            c = item
        else:
            raise ConfigError("config", key, f"unknown class {item!r}; classes: {data.class_names}")
        if c < first:
            raise ConfigError("config", key, f"{data.class_names[c]!r} is the background, not an object class")
        chosen.append(c)
    return sorted(set(chosen))


def class_pixels(mask: np.ndarray, cls: int) -> np.ndarray:
    """Bool map of ``cls`` in a multiclass (H, W) or multilabel (H, W, C) mask."""
    return mask == cls if mask.ndim == 2 else mask[..., cls] == 1


def find_instances(load: Callable[[int], tuple[np.ndarray, np.ndarray]], indices: Sequence[int],
                   presence: np.ndarray, classes: list[int]) -> list[Instance]:
    """Connected components of ``classes`` in the masks of ``indices`` (only images containing one)."""
    found = []
    for i in indices:
        wanted = [c for c in classes if presence[i, c]]
        if not wanted:
            continue
        _, mask = load(i)
        for c in wanted:
            labels, _ = ndimage.label(class_pixels(mask, c))
            for k, box in enumerate(ndimage.find_objects(labels), start=1):
                pixels = labels[box] == k
                if pixels.sum() >= MIN_AREA:
                    found.append(Instance(i, c, (box[0].start, box[0].stop, box[1].start, box[1].stop), pixels))
    return found


def _resize(array: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
    out = cv2.resize(array, size, interpolation=interpolation)
    return out.reshape(size[1], size[0], *array.shape[2:])  # cv2 drops a single channel axis


def _placement(length: int, room: int, rng: np.random.Generator) -> tuple[slice, slice]:
    """Random offset of a ``length``-long patch in a ``room``-long side: (target slice, patch slice)."""
    start = int(rng.integers(0, room - length + 1)) if length <= room else -int(rng.integers(0, length - room + 1))
    lo, hi = max(start, 0), min(start + length, room)
    return slice(lo, hi), slice(lo - start, hi - start)


class CopyPaste:
    """Pastes instances onto an (image, mask) pair, drawing from the caller's generator (or its own)."""

    def __init__(self, instances: list[Instance], load: Callable[[int], tuple[np.ndarray, np.ndarray]], p: float,
                 scale: tuple[float, float], max_instances: int, seed: int = 0):
        self.load, self.p, self.scale, self.max_instances = load, p, scale, max_instances
        self.seed = seed
        self.rng = np.random.default_rng([seed, 0xC0FFEE])
        by_class: dict[int, list[Instance]] = {}
        for inst in instances:
            by_class.setdefault(inst.cls, []).append(inst)
        self.by_class = by_class
        self.sources = {c: np.array([inst.index for inst in insts]) for c, insts in by_class.items()}
        self.classes = sorted(by_class)

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_class.values())

    def __call__(self, image: np.ndarray, mask: np.ndarray, index: int | None = None,
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng if rng is None else rng
        if not self.classes or rng.random() >= self.p:
            return image, mask
        image, mask = image.copy(), mask.copy()
        for _ in range(int(rng.integers(1, self.max_instances + 1))):
            cls = self.classes[int(rng.integers(len(self.classes)))]
            candidates = np.flatnonzero(self.sources[cls] != index)  # from other images
            if not len(candidates):
                continue
            self._paste(self.by_class[cls][int(candidates[rng.integers(len(candidates))])], image, mask, rng)
        return image, mask

    def _paste(self, inst: Instance, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
        src_image, src_mask = self.load(inst.index)
        y0, y1, x0, x1 = inst.box
        patch, labels, pixels = src_image[y0:y1, x0:x1], src_mask[y0:y1, x0:x1], inst.pixels.astype(np.uint8)
        s = rng.uniform(*self.scale)
        size = (max(1, round((x1 - x0) * s)), max(1, round((y1 - y0) * s)))  # (width, height) for cv2
        if size != (x1 - x0, y1 - y0):
            patch = _resize(patch, size, cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
            labels = _resize(labels, size, cv2.INTER_NEAREST)  # same sampling grid as pixels: stays aligned
            pixels = _resize(pixels, size, cv2.INTER_NEAREST)
        if rng.random() < 0.5:
            patch, labels, pixels = patch[:, ::-1], labels[:, ::-1], pixels[:, ::-1]
        rows, prows = _placement(size[1], image.shape[0], rng)
        cols, pcols = _placement(size[0], image.shape[1], rng)
        where = pixels[prows, pcols].astype(bool)
        image[rows, cols][where] = patch[prows, pcols][where]
        mask[rows, cols][where] = labels[prows, pcols][where]


def build_copy_paste(augment: dict, data: SegData, train_idx: Sequence[int],
                     load: Callable[[int], tuple[np.ndarray, np.ndarray]], pixel_counts: np.ndarray,
                     seed: int = 0) -> CopyPaste | None:
    """The configured copy-paste over the training indices ``train_idx``, or None when off."""
    p, scale, most = check_settings(augment)
    if p == 0:
        return None
    classes = choose_classes(augment["copy_paste_classes"], data, pixel_counts)
    instances = find_instances(load, train_idx, data.presence, classes)
    paste = CopyPaste(instances, load, p, scale, most, seed)
    names = [data.class_names[c] for c in classes]
    counts = {data.class_names[c]: len(v) for c, v in paste.by_class.items()}
    if not paste.classes:
        logger.warning("copy-paste: no instance of %s in the training images; nothing will be pasted", names)
    else:
        logger.info("copy-paste p=%.2f of %s: %s instances", p, names, counts)
    return paste
