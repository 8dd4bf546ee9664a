"""k-fold splits, written once and reused (never recomputed differently later).

Strategies:

* ``kfold``: shuffled KFold.
* ``stratified``: StratifiedKFold on each image's rarest present class (rarest by the number of
  images containing it), so rare classes spread over folds.
* ``multilabel``: iterative stratification (Sechidis et al. 2011) over per-image class presence.
* ``group``: a group key per image from ``group_regex`` on its file name (first capture group,
  or the whole match); one group never straddles folds (GroupKFold, shuffled by seed).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from trainables.errors import ConfigError, InputError
from trainables.io import atomic_write_json

logger = logging.getLogger(__name__)

STRATEGIES = ("kfold", "stratified", "multilabel", "group")


def group_keys(names: list[str], regex: str) -> list[str]:
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise ConfigError("config", "folds.group_regex", f"invalid regular expression {regex!r}: {exc}") from None
    keys = []
    for name in names:
        match = pattern.search(name)
        if match is None:
            raise ConfigError("config", "folds.group_regex", f"{regex!r} does not match file name {name!r}")
        keys.append(match.group(1) if pattern.groups else match.group(0))
    return keys


def make_folds(strategy: str, k: int, seed: int, ids: list[str], presence: np.ndarray,
               group_regex: str | None = None) -> list[list[str]]:
    """Return the validation ids of each of ``k`` folds; every id is in exactly one fold."""
    n = len(ids)
    if strategy not in STRATEGIES:
        raise ConfigError("config", "folds.strategy", f"unknown strategy {strategy!r}; options: {STRATEGIES}")
    if k < 2:
        raise ConfigError("config", "folds.k", f"needs at least 2 folds, got {k}")
    if k > n:
        raise ConfigError("config", "folds.k", f"{k} folds but the dataset has only {n} images")
    x = np.zeros((n, 1))
    if strategy == "kfold":
        from sklearn.model_selection import KFold

        splits = KFold(k, shuffle=True, random_state=seed).split(x)
    elif strategy == "stratified":
        from sklearn.model_selection import StratifiedKFold

        image_freq = presence.sum(0).astype(float)
        image_freq[image_freq == 0] = np.inf
        rarest = np.where(presence.any(1), np.argmin(np.where(presence, image_freq, np.inf), axis=1), -1)
        labels = _merge_small_strata(rarest, k)
        splits = StratifiedKFold(k, shuffle=True, random_state=seed).split(x, labels)
    elif strategy == "multilabel":
        from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

        splits = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x, presence.astype(int))
    else:
        from sklearn.model_selection import GroupKFold

        if not group_regex:
            raise ConfigError("config", "folds.group_regex", "strategy 'group' needs a group_regex")
        groups = group_keys(ids, group_regex)
        if len(set(groups)) < k:
            raise ConfigError("config", "folds.k", f"{k} folds but only {len(set(groups))} groups from "
                                                   f"{group_regex!r}")
        splits = GroupKFold(k, shuffle=True, random_state=seed).split(x, groups=groups)
    return [sorted(ids[i] for i in val) for _, val in splits]


def _merge_small_strata(labels: np.ndarray, k: int) -> np.ndarray:
    """Strata with fewer than k members join the next-rarer stratum (sklearn needs >= k each)."""
    labels = labels.copy()
    values, counts = np.unique(labels, return_counts=True)
    order = values[np.argsort(counts)]
    for value in order:
        count = (labels == value).sum()
        if 0 < count < k:
            others = [v for v in np.unique(labels) if v != value]
            if not others:
                break
            target = min(others, key=lambda v: (labels == v).sum())
            labels[labels == value] = target
    return labels


def fold_coverage(folds: list[list[str]], ids: list[str], presence: np.ndarray) -> np.ndarray:
    """(k, C) number of validation images of each fold that contain each class."""
    index = {image_id: i for i, image_id in enumerate(ids)}
    return np.stack([presence[[index[i] for i in fold]].sum(0) for fold in folds])


def coverage_table(coverage: np.ndarray, class_names: list[str]) -> str:
    width = max(len(n) for n in class_names)
    header = " " * width + "  " + " ".join(f"fold{f:<2d}" for f in range(coverage.shape[0]))
    rows = [f"{name:>{width}}  " + " ".join(f"{int(v):6d}" for v in coverage[:, c])
            for c, name in enumerate(class_names)]
    return "\n".join([header, *rows])


def load_or_make_folds(path: Path, strategy: str, k: int, seed: int, ids: list[str], presence: np.ndarray,
                       fingerprint: str, group_regex: str | None = None) -> list[list[str]]:
    """Reuse ``path`` when it was made with the same settings and data; else make and save it."""
    meta = {"strategy": strategy, "k": k, "seed": seed, "group_regex": group_regex, "dataset": fingerprint}
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("meta") == meta:
            return saved["folds"]
        if saved.get("meta", {}).get("dataset") != fingerprint:
            raise InputError(path, "folds were made for a different dataset (fingerprint changed); "
                                   "use a new run directory")
        raise InputError(path, f"folds were made with other settings {saved.get('meta')}; use a new run directory")
    folds = make_folds(strategy, k, seed, ids, presence, group_regex)
    atomic_write_json(path, {"meta": meta, "folds": folds})
    return folds


def train_val_indices(folds: list[list[str]], fold: int, ids: list[str]) -> tuple[list[int], list[int]]:
    if not 0 <= fold < len(folds):
        raise ConfigError("config", "fold", f"fold {fold} out of range: the split has {len(folds)} folds")
    val = set(folds[fold])
    train_idx = [i for i, image_id in enumerate(ids) if image_id not in val]
    val_idx = [i for i, image_id in enumerate(ids) if image_id in val]
    return train_idx, val_idx
