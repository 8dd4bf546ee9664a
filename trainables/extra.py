"""Extra training data (``data.extra_train``): datasets added to every fold's training set only.

Typical use: pseudo-labels written by ``ensemble/run.py --pseudo-label`` (a mask folder whose
255 pixels are ignored). Folds are always computed on the labelled dataset alone, so
``folds.json`` and its fingerprint check are unchanged, and an extra image can never be in a
validation fold: extra images are appended after the labelled ones and only their indices
are added to ``train_idx``.

An entry may contain ``{fold}``: ``runs/x/pseudo/fold{fold}`` gives each fold its own set
(pseudo-labels made by that fold's members only, so no fold learns from its validation images
through the labels of another fold's models).

An extra image may not be, byte for byte, a labelled image that the fold validates on or the
holdout keeps (pseudo-labels made of the training images, a copied folder): the fold would
train on its own validation images. :func:`check_extra_train` refuses one up front, for every
fold; :func:`with_extra_train` again for its fold. Repeating a fold's own training image is
allowed (a second label for it, not a leak).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from trainables.config import check_setting
from trainables.data import SegData, dataset_options, file_digest, fingerprint, load_dataset
from trainables.errors import ConfigError, InputError
from trainables.folds import train_val_indices

logger = logging.getLogger(__name__)


def extra_entries(d: dict) -> list[str]:
    """``data.extra_train`` as a list of strings (one path alone is accepted too)."""
    check_setting("data.extra_train", d.get("extra_train"))
    value = d.get("extra_train") or []
    if isinstance(value, (str, Path)):
        value = [value]
    return [str(v) for v in value]


def absolute_extra_train(d: dict) -> list[str]:
    """The entries made absolute (trials run in other directories and on other nodes)."""
    return [str(Path(e).expanduser().resolve()) for e in extra_entries(d)]


def extra_paths(d: dict, fold: int | None) -> list[Path]:
    """The ``data.extra_train`` entries of a data config, with ``{fold}`` filled in."""
    items = extra_entries(d)
    if fold is None and any("{fold}" in e for e in items):
        raise ConfigError("config", "data.extra_train", "an entry with {fold} needs a fold")
    return [Path(e.replace("{fold}", str(fold))) for e in items]


def load_extra(d: dict, data: SegData, fold: int | None) -> list[SegData]:
    """Load every extra dataset of ``d`` for ``fold``; classes and task must match ``data``."""
    extras = []
    for path in extra_paths(d, fold):
        extra = load_dataset(path, None, d["task"], d["unannotated"], d["cache_dir"], **dataset_options(d))
        if extra.class_names != data.class_names:
            raise InputError(path, f"extra training data has classes {extra.class_names}, "
                                   f"the dataset has {data.class_names}")
        extras.append(extra)
    return extras


def refuse_overlap(extras: list[SegData], data: SegData, outside: list[int], role: Callable[[int], str]) -> None:
    """InputError naming the first extra image whose file is one of ``data``'s images ``outside``
    (those a fold validates on or the holdout keeps); ``role(j)`` says what labelled image ``j`` is.
    Files are hashed only where the sizes match."""
    by_size: dict[int, list[int]] = {}
    for j in outside:
        by_size.setdefault(data.image_paths[j].stat().st_size, []).append(j)
    digests: dict[int, str] = {}
    for extra in extras:
        for path in extra.image_paths:
            candidates = by_size.get(Path(path).stat().st_size)
            if not candidates:
                continue
            digest = file_digest(path)
            for j in candidates:
                if j not in digests:
                    digests[j] = file_digest(data.image_paths[j])
                if digests[j] == digest:
                    raise InputError(path, f"extra training image is the labelled image {data.ids[j]!r} "
                                           f"({role(j)}): a fold would train on what it is scored on")


def check_extra_train(d: dict, data: SegData, folds: list[list[str]]) -> None:
    """Load every extra dataset once up front (every fold's, for ``{fold}`` entries): errors
    before any training starts, and the mask caches are warm for the trials. ``folds``: the
    validation ids of each fold (the holdout is in none)."""
    entries = extra_entries(d)
    if not entries:
        return
    where = {image_id: f"a validation image of fold {f}" for f, part in enumerate(folds) for image_id in part}
    role = lambda j: where.get(data.ids[j], "a holdout image")  # noqa: E731
    everything = set(range(len(data)))
    outside = {f: sorted(everything - set(train_val_indices(folds, f, data.ids)[0])) for f in range(len(folds))}
    if any("{fold}" in e for e in entries):
        for fold in range(len(folds)):
            refuse_overlap(load_extra(d, data, fold), data, outside[fold], role)
    else:  # one set for every fold: no fold may validate on it
        refuse_overlap(load_extra(d, data, None), data, sorted(set().union(*outside.values())), role)


def concat(data: SegData, extras: list[SegData]) -> SegData:
    """``data`` followed by the images of ``extras`` (indices ``len(data)..``)."""
    if not extras:
        return data
    parts = [data, *extras]
    ids = list(data.ids) + [f"extra{j}/{i}" for j, e in enumerate(extras) for i in e.ids]
    return replace(
        data, ids=ids,
        image_paths=[p for s in parts for p in s.image_paths], mask_paths=[p for s in parts for p in s.mask_paths],
        sizes=[z for s in parts for z in s.sizes], presence=np.concatenate([s.presence for s in parts]),
        pixel_counts=np.sum([s.pixel_counts for s in parts], axis=0),
        image_pixel_counts=None if any(s.image_pixel_counts is None for s in parts) else
        np.concatenate([s.image_pixel_counts for s in parts]),
        fingerprint=fingerprint(data.fingerprint, "extra", [e.fingerprint for e in extras]),
        meta={**data.meta, "extra_train": [str(e.source) for e in extras], "labelled_images": len(data)})


def with_extra_train(data: SegData, train_idx: list[int], d: dict, fold: int | None) -> tuple[SegData, list[int]]:
    """(dataset, training indices) with the extra datasets of ``d`` appended to training only."""
    extras = load_extra(d, data, fold)
    if not extras:
        return data, train_idx
    training = set(int(i) for i in train_idx)
    refuse_overlap(extras, data, [j for j in range(len(data)) if j not in training],
                   lambda j: f"not a training image of fold {fold}: validation or holdout")
    combined = concat(data, extras)
    added = list(range(len(data), len(combined)))
    logger.info("fold %s: %d extra training images from %s", fold, len(added),
                ", ".join(str(e.source) for e in extras))
    return combined, list(train_idx) + added
