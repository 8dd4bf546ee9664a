"""Pseudo-labels: the ensemble's decisions on unlabelled images, written as a training dataset.

``ensemble/run.py --experiment runs/x --pseudo-label UNLABELED_DIR`` writes a mask folder (the
format :func:`trainables.data.load_dataset` reads; multiclass tasks only):

* ``images/<file>``: copies of the unlabelled images;
* ``masks/<stem>.png``: uint8 class indices by the tuned decision rule (the out-of-fold
  thresholds, and the CRF when ``postprocessing.json`` kept it); ``255`` (ignored by the loss)
  where the ensemble's probability of the chosen class is below ``--pseudo-confidence`` or the
  rule leaves the pixel void;
* ``classes.txt``: the experiment's class names, so the loader checks they match;
* ``pseudo.json``: where the labels came from (experiment, members, confidence, rule) and the
  share of pixels kept per image and per class.

A later search or ``trainables/train.py`` run adds it to every fold's training set, never to
validation: ``--set data.extra_train=[runs/x/pseudo]`` (see :mod:`trainables.extra`).

With ``--pseudo-per-fold`` the labels of ``fold<k>/`` come from fold ``k``'s members only, and
``data.extra_train=[runs/x/pseudo/fold{fold}]`` gives each fold its own: no fold then learns,
through another fold's labels, from its own validation images, so the out-of-fold comparison
with and without pseudo-labels stays fair. (The thresholds are tuned on all out-of-fold
predictions either way.)

Prediction side: it applies a bundle's ensemble and rule, locally or on Ray
(``ensemble/ray_predict.py``). Comparing two experiments' out-of-fold results (``--compare``) is
the report's: ``ensemble/compare.py``.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from ensemble.infer import check_stems, list_inputs
from ensemble.voting import Voting
from trainables.data import read_image
from trainables.errors import ConfigError
from trainables.io import atomic_path, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

VOID = 255


def confident_labels(probs: np.ndarray, decision: np.ndarray, confidence: float) -> np.ndarray:
    """``decision`` (H, W) with pixels whose probability of their label is below ``confidence`` set to 255."""
    labels = decision.astype(np.uint8).copy()
    chosen = np.take_along_axis(probs, np.minimum(labels, probs.shape[0] - 1)[None].astype(np.int64), 0)[0]
    labels[(chosen < confidence) | (decision == VOID)] = VOID
    return labels


def pseudo_inputs(ens_task: str, inputs: Path, confidence: float, cache_dir=None) -> tuple[list[Path], list[str]]:
    """(image paths, ids) to pseudo-label, after the checks: multiclass, confidence in [0, 1], unique stems."""
    if ens_task != "multiclass":
        raise ConfigError("command line", "--pseudo-label", "pseudo-labels are class-index masks: multiclass only")
    if not 0.0 <= confidence <= 1.0:
        raise ConfigError("command line", "--pseudo-confidence", f"must lie in [0, 1], got {confidence=}")
    paths, ids, _ = list_inputs(inputs, "multiclass", "background", cache_dir)
    check_stems(ids, inputs)
    return paths, ids


def pseudo_image(ens: Voting, thresholds: dict | None, *, out: Path, path: Path, image_id: str, image: np.ndarray,
                 probs: np.ndarray, confidence: float, refine: Callable | None, num_classes: int
                 ) -> tuple[float, np.ndarray, list[str]]:
    """Write one image's copy and label mask under ``out`` (atomically); (share of pixels kept,
    kept pixels per class, paths written relative to ``out``)."""
    if refine is not None:
        probs = refine(probs, image)
    labels = confident_labels(probs, ens.decide(probs, thresholds), confidence)
    written = [f"images/{Path(image_id).name}", f"masks/{Path(image_id).stem}.png"]
    with atomic_path(out / written[0]) as tmp:
        shutil.copyfile(path, tmp)
    with atomic_path(out / written[1]) as tmp:
        Image.fromarray(labels).save(tmp, format="PNG")
    counts = np.bincount(labels[labels != VOID].ravel(), minlength=num_classes)[:num_classes]
    return float((labels != VOID).mean()), counts, written


def write_pseudo_labels(ens: Voting, thresholds: dict | None, *, inputs: Path, out: Path, class_names: list[str],
                        confidence: float = 0.9, refine: Callable | None = None, batch_size: int = 8,
                        provenance: dict | None = None, cache_dir=None) -> dict:
    """Predict ``inputs`` (folder of images or COCO json) and write the mask folder ``out``."""
    paths, ids = pseudo_inputs(ens.task, inputs, confidence, cache_dir)
    kept_per_image, counts = {}, np.zeros(len(class_names), np.int64)
    for start in tqdm(range(0, len(paths), batch_size), desc="pseudo-labels", unit="batch", disable=None):
        batch = list(range(start, min(start + batch_size, len(paths))))
        images = [read_image(paths[i]) for i in batch]
        for i, image, probs in zip(batch, images, ens.predict_batch(images)):
            kept, per_class, _ = pseudo_image(ens, thresholds, out=out, path=paths[i], image_id=ids[i], image=image,
                                              probs=probs, confidence=confidence, refine=refine,
                                              num_classes=len(class_names))
            kept_per_image[ids[i]] = kept
            counts += per_class
    return write_pseudo_summary(out, class_names, inputs, confidence, thresholds, refine is not None, kept_per_image,
                                counts, provenance)


def write_pseudo_summary(out: Path, class_names: list[str], inputs: Path, confidence: float, thresholds: dict | None,
                         crf: bool, kept_per_image: dict, counts: np.ndarray, provenance: dict | None = None) -> dict:
    """``classes.txt`` and ``pseudo.json`` of a finished label folder; returns the summary."""
    atomic_write_text(out / "classes.txt", "".join(f"{n}\n" for n in class_names))
    summary = {**(provenance or {}), "source": str(inputs), "images": len(kept_per_image), "confidence": confidence,
               "thresholds": "tuned out-of-fold" if thresholds else "argmax", "crf": crf,
               "kept_share": float(np.mean(list(kept_per_image.values()))) if kept_per_image else 0.0,
               "pixels_per_class": dict(zip(class_names, counts.tolist())), "kept_share_per_image": kept_per_image}
    atomic_write_json(out / "pseudo.json", summary)
    logger.info("pseudo-labels for %d images -> %s (%.0f%% of pixels kept at confidence %.2f)", len(kept_per_image),
                out, 100 * summary["kept_share"], confidence)
    return summary
