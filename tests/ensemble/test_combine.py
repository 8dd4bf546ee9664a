"""How the members are combined: weights in the prediction and the bundle, and the decision on the
holdout that never ships a combination losing to the best member (``ensemble/combine.py``)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from tests.ensemble.test_bundle import members  # noqa: F401 (fixture)
from tests.ensemble.test_ensemble import _one_torch_thread  # noqa: F401 (fixture)


class Constant(torch.nn.Module):
    """Logits that are the same at every pixel (any input size)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x):
        return self.logits[None, :, None, None].expand(x.shape[0], -1, *x.shape[2:])


class Refuses(torch.nn.Module):
    def forward(self, x):
        raise AssertionError("a member of weight 0 was run")


# --------------------------------------------------------------------------- prediction side


def test_weighted_average_against_a_hand_computation():
    from ensemble.predictor import TTA, Ensemble, Member

    logits = [[2.0, 0.0, -1.0], [0.0, 1.5, 0.0], [-3.0, 0.0, 4.0]]
    weights = [3.0, 0.5, 0.0]
    models = [Constant(logits[0]), Constant(logits[1]), Refuses()]
    members = [Member(f"m{k}", 0, model, (16, 16), "multiclass", ["a", "b", "c"], weight=w)
               for k, (model, w) in enumerate(zip(models, weights))]
    image = np.zeros((20, 30, 3), np.uint8)

    def softmax(v):
        e = np.exp(np.array(v) - max(v))
        return e / e.sum()

    want = (3.0 * softmax(logits[0]) + 0.5 * softmax(logits[1])) / 3.5
    for tta in ("none", "hflip"):  # views are averaged within a member, weights across members
        ens = Ensemble(members, TTA.parse(tta), device="cpu")
        probs = ens.predict_batch([image])[0]
        assert probs.shape == (3, 20, 30)
        np.testing.assert_allclose(probs[:, 7, 11], want, rtol=1e-5)
        both = ens.predict_batch_and_member([image], keep=0)[0]
        np.testing.assert_allclose(both[0][:, 0, 0], want, rtol=1e-5)
        np.testing.assert_allclose(both[1][:, 0, 0], softmax(logits[0]), rtol=1e-5)
    # default weights: the plain mean, as before
    plain = Ensemble([dataclasses.replace(m, weight=1.0) for m in members[:2]], device="cpu")
    np.testing.assert_allclose(plain.predict_batch([image])[0][:, 0, 0],
                               (softmax(logits[0]) + softmax(logits[1])) / 2, rtol=1e-5)
    with pytest.raises(ValueError, match="sum to 0"):
        Ensemble([dataclasses.replace(members[0], weight=0.0)], device="cpu")
    with pytest.raises(ValueError, match=">= 0"):
        Ensemble([dataclasses.replace(members[0], weight=-1.0)], device="cpu")


def test_bundle_round_trip_of_weights(members, tmp_path):  # noqa: F811
    from ensemble.bundle import load_bundle, write_bundle, write_manifest
    from ensemble.predictor import Ensemble
    from trainables.errors import InputError

    weighted = [dataclasses.replace(members[0], weight=3.0), dataclasses.replace(members[1], weight=1.0),
                dataclasses.replace(members[0], name="dropped", weight=0.0)]
    out = write_bundle(tmp_path / "bundle", weighted, tta="none", voting="soft", rule={"thresholds": None},
                       metric="val_miou", mode="max")
    info = json.loads((out / "bundle.json").read_text())
    assert [(m["name"], m["weight"]) for m in info["members"]] == [("m0", 3.0), ("m1", 1.0)]  # weight 0: not written
    bundle = load_bundle(out)
    assert [m.weight for m in bundle.members] == [3.0, 1.0]
    image = [np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)]
    got = bundle.ensemble("cpu").predict_batch(image)[0]
    np.testing.assert_array_equal(got, Ensemble(weighted, device="cpu").predict_batch(image)[0])
    p0, p1 = (Ensemble([m], device="cpu").predict_batch(image)[0] for m in members)
    np.testing.assert_allclose(got, (3 * p0 + p1) / 4, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, (p0 + p1) / 2, atol=1e-4)  # the weights changed the average

    # a bundle written before weights: every member weighs 1
    for m in info["members"]:
        del m["weight"]
    (out / "bundle.json").write_text(json.dumps(info))
    write_manifest(out)
    assert [m.weight for m in load_bundle(out).members] == [1.0, 1.0]
    info["members"][1]["weight"] = -2
    (out / "bundle.json").write_text(json.dumps(info))
    write_manifest(out)
    with pytest.raises(InputError, match="weight -2"):
        load_bundle(out)


# --------------------------------------------------------------------------- fit side, synthetic probabilities

C = 3


def _data():
    from types import SimpleNamespace

    return SimpleNamespace(task="multiclass", num_classes=C, ignore_index=255)


def synthetic(quality: np.ndarray, pixels: int = 300, seed: int = 0):
    """Member probabilities (M, C, P) on ``quality.shape[1]`` images of ``pixels`` pixels: at a pixel of
    image i, member m favours the true class with probability ``quality[m, i]`` and a wrong class
    otherwise, with independent noise (so averaging good members helps)."""
    rng = np.random.default_rng(seed)
    m, n = quality.shape
    owner = np.repeat(np.arange(n), pixels)
    target = rng.integers(0, C, owner.size)
    probs = np.empty((m, C, owner.size), np.float32)
    for k in range(m):
        right = rng.random(owner.size) < quality[k, owner]
        label = np.where(right, target, (target + rng.integers(1, C, owner.size)) % C)
        logits = rng.normal(0.0, 1.0, (C, owner.size))
        logits[label, np.arange(owner.size)] += 1.5
        e = np.exp(logits - logits.max(0))
        probs[k] = e / e.sum(0)
    return probs.astype(np.float16), target, owner


def hand_miou(probs: np.ndarray, subset, target, rows) -> float:
    """mIoU of the plain mean of members ``subset`` on pixels ``rows``, from a confusion matrix."""
    pred = probs[list(subset)][:, :, rows].astype(np.float32).mean(0).argmax(0)
    return _miou_of(pred, target[rows])


def _miou_of(pred, truth) -> float:
    conf = np.bincount(truth * C + pred, minlength=C * C).reshape(C, C)
    inter = np.diag(conf)
    return float(np.mean(inter / (conf.sum(0) + conf.sum(1) - inter)))


def brute_force(probs, target, rows) -> tuple[int, ...]:
    """The best non-empty keep/drop subset on ``rows``, over all 2^M - 1 of them."""
    import itertools

    m = probs.shape[0]
    subsets = [s for r in range(1, m + 1) for s in itertools.combinations(range(m), r)]
    return max(subsets, key=lambda s: hand_miou(probs, s, target, rows))


def test_fitted_on_one_half_and_scored_on_the_other_as_a_brute_force_finds():
    """Members 0 and 1 are good on the first half's images and poor on the second's, members 2 and 3
    the reverse: each half's best subset is scored on the other half, where it is poor, so the pooled
    cross-fitted score is far below the in-sample one."""
    from ensemble.combine import decide_combination, split_halves

    n, seed = 8, 3
    first, second = split_halves(n, seed)
    assert sorted([*first, *second]) == list(range(n)) and abs(len(first) - len(second)) <= 1
    quality = np.full((4, n), 0.35)
    quality[:2, first], quality[2:, second] = 0.8, 0.8
    quality[0, first] = quality[2, second] = 0.9
    probs, target, owner = synthetic(quality)
    weights, record = decide_combination(probs, target, owner=owner, data=_data(), key="miou", mode="max", best=0,
                                         names=["a", "b", "c", "d"], seed=seed)
    rows = [np.flatnonzero(np.isin(owner, h)) for h in (first, second)]
    picks = [brute_force(probs, target, r) for r in rows]
    assert picks == [(0, 1), (2, 3)]  # the known answer: each half's two good members
    assert record["half_weights"] == [[1.0 if k in p else 0.0 for k in range(4)] for p in picks]
    # pooled over both halves, each half predicted by the other half's pick
    pred = np.empty_like(target)
    for fit, score in ((0, 1), (1, 0)):
        pred[rows[score]] = probs[list(picks[fit])][:, :, rows[score]].astype(np.float32).mean(0).argmax(0)
    cross = _miou_of(pred, target)
    assert record["scores"]["fitted"] == pytest.approx(cross, abs=1e-6)
    everything = np.arange(len(owner))
    in_sample = brute_force(probs, target, everything)
    assert record["fitted_weights"] == [1.0 if k in in_sample else 0.0 for k in range(4)]
    assert record["fitted_in_sample"] == pytest.approx(hand_miou(probs, in_sample, target, everything), abs=1e-6)
    assert record["fitted_in_sample"] > cross + 0.1  # scoring where it was fitted would look far better
    assert record["scores"]["uniform"] == pytest.approx(hand_miou(probs, range(4), target, everything), abs=1e-6)
    assert record["scores"]["best_member"] == pytest.approx(hand_miou(probs, [0], target, everything), abs=1e-6)
    assert record["shipped"] != "fitted" and weights == record["weights"]


@pytest.mark.parametrize("per_image", [False, True])
def test_never_ships_an_average_that_loses_to_a_member(per_image):
    """Member 0 is right on most pixels; members 1 and 2 are mostly wrong: their average loses to member 0.
    The shipped combination must not be the uniform average."""
    from ensemble.combine import decide_combination

    n = 10
    quality = np.array([[0.9] * n, [0.3] * n, [0.3] * n])
    probs, target, owner = synthetic(quality, seed=1)
    key = "miou_image" if per_image else "miou"
    weights, record = decide_combination(probs, target, owner=owner, data=_data(), key=key, mode="max", best=0,
                                         names=["good", "bad1", "bad2"], seed=0)
    s = record["scores"]
    assert s["uniform"] < s["best_member"]
    assert record["shipped"] == "best_member" and weights == [1.0, 0.0, 0.0]
    assert "does not beat" in record["reason"]
    # the best member by validation score is a bad one: the fitted keep/drop (member 0) beats both
    weights, record = decide_combination(probs, target, owner=owner, data=_data(), key=key, mode="max", best=1,
                                         names=["good", "bad1", "bad2"], seed=0)
    s = record["scores"]
    assert s["fitted"] > max(s["uniform"], s["best_member"])
    assert record["shipped"] == "fitted" and weights == [1.0, 0.0, 0.0] and "beats" in record["reason"]


def test_uniform_average_is_kept_when_nothing_beats_it():
    from ensemble.combine import decide_combination

    quality = np.full((3, 10), 0.7)
    probs, target, owner = synthetic(quality, seed=2)
    weights, record = decide_combination(probs, target, owner=owner, data=_data(), key="miou", mode="max", best=2,
                                         names=["a", "b", "c"], seed=0)
    s = record["scores"]
    assert s["uniform"] > s["best_member"] and s["fitted"] <= s["uniform"]
    assert record["shipped"] == "uniform" and weights == [1.0, 1.0, 1.0]


# --------------------------------------------------------------------------- the ensemble step, end to end


def _biased(fold, model, data):
    """Fold 0's member leans towards the most frequent class, fold 1's (the better validation score)
    overwhelmingly towards the rarest: the plain average is fold 1's member, worse than fold 0's."""
    counts = data.pixel_counts
    with torch.no_grad():
        bias = model.segmentation_head[0].bias
        if fold == 0:
            bias[int(np.argmax(counts))] += 3.0
        else:
            bias[int(np.argmin(counts))] += 20.0


@pytest.mark.slow
def test_ensemble_step_ships_the_holdouts_decision(tmp_path, monkeypatch, capsys, _one_torch_thread):  # noqa: F811
    from ensemble.bundle import load_bundle
    from ensemble.holdout import holdout_indices
    from ensemble.infer import score_rows
    from ensemble.run import main
    from tests.ensemble.test_crf_decisions import fake_experiment
    from trainables.folds import read_holdout

    exp = fake_experiment(tmp_path, "val_miou", edit=_biased)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    main(["--experiment", str(exp.run_dir), "--top-k", "1", "--batch-size", "12"])
    printed = capsys.readouterr().out
    out = exp.run_dir / "ensemble"
    report = json.loads((out / "oof_metrics.json").read_text())
    comb = report["combination"]
    assert comb["members"] == ["t0", "t1"] and comb["best_member"] == "t1" and comb["metric"] == "miou"
    s = comb["scores"]
    assert s["fitted"] > max(s["uniform"], s["best_member"])
    assert comb["shipped"] == "fitted" and comb["weights"] == [1.0, 0.0] and comb["reason"]
    assert "shipped: fitted combination (1 of 2 members)" in printed and "rows (b)-(d): the shipped fitted" in printed
    # the bundle holds the shipped combination, and the holdout rows (b) are what it predicts
    info = json.loads((out / "bundle" / "bundle.json").read_text())
    assert [(m["name"], m["weight"]) for m in info["members"]] == [("t0", 1.0)]
    h = report["holdout"]
    assert h["combination"] == "fitted" and h["single_member"] == "t1"
    index = holdout_indices(exp.data, read_holdout(exp.run_dir / "folds.json"))
    assert h["images"] == len(index) > 1
    bundle = load_bundle(out / "bundle", "cpu")
    rows = score_rows(bundle.ensemble("cpu"), exp.data, index, None, None, None, 12)
    assert h["ensemble"]["miou"] == pytest.approx(rows["ensemble"]["miou"], abs=1e-12)
    assert h["ensemble"]["miou"] > h["single"]["miou"]  # on the holdout the shipped one beats row (a)


def test_ensemble_step_without_a_holdout_says_the_comparison_is_unknown(tmp_path, monkeypatch, capsys,
                                                                          _one_torch_thread):  # noqa: F811
    from ensemble.run import main
    from tests.ensemble.test_crf_decisions import fake_experiment

    exp = fake_experiment(tmp_path, "val_miou", holdout=None)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    main(["--experiment", str(exp.run_dir), "--top-k", "1", "--batch-size", "12"])
    printed = capsys.readouterr().out
    report = json.loads((exp.run_dir / "ensemble" / "oof_metrics.json").read_text())
    assert "holdout" not in report
    assert report["combination"]["shipped"] == "uniform" and report["combination"]["weights"] is None
    assert "unknown" in report["combination"]["reason"] and "--set folds.holdout=0.1" in printed
    info = json.loads((exp.run_dir / "ensemble" / "bundle" / "bundle.json").read_text())
    assert [(m["name"], m["weight"]) for m in info["members"]] == [("t0", 1.0), ("t1", 1.0)]
