"""The CRF step's keep decision and holdout rows, without the optional ``pydensecrf2``.

The CRF's fit (grid, thresholds on refined probabilities, cross-fitted keep decision) and the
holdout rows do not depend on what the refinement is, so they are driven here by a small real
refinement in its place: a box filter over the probabilities whose width follows the grid's
``sxy_bilateral`` (it removes isolated wrong pixels, as a CRF does).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage

from tests.conftest import tiny_config
from tests.ensemble.test_ensemble import VAL_JSON, _one_torch_thread  # noqa: F401 (fixture)

MAX_SIZE = 48


def smooth(probs: np.ndarray, image: np.ndarray, params: dict | None) -> np.ndarray:
    """Stand-in refinement: probabilities box-filtered over ``sxy_bilateral // 10`` pixels, renormalised."""
    if image.shape[:2] != probs.shape[1:]:
        raise ValueError(f"image {image.shape} does not match probabilities {probs.shape}")
    size = max(1, int((params or {}).get("sxy_bilateral", 10)) // 10)
    q = ndimage.uniform_filter(probs.astype(np.float32), size=(1, size, size), mode="nearest")
    return q / np.maximum(q.sum(0, keepdims=True), 1e-12)


def fake_experiment(tmp: Path, metric: str, holdout: float | None = 0.25, edit=None) -> SimpleNamespace:
    """runs/<name>/ as tune/run.py leaves it, on the sample's val images with a quarter held out, from
    untrained tiny members (one per fold): the ensemble step runs on it in seconds. ``edit(fold,
    model, data)``: changes a member's weights before it is saved."""
    from trainables.checkpoint import make_checkpoint, save_checkpoint
    from trainables.config import resolve
    from trainables.data import load_data
    from trainables.folds import load_or_make_folds
    from trainables.models import build_model
    from trainables.runfiles import write_experiment_json, write_trials_csv

    run_dir, cache = tmp / "run", tmp / "cache"
    run_dir.mkdir()
    base = resolve({"data": {"path": str(VAL_JSON), "max_size": MAX_SIZE, "cache_dir": str(cache)},
                    "folds": {"k": 2, "seed": 0, "holdout": holdout}})
    data = load_data(base["data"])
    f = base["folds"]
    folds = load_or_make_folds(run_dir / "folds.json", f["strategy"], k=f["k"], seed=f["seed"], ids=data.ids,
                               presence=data.presence,
                               fingerprint=data.fingerprint, group_regex=f["group_regex"], holdout=f["holdout"])
    cfg = tiny_config(**{"data": base["data"], "folds": base["folds"]})
    rows = []
    for fold in range(2):
        torch.manual_seed(fold)
        m = cfg["model"]
        model = build_model(m["arch"], m["encoder"], data.num_classes, weights=None, kwargs=m["kwargs"])
        if edit is not None:
            edit(fold, model, data)
        score = 0.1 * (fold + 1)
        path = save_checkpoint(make_checkpoint(model.state_dict(), cfg, data.class_names, "multiclass", metric,
                                               score, 1, fold), run_dir / "tune" / f"t{fold}" / "model.pt")
        rows.append({"trial_id": f"t{fold}", "fold": fold, "status": "completed", "retrain": False, "epochs": 1,
                     "best_epoch": 1, f"best_{metric}": score, "node": "test", "error": "", "checkpoint": str(path)})
    write_trials_csv(run_dir / "trials.csv", rows)
    settings = {"space": "test", "name": "tiny", "fixed": cfg, "search": {"metric": metric, "mode": "max"},
                "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0}, "space_params": []}
    write_experiment_json(run_dir, settings, {"fingerprint": data.fingerprint, "source": str(data.source),
                                              "class_names": data.class_names, "task": data.task,
                                              "images": len(data)})
    return SimpleNamespace(run_dir=run_dir, cache=cache, data=data, folds=folds)


def test_crf_with_a_per_image_metric_runs_to_the_report(tmp_path, monkeypatch):
    """``ensemble/run.py --crf`` on a search of val_miou_image: the CRF step is judged on miou_image,
    and the report, the holdout's row (d) and the bundle follow."""
    import ensemble.crf
    import ensemble.crf_apply
    from ensemble.run import main

    exp = fake_experiment(tmp_path, "val_miou_image")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(ensemble.crf, "missing", lambda: None)
    monkeypatch.setattr(ensemble.crf, "refine", smooth)  # the fit
    monkeypatch.setattr(ensemble.crf_apply, "refine", smooth)  # the holdout and the bundle apply it
    main(["--experiment", str(exp.run_dir), "--crf", "--top-k", "1", "--batch-size", "12"])
    report = json.loads((exp.run_dir / "ensemble" / "oof_metrics.json").read_text())
    post = json.loads((exp.run_dir / "ensemble" / "postprocessing.json").read_text())["crf"]
    assert post["step"]["metric"] == "miou_image" and "miou_image" in report["crf"]
    assert report["optimism"]["crf"] == pytest.approx(report["crf_in_sample"]["miou_image"]
                                                      - report["crf"]["miou_image"])
    assert "crf" in report["holdout"]


# --------------------------------------------------------------------------- keep decision, synthetic


C = 3


class Speckled:
    """Out-of-fold images as :class:`ensemble.crf.OOFImages` gives them: two class blocks on class 0,
    probabilities confident on the truth except isolated pixels wrongly confident (a box filter of
    width 3 corrects them, one of width 1 does nothing)."""

    def __init__(self, n: int = 8, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.data = SimpleNamespace(task="multiclass", num_classes=C, ignore_index=255)
        self.items = []
        for _ in range(n):
            truth = np.zeros((24, 24), dtype=np.int64)
            truth[4:14, 2:12], truth[10:22, 12:22] = 1, 2
            label = truth.copy()
            specks = rng.random(truth.shape) < 0.08
            label[specks] = (truth[specks] + rng.integers(1, C, specks.sum())) % C
            probs = np.full((C, 24, 24), 0.1, dtype=np.float32)
            probs[label, np.arange(24)[:, None], np.arange(24)] = 0.8
            self.items.append((np.zeros((24, 24, 3), np.uint8), probs, truth))

    def __call__(self, i: int, probs: bool = True):
        image, p, mask = self.items[i]
        return image, (p if probs else None), mask


def _argmax_metrics(load: Speckled, images, per_image: bool = False) -> dict:
    from trainables.metrics import SegMetrics

    m = SegMetrics(C, "multiclass", 255, per_image=per_image)
    for i in images:
        _, p, mask = load(i)
        m.update(torch.from_numpy(p.argmax(0))[None], torch.from_numpy(mask)[None])
    return m.compute()


def _fit(load, folds, baseline, tmp, per_image=False):
    from ensemble.crf import fit_crf
    from ensemble.rules import decide
    from ensemble.thresholds import MulticlassThresholdTuner
    from trainables.metrics import SegMetrics

    images = list(range(len(load.items)))
    return fit_crf(load, images, {i: folds[i] for i in images}, lambda: MulticlassThresholdTuner(C, fallback=0, bins=20),
                   lambda p, rule: decide(p, rule, "multiclass"), baseline, tmp, ["a", "b", "c"],
                   grid=[{"sxy_bilateral": 10}, {"sxy_bilateral": 30}], refine_fn=smooth,
                   key="miou_image" if per_image else "miou",
                   new_metrics=lambda: SegMetrics(C, "multiclass", 255, per_image=per_image))


@pytest.mark.parametrize("per_image", [False, True])
def test_crf_kept_only_when_its_cross_fitted_gain_beats_the_rule_before(tmp_path, per_image):
    load = Speckled()
    folds = [k % 2 for k in range(len(load.items))]
    key = "miou_image" if per_image else "miou"
    b = _argmax_metrics(load, range(len(load.items)), per_image)
    with_cf, with_in, post = _fit(load, folds, {"name": "ensemble", "cross_fitted": b, "in_sample": b},
                                  tmp_path / "a", per_image)
    record = post["crf"]["step"]
    assert record["metric"] == key and key in with_cf and key in with_in
    assert post["crf"]["params"] == {"sxy_bilateral": 30} and set(post["crf"]["params_per_fold"]) == {"0", "1"}
    assert with_cf[key] > b[key] and record["gain"] == pytest.approx(with_cf[key] - b[key])
    assert record["kept"] and post["crf"]["kept"] and record["compared_with"] == "ensemble"
    # a rule kept before it that scores better, cross-fitted: the same CRF is not kept
    better = {**b, key: with_cf[key] + 0.01}
    _, _, post = _fit(load, folds, {"name": "tuned", "cross_fitted": better, "in_sample": better},
                      tmp_path / "b", per_image)
    assert not post["crf"]["kept"] and post["crf"]["step"]["gain"] == pytest.approx(-0.01)
    assert post["crf"]["step"]["compared_with"] == "tuned"


def test_crf_on_one_fold_is_not_cross_fitted_nor_kept(tmp_path, caplog):
    load = Speckled()
    b = _argmax_metrics(load, range(len(load.items)))
    with_cf, with_in, post = _fit(load, [0] * len(load.items), {"name": "ensemble", "cross_fitted": b,
                                                                  "in_sample": b}, tmp_path)
    assert with_cf["miou"] == b["miou"] and with_in["miou"] > b["miou"]  # only the in-sample score moved
    assert not post["crf"]["kept"] and post["crf"]["step"]["gain"] == 0
    assert "cannot be cross-fitted" in caplog.text


def test_crf_competes_with_the_best_rule_kept_before_it():
    from ensemble.crf import crf_baseline

    rows = {k: {"miou": v} for k, v in (("ensemble", 0.5), ("tuned", 0.6), ("thresholds_only", 0.55))}
    rows.update({f"{k}_in_sample": {"miou": v["miou"] + 0.1} for k, v in rows.items()})
    yes, no = {"kept": True}, {"kept": False}
    for steps, name in (({"thresholds": yes}, "tuned"), ({"thresholds": yes, "min_area": yes}, "tuned"),
                        ({"thresholds": yes, "min_area": no}, "thresholds_only"), ({"thresholds": no}, "ensemble"),
                        ({"thresholds": no, "min_area": no}, "ensemble")):
        base = crf_baseline({**rows, "steps": steps})
        assert base["name"] == name and base["cross_fitted"] is rows[name]
        assert base["in_sample"] is rows[name if name == "ensemble" else f"{name}_in_sample"]


# --------------------------------------------------------------------------- holdout rows with a CRF


@pytest.mark.parametrize("crf_kept, thresholds_kept, applied", [(True, True, "crf"), (False, True, "tuned"),
                                                                 (False, False, "ensemble")])
def test_holdout_crf_row_and_what_prediction_applies(tmp_path, crf_kept, thresholds_kept, applied):
    """Row (d) on the holdout is the CRF's rule at the images' size, refined at ``max_size``, whether
    kept or not; ``applied`` names the row the bundle's rule is."""
    from sklearn.metrics import confusion_matrix

    from ensemble.crf import refine_at
    from ensemble.holdout import holdout_step
    from ensemble.predictor import Ensemble, load_member
    from ensemble.rules import decide

    exp = fake_experiment(tmp_path, "val_miou")
    rows = [r for r in __import__("csv").DictReader(open(exp.run_dir / "trials.csv"))]
    members = [load_member(r["checkpoint"], r["trial_id"], torch.device("cpu")) for r in rows]
    ensembles = {k: Ensemble([m], device="cpu") for k, m in enumerate(members)}
    rule = {"thresholds": [0.0, 0.3] + [0.0] * (exp.data.num_classes - 2), "fallback": 0,
            "min_area": [0, 4] + [0] * (exp.data.num_classes - 2)}
    crf_rule = {**rule, "min_area": [0, 2] + [0] * (exp.data.num_classes - 2)}
    params = {"sxy_bilateral": 30}
    steps = {"thresholds": {"kept": thresholds_kept}}
    post = {"crf": {"kept": crf_kept, "params": params, "thresholds": crf_rule}, "steps": steps}
    held = [exp.data.ids[i] for i in range(0, len(exp.data.ids), 4)]
    got = holdout_step(ensembles, exp.data, holdout=held, thresholds=rule, post=post, steps=steps, mode="max",
                       max_size=MAX_SIZE, batch_size=12, refine=smooth)
    assert got["applied"] == applied and {"single", "ensemble", "tuned", "crf"} <= set(got)
    # row (d) by hand: every member's average, refined at max_size, decided with areas at the image's size
    n = exp.data.num_classes
    cm = np.zeros((n, n + 1), dtype=np.int64)
    everyone = Ensemble(members, device="cpu")
    for image_id in held:
        i = exp.data.ids.index(image_id)
        image = exp.data.read_image(i)
        probs = everyone.predict_batch([image])[0]
        labels = decide(refine_at(probs, image, params, MAX_SIZE, smooth), {**crf_rule, "max_size": MAX_SIZE},
                        "multiclass").astype(np.int64)
        mask = exp.data.read_mask(i)
        keep = mask != 255
        cm += confusion_matrix(mask[keep], np.where(labels[keep] == 255, n, labels[keep]), labels=range(n + 1))[:n]
    tp = np.diag(cm[:, :n])
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (cm.sum(1) + cm[:, :n].sum(0) - tp)
    np.testing.assert_allclose(got["crf"]["iou_per_class"], iou, atol=1e-12, equal_nan=True)
