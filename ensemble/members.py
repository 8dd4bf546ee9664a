"""Choose ensemble members from a finished experiment's ``trials.csv``.

``top_k``: per fold, up to k of the best completed trials by the experiment's metric (ties: fewer
epochs). Trials stopped early by ASHA trained on a fraction of the budget and would drag the
average down; they are used only for a fold without any completed trial.
``greedy_select``: Caruana et al. (2004) forward selection with replacement on out-of-fold
score, driven by a scoring function so it is testable without models.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Sequence

from trainables.errors import InputError

logger = logging.getLogger(__name__)


def _score(row: dict, metric: str) -> float:
    try:
        return float(row.get(f"best_{metric}", "nan"))
    except ValueError:
        return math.nan


def top_k(rows: list[dict], metric: str, mode: str, k: int) -> dict[int, list[dict]]:
    sign = -1.0 if mode == "max" else 1.0
    by_fold: dict[int, list[dict]] = {}
    for row in rows:
        if row["status"] in ("completed", "stopped") and row.get("checkpoint") and not math.isnan(_score(row, metric)):
            by_fold.setdefault(int(row["fold"]), []).append(row)
    members = {}
    for fold, candidates in sorted(by_fold.items()):
        candidates.sort(key=lambda r: (r["status"] != "completed", sign * _score(r, metric), int(r["epochs"] or 0)))
        completed = [r for r in candidates if r["status"] == "completed"]
        if not completed:
            logger.warning("fold %d has no completed trial: using trials stopped early", fold)
        members[fold] = (completed or candidates)[:k]
    if not members:
        raise InputError("trials.csv", "no completed trial with a checkpoint: nothing to ensemble")
    for fold, chosen in members.items():
        for row in chosen:
            if not Path(row["checkpoint"]).exists():
                raise InputError(row["checkpoint"], f"checkpoint of trial {row['trial_id']} (fold {fold}) is missing")
    return members


def greedy_select(candidates: Sequence[str], score: Callable[[list[str]], float], max_members: int,
                  mode: str = "max") -> list[str]:
    """Forward selection with replacement: add the candidate that most improves ``score`` of the
    averaged ensemble; stop when nothing improves or ``max_members`` are chosen."""
    sign = 1.0 if mode == "max" else -1.0
    chosen: list[str] = []
    best = -math.inf
    while len(chosen) < max_members:
        trials = [(sign * score(chosen + [c]), c) for c in candidates]
        value, pick = max(trials, key=lambda t: t[0])
        if value <= best:
            break
        chosen.append(pick)
        best = value
    return chosen
