"""Fold splits on the shipped sample: determinism, partition, groups, persistence, errors."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from trainables import folds as folds_module
from trainables.errors import ConfigError, InputError
from trainables.folds import (
    _merge_small_strata,
    fold_coverage,
    group_keys,
    load_or_make_folds,
    make_folds,
    train_val_indices,
)

GROUP_REGEX = r"^([^_]+)_"
SEQUENCES = {"0001TP", "0006R0", "0016E5"}
# (strategy, k, group_regex)
STRATEGIES = [("kfold", 5, None), ("stratified", 5, None), ("multilabel", 5, None), ("group", 3, GROUP_REGEX)]


def split(sample, strategy, k, regex, seed=0):
    return make_folds(strategy, k, seed, sample.ids, sample.presence, regex)


@pytest.mark.parametrize("strategy, k, regex", STRATEGIES)
def test_every_image_in_exactly_one_validation_fold(sample, strategy, k, regex):
    folds = split(sample, strategy, k, regex)
    assert len(folds) == k
    counts = Counter(i for fold in folds for i in fold)
    assert sorted(counts) == sorted(sample.ids) and set(counts.values()) == {1}
    assert all(fold == sorted(fold) for fold in folds)
    sizes = sorted(len(f) for f in folds)
    assert sizes[-1] - sizes[0] <= (0 if strategy == "group" else 1)  # 72 images: 24 per group, ~14.4 else


@pytest.mark.parametrize("strategy, k, regex", STRATEGIES)
def test_deterministic_for_a_seed(sample, strategy, k, regex):
    assert split(sample, strategy, k, regex, seed=3) == split(sample, strategy, k, regex, seed=3)


def test_kfold_seed_changes_the_split(sample):
    assert split(sample, "kfold", 5, None, seed=0) != split(sample, "kfold", 5, None, seed=1)


def test_group_keys_of_the_sample(sample):
    keys = group_keys(sample.ids, GROUP_REGEX)
    assert Counter(keys) == {name: 24 for name in SEQUENCES}
    assert group_keys(["ab_1.png"], r"^[a-z]+") == ["ab"]  # no capture group: the whole match
    with pytest.raises(ConfigError, match="does not match"):
        group_keys(["nounderscore.png"], GROUP_REGEX)
    with pytest.raises(ConfigError, match="invalid regular expression"):
        group_keys(sample.ids, "([")


@pytest.mark.parametrize("k, seed", [(3, 0), (3, 1), (2, 0)])
def test_groups_never_split(sample, k, seed):
    folds = split(sample, "group", k, GROUP_REGEX, seed)
    fold_of_sequence: dict[str, set[int]] = {}
    for f, fold in enumerate(folds):
        for image_id in fold:
            fold_of_sequence.setdefault(image_id.split("_")[0], set()).add(f)
    assert set(fold_of_sequence) == SEQUENCES
    assert all(len(f) == 1 for f in fold_of_sequence.values())
    if k == 3:
        assert sorted(len(fold) for fold in folds) == [24, 24, 24]


def test_group_needs_regex_and_enough_groups(sample):
    with pytest.raises(ConfigError, match="group_regex"):
        split(sample, "group", 3, None)
    with pytest.raises(ConfigError, match="only 3 groups"):
        split(sample, "group", 4, GROUP_REGEX)


@pytest.mark.parametrize("strategy", ["stratified", "multilabel"])
def test_stratification_spreads_the_rarest_class(sample, strategy):
    rarest = int(np.argmin(sample.presence.sum(0)))
    assert sample.class_names[rarest] == "Fence" and sample.presence[:, rarest].sum() == 27
    coverage = fold_coverage(split(sample, strategy, 5, None), sample.ids, sample.presence)
    assert coverage[:, rarest].max() - coverage[:, rarest].min() <= 1  # 27 over 5 folds: 5 or 6 each


def test_stratified_with_strata_smaller_than_k():
    ids = [f"im{i:02d}" for i in range(12)]
    presence = np.zeros((12, 3), bool)
    presence[:, 0] = True
    presence[0, 2] = True  # class 2 in one image only: its stratum joins another
    presence[1:4, 1] = True
    presence[11] = False  # an image without any class
    folds = make_folds("stratified", 4, 0, ids, presence)
    assert sorted(i for f in folds for i in f) == ids
    labels = _merge_small_strata(np.array([2, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, -1]), 4)
    assert all(c >= 4 for c in Counter(labels.tolist()).values())


@pytest.mark.parametrize("strategy, k, regex", STRATEGIES)
def test_fold_coverage_sums_match_presence(sample, strategy, k, regex):
    folds = split(sample, strategy, k, regex)
    coverage = fold_coverage(folds, sample.ids, sample.presence)
    assert coverage.shape == (k, sample.num_classes)
    np.testing.assert_array_equal(coverage.sum(0), sample.presence.sum(0))
    index = {image_id: i for i, image_id in enumerate(sample.ids)}
    np.testing.assert_array_equal(coverage[1], sample.presence[[index[i] for i in folds[1]]].sum(0))


def test_load_or_make_folds_saves_and_reloads(sample, tmp_path, monkeypatch):
    path = tmp_path / "run" / "folds.json"
    args = {"k": 3, "seed": 0, "ids": sample.ids, "presence": sample.presence, "fingerprint": sample.fingerprint,
            "group_regex": GROUP_REGEX}
    made = load_or_make_folds(path, "group", **args)
    saved = json.loads(path.read_text())
    assert saved["folds"] == made
    assert saved["meta"] == {"strategy": "group", "k": 3, "seed": 0, "group_regex": GROUP_REGEX,
                             "dataset": sample.fingerprint}

    def never(*a, **k):
        raise AssertionError("folds recomputed although saved")

    monkeypatch.setattr(folds_module, "make_folds", never)
    assert load_or_make_folds(path, "group", **args) == made


def test_load_or_make_folds_refuses_other_dataset_or_settings(sample, tmp_path):
    path = tmp_path / "folds.json"
    load_or_make_folds(path, "kfold", k=5, seed=0, ids=sample.ids, presence=sample.presence,
                       fingerprint=sample.fingerprint)
    with pytest.raises(InputError, match="different dataset") as err:
        load_or_make_folds(path, "kfold", k=5, seed=0, ids=sample.ids, presence=sample.presence,
                           fingerprint="0123456789abcdef")
    assert str(path) in str(err.value)
    with pytest.raises(InputError, match="other settings"):
        load_or_make_folds(path, "kfold", k=5, seed=1, ids=sample.ids, presence=sample.presence,
                           fingerprint=sample.fingerprint)


def test_bad_k_and_strategy(sample):
    with pytest.raises(ConfigError, match="73 folds but the dataset has only 72 images"):
        split(sample, "kfold", 73, None)
    with pytest.raises(ConfigError, match="at least 2"):
        split(sample, "kfold", 1, None)
    with pytest.raises(ConfigError, match="expected kfold, stratified, multilabel or group"):
        split(sample, "random", 5, None)


def test_train_val_indices(sample):
    folds = split(sample, "kfold", 5, None)
    train_idx, val_idx = train_val_indices(folds, 2, sample.ids)
    assert sorted(train_idx + val_idx) == list(range(72))
    assert [sample.ids[i] for i in val_idx] == folds[2]
    assert not set(train_idx) & set(val_idx)
    for fold in (5, -1):
        with pytest.raises(ConfigError, match=f"fold {fold} out of range"):
            train_val_indices(folds, fold, sample.ids)
