"""Decisions scored against annotated masks with :class:`trainables.metrics.SegMetrics` (torch).

What the out-of-fold pass, the holdout and annotated test inputs share: a data mask as the
(target, valid) tensors SegMetrics takes, and one decision added to its counts. Prediction imports
this only to score annotated inputs (``ensemble/infer.py``), so writing predictions needs no torch.
"""
from __future__ import annotations

import numpy as np
import torch

from trainables.metrics import SegMetrics


def target_of(mask: np.ndarray, task: str, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Data mask -> (target, valid) tensors with a batch axis, as SegMetrics takes them."""
    if task == "multiclass":
        return torch.from_numpy(mask.astype(np.int64))[None], None
    m = mask.transpose(2, 0, 1)
    valid = torch.from_numpy((m != ignore_index).all(0))[None]
    return torch.from_numpy(np.minimum(m, 1).astype(np.int64))[None], valid


def score_into(metrics: SegMetrics, decision: np.ndarray, target: torch.Tensor, valid, task: str) -> None:
    """Add one image's ``decision`` (labels, or booleans per class) to ``metrics``."""
    if task == "multiclass":
        metrics.update(torch.from_numpy(decision.astype(np.int64))[None], target)
    else:
        metrics.update(torch.from_numpy(decision)[None], target, valid=valid)
