"""How the members are combined: weights in the prediction and the bundle, and the decision on the
holdout that never ships a combination losing to the best member (``ensemble/combine.py``)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from tests.test_bundle import members  # noqa: F401 (fixture)


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
    out = write_bundle(tmp_path / "bundle", weighted, "none", "soft", {"thresholds": None}, "val_miou", "max")
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
