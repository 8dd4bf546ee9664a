"""Rare-class oversampling: hand-computed weights, draw frequencies that follow them (CamVid
sample and the full CamVid when present), the trainer's loader, bad settings."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from tests.conftest import tiny_config
from trainables.errors import ConfigError
from trainables.loop import FoldTrainer
from trainables.sampling import Draw, EpochSampler, build_sampler, check_settings, rare_class_weights

CAMVID = Path(__file__).resolve().parents[3] / "shared" / "data" / "camvid" / "train" / "annotations.json"


def test_weights_by_hand():
    # classes: background, common (4/4 images), mid (2/4), rare (1/4); background is left out
    presence = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 0, 0]], dtype=bool)
    assert rare_class_weights(presence, 1.0, 10.0).tolist() == [1.0, 2.0, 4.0, 1.0]
    assert rare_class_weights(presence, 0.5, 10.0).tolist() == [1.0, 2 ** 0.5, 2.0, 1.0]
    assert rare_class_weights(presence, 1.0, 3.0).tolist() == [1.0, 2.0, 3.0, 1.0]  # capped
    assert rare_class_weights(presence, 0.0, 3.0).tolist() == [1.0] * 4
    empty = np.array([[1, 0], [1, 1]], dtype=bool)  # image 0 has no class but background: weight 1
    assert rare_class_weights(empty, 1.0, 5.0).tolist() == [1.0, 1.0]


def draw_frequencies(weights: np.ndarray, draws: int, seed: int = 0) -> np.ndarray:
    sampler = EpochSampler(len(weights), seed, torch.as_tensor(weights), num_draws=draws)
    return np.bincount(np.fromiter((d.item for d in sampler), dtype=np.int64, count=draws), minlength=len(weights))


def check_draws_follow_weights(presence: np.ndarray, draws: int = 200_000) -> None:
    weights = rare_class_weights(presence, 1.0, 5.0)
    assert weights.max() > 1.5 * weights.min()  # a real difference to detect
    counts = draw_frequencies(weights, draws)
    expected = draws * weights / weights.sum()
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    assert stats.chisquare(counts, np.full(len(weights), draws / len(weights))).pvalue < 1e-6  # not uniform
    # the images holding the rarest class are drawn as often as their weights say (within 3%)
    rarest = presence[:, 1:].sum(0).argmin() + 1
    holding = presence[:, rarest]
    assert counts[holding].sum() / draws == pytest.approx(weights[holding].sum() / weights.sum(), rel=0.03)


def test_sample_draw_frequencies_follow_weights(sample):
    check_draws_follow_weights(sample.presence)


@pytest.mark.skipif(not CAMVID.exists(), reason="full CamVid not found")
def test_camvid_draw_frequencies_follow_weights():
    """The 367 CamVid training images, class presence read from their COCO annotations (rasterising
    every mask would take a minute; presence is all the weights need)."""
    coco = json.loads(CAMVID.read_text())
    row = {img["id"]: k for k, img in enumerate(coco["images"])}
    column = {cat["id"]: k + 1 for k, cat in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
    presence = np.zeros((len(row), len(column) + 1), dtype=bool)
    presence[:, 0] = True  # background (void), left out of the weights
    for ann in coco["annotations"]:
        presence[row[ann["image_id"]], column[ann["category_id"]]] = True
    assert presence.shape == (367, 12)
    check_draws_follow_weights(presence)


def test_trainer_draws_with_the_weights(sample):
    train_idx, val_idx = list(range(0, 72, 2)), list(range(1, 8, 2))
    trainer = FoldTrainer(tiny_config(**{"train.oversample": 1.0, "train.batch_size": 4}), sample, train_idx, val_idx)
    sampler = trainer.train_loader.sampler
    assert isinstance(sampler, EpochSampler) and sampler.seed == 0
    expected = rare_class_weights(sample.presence[train_idx], 1.0, 5.0)
    assert np.allclose(sampler.weights.numpy(), expected)
    assert len(trainer.train_loader) == len(train_idx) // 4  # one epoch is still len(train_set) draws
    plain = FoldTrainer(tiny_config(), sample, train_idx, val_idx).train_loader.sampler
    assert plain.weights is None and sorted(d.item for d in plain) == list(range(len(train_idx)))  # a shuffle


def test_draws_are_a_function_of_seed_and_epoch():
    sampler = EpochSampler(50, seed=3, weights=torch.rand(50, dtype=torch.double))
    first = list(sampler)
    assert all(isinstance(d, Draw) and d.epoch == 0 for d in first) and [d.position for d in first] == list(range(50))
    assert list(EpochSampler(50, seed=3, weights=sampler.weights)) == first  # no hidden state
    sampler.set_epoch(1)
    second = list(sampler)
    assert [d.item for d in second] != [d.item for d in first] and {d.epoch for d in second} == {1}
    sampler.set_epoch(0)
    assert list(sampler) == first


@pytest.mark.parametrize("key, value, message", [
    ("oversample", -1, "strength >= 0"),
    ("oversample", "rare", "strength >= 0"),
    ("oversample_cap", 0.5, "cap >= 1"),
])
def test_bad_settings_are_one_line_config_errors(key, value, message):
    train = {"oversample": 1.0, "oversample_cap": 5.0, key: value}
    with pytest.raises(ConfigError, match=message) as err:
        check_settings(train)
    assert err.value.key == f"train.{key}"
    assert build_sampler({"oversample": False, "oversample_cap": 5.0}, np.ones((3, 2), bool), True, 0).weights is None
