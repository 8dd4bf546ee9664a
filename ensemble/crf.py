"""Fully connected CRF post-processing (Krähenbühl & Koltun 2011), fitted out-of-fold.

Optional: needs ``pydensecrf2`` (``pip install pydensecrf2==1.1``; it builds from source and
needs a C++ compiler). Without it ``--crf`` stops with one line saying so.

:func:`refine` turns ensemble probabilities (C, H, W) and the image into CRF marginals of the
same shape (each pixel sums to 1): a unary ``-log p`` plus a Gaussian smoothness kernel and a
bilateral appearance kernel, mean-field ``iterations`` times. Multiclass only.

Fit, then apply (as the thresholds): :func:`fit_crf` scores a small grid of kernel parameters
by argmax mIoU on up to ``tune_images`` out-of-fold images, re-tunes the class thresholds on
the refined out-of-fold probabilities of every image, and keeps the CRF only when refined +
re-tuned beats the ensemble with its own tuned thresholds (row (c)). The choice, the
parameters, the thresholds for refined probabilities and both numbers go to
``postprocessing.json``; prediction only reads it. The CRF runs at the resolution the
out-of-fold probabilities had (the experiment's ``data.max_size``): spatial parameters are in
those pixels, so inference downscales, refines and upsamples (:func:`refine_at`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from trainables.errors import ConfigError
from trainables.io import atomic_path
from trainables.metrics import SegMetrics

logger = logging.getLogger(__name__)

INSTALL = "pip install pydensecrf2==1.1 (builds from source: needs a C++ compiler)"
DEFAULT = {"sxy_gaussian": 3, "compat_gaussian": 3, "sxy_bilateral": 60, "srgb": 10, "compat_bilateral": 5,
           "iterations": 5}
# bilateral kernel width, colour range and weight: the parameters that matter most
GRID = [{**DEFAULT, "sxy_bilateral": sxy, "srgb": srgb, "compat_bilateral": w}
        for sxy in (20, 60) for srgb in (5, 13) for w in (3, 8)]


def missing() -> str | None:
    """Why the CRF cannot run here, in one line; None when it can."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return f"needs the optional package pydensecrf2, which is not installed: {INSTALL}"
    return None


def refine(probs: np.ndarray, image: np.ndarray, params: dict | None = None) -> np.ndarray:
    """CRF marginals (C, H, W) float32 for probabilities (C, H, W) and an RGB uint8 image (H, W, 3)."""
    import pydensecrf.densecrf as dcrf

    p = {**DEFAULT, **(params or {})}
    c, h, w = probs.shape
    if image.shape != (h, w, 3):
        raise ValueError(f"image {image.shape} does not match probabilities {probs.shape}")
    crf = dcrf.DenseCRF2D(w, h, c)
    unary = -np.log(np.clip(probs.reshape(c, -1), 1e-8, 1.0), dtype=np.float32)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=p["sxy_gaussian"], compat=p["compat_gaussian"])
    crf.addPairwiseBilateral(sxy=p["sxy_bilateral"], srgb=p["srgb"], rgbim=np.array(image, dtype=np.uint8, order="C"),
                             compat=p["compat_bilateral"])
    q = np.asarray(crf.inference(int(p["iterations"])), dtype=np.float32).reshape(c, h, w)
    return q / np.maximum(q.sum(0, keepdims=True), 1e-12)


def refine_at(probs: np.ndarray, image: np.ndarray, params: dict, max_size: int | None) -> np.ndarray:
    """:func:`refine` at the out-of-fold resolution (longer side ``max_size``), back to the input size."""
    h, w = probs.shape[1:]
    if not max_size or max(h, w) <= max_size:
        return refine(probs, image, params)
    scale = max_size / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.stack([cv2.resize(ch, size, interpolation=cv2.INTER_AREA) for ch in probs])
    q = refine(small / small.sum(0, keepdims=True), cv2.resize(image, size, interpolation=cv2.INTER_AREA), params)
    up = np.stack([cv2.resize(ch, (w, h), interpolation=cv2.INTER_LINEAR) for ch in q])
    return up / np.maximum(up.sum(0, keepdims=True), 1e-12)


def _miou(pairs, num_classes: int, ignore: int, params: dict | None) -> float:
    metrics = SegMetrics(num_classes, "multiclass", ignore)
    for image, probs, mask in pairs:
        q = probs if params is None else refine(probs, image, params)
        metrics.update(torch.from_numpy(q.argmax(0).astype(np.int64))[None], torch.from_numpy(mask.astype(np.int64))[None])
    return metrics.compute()["miou"]


class OOFImages:
    """(image, probabilities, mask) of an out-of-fold image at the out-of-fold size, read back
    from ``<report>/oof_probs`` as written by :func:`ensemble.oof.oof_evaluate`."""

    def __init__(self, data, max_size: int | None, prob_dir: Path):
        from trainables.dataset import SegDataset

        self.data, self.prob_dir = data, prob_dir
        self.dataset = SegDataset(data, [], transform=None, max_size=max_size, cache=False)

    def __call__(self, i: int, probs: bool = True) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        image, mask = self.dataset.load(i)
        p = np.load(self.prob_dir / f"{i}.npy").astype(np.float32) if probs else None
        return image, p, mask


def fit_crf(load: OOFImages, images: list[int], tuner, decide, baseline_miou: float, out_dir: Path,
            tune_images: int = 24, grid: list[dict] | None = None) -> tuple[dict, dict]:
    """Fit the CRF on the out-of-fold ``images``; returns (metrics of row (d), postprocessing dict).

    ``tuner`` is a fresh threshold tuner for the refined probabilities, ``decide(probs,
    thresholds)`` the ensemble's decision rule and ``baseline_miou`` row (c)'s mIoU.
    """
    data = load.data
    problem = missing()
    if problem:
        raise ConfigError("command line", "--crf", problem)
    if data.task != "multiclass":
        raise ConfigError("command line", "--crf", "the CRF refines softmax probabilities: multiclass tasks only")
    grid = grid or GRID
    pick = [images[k] for k in np.linspace(0, len(images) - 1, min(tune_images, len(images))).round().astype(int)]
    pairs = [load(i) for i in pick]
    n, ignore = data.num_classes, data.ignore_index
    scores = [_miou(pairs, n, ignore, None)]
    for params in tqdm(grid, desc="CRF grid", leave=False, disable=None):
        scores.append(_miou(pairs, n, ignore, params))
    best = grid[int(np.argmax(scores[1:]))]
    logger.info("CRF grid on %d images: argmax mIoU %.4f without, best %.4f with %s", len(pairs), scores[0],
                max(scores[1:]), best)
    crf_dir = out_dir / "oof_probs_crf"
    for i in tqdm(images, desc="CRF out-of-fold", leave=False, disable=None):
        image, probs, mask = load(i)
        q = refine(probs, image, best).astype(np.float16).astype(np.float32)  # as stored, see oof.py
        tuner.update(q.astype(np.float64), mask.astype(np.int64), ignore_index=ignore)
        with atomic_path(crf_dir / f"{i}.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, q.astype(np.float16))
    thresholds = tuner.fit()
    metrics = SegMetrics(n, "multiclass", ignore)
    for i in images:
        mask = load(i, probs=False)[2]
        q = np.load(crf_dir / f"{i}.npy").astype(np.float32)
        metrics.update(torch.from_numpy(decide(q, thresholds).astype(np.int64))[None],
                       torch.from_numpy(mask.astype(np.int64))[None])
    result = metrics.compute()
    kept = bool(result["miou"] > baseline_miou)
    logger.info("CRF out-of-fold mIoU %.4f vs %.4f without: %s", result["miou"], baseline_miou,
                "kept" if kept else "not kept")
    post = {"crf": {"kept": kept, "params": best, "thresholds": thresholds, "miou_without": baseline_miou,
                    "miou_with": result["miou"], "grid_images": len(pairs),
                    "grid": [{"params": None, "argmax_miou": scores[0]}]
                    + [{"params": g, "argmax_miou": s} for g, s in zip(grid, scores[1:])]}}
    return result, post


def crf_step(result: dict, any_ensemble, data, max_size: int | None, out_dir: Path, tune_min_area: bool = False,
             tune_images: int = 24) -> tuple[dict, dict]:
    """After :func:`ensemble.oof.oof_evaluate`: fit the CRF on its stored probabilities; returns
    (row (d) metrics, the ``postprocessing.json`` content)."""
    from ensemble.oof import make_tuner

    load = OOFImages(data, max_size, out_dir / "oof_probs")
    return fit_crf(load, result["images"], make_tuner(data, tune_min_area, 1000), any_ensemble.decide,
                   result["tuned"]["miou"], out_dir, tune_images)


def crf_refiner(post: dict | None, max_size: int | None):
    """``refine(probs, image)`` applying the fitted CRF, or None when there is none or it was not kept."""
    crf = (post or {}).get("crf")
    if not crf or not crf["kept"]:
        return None
    params = crf["params"]
    return lambda probs, image: refine_at(probs, image, params, max_size)
