"""The rows of every ensemble table, named in one place.

(a) the best single member, (b) the ensemble at default decisions (argmax / 0.5), (c) the
ensemble with the post-processing that was kept (thresholds, min-areas), (d) with the CRF too.
The out-of-fold table, the test table of ``ensemble/predict.py``, the plots and the HTML report
all use these labels; out of fold, row (b) is labelled in-sample (:data:`OOF_ROWS`): its members
were chosen on the very images it is scored on, so the number to quote is the holdout's.
"""
from __future__ import annotations

import math

ROWS = {"single": "(a) best single", "ensemble": "(b) ensemble", "tuned": "(c) post-processed", "crf": "(d) CRF"}
# Out of fold, the ensemble's members were chosen on the images it is scored on: top-k by their
# validation score (the fold's images), greedy selection and the latency budget on its predictions.
OOF_ROWS = {**ROWS, "ensemble": "(b) ensemble (in-sample)"}
OOF_NOTE = ("row (b) is in-sample: its members were chosen on these same out-of-fold images (top-k by validation "
            "score, greedy selection, latency budget), as was (a)'s trial, so both flatter; quote the holdout's "
            "rows (folds.holdout)")
NO_HOLDOUT = "this search has no holdout: set folds.holdout (e.g. --set folds.holdout=0.1) for a number to quote"
FIELDS = (("mIoU", "miou"), ("mean Dice", "dice"), ("boundary IoU", "biou"), ("pixel acc", "pixel_acc"))


def format_table(rows: dict, class_names: list[str], title: str) -> str:
    """``rows``: key of :data:`ROWS` -> metrics as ``SegMetrics.compute`` returns them; the rows
    present are printed in :data:`ROWS` order, one column each, per-class IoU below."""
    keys = [k for k in ROWS if k in rows]
    lines = [f"{title:<28}" + "".join(f"{ROWS[k]:>20}" for k in keys)]
    for label, field in FIELDS:
        if any(field in rows[k] for k in keys):
            lines.append(f"{label:<28}" + "".join(f"{rows[k].get(field, math.nan):>20.4f}" for k in keys))
    for c, name in enumerate(class_names):
        lines.append(f"  IoU {name:<22}" + "".join(f"{rows[k]['iou_per_class'][c]:>20.4f}" for k in keys))
    return "\n".join(lines)
