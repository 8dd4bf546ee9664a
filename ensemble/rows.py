"""The rows of every ensemble table, named in one place.

(a) the best single member, (b) the ensemble at default decisions (argmax / 0.5), (c) the
ensemble with the post-processing that was kept (thresholds, min-areas), (d) with the CRF too.
The out-of-fold table, the test table of ``ensemble/predict.py``, the plots and the HTML report
all use these labels.
"""
from __future__ import annotations

import math

ROWS = {"single": "(a) best single", "ensemble": "(b) ensemble", "tuned": "(c) post-processed", "crf": "(d) CRF"}
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
