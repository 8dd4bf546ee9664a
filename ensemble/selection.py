"""Greedy (Caruana-style) ensemble selection on out-of-fold predictions.

Per fold, every candidate predicts the fold's validation images once; a fixed random subset of
pixels per image (``pixels_per_image``) is kept, so memory stays bounded on large datasets.
:func:`ensemble.members.greedy_select` then adds, with replacement, the candidate that most
improves the search's metric (and mode) of the averaged probabilities, where sampled pixels can
compute it (mIoU, mean Dice, pixel accuracy, and their per-image variants over each image's
sampled pixels); otherwise (boundary IoU, a loss) mIoU or, for
multilabel, mean Dice, and the report says so. The selection is cross-fitted on half-folds.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ensemble.members import greedy_select
from ensemble.predictor import Ensemble
from trainables.data import SegData
from trainables.dataset import SegDataset
from trainables.folds import train_val_indices
from trainables.metrics import IMAGE_METRICS, SegMetrics

logger = logging.getLogger(__name__)


def sample_pixels(predict, ds: SegDataset, val_idx: list[int], pixels: int, seed: int):
    """``predict(image)`` -> (..., C, H, W) probabilities of each image, kept as float16 on a fixed random
    subset of its pixels: (..., C, P) probabilities, (P,) or (P, C) targets, (P,) position of each pixel's
    image in ``val_idx``."""
    rng = np.random.default_rng(seed)
    probs, targets, owner = [], [], []
    for k, i in enumerate(val_idx):
        image, mask = ds.load(i)
        per = predict(image)
        flat = per.reshape(*per.shape[:-2], -1)
        pick = rng.choice(flat.shape[-1], size=min(pixels, flat.shape[-1]), replace=False)
        probs.append(flat[..., pick].astype(np.float16))
        targets.append(mask.reshape(-1, *mask.shape[2:])[pick])
        owner.append(np.full(len(pick), k))
    return np.concatenate(probs, -1), np.concatenate(targets, 0), np.concatenate(owner)


def _subsampled_probs(ens: Ensemble, data: SegData, val_idx: list[int], max_size, pixels: int, seed: int):
    """(M, C, P) member probabilities on sampled pixels (:func:`sample_pixels`)."""
    ds = SegDataset(data, val_idx, transform=None, max_size=max_size, cache=False)
    return sample_pixels(lambda image: ens.predict_batch([image], per_member=True)[0], ds, val_idx, pixels, seed)


# metrics greedy selection can compute on sampled pixels: the search metric -> SegMetrics key
PIXEL_METRICS = {"val_miou": "miou", "val_dice": "dice", "val_pixel_acc": "pixel_acc",
                 "val_miou_image": "miou_image", "val_dice_image": "dice_image"}


def selection_metric(metric: str, mode: str, task: str) -> tuple[str, str, str | None]:
    """(SegMetrics key, mode, note): the search's metric where sampled pixels can score it, else
    mIoU (multiclass) / mean Dice (multilabel), maximised, with a note saying so."""
    if metric in PIXEL_METRICS:
        return PIXEL_METRICS[metric], mode, None
    key = "miou" if task == "multiclass" else "dice"
    return key, "max", (f"{metric} cannot be computed on sampled pixels (boundary IoU needs whole images, a loss "
                        f"needs logits): greedy selection maximises {key} instead")


def new_metrics(data: SegData, key: str, empty: float = 1.0) -> SegMetrics:
    per_image = key in IMAGE_METRICS
    return SegMetrics(data.num_classes, data.task, data.ignore_index, boundary=False, per_image=per_image,
                      empty=empty)


def _metrics(probs: np.ndarray, target: np.ndarray, data: SegData, metrics: SegMetrics,
             owner: np.ndarray | None = None) -> SegMetrics:
    """Add sampled pixels (C, P) with targets to ``metrics``; with per-image scores, the pixels of each
    image (``owner``: the image of each pixel) are one image of the batch."""
    groups = [np.arange(probs.shape[1])] if owner is None or not metrics.per_image else \
        [np.flatnonzero(owner == k) for k in np.unique(owner)]
    for rows in groups:
        p = torch.from_numpy(probs[:, rows].astype(np.float32))[None, :, :, None]  # (1, C, P, 1)
        if data.task == "multiclass":
            metrics.update(p.argmax(1), torch.from_numpy(target[rows].astype(np.int64))[None, :, None])
            continue
        t = torch.from_numpy(np.minimum(target[rows], 1).T.astype(np.int64))[None, :, :, None]
        valid = torch.from_numpy((target[rows] != data.ignore_index).all(1))[None, :, None]
        metrics.update(p >= 0.5, t, valid=valid)
    return metrics


def greedy_members(ensembles: dict[int, Ensemble], data: SegData, folds, max_size, max_members: int,
                   metric: str, mode: str, pixels_per_image: int = 4096,
                   empty: float = 1.0) -> tuple[dict[int, Ensemble], dict]:
    """Per fold, greedy selection among the fold's candidates, and how honest its gain is.

    Fold f's candidates have out-of-fold predictions on fold f's images only, so the selection is
    cross-fitted within the fold: select on one half of its images (alternate images), score on the
    other half, then swap; the pooled score of both halves is the selection's cross-fitted score.
    The selection used is made on all the fold's images (its in-sample score is reported beside);
    it replaces the fold's top-k only when its cross-fitted score beats the top-k's on the same
    pixels (nothing is fitted for top-k: its score is honest as it is).
    """
    key, mode, note = selection_metric(metric, mode, data.task)
    if note:
        logger.warning(note)
    sign = 1.0 if mode == "max" else -1.0
    out, report = {}, {"metric": key, "mode": mode, "note": note, "folds": {}}
    for fold, ens in ensembles.items():
        _, val_idx = train_val_indices(folds, fold, data.ids)
        probs, target, owner = _subsampled_probs(ens, data, val_idx, max_size, pixels_per_image, seed=fold)
        names = [m.name for m in ens.members]

        def average(chosen: list[str], rows=slice(None)) -> np.ndarray:
            return probs[[names.index(c) for c in chosen]][:, :, rows].astype(np.float32).mean(0)

        def score_on(rows):
            return lambda chosen: _metrics(average(chosen, rows), target[rows], data, new_metrics(data, key, empty),
                                           owner[rows]).compute()[key]

        chosen = greedy_select(names, score_on(slice(None)), max_members, mode=mode)
        halves = [np.flatnonzero(owner % 2 == h) for h in (0, 1)]
        pooled = new_metrics(data, key, empty)
        picks = []
        for fit_rows, score_rows in ((halves[0], halves[1]), (halves[1], halves[0])):
            pick = greedy_select(names, score_on(fit_rows), max_members, mode=mode) if len(fit_rows) else chosen
            picks.append(pick)
            if len(score_rows):
                _metrics(average(pick, score_rows), target[score_rows], data, pooled, owner[score_rows])
        topk = names[:max_members]  # the candidates come sorted by validation score
        cross, in_sample, top = pooled.compute()[key], score_on(slice(None))(chosen), score_on(slice(None))(topk)
        kept = bool(sign * (cross - top) > 0)
        report["folds"][str(fold)] = {"metric": key, "chosen": chosen, "half_choices": picks, "cross_fitted": cross,
                                      "in_sample": in_sample, "optimism": sign * (in_sample - cross), "topk": top,
                                      "kept": kept}
        logger.info("fold %d: greedy selection %s: %s %.4f cross-fitted on half-folds (%.4f in-sample), top-%d %.4f: %s",
                    fold, chosen, key, cross, in_sample, max_members, top, "kept" if kept else "top-k kept")
        # members chosen more than once weigh more: repeat them, as Caruana's selection does
        members = [ens.members[names.index(c)] for c in (chosen if kept else topk)]
        out[fold] = Ensemble(members, ens.tta, ens.voting, ens.device)
    return out, report
