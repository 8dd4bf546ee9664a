"""Greedy (Caruana-style) ensemble selection on out-of-fold predictions.

Per fold, every candidate predicts the fold's validation images once; a fixed random subset of
pixels per image (``pixels_per_image``) is kept, so memory stays bounded on large datasets.
:func:`ensemble.members.greedy_select` then adds, with replacement, the candidate that most
improves the score (mIoU, or mean Dice for multilabel) of the averaged probabilities.
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
from trainables.metrics import SegMetrics

logger = logging.getLogger(__name__)


def _subsampled_probs(ens: Ensemble, data: SegData, val_idx: list[int], max_size, pixels: int, seed: int):
    rng = np.random.default_rng(seed)
    ds = SegDataset(data, val_idx, transform=None, max_size=max_size, cache=False)
    probs, targets = [], []
    for i in val_idx:
        image, mask = ds.load(i)
        member_probs = ens.predict_batch([image], per_member=True)[0]  # (M, C, H, W)
        flat = member_probs.reshape(*member_probs.shape[:2], -1)
        pick = rng.choice(flat.shape[-1], size=min(pixels, flat.shape[-1]), replace=False)
        probs.append(flat[..., pick].astype(np.float16))
        targets.append(mask.reshape(-1, *mask.shape[2:])[pick])
    return np.concatenate(probs, -1), np.concatenate(targets, 0)  # (M, C, P), (P,) or (P, C)


def _score(probs: np.ndarray, target: np.ndarray, data: SegData) -> float:
    metrics = SegMetrics(data.num_classes, data.task, data.ignore_index, boundary=False)
    p = torch.from_numpy(probs.astype(np.float32))[None, :, :, None]  # (1, C, P, 1)
    if data.task == "multiclass":
        metrics.update(p.argmax(1), torch.from_numpy(target.astype(np.int64))[None, :, None])
        return metrics.compute()["miou"]
    t = torch.from_numpy(np.minimum(target, 1).T.astype(np.int64))[None, :, :, None]
    valid = torch.from_numpy((target != data.ignore_index).all(1))[None, :, None]
    metrics.update(p, t, valid=valid)
    return metrics.compute()["dice"]


def greedy_members(ensembles: dict[int, Ensemble], data: SegData, folds, max_size, max_members: int,
                   metric: str, mode: str, pixels_per_image: int = 4096) -> dict[int, Ensemble]:
    out = {}
    for fold, ens in ensembles.items():
        _, val_idx = train_val_indices(folds, fold, data.ids)
        probs, target = _subsampled_probs(ens, data, val_idx, max_size, pixels_per_image, seed=fold)
        names = [m.name for m in ens.members]

        def score(chosen: list[str]) -> float:
            idx = [names.index(c) for c in chosen]
            return _score(probs[idx].astype(np.float32).mean(0), target, data)

        chosen = greedy_select(names, score, max_members, mode="max")
        logger.info("fold %d: greedy selection chose %s (score %.4f)", fold, chosen, score(chosen))
        # members chosen more than once weigh more: repeat them, as Caruana's selection does
        members = [ens.members[names.index(c)] for c in chosen]
        out[fold] = Ensemble(members, ens.tta, ens.voting, ens.device)
    return out
