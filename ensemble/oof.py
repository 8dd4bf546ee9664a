"""Out-of-fold evaluation: every image is predicted once, by the members of the fold that held
it out; thresholds are tuned on those predictions and the three numbers are reported on the
same pixels:

(a) the best single trial of each fold, (b) the ensemble at default decisions (argmax / 0.5),
(c) the ensemble with tuned class-wise thresholds (and minimum areas, if asked).

Pass 1 predicts, scores (a) and (b), feeds the streaming threshold tuner and stores the
ensemble probabilities (float16) per image; pass 2 reads them back to score (c).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ensemble.predictor import Ensemble
from ensemble.thresholds import MulticlassThresholdTuner, MultilabelThresholdTuner
from trainables.data import SegData
from trainables.dataset import SegDataset
from trainables.folds import train_val_indices
from trainables.io import atomic_path
from trainables.metrics import SegMetrics

logger = logging.getLogger(__name__)


def target_of(mask: np.ndarray, task: str, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Data mask -> (target, valid) tensors with a batch axis, as SegMetrics takes them."""
    if task == "multiclass":
        return torch.from_numpy(mask.astype(np.int64))[None], None
    m = mask.transpose(2, 0, 1)
    valid = torch.from_numpy((m != ignore_index).all(0))[None]
    return torch.from_numpy(np.minimum(m, 1).astype(np.int64))[None], valid


def score_into(metrics: SegMetrics, decision: np.ndarray, target: torch.Tensor, valid, task: str) -> None:
    if task == "multiclass":
        metrics.update(torch.from_numpy(decision.astype(np.int64))[None], target)
    else:
        metrics.update(torch.from_numpy(decision)[None], target, valid=valid)


def make_tuner(data: SegData, tune_min_area: bool, bins: int):
    if data.task == "multilabel":
        return MultilabelThresholdTuner(data.num_classes, bins=bins, metric="dice")
    return MulticlassThresholdTuner(data.num_classes, fallback=0 if data.has_background else None, bins=bins,
                                    tune_min_area=tune_min_area)


def oof_evaluate(ensembles: dict[int, Ensemble], data: SegData, folds: list[list[str]], max_size: int | None,
                 out_dir: Path, batch_size: int = 8, tune_min_area: bool = False, bins: int = 1000,
                 max_per_fold: int | None = None) -> dict:
    """Run both passes; returns metrics (a)/(b)/(c), thresholds and bookkeeping for the report.
    ``max_per_fold`` evaluates only the first images of each fold (quick checks)."""
    task, ignore = data.task, data.ignore_index
    single, default = (SegMetrics(data.num_classes, task, ignore) for _ in range(2))
    tuner = make_tuner(data, tune_min_area, bins)
    prob_dir = out_dir / "oof_probs"
    prob_dir.mkdir(parents=True, exist_ok=True)
    seen: list[tuple[int, Path]] = []
    for fold, ens in sorted(ensembles.items()):
        _, val_idx = train_val_indices(folds, fold, data.ids)
        val_idx = val_idx[:max_per_fold] if max_per_fold else val_idx
        loader = SegDataset(data, val_idx, transform=None, max_size=max_size, cache=False)
        for start in tqdm(range(0, len(val_idx), batch_size), desc=f"out-of-fold fold {fold}", leave=False, disable=None):
            idx = val_idx[start:start + batch_size]
            pairs = [loader.load(i) for i in idx]
            per_member = ens.predict_batch([img for img, _ in pairs], per_member=True)
            for i, (_, mask), member_probs in zip(idx, pairs, per_member):
                target, valid = target_of(mask, task, ignore)
                # Pass 2 reads these back from float16: round once here so that (b), the tuner
                # and (c) see the same values (else (c) is not what the thresholds were tuned for).
                probs = member_probs.mean(0).astype(np.float16).astype(np.float32)
                score_into(single, ens.decide(member_probs[0]), target, valid, task)
                score_into(default, ens.decide(probs), target, valid, task)
                if task == "multiclass":
                    tuner.update(probs.astype(np.float64), mask.astype(np.int64), ignore_index=ignore)
                else:
                    tuner.update(probs.astype(np.float64), np.minimum(mask.transpose(2, 0, 1), 1),
                                 valid=valid[0].numpy())
                path = prob_dir / f"{i}.npy"
                with atomic_path(path) as tmp:
                    with open(tmp, "wb") as fh:
                        np.save(fh, probs.astype(np.float16))
                seen.append((i, path))
    if sorted(i for i, _ in seen) != sorted(set(i for i, _ in seen)):
        raise RuntimeError("an image was predicted by more than one fold")
    thresholds = tuner.fit()
    tuned = SegMetrics(data.num_classes, task, ignore)
    any_ens = next(iter(ensembles.values()))
    for i, path in tqdm(seen, desc="scoring tuned thresholds", leave=False, disable=None):
        probs = np.load(path).astype(np.float32)
        mask = SegDataset(data, [i], transform=None, max_size=max_size, cache=False).load(i)[1]
        target, valid = target_of(mask, task, ignore)
        score_into(tuned, any_ens.decide(probs, thresholds), target, valid, task)
    return {"single": single.compute(), "ensemble": default.compute(), "tuned": tuned.compute(),
            "thresholds": thresholds, "images": [i for i, _ in seen]}
