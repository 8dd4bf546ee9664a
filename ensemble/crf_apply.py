"""The fully connected CRF (Krähenbühl & Koltun 2011) as prediction applies it.

Optional: needs ``pydensecrf2`` (``pip install pydensecrf2==1.1``; it builds from source and
needs a C++ compiler). Without it ``--crf`` stops with one line saying so (:func:`missing`).

:func:`refine` turns ensemble probabilities (C, H, W) and the image into CRF marginals of the
same shape (each pixel sums to 1): a unary ``-log p`` plus a Gaussian smoothness kernel and a
bilateral appearance kernel, mean-field ``iterations`` times. Multiclass only. Its parameters are
fitted by ``ensemble/crf.py`` at the resolution the out-of-fold probabilities had (the
experiment's ``data.max_size``): spatial parameters are in those pixels, so inference downscales,
refines and upsamples (:func:`refine_at`).
"""
from __future__ import annotations

import logging

import cv2
import numpy as np

logger = logging.getLogger(__name__)

INSTALL = "pip install pydensecrf2==1.1 (builds from source: needs a C++ compiler)"
DEFAULT = {"sxy_gaussian": 3, "compat_gaussian": 3, "sxy_bilateral": 60, "srgb": 10, "compat_bilateral": 5,
           "iterations": 5}


def missing() -> str | None:
    """Why the CRF cannot run here, in one line; None when it can."""
    try:
        # lazy: optional dependency (pydensecrf2), only asked whether it is installed
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return f"needs the optional package pydensecrf2, which is not installed: {INSTALL}"
    return None


def refine(probs: np.ndarray, image: np.ndarray, params: dict | None = None) -> np.ndarray:
    """CRF marginals (C, H, W) float32 for probabilities (C, H, W) and an RGB uint8 image (H, W, 3)."""
    import pydensecrf.densecrf as dcrf  # lazy: optional dependency (pydensecrf2)

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


def refine_at(probs: np.ndarray, image: np.ndarray, params: dict, max_size: int | None,
              refine_fn=None) -> np.ndarray:
    """:func:`refine` at the out-of-fold resolution (longer side ``max_size``), back to the input size.
    ``refine_fn(probs, image, params)``: the refinement to run there (default :func:`refine`)."""
    refine_fn = refine_fn or refine
    h, w = probs.shape[1:]
    if not max_size or max(h, w) <= max_size:
        return refine_fn(probs, image, params)
    scale = max_size / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.stack([cv2.resize(ch, size, interpolation=cv2.INTER_AREA) for ch in probs])
    q = refine_fn(small / small.sum(0, keepdims=True), cv2.resize(image, size, interpolation=cv2.INTER_AREA), params)
    up = np.stack([cv2.resize(ch, (w, h), interpolation=cv2.INTER_LINEAR) for ch in q])
    return up / np.maximum(up.sum(0, keepdims=True), 1e-12)
