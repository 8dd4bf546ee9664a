"""Run-length encoding of masks for submission files.

Format (the one of the Kaggle segmentation competitions, not COCO's): a string of
space-separated ``start length`` pairs. Pixels are numbered in column-major (Fortran) order,
top to bottom, then left to right, starting at 1; each pair marks a run of ``length`` mask pixels
beginning at pixel ``start``. An empty mask is the empty string. For example the 3x3 mask::

    1 1 1
    0 0 0
    0 0 1

reads 1 0 0 | 1 0 0 | 1 0 1 column by column and encodes as ``"1 1 4 1 7 1 9 1"``.

``order="row"`` numbers the pixels row by row instead (C order, left to right, then top to
bottom), as some competitions do (``--rle-order row``).

Encoding and decoding are vectorised over pixels (a difference of the padded flat mask, and a
cumulative sum of run boundaries), so whole-resolution masks stay fast.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)


ORDERS = {"column": "F", "row": "C"}


def _flat_order(order: str) -> str:
    if order not in ORDERS:
        raise ValueError(f"unknown RLE order {order!r}: use {' or '.join(ORDERS)}")
    return ORDERS[order]


def rle_encode(mask: np.ndarray, order: str = "column") -> str:
    """``(H, W)`` boolean mask -> ``"start length start length ..."`` ("" when empty)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    pixels = np.concatenate([[False], mask.astype(bool).ravel(order=_flat_order(order)), [False]])
    # 1-based positions where a run starts and where the first pixel after it lies.
    edges = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1
    edges[1::2] -= edges[::2]
    return " ".join(map(str, edges))


def rle_decode(rle: str, shape: tuple[int, int], order: str = "column") -> np.ndarray:
    """Inverse of :func:`rle_encode`: a boolean mask of ``shape`` ``(H, W)``."""
    numbers = np.array(rle.split(), dtype=np.int64)
    size = int(np.prod(shape))
    if len(numbers) % 2:
        raise ValueError("run-length string has an odd number of values")
    starts, lengths = numbers[::2] - 1, numbers[1::2]
    if np.any(starts < 0) or np.any(lengths < 0) or np.any(starts + lengths > size):
        raise ValueError(f"run-length string does not fit a mask of shape {tuple(shape)}")
    boundaries = np.zeros(size + 1, dtype=np.int64)
    np.add.at(boundaries, starts, 1)
    np.add.at(boundaries, starts + lengths, -1)
    return (np.cumsum(boundaries[:-1]) > 0).reshape(shape, order=_flat_order(order))


def submission_rows(
    image_id: str,
    labels: np.ndarray | None = None,
    binary: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    skip_classes: Sequence[int] | None = None,
    order: str = "column",
) -> list[dict]:
    """One submission row per class of one image.

    Give either ``labels`` ``(H, W)`` (multiclass; values outside ``class_names`` such as a void
    label belong to no class) or ``binary`` ``(C, H, W)`` (multilabel). ``class_names`` defaults
    to the channel indices for ``binary`` and is required for ``labels``. ``skip_classes``
    defaults to ``(0,)``, the background, for ``labels`` and to none for ``binary``.
    Rows are ``{"image_id", "class", "rle", "height", "width"}``.
    """
    if (labels is None) == (binary is None):
        raise ValueError("give exactly one of labels and binary")
    if labels is not None:
        if class_names is None:
            raise ValueError("class_names is required with labels")
        labels = np.asarray(labels)
        masks = (labels == c for c in range(len(class_names)))
        skip = (0,) if skip_classes is None else skip_classes
        height, width = labels.shape
    else:
        binary = np.asarray(binary).astype(bool)
        if class_names is None:
            class_names = [str(c) for c in range(len(binary))]
        if len(class_names) != len(binary):
            raise ValueError(f"{len(class_names)} class names for {len(binary)} channels")
        masks = iter(binary)
        skip = () if skip_classes is None else skip_classes
        height, width = binary.shape[1:]
    return [
        {
            "image_id": image_id,
            "class": name,
            "rle": rle_encode(mask, order),
            "height": height,
            "width": width,
        }
        for c, (name, mask) in enumerate(zip(class_names, masks))
        if c not in skip
    ]
