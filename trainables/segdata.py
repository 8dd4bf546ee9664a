"""The dataset record and its files on disk: :class:`SegData`, images, cached masks, the cache
index and fingerprints. Both loaders (COCO in ``trainables/coco.py``, image/mask folders in
``trainables/data.py``) build on it."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from trainables.errors import InputError
from trainables.io import atomic_path, atomic_write_json

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
CACHE_VERSION = "2"


@dataclass
class SegData:
    """A dataset ready for training: image paths, cached masks and class statistics."""

    source: Path
    task: str
    class_names: list[str]
    ids: list[str]  # unique per image: the file name relative to the image root
    image_paths: list[Path]
    mask_paths: list[Path]
    sizes: list[tuple[int, int]]  # (height, width) of each image
    presence: np.ndarray  # (N, C) bool: class c occurs in image i
    pixel_counts: np.ndarray  # (C,) int64 labelled pixels per class
    fingerprint: str
    ignore_index: int = IGNORE_INDEX
    has_background: bool = True
    meta: dict = field(default_factory=dict)
    # whether the source holds ground truth at all (an annotation, or a mask file): a COCO file
    # listing images without annotations only is unannotated even where its pixels count as background
    has_annotations: bool = True
    # (N, C) int64 labelled pixels per class of each image (the rows sum to ``pixel_counts``);
    # None only for a SegData made by hand: :meth:`pixel_counts_of` then counts the masks
    image_pixel_counts: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    def read_image(self, i: int) -> np.ndarray:
        return read_image(self.image_paths[i])

    def read_mask(self, i: int) -> np.ndarray:
        """(H, W) uint8 labels for multiclass; (H, W, C) uint8 {0,1} (+255 where ignored) for multilabel."""
        return read_cached_mask(self.mask_paths[i], self.task, self.num_classes)

    def pixel_counts_of(self, indices) -> np.ndarray:
        """(C,) int64 labelled pixels per class of images ``indices`` (ignored pixels count nowhere)."""
        idx = [int(i) for i in indices]
        if self.image_pixel_counts is not None:
            return self.image_pixel_counts[idx].sum(0, dtype=np.int64) if idx else \
                np.zeros(self.num_classes, np.int64)
        total = np.zeros(self.num_classes, np.int64)
        for i in idx:
            total += mask_pixel_counts(self.read_mask(i), self.task, self.num_classes)
        return total

    def subset(self, indices: list[int]) -> "SegData":
        """These images only (quick checks), with their own pixel counts; the fingerprint names the
        subset, so folds and experiments made on it are never mistaken for ones of the whole dataset."""
        idx = [int(i) for i in indices]
        pick = lambda seq: [seq[i] for i in idx]  # noqa: E731
        per_image = self.image_pixel_counts[idx] if self.image_pixel_counts is not None else None
        return replace(self, ids=pick(self.ids), image_paths=pick(self.image_paths), mask_paths=pick(self.mask_paths),
                       sizes=pick(self.sizes), presence=self.presence[idx], pixel_counts=self.pixel_counts_of(idx),
                       image_pixel_counts=per_image,
                       fingerprint=fingerprint(self.fingerprint, "subset", idx), meta={**self.meta, "subset": len(idx)})


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); grayscale, palette and RGBA images are converted."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise InputError(path, "image file not found") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(path, f"cannot read image ({exc})") from None


def mask_pixel_counts(mask: np.ndarray, task: str, num_classes: int) -> np.ndarray:
    """(C,) int64 pixels per class of one mask as :meth:`SegData.read_mask` gives it (255: ignored)."""
    if task == "multiclass":
        return np.bincount(mask[mask != IGNORE_INDEX].ravel(), minlength=num_classes)[:num_classes].astype(np.int64)
    return (mask[..., :num_classes] == 1).sum((0, 1)).astype(np.int64)


def read_cached_mask(path: Path, task: str, num_classes: int) -> np.ndarray:
    if task == "multiclass":
        with Image.open(path) as im:
            return np.array(im)  # writable: torch.from_numpy warns on read-only arrays
    packed = np.load(path)  # (H, W, ceil((C+1)/8)) bits: C class channels + 1 "ignored" channel
    bits = np.unpackbits(packed, axis=-1, count=num_classes + 1)
    mask = bits[..., :num_classes]
    mask[bits[..., num_classes] == 1] = IGNORE_INDEX
    return mask


def fingerprint(*parts) -> str:
    digest = hashlib.sha256(CACHE_VERSION.encode())
    for part in parts:
        digest.update(b"\0")
        digest.update(part if isinstance(part, bytes) else str(part).encode())
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_mask(path: Path, mask: np.ndarray, task: str) -> None:
    """Write one cached mask atomically (PNG for labels, packed bits for multilabel)."""
    with atomic_path(path) as tmp:
        if task == "multiclass":
            Image.fromarray(mask.astype(np.uint8)).save(tmp, format="PNG")
        else:
            with open(tmp, "wb") as fh:
                np.save(fh, np.packbits(mask.astype(bool), axis=-1))


def load_stats(stats_path: Path) -> dict | None:
    """The cache index, or None when it is missing, unreadable or written before it held per-image
    pixel counts (then the caller rebuilds it: the fingerprint, and so folds, stay the same)."""
    if stats_path.exists():
        try:
            stats = json.loads(stats_path.read_text())
        except json.JSONDecodeError:
            logger.warning("ignoring unreadable cache index %s", stats_path)
            return None
        if "image_pixel_counts" not in stats:
            logger.info("cache index %s has no per-image pixel counts: rebuilding it", stats_path)
            return None
        return stats
    return None


def save_stats(stats_path: Path, presence: np.ndarray, pixel_counts: np.ndarray, skipped: dict | None = None,
               image_pixel_counts: np.ndarray | None = None, **extra) -> None:
    """``image_pixel_counts``: (N, C) per image, every image (skipped ones too, as ``presence``)."""
    atomic_write_json(stats_path, {"presence": presence.astype(int).tolist(), "pixel_counts": pixel_counts.tolist(),
                                   "skipped": skipped or {},
                                   "image_pixel_counts": np.asarray(image_pixel_counts).astype(int).tolist(), **extra})
