"""k-fold splits, written once and reused (never recomputed differently later).

Strategies:

* ``kfold``: shuffled KFold.
* ``stratified``: StratifiedKFold on each image's rarest present class (rarest by the number of
  images containing it), so rare classes spread over folds.
* ``multilabel``: iterative stratification (Sechidis et al. 2011) over per-image class presence.
* ``group``: a group key per image from ``group_regex`` on its file name (first capture group,
  or the whole match); one group never straddles folds (GroupKFold, shuffled by seed).

A **holdout** (``folds.holdout``: a share such as 0.1, a list of image names, or a regular
expression on them) is set aside before the folds are made, split the way the folds are (the
first part of a ``round(1 / share)``-fold split of the same strategy: grouped images stay
together), and saved in ``folds.json`` beside them. No fold trains or validates on it, so the
search, member selection and post-processing never see it; the ensemble step scores it.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from trainables.config import check_setting, validate_config
from trainables.errors import ConfigError, InputError
from trainables.io import atomic_write_json

logger = logging.getLogger(__name__)

def group_keys(names: list[str], regex: str) -> list[str]:
    check_setting("folds.group_regex", regex)
    pattern = re.compile(regex)
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
    validate_config({"folds": {"strategy": strategy, "k": k, "group_regex": group_regex}})
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


def holdout_ids(spec, strategy: str, seed: int, ids: list[str], presence: np.ndarray,
                group_regex: str | None = None) -> list[str]:
    """The image ids ``folds.holdout`` sets aside (sorted; empty for None)."""
    if spec is None or spec == []:
        return []
    check_setting("folds.holdout", spec)
    if isinstance(spec, (int, float)):
        parts = max(2, round(1 / spec))
        if strategy == "group":
            groups = len(set(group_keys(ids, group_regex or "")))
            if groups < parts:
                raise ConfigError("config", "folds.holdout", f"a share of {spec} needs {parts} groups, "
                                                              f"{group_regex!r} gives {groups}")
        chosen = make_folds(strategy, parts, seed, ids, presence, group_regex)[0]
    elif isinstance(spec, str):
        pattern = re.compile(spec)
        chosen = [i for i in ids if pattern.search(i)]
        if not chosen:
            raise ConfigError("config", "folds.holdout", f"{spec!r} matches no image name")
    else:  # a list of names
        known = set(ids)
        unknown = [name for name in spec if name not in known]
        if unknown:
            raise ConfigError("config", "folds.holdout", f"{len(unknown)} names are not images of the dataset, "
                                                          f"e.g. {unknown[0]!r}")
        chosen = sorted(set(spec))
    if len(chosen) >= len(ids):
        raise ConfigError("config", "folds.holdout", "the holdout would take every image")
    if strategy == "group" and group_regex and not isinstance(spec, (int, float)):
        inside = set(chosen)
        keys = group_keys(ids, group_regex)
        split = sorted({k for k, i in zip(keys, ids) if i in inside} & {k for k, i in zip(keys, ids) if i not in inside})
        if split:
            logger.warning("folds.holdout: %d groups of %r have images in the holdout and in the folds, e.g. %r",
                           len(split), group_regex, split[0])
    return sorted(chosen)


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


def make_split(strategy: str, k: int, seed: int, ids: list[str], presence: np.ndarray, group_regex: str | None = None,
               holdout=None) -> tuple[list[list[str]], list[str]]:
    """(the folds' validation ids, the holdout ids): the holdout first, then ``k`` folds of the rest."""
    held = holdout_ids(holdout, strategy, seed, ids, presence, group_regex)
    aside = set(held)
    rest = [i for i, image_id in enumerate(ids) if image_id not in aside]
    return make_folds(strategy, k, seed, [ids[i] for i in rest], presence[rest], group_regex), held


def load_or_make_folds(path: Path, strategy: str, *, k: int, seed: int, ids: list[str], presence: np.ndarray,
                       fingerprint: str, group_regex: str | None = None, holdout=None) -> list[list[str]]:
    """Reuse ``path`` when it was made with the same settings and data; else make and save it.
    With ``holdout`` the folds cover the other images; :func:`read_holdout` gives the holdout."""
    meta = {"strategy": strategy, "k": k, "seed": seed, "group_regex": group_regex, "dataset": fingerprint}
    if holdout is not None:  # only when set, so folds.json files made before the setting still match
        meta["holdout"] = holdout
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("meta") == meta:
            return saved["folds"]
        if saved.get("meta", {}).get("dataset") != fingerprint:
            raise InputError(path, "folds were made for a different dataset (fingerprint changed); "
                                   "use a new run directory")
        raise InputError(path, f"folds were made with other settings {saved.get('meta')}; use a new run directory")
    folds, held = make_split(strategy, k, seed, ids, presence, group_regex, holdout)
    atomic_write_json(path, {"meta": meta, "folds": folds, **({"holdout": held} if held else {})})
    if held:
        logger.info("holdout: %d of %d images set aside, never searched, selected or tuned on", len(held), len(ids))
    return folds


def read_holdout(path: Path) -> list[str]:
    """The holdout image ids saved in ``folds.json`` (empty when there is none)."""
    return json.loads(Path(path).read_text()).get("holdout", [])


def train_val_indices(folds: list[list[str]], fold: int, ids: list[str]) -> tuple[list[int], list[int]]:
    """Indices into ``ids`` of fold ``fold``'s training images (those of the other folds: an image in
    no fold, such as the holdout, is never trained on) and of its validation images."""
    if not 0 <= fold < len(folds):
        raise ConfigError("config", "fold", f"fold {fold} out of range: the split has {len(folds)} folds")
    val = set(folds[fold])
    train = {image_id for f, part in enumerate(folds) if f != fold for image_id in part}
    train_idx = [i for i, image_id in enumerate(ids) if image_id in train]
    val_idx = [i for i, image_id in enumerate(ids) if image_id in val]
    return train_idx, val_idx
