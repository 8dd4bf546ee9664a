"""Inference with the whole ensemble (every fold's members) on new images.

Input: a folder of images, or a COCO json (with annotations: test metrics are computed too).
Output (``--out DIR``):

* ``masks/<stem>.png``: multiclass, one uint8 PNG of class indices at the original image size
  (255 = void, only when the tuned rule has no background class to fall back to);
  multilabel, ``masks/<class name>/<stem>.png`` per class, 0 or 255.
* ``submission.csv``: ``image_id,class,rle,height,width`` with one row per image and class
  (multiclass: background left out), RLE as in :mod:`ensemble.rle` (Kaggle style: 1-indexed
  ``start length`` pairs over the column-major flattened mask; empty when absent).
* ``probs/<stem>.npy`` with ``--save-probs``: float16 (C, H, W) averaged probabilities.
* ``test_metrics.json`` when the input has annotations.
"""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ensemble.oof import score_into, target_of
from ensemble.predictor import Ensemble
from ensemble.rle import submission_rows
from trainables.data import IMAGE_SUFFIXES, load_dataset, read_image
from trainables.errors import InputError
from trainables.io import atomic_path, atomic_write_json, atomic_write_text
from trainables.metrics import SegMetrics

logger = logging.getLogger(__name__)


def list_inputs(path: Path, task: str, unannotated: str, cache_dir) -> tuple[list[Path], list[str], object]:
    """(image paths, image ids, SegData or None) for a folder of images or a COCO json."""
    if not path.exists():
        raise InputError(path, "nothing to predict: path not found")
    if path.is_dir() and not any(path.glob("*.json")):
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise InputError(path, "no images found")
        return images, [p.name for p in images], None
    data = load_dataset(path, None, task, unannotated, cache_dir)
    annotated = data.pixel_counts.sum() > 0
    return data.image_paths, data.ids, data if annotated else None


def _save_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def predict_folder(ens: Ensemble, thresholds: dict | None, inputs: Path, out: Path, task: str, unannotated: str,
                   class_names: list[str], batch_size: int = 8, save_probs: bool = False, cache_dir=None,
                   refine=None) -> dict:
    """``refine(probs, image)``: post-processing of the probabilities before the decision (the CRF)."""
    paths, ids, data = list_inputs(inputs, task, unannotated, cache_dir)
    if data is not None and data.class_names != class_names:
        raise InputError(inputs, f"classes {data.class_names} differ from the experiment's {class_names}")
    metrics = SegMetrics(len(class_names), task, 255) if data is not None else None
    # class 0 is background (left out of the submission) only when the rule falls back to it;
    # datasets without a background class (fallback None) have a real class 0
    skip = () if thresholds is not None and thresholds.get("fallback", 0) is None else None
    rows: list[dict] = []
    for start in tqdm(range(0, len(paths), batch_size), desc="predicting", unit="batch", disable=None):
        batch = list(range(start, min(start + batch_size, len(paths))))
        images = [read_image(paths[i]) for i in batch]
        for i, image, probs in zip(batch, images, ens.predict_batch(images)):
            probs = refine(probs, image) if refine is not None else probs
            stem = Path(ids[i]).stem
            decision = ens.decide(probs, thresholds)
            if task == "multiclass":
                _save_png(out / "masks" / f"{stem}.png", decision)
                rows += submission_rows(ids[i], labels=decision, class_names=class_names, skip_classes=skip)
            else:
                for c, name in enumerate(class_names):
                    _save_png(out / "masks" / name / f"{stem}.png", decision[c].astype(np.uint8) * 255)
                rows += submission_rows(ids[i], binary=decision, class_names=class_names)
            if save_probs:
                with atomic_path(out / "probs" / f"{stem}.npy") as tmp:
                    with open(tmp, "wb") as fh:
                        np.save(fh, probs.astype(np.float16))
            if metrics is not None:
                target, valid = target_of(data.read_mask(i), task, 255)
                score_into(metrics, decision, target, valid, task)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["image_id", "class", "rle", "height", "width"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "submission.csv", buf.getvalue())
    result = {"images": len(paths), "out": str(out)}
    if metrics is not None:
        result["test_metrics"] = metrics.compute()
        atomic_write_json(out / "test_metrics.json", result["test_metrics"])
    return result
