"""Fully connected CRF post-processing (Krähenbühl & Koltun 2011), fitted out-of-fold.

Optional: needs ``pydensecrf2`` (``pip install pydensecrf2==1.1``; it builds from source and
needs a C++ compiler). Without it ``--crf`` stops with one line saying so.

:func:`ensemble.crf_apply.refine` (prediction side) turns ensemble probabilities (C, H, W) and the
image into CRF marginals of the same shape; this module fits its parameters.

Fit, then apply (as the thresholds), cross-fitted (``ensemble/crossfit.py``): :func:`fit_crf`
scores a small grid of kernel parameters by argmax mIoU on up to ``tune_images`` out-of-fold
images, re-tunes the class thresholds on the refined out-of-fold probabilities of every image,
and keeps the CRF only when refined + re-tuned beats, cross-fitted, the best rule kept before it
(row (c) when the thresholds were kept, else row (b)). For the cross-fitted score fold f gets
parameters chosen and thresholds fitted without its images. The choice, the parameters, the
thresholds for refined probabilities and the numbers go to ``postprocessing.json``; prediction
only reads it. The CRF runs at the resolution the
out-of-fold probabilities had (the experiment's ``data.max_size``): spatial parameters are in
those pixels, so inference downscales, refines and upsamples (:func:`ensemble.crf_apply.refine_at`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ensemble.crf_apply import DEFAULT, INSTALL, missing, refine, refine_at  # noqa: F401  (ensemble/run.py, tests)
from ensemble.crossfit import score_key, step_record
from ensemble.oof import image_metric, make_tuner
from ensemble.thresholds import merge_tuners
from trainables.dataset import SegDataset
from trainables.errors import ConfigError
from trainables.io import atomic_path
from trainables.metrics import SegMetrics, iou_from_counts, mean_defined
from trainables.runfiles import EnsembleFiles

logger = logging.getLogger(__name__)

# bilateral kernel width, colour range and weight: the parameters that matter most
GRID = [{**DEFAULT, "sxy_bilateral": sxy, "srgb": srgb, "compat_bilateral": w}
        for sxy in (20, 60) for srgb in (5, 13) for w in (3, 8)]


def _confusion(labels: np.ndarray, mask: np.ndarray, num_classes: int, ignore: int) -> np.ndarray:
    valid = mask != ignore
    index = mask[valid].astype(np.int64) * num_classes + labels[valid]
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _miou(confusion: np.ndarray) -> float:
    tp = np.diag(confusion)
    return float(mean_defined(iou_from_counts(tp, confusion.sum(0) - tp, confusion.sum(1) - tp)))


class OOFImages:
    """(image, probabilities, mask) of an out-of-fold image at the out-of-fold size, read back
    from ``<report>/oof_probs`` as written by :func:`ensemble.oof.oof_evaluate`."""

    def __init__(self, data, max_size: int | None, prob_dir: Path):
        self.data, self.prob_dir = data, prob_dir
        self.dataset = SegDataset(data, [], transform=None, max_size=max_size, cache=False)

    def __call__(self, i: int, probs: bool = True) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        image, mask = self.dataset.load(i)
        p = np.load(self.prob_dir / f"{i}.npy").astype(np.float32) if probs else None
        return image, p, mask


def _grid_confusions(pairs, grid: list[dict], num_classes: int, ignore: int, refine_fn) -> np.ndarray:
    """(1 + len(grid), images, C, C) argmax confusion of each image: unrefined, then each grid entry."""
    out = np.zeros((len(grid) + 1, len(pairs), num_classes, num_classes), dtype=np.int64)
    with tqdm(total=len(pairs) * (len(grid) + 1), desc="CRF grid", leave=False, disable=None) as bar:
        for j, (image, probs, mask) in enumerate(pairs):
            for g, params in enumerate([None, *grid]):
                q = probs if params is None else refine_fn(probs, image, params)
                out[g, j] = _confusion(q.argmax(0), mask, num_classes, ignore)
                bar.update()
    return out


def fit_crf(load: OOFImages, images: list[int], image_folds: dict[int, int], make_tuner, decide, baseline: dict,
            out_dir: Path, class_names: list[str], tune_images: int = 24, grid: list[dict] | None = None, *,
            key: str = "miou", new_metrics=None, refine_fn=None) -> tuple[dict, dict, dict]:
    """Fit the CRF on the out-of-fold ``images``, cross-fitted; returns (row (d) cross-fitted, row (d)
    in-sample, the ``postprocessing.json`` content).

    For each fold f the kernel parameters are chosen on the grid images of the other folds, the
    thresholds of the refined probabilities are fitted on the other folds' refined images, and fold
    f's images are scored with both; the parameters and thresholds written for prediction are fitted
    on every image. ``make_tuner()`` gives a fresh threshold tuner, ``decide(probs, thresholds)`` is
    the ensemble's decision rule and ``baseline`` ({"cross_fitted": ..., "in_sample": ..., "name": ...})
    the metrics of the best rule kept before the CRF, which it must beat cross-fitted to be kept.

    ``key``: the score a step must improve (:func:`ensemble.crossfit.score_key`: mIoU, or the per-image
    score the search optimised), ``new_metrics()`` a fresh ``SegMetrics`` that computes it (default:
    dataset-level). ``refine_fn(probs, image, params)``: the refinement (default :func:`refine`, the
    CRF). With the images of one fold nothing is cross-fitted: row (d) cross-fitted is the rule
    before it and the CRF is not kept.
    """
    data = load.data
    if refine_fn is None:
        problem = missing()
        if problem:
            raise ConfigError("command line", "--crf", problem)
        refine_fn = refine
    if data.task != "multiclass":
        raise ConfigError("command line", "--crf", "the CRF refines softmax probabilities: multiclass tasks only")
    grid = grid or GRID
    pick = [images[k] for k in np.linspace(0, len(images) - 1, min(tune_images, len(images))).round().astype(int)]
    pick = list(dict.fromkeys(pick))
    n, ignore = data.num_classes, data.ignore_index
    new_metrics = new_metrics or (lambda: SegMetrics(n, "multiclass", ignore))
    confusions = _grid_confusions([load(i) for i in pick], grid, n, ignore, refine_fn)
    folds = sorted(set(image_folds[i] for i in images))
    cross_fit = len(folds) > 1
    if not cross_fit:
        logger.warning("only fold %s has out-of-fold images: the CRF cannot be cross-fitted, so it is scored as "
                       "the rule before it and not kept", folds)

    def choose(exclude: int | None) -> int:
        rows = [j for j, i in enumerate(pick) if image_folds[i] != exclude] or list(range(len(pick)))
        return int(np.argmax([_miou(confusions[g + 1, rows].sum(0)) for g in range(len(grid))]))

    best = choose(None)
    best_without = {f: choose(f) for f in folds} if cross_fit else {}
    logger.info("CRF grid on %d images: argmax mIoU %.4f without, best %.4f with %s", len(pick),
                _miou(confusions[0].sum(0)), _miou(confusions[best + 1].sum(0)), grid[best])
    # every image refined with every parameter set some fold chose, into one tuner per (set, fold)
    chosen = sorted({best, *best_without.values()})
    tuners = {g: {f: make_tuner() for f in folds} for g in chosen}
    crf_dir = out_dir / "oof_probs_crf"
    with tqdm(total=len(images) * len(chosen), desc="CRF out-of-fold", leave=False, disable=None) as bar:
        for g in chosen:
            for i in images:
                image, probs, mask = load(i)
                q = refine_fn(probs, image, grid[g]).astype(np.float16).astype(np.float32)  # as stored, see oof.py
                tuners[g][image_folds[i]].update(q.astype(np.float64), mask.astype(np.int64), ignore_index=ignore)
                path = crf_dir / ("" if g == best else f"grid{g}") / f"{i}.npy"
                with atomic_path(path) as tmp:
                    with open(tmp, "wb") as fh:
                        np.save(fh, q.astype(np.float16))
                bar.update()
    thresholds = merge_tuners(tuners[best].values()).fit()
    per_fold = {f: merge_tuners(tuners[best_without[f]][h] for h in folds if h != f).fit() for f in best_without}
    in_sample, cross = new_metrics(), new_metrics()
    for i in images:
        f, mask = image_folds[i], load(i, probs=False)[2]
        target = torch.from_numpy(mask.astype(np.int64))[None]
        scored = [(in_sample, best, thresholds)] + ([(cross, best_without[f], per_fold[f])] if cross_fit else [])
        for metrics, g, rule in scored:
            q = np.load(crf_dir / ("" if g == best else f"grid{g}") / f"{i}.npy").astype(np.float32)
            metrics.update(torch.from_numpy(decide(q, rule).astype(np.int64))[None], target)
    with_cf, with_in = (cross.compute() if cross_fit else dict(baseline["cross_fitted"])), in_sample.compute()
    record = step_record("crf", key, baseline["cross_fitted"], with_cf, baseline["in_sample"], with_in,
                         class_names, allowed=cross_fit)
    record["compared_with"] = baseline["name"]
    post = {"crf": {"kept": record["kept"], "params": grid[best], "thresholds": thresholds, "metric": key,
                    "params_per_fold": {str(f): grid[g] for f, g in best_without.items()},
                    "miou_without": baseline["cross_fitted"]["miou"], "miou_with": with_cf["miou"],
                    "miou_with_in_sample": with_in["miou"], "grid_images": len(pick), "step": record,
                    "grid": [{"params": None, "argmax_miou": _miou(confusions[0].sum(0))}]
                    + [{"params": p, "argmax_miou": _miou(confusions[g + 1].sum(0))} for g, p in enumerate(grid)]}}
    return with_cf, with_in, post


def crf_baseline(result: dict) -> dict:
    """The best rule kept before the CRF, which it must beat cross-fitted: the tuned thresholds (with
    the minimum areas when those were kept too) when they were kept, else row (b), the default decisions."""
    steps = result["steps"]
    if steps["thresholds"]["kept"]:
        name = "tuned" if steps.get("min_area", {"kept": True})["kept"] else "thresholds_only"
        return {"name": name, "cross_fitted": result[name], "in_sample": result[f"{name}_in_sample"]}
    return {"name": "ensemble", "cross_fitted": result["ensemble"], "in_sample": result["ensemble"]}


def crf_step(result: dict, any_ensemble, data, max_size: int | None, out_dir: Path, tune_min_area: bool = False,
             tune_images: int = 24, *, metric: str = "val_miou", empty: float | None = 1.0,
             refine_fn=None) -> tuple[dict, dict, dict]:
    """After :func:`ensemble.oof.oof_evaluate`: fit the CRF on its stored probabilities; returns
    (row (d) cross-fitted, row (d) in-sample, the ``postprocessing.json`` content). The CRF competes
    with the best rule kept before it (:func:`crf_baseline`) on what the search optimised (``metric``:
    with a per-image score, its thresholds are the per-image tuner's, as the out-of-fold step's)."""
    load = OOFImages(data, max_size, EnsembleFiles(out_dir).oof_probs_dir)
    per_image = image_metric(metric)

    def new_metrics() -> SegMetrics:
        return SegMetrics(data.num_classes, "multiclass", data.ignore_index, per_image=per_image,
                          empty=1.0 if empty is None else empty)

    return fit_crf(load, result["images"], result["image_folds"],
                   lambda: make_tuner(data, tune_min_area, 1000, metric, empty), any_ensemble.decide,
                   crf_baseline(result), out_dir, data.class_names, tune_images, key=score_key(data.task, metric),
                   new_metrics=new_metrics, refine_fn=refine_fn)
