"""Choose ensemble members from a finished experiment's ``trials.csv``.

``top_k``: per fold, up to k of the best completed trials by the experiment's metric (ties: fewer
epochs). Trials stopped early by ASHA trained on a fraction of the budget and would drag the
average down; they are used only for a fold without any completed trial. A racing run
(tune/racing.py; trials.csv has a ``config_id`` column) is ranked by configuration instead
(:func:`race_top_k`): the k configurations that completed every fold, best mean over the folds first,
one member per fold each.
``greedy_select``: Caruana et al. (2004) forward selection with replacement on out-of-fold
score, driven by a scoring function so it is testable without models.

A member's checkpoint (the ``checkpoint`` column) is a path, on the shared storage every node of
the search wrote to, or a URI (``s3://...``, ``gs://...``, ``file://...``) when the trials wrote to
an object store; ``local_checkpoint`` copies such a file once into a local cache. Either way the
ensemble needs no access to the node that trained the member.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

from trainables.errors import InputError
from trainables.runfiles import FINISHED, TRIALS_CSV, race_configs, score_column

logger = logging.getLogger(__name__)


def _score(row: dict, metric: str) -> float:
    try:
        return float(row.get(score_column(metric), "nan"))
    except ValueError:
        return math.nan


def race_top_k(rows: list[dict], metric: str, mode: str, k: int, num_folds: int | None = None
               ) -> dict[int, list[dict]] | None:
    """A racing run's members: the ``k`` configurations that completed every fold (``num_folds``, else
    every fold trials.csv has), ranked by their mean over the folds, each one member per fold (its trial
    on that fold). None for a run without racing, or when no configuration completed every fold."""
    configs = race_configs(rows, metric, mode)
    if not configs:
        return None
    folds = range(num_folds) if num_folds is not None else sorted({int(r["fold"]) for r in rows})
    complete = [c for c in configs if all(f in c["scores"] and c["rows"][f].get("checkpoint") for f in folds)][:k]
    if not complete:
        logger.warning("racing run: no configuration completed every fold; members chosen per fold instead")
        return None
    logger.info("racing run: members are configurations %s (mean %s over %d folds)",
                ", ".join(c["config_id"] for c in complete), ", ".join(f"{c['mean']:.4f}" for c in complete),
                len(folds))
    return {f: [c["rows"][f] for c in complete] for f in folds}


def top_k(rows: list[dict], metric: str, mode: str, k: int, num_folds: int | None = None) -> dict[int, list[dict]]:
    """Per fold, its ``k`` best trials; a racing run's ``k`` best configurations (:func:`race_top_k`)."""
    members = race_top_k(rows, metric, mode, k, num_folds)
    if members is not None:
        _check_checkpoints(members)
        return members
    sign = -1.0 if mode == "max" else 1.0
    by_fold: dict[int, list[dict]] = {}
    for row in rows:
        if row["status"] in FINISHED and row.get("checkpoint") and not math.isnan(_score(row, metric)):
            by_fold.setdefault(int(row["fold"]), []).append(row)
    members = {}
    for fold, candidates in sorted(by_fold.items()):
        candidates.sort(key=lambda r: (r["status"] != "completed", sign * _score(r, metric), int(r["epochs"] or 0)))
        completed = [r for r in candidates if r["status"] == "completed"]
        if not completed:
            logger.warning("fold %d has no completed trial: using trials stopped early", fold)
        members[fold] = (completed or candidates)[:k]
    if not members:
        raise InputError(TRIALS_CSV, "no completed trial with a checkpoint: nothing to ensemble")
    _check_checkpoints(members)
    return members


def _check_checkpoints(members: dict[int, list[dict]]) -> None:
    for fold, chosen in members.items():
        for row in chosen:
            if not checkpoint_exists(row["checkpoint"]):
                raise InputError(row["checkpoint"], f"checkpoint of trial {row['trial_id']} (fold {fold}) is missing")


def _fs(ref: str):
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(ref)
    except Exception as exc:  # unknown scheme, missing credentials, unreachable endpoint
        raise InputError(ref, f"cannot open the checkpoint's storage ({type(exc).__name__}: {exc})") from None


def checkpoint_exists(ref: str) -> bool:
    if "://" not in ref:
        return Path(ref).exists()
    import pyarrow.fs

    fs, path = _fs(ref)
    return fs.get_file_info(path).type == pyarrow.fs.FileType.File


def local_checkpoint(ref: str, cache_dir: Path) -> Path:
    """A member's checkpoint as a local file: a path as it is, a URI downloaded (once) to
    ``cache_dir/<trial dir>/<checkpoint dir>/model.pt``."""
    if "://" not in ref:
        return Path(ref)
    fs, path = _fs(ref)
    parts = Path(path.split("?")[0]).parts
    target = Path(cache_dir, *parts[-3:-1], parts[-1])  # <trial dir>/<checkpoint_nnnnnn>/model.pt
    size = fs.get_file_info(path).size
    if target.exists() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    with fs.open_input_stream(path) as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(partial, target)
    logger.info("checkpoint %s -> %s", ref, target)
    return target


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
