"""``ensemble/run.py --compare OTHER``: two experiments' out-of-fold results side by side.

Say one searched with pseudo-labels (``ensemble/pseudo.py``) and one without: on the same folds
and data their out-of-fold rows are comparable, and the report shows both.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from trainables.errors import InputError
from trainables.rows import ROWS
from trainables.runfiles import RunFiles, read_experiment, read_folds

logger = logging.getLogger(__name__)


def compare_oof(run_dir: Path, other: Path, report: dict, experiment: dict) -> dict:
    """``--compare OTHER``: this experiment's out-of-fold results beside another's on the same
    folds and data (say one trained with pseudo-labels, one without); the other experiment's
    ``ensemble/oof_metrics.json`` must exist."""
    files = RunFiles(other)
    for path in (files.experiment_json, files.folds_json, files.ensemble().oof_metrics_json):
        if not path.exists():
            raise InputError(path, "missing: --compare needs another experiment with its ensemble report")
    theirs = read_experiment(other)
    if theirs["dataset"]["fingerprint"] != experiment["dataset"]["fingerprint"]:
        raise InputError(other, "was searched on another dataset: its out-of-fold results are not comparable")
    if read_folds(other) != read_folds(run_dir):
        raise InputError(files.folds_json, "other folds: its out-of-fold results are not comparable")
    their_report = json.loads(files.ensemble().oof_metrics_json.read_text())

    def row(path: Path, exp: dict, rep: dict) -> dict:
        return {"experiment": str(path), "extra_train": exp["settings"]["fixed"]["data"].get("extra_train"),
                **{k: rep[k]["miou"] for k in ROWS if k in rep}}

    return {"this": row(run_dir, experiment, report), "other": row(other, theirs, their_report)}
