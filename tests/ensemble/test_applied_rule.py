"""The rule as prediction applies it, everywhere it is scored: the holdout rows are the bundle's rows.

Two tiny real members (random weights, one per fold) on the sample's val images (160 x 120);
out-of-fold predictions at ``max_size`` 32, so tuned pixel areas must be scaled by 25 to
the images' own size. The holdout step and ``ensemble/predict.py``'s bundle prediction then score
the same images and must agree row for row.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from tests.ensemble.test_ensemble import VAL_JSON, _one_torch_thread  # noqa: F401 (fixture)

MAX_SIZE = 32


def _member(tmp: Path, name: str, seed: int, class_names: list[str]):
    from ensemble.predictor import load_member
    from trainables.checkpoint import make_checkpoint, save_checkpoint
    from trainables.models import build_model

    cfg = tiny_config(**{"data.max_size": MAX_SIZE})
    torch.manual_seed(seed)
    m = cfg["model"]
    model = build_model(m["arch"], m["encoder"], len(class_names), weights=None, kwargs=m["kwargs"])
    path = save_checkpoint(make_checkpoint(model.state_dict(), cfg, class_names, "multiclass", "val_miou",
                                           0.1 * (seed + 1), 1, seed), tmp / name / "model.pt")
    return load_member(path, name, torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ensemble.predictor import Ensemble
    from trainables.data import load_dataset

    tmp = tmp_path_factory.mktemp("applied")
    cache = tmp / "cache"
    data = load_dataset(VAL_JSON, cache_dir=cache)
    members = [_member(tmp, f"m{k}", k, data.class_names) for k in range(2)]
    ensembles = {k: Ensemble([m], device="cpu") for k, m in enumerate(members)}
    half = len(data.ids) // 2
    return SimpleNamespace(tmp=tmp, cache=cache, data=data, members=members, ensembles=ensembles,
                           folds=[data.ids[:half], data.ids[half:]])


def _fit(tiny, metric: str, min_area: bool) -> dict:
    from ensemble.oof import oof_evaluate

    out = tiny.tmp / f"oof-{metric}-{min_area}"
    return oof_evaluate(tiny.ensembles, tiny.data, folds=tiny.folds, max_size=MAX_SIZE, out_dir=out, batch_size=12,
                        tune_min_area=min_area, metric=metric, empty=1.0)


def _bundle_rule(post: dict, thresholds: dict) -> dict:
    """What ``ensemble/run.py`` writes into the bundle."""
    from ensemble.crossfit import prediction_rule

    return prediction_rule(thresholds, post, MAX_SIZE)


@pytest.mark.parametrize("metric, min_area, areas", [("val_miou", True, "min_area"),
                                                     ("val_miou_image", False, "empty_area")])
def test_holdout_rows_are_the_bundles_rows(tiny, tmp_path, metric, min_area, areas):
    from ensemble.bundle import load_bundle, write_bundle
    from ensemble.holdout import holdout_step
    from ensemble.predict import predict_with_bundle

    result = _fit(tiny, metric, min_area)
    thresholds = result["thresholds"]
    assert any(a > 0 for a in thresholds[areas])  # areas were tuned: scaling them to 160 x 120 matters
    # every step kept, so prediction applies the whole tuned rule, areas included
    steps = {name: {**record, "kept": True} for name, record in result["steps"].items()}
    post = {"crf": None, "steps": steps}
    rows = holdout_step(tiny.ensembles, tiny.data, holdout=list(tiny.data.ids), thresholds=thresholds, post=post,
                        steps=steps, mode="max", max_size=MAX_SIZE,
                        batch_size=12)
    assert rows["applied"] == "tuned" and rows["images"] == len(tiny.data.ids)

    bundle_dir = write_bundle(tmp_path / "bundle", tiny.members, tta="none", voting="soft",
                              rule=_bundle_rule(post, thresholds), metric=metric, mode="max")
    res = predict_with_bundle(load_bundle(bundle_dir, "cpu"), VAL_JSON, out=tmp_path / "pred", batch_size=12,
                              device="cpu", cache_dir=tiny.cache)
    test = res["test_rows"]
    assert rows["single_member"] == "m1"
    for key, want in (("single", "single"), ("ensemble", "ensemble"), (rows["applied"], "tuned")):
        assert rows[key]["miou"] == pytest.approx(test[want]["miou"], abs=1e-12), key
        np.testing.assert_allclose(rows[key]["iou_per_class"], test[want]["iou_per_class"], atol=1e-12,
                                   equal_nan=True, err_msg=key)
    assert rows["tuned"]["miou"] != rows["ensemble"]["miou"]  # the rule changed something
