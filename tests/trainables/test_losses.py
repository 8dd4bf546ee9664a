"""Losses by name and combination, class weights, ignored pixels, float32 under autocast."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainables.config import defaults
from trainables.errors import ConfigError
from trainables.losses import LOSSES, build_loss, class_weights, parse_combo

C = 4
COUNTS = np.array([500, 200, 60, 40])
NAMES = sorted(LOSSES) + ["0.5*focal+0.5*dice", "ce+lovasz"]
WEIGHTS = ["none", "inverse", "median", "sqrt_inverse", [1.0, 2.0, 0.5, 4.0]]


def loss_cfg(name="ce", weights="none", **extra) -> dict:
    cfg = defaults()["loss"]
    cfg.update(name=name, class_weights=weights, **extra)
    return cfg


def batch(task: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (2, C, 8, 8) and targets with a few ignored (255) pixels."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, C, 8, 8, generator=g)
    if task == "multiclass":
        target = torch.randint(0, C, (2, 8, 8), generator=g)
        target[0, 0, :5] = 255
    else:
        target = (torch.rand(2, C, 8, 8, generator=g) > 0.6).float()
        target[0, :, 0, :5] = 255
    return logits, target


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
@pytest.mark.parametrize("weights", WEIGHTS, ids=lambda w: w if isinstance(w, str) else "vector")
@pytest.mark.parametrize("name", NAMES)
def test_loss_builds_and_backpropagates(name, weights, task):
    fn = build_loss(loss_cfg(name, weights), task, C, COUNTS)
    logits, target = batch(task)
    logits.requires_grad_(True)
    loss = fn(logits, target)
    assert loss.shape == () and loss.dtype == torch.float32
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # ignored pixels get no gradient
    ignored = (target == 255) if task == "multiclass" else (target == 255)
    grad = logits.grad.permute(0, 2, 3, 1)[ignored] if task == "multiclass" else logits.grad[ignored]
    assert grad.abs().max() == 0


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
@pytest.mark.parametrize("name", NAMES)
def test_loss_is_float32_under_bf16_autocast(name, task):
    fn = build_loss(loss_cfg(name, "inverse"), task, C, COUNTS)
    logits, target = batch(task, seed=1)
    conv = torch.nn.Conv2d(C, C, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = conv(logits)
        assert low.dtype == torch.bfloat16
        loss = fn(low, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    reference = fn(low.detach().float(), target)
    assert torch.allclose(loss, reference)


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_combination_is_the_weighted_sum(task):
    logits, target = batch(task, seed=2)
    parts = {n: build_loss(loss_cfg(n), task, C, COUNTS)(logits, target) for n in ("focal", "dice", "ce", "lovasz")}
    combo = build_loss(loss_cfg("0.5*focal+0.5*dice"), task, C, COUNTS)(logits, target)
    assert torch.allclose(combo, 0.5 * parts["focal"] + 0.5 * parts["dice"])
    combo = build_loss(loss_cfg("ce+lovasz"), task, C, COUNTS)(logits, target)
    assert torch.allclose(combo, parts["ce"] + parts["lovasz"])


def test_parse_combo():
    assert parse_combo("0.5*focal+0.5*dice") == [(0.5, "focal"), (0.5, "dice")]
    assert parse_combo("CE + 2 * Lovasz") == [(1.0, "ce"), (2.0, "lovasz")]
    assert parse_combo("1e-1*dice") == [(0.1, "dice")]
    for bad in ("focall", "0.5*focal+", "focal*0.5", ""):
        with pytest.raises(ConfigError, match="loss.name"):
            parse_combo(bad)


def test_weighted_ce_matches_the_formula():
    # one image, 3 classes, 4 pixels (one ignored)
    logits = torch.tensor([[[[2.0, 0.0, -1.0, 5.0]], [[0.5, 1.0, 0.0, 5.0]], [[-1.0, 3.0, 2.0, 5.0]]]])
    target = torch.tensor([[[0, 2, 1, 255]]])
    weights = [1.0, 2.0, 3.0]
    fn = build_loss(loss_cfg("ce", weights), "multiclass", 3, np.array([1, 1, 1]))
    w = np.array(weights) / np.mean(weights)  # normalised to mean 1 (cancels in the weighted mean)
    x = logits[0, :, 0].numpy().T  # (pixel, class)
    nll = [-(x[i, t] - math.log(np.exp(x[i]).sum())) for i, t in enumerate([0, 2, 1])]
    expected = (w[0] * nll[0] + w[2] * nll[1] + w[1] * nll[2]) / (w[0] + w[2] + w[1])
    assert fn(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert fn(logits, target).item() == pytest.approx(5.0903 / 6, abs=1e-4)  # (0.2413 + 3*0.1697 + 2*2.1699) / 6
    torch_ref = torch.nn.functional.cross_entropy(logits, target, weight=torch.tensor(weights), ignore_index=255)
    assert fn(logits, target).item() == pytest.approx(torch_ref.item(), rel=1e-6)


def test_multilabel_bce_weights_and_ignore():
    logits = torch.tensor([[[[0.0, 2.0]], [[1.0, -1.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[[1.0, 255.0]], [[0.0, 255.0]]]])  # second pixel ignored
    fn = build_loss(loss_cfg("bce", [1.0, 3.0]), "multilabel", 2, np.array([1, 1]))
    # weights [0.5, 1.5]; pixel 0: class 0 -log(sigmoid(0)), class 1 -log(1 - sigmoid(1)); 2 valid entries
    expected = (0.5 * math.log(2) + 1.5 * math.log(1 + math.e)) / 2
    assert fn(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_multilabel_focal_ignores_pixels_per_channel():
    """Multilabel focal without ignored pixels equals smp's; ignored pixels change nothing."""
    from segmentation_models_pytorch.losses import FocalLoss

    logits, target = batch("multilabel", seed=3)
    target[target == 255] = 0
    fn = build_loss(loss_cfg("focal", [1.0, 2.0, 3.0, 4.0]), "multilabel", C, COUNTS)
    smp_loss = FocalLoss("multilabel", gamma=2.0, class_weights=[0.4, 0.8, 1.2, 1.6])(logits, target)
    assert fn(logits, target).item() == pytest.approx(smp_loss.item(), rel=1e-6)
    # adding ignored pixels whose logits are wild leaves the loss of the others unchanged
    wide_logits = torch.cat([logits, torch.full((2, C, 8, 3), 50.0)], dim=3)
    wide_target = torch.cat([target, torch.full((2, C, 8, 3), 255.0)], dim=3)
    assert fn(wide_logits, wide_target).item() == pytest.approx(fn(logits, target).item(), rel=1e-6)


def test_class_weights_hand_values():
    counts = np.array([10, 20, 70])  # frequencies .1 .2 .7
    inverse = [42 / 23, 21 / 23, 6 / 23]  # 1/f = 10, 5, 10/7 -> normalised to mean 1
    assert class_weights("inverse", counts) == pytest.approx(inverse)
    assert class_weights("median", counts) == pytest.approx(inverse)  # every image has every class: = inverse
    # median frequency balancing: freq = pixels / pixels of the images containing the class
    freq = np.array([10 / 50, 20 / 100, 70 / 100])  # .2 .2 .7, median .2 -> 1, 1, 2/7
    median = np.array([1, 1, 2 / 7])
    assert class_weights("median", counts, np.array([50, 100, 100])) == pytest.approx((median / median.mean()).tolist())
    assert np.median(freq) == pytest.approx(0.2)
    s = 1 / np.sqrt([0.1, 0.2, 0.7])
    assert class_weights("sqrt_inverse", counts) == pytest.approx((s / s.mean()).tolist())
    assert class_weights("sqrt_inverse", counts) == pytest.approx([1.4388, 1.0174, 0.5438], abs=1e-4)
    assert class_weights("none", counts) is None and class_weights(None, counts) is None
    assert class_weights([1, 1, 4], counts) == pytest.approx([0.5, 0.5, 2.0])
    # an absent class keeps weight 1; the present ones are normalised among themselves first
    assert class_weights("inverse", np.array([0, 10, 30])) == pytest.approx([1.0, 1.5, 0.5])
    for spec in ("inverse", "median", "sqrt_inverse", [2.0, 3.0, 4.0]):
        assert np.mean(class_weights(spec, counts)) == pytest.approx(1.0)


@pytest.mark.parametrize("spec, message", [
    ([1.0, 2.0], "the data has 3 classes, got 2 weights"),
    ([1.0, 0.0, 2.0], "must be positive"),
    ("inverted", "unknown scheme 'inverted'"),
])
def test_class_weights_errors(spec, message):
    with pytest.raises(ConfigError, match="loss.class_weights") as err:
        class_weights(spec, np.array([1, 2, 3]))
    assert message in str(err.value)
    with pytest.raises(ConfigError, match=message):
        build_loss(loss_cfg("ce", spec), "multiclass", 3, np.array([1, 2, 3]))


def test_unknown_loss_name():
    with pytest.raises(ConfigError, match="cannot read 'crossentropy'"):
        build_loss(loss_cfg("crossentropy"), "multiclass", 3, np.array([1, 2, 3]))
