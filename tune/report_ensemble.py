"""The report's ensemble section, read from the files ``ensemble/run.py`` and ``ensemble/predict.py``
write: the out-of-fold, holdout and test tables, the members and what they cost, and interactive
class-wise IoU, threshold and confusion figures (PNG only for the image overlays and Grad-CAM).

Out of fold, row (b) is labelled in-sample and a note under the table says why (its members
were chosen on those images) and points to the holdout as the number to quote.

The tables show whichever rows a file has (``single``, ``ensemble``, ``tuned``, ``crf``, and for
cross-fitted post-processing ``tuned_in_sample`` with its ``optimism``), so a new row needs no
change here.
"""
from __future__ import annotations

import html
import json
import logging
import os
from pathlib import Path

from trainables.rows import FIELDS, NO_HOLDOUT, OOF_NOTE, OOF_ROWS, ROWS  # the row labels of every ensemble table
from trainables.runfiles import RunFiles
from tune.report_html import Page, Text, as_number, table, tidy_figure

logger = logging.getLogger(__name__)

IMAGES = ("overlays.png",)  # pictures, not charts: kept as PNG


def _labels(oof: bool = False) -> dict[str, str]:
    return OOF_ROWS if oof else ROWS


def metric_rows(result: dict) -> dict[str, dict]:
    """The rows of a results dict (a value with an ``miou``), in the tables' order: (a)..(d), each
    followed by its in-sample twin, then any other row as it comes. A ``rows`` entry (the test
    file's layout) is read instead of the top level."""
    if isinstance(result.get("rows"), dict):
        result = result["rows"]
    rows = {k: v for k, v in result.items() if isinstance(v, dict) and "miou" in v}
    order = []
    for key in _labels():
        order += [k for k in (key, f"{key}_in_sample") if k in rows]
    return {k: rows[k] for k in order + [k for k in rows if k not in order]}


def row_label(key: str, oof: bool = False) -> str:
    """``oof``: the out-of-fold table's label (row (b) is in-sample there)."""
    labels = _labels(oof)
    if key in labels:
        return labels[key]
    if key.endswith("_in_sample") and key[: -len("_in_sample")] in labels:
        return f"{labels[key[:-len('_in_sample')]]}, in-sample (fitted and scored on the same images)"
    return key.replace("_", " ")


def results_table(result: dict, optimism: dict | None = None, oof: bool = False) -> str:
    rows = metric_rows(result)
    if not rows:
        return ""
    fields = [(name, key) for name, key in FIELDS if any(key in r for r in rows.values())]
    header = ["", *(name for name, _ in fields)]
    optimism = {k: v for k, v in (optimism or {}).items() if as_number(v) is not None}
    if optimism:
        header.append("optimism (in-sample − cross-fitted)")
    body = []
    for key, r in rows.items():
        line = [Text(row_label(key, oof)), *(r.get(f, "") for _, f in fields)]
        if optimism:
            line.append(optimism.get(key, ""))
        body.append(line)
    return table(header, body)


def oof_note(oof: dict) -> str:
    """Under the out-of-fold table: row (b) is in-sample; the holdout (or how to get one) is the number to quote."""
    if "ensemble" not in oof:
        return ""
    has_holdout = isinstance(oof.get("holdout"), dict) and bool(metric_rows(oof["holdout"]))
    text = OOF_NOTE[0].upper() + OOF_NOTE[1:] + (" below." if has_holdout else f"; {NO_HOLDOUT}.")
    return f"<p class='note'>{html.escape(text)}</p>"


def refit_note(refits: list[str] | None, where: str) -> str:
    """Which rows of a table include refits (``ensemble/run.py --refit``; None: no refit was offered)."""
    if refits is None:
        return ""
    if where == "oof":
        return ("<p class='note'>No out-of-fold row includes a refit: a refit trained on every out-of-fold "
                "image; the holdout and test rows score it.</p>")
    named = ", ".join(html.escape(str(r)) for r in refits)
    return (f"<p class='note'>Rows (b)-(d) include the refit{'s' if len(refits) > 1 else ''} {named} "
            "(trained on every training image).</p>" if refits
            else "<p class='note'>Rows (b)-(d) include no refit: the combination left them out.</p>")


def _size_mb(path: str) -> float | None:
    """Bytes of a member's checkpoint (a file, or a directory of files) in MB; None if not local."""
    p = Path(path)
    if not path or "://" in path or not p.exists():
        return None
    size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return size / 1e6


def members_table(members: dict, trials: dict[str, dict], metric: str) -> str:
    """One row per member: its fold, trial, score, epoch, model, checkpoint size, and inference time
    per image when the ensemble step recorded one (``ms_per_image``)."""
    rows = []
    timed = any("ms_per_image" in m for ms in members.get("members", {}).values() for m in ms)
    for fold, ms in sorted(members.get("members", {}).items(), key=lambda kv: int(kv[0])):
        for m in ms:
            t = trials.get(m["trial_id"], {})
            model = " ".join(v for v in (t.get("param:model.arch", ""), t.get("param:model.encoder", "")) if v) \
                or t.get("config:model", "")
            row = [int(fold), Text(m["trial_id"]), m.get("score", ""), m.get("epoch", ""), model,
                   _size_mb(m.get("checkpoint", ""))]
            if timed:
                row.append(m.get("ms_per_image", ""))
            rows.append(row)
    if not rows:
        return ""
    sizes = [r[5] for r in rows if r[5] is not None]
    header = ["fold", "trial", metric, "epoch", "model", "checkpoint MB"] + (["ms / image"] if timed else [])
    how = ", ".join(f"{k} {html.escape(str(members[k]))}" for k in ("selection", "top_k", "voting", "tta")
                    if k in members)
    total = f"; {len(rows)} members, {sum(sizes):.1f} MB of checkpoints in all" if sizes else ""
    return f"<h3>Members</h3><p class='note'>{how}{total}</p>" + table(header, rows)


def iou_figure(rows: dict[str, dict], class_names: list[str]):
    import plotly.graph_objects as go

    fig = go.Figure()
    for key, r in rows.items():
        if "iou_per_class" in r and not key.endswith("_in_sample"):
            fig.add_bar(name=f"{row_label(key, oof=True)}: mIoU {r['miou']:.4g}", x=class_names,
                        y=[None if v is None else v for v in r["iou_per_class"]])
    fig.update_layout(barmode="group", yaxis=dict(title="IoU", range=[0, 1]),
                      legend=dict(orientation="h", y=-0.3, font=dict(size=9)))
    return tidy_figure(fig, "class-wise IoU, out-of-fold")


def threshold_figure(thresholds: dict, class_names: list[str]):
    curves = thresholds.get("curves", {})
    grid, scores = curves.get("thresholds"), curves.get("score") or curves.get("miou")
    if not grid or not scores:
        return None
    import plotly.graph_objects as go

    fig = go.Figure()
    for c, name in enumerate(class_names):
        curve = scores[c] if c < len(scores) else None
        if curve and any(v is not None for v in curve):  # the fallback class has no curve
            fig.add_scatter(x=grid, y=curve, name=name, mode="lines")
    fig.update_layout(xaxis_title="class threshold",
                      yaxis_title="mIoU" if "miou" in curves else thresholds.get("metric", "score"))
    return tidy_figure(fig, "threshold curves (out-of-fold)")


def confusion_figure(confusion: list[list[float]], class_names: list[str]):
    import numpy as np
    import plotly.graph_objects as go

    cm = np.asarray(confusion, dtype=float)
    cm = cm[:, : len(class_names)] / np.maximum(cm.sum(1, keepdims=True), 1)
    fig = go.Figure(go.Heatmap(z=cm, x=class_names, y=class_names, colorscale="Blues", zmin=0, zmax=1,
                               hovertemplate="true %{y}<br>predicted %{x}<br>%{z:.4g}<extra></extra>"))
    fig.update_layout(xaxis_title="predicted", yaxis=dict(title="true (row-normalised)", autorange="reversed"))
    return tidy_figure(fig, f"confusion, {_labels()['tuned']}")


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("%s: not read (%s)", path, exc)
        return None


def ensemble_section(page: Page, run_dir: Path, trials: list[dict], metric: str) -> None:
    files = RunFiles(run_dir)
    ensemble = files.ensemble()
    ens = ensemble.root
    oof = _read(ensemble.oof_metrics_json)
    if oof is None:
        page.add(f"<p>No ensemble yet: <code>python ensemble/run.py --experiment {html.escape(str(run_dir))}"
                 "</code> adds its results here.</p>")
        return
    class_names = oof.get("class_names", [])
    page.add(f"<h2>Ensemble, out-of-fold ({oof.get('oof_images', '?')} images)</h2>"
             + results_table(oof, oof.get("optimism"), oof=True) + oof_note(oof)
             + refit_note([] if oof.get("refits") else None, "oof"))
    if "postprocessing" in oof and "crf" in oof:
        kept = oof["postprocessing"].get("kept")
        page.add(f"<p class='note'>DenseCRF: {'kept' if kept else 'not kept (no gain)'}.</p>")
    if isinstance(oof.get("holdout"), dict) and metric_rows(oof["holdout"]):
        n = oof["holdout"].get("images")
        page.add(f"<h2>Holdout{f' ({n} images)' if n else ''}</h2><p class='note'>images no fold trained or "
                 "tuned on</p>" + results_table(oof["holdout"], oof["holdout"].get("optimism"))
                 + refit_note(oof["holdout"].get("refits"), "holdout"))
    for path in ensemble.test_metrics_jsons:
        test = _read(path)
        if test and metric_rows(test):
            page.add(f"<h2>Test ({test.get('images', '?')} images, <code>{html.escape(str(path))}</code>)"
                     "</h2>" + results_table(test) + refit_note(test.get("refits") or None, "test"))
            break
    members = _read(ensemble.members_json)
    if members:
        page.add(members_table(members, {r["trial_id"]: r for r in trials}, metric))
    figs = [iou_figure(metric_rows(oof), class_names)] if class_names else []
    thresholds = _read(ensemble.thresholds_json)
    if thresholds and class_names:
        figs.append(threshold_figure(thresholds, class_names))
    tuned = oof.get("tuned", {})
    if "confusion" in tuned and class_names:
        figs.append(confusion_figure(tuned["confusion"], class_names))
    page.figures([f for f in figs if f is not None])
    pictures = [p for p in IMAGES if (ens / p).exists()] + sorted(p.name for p in ens.glob("cam_*.png"))
    page.add("".join(f"<figure><img src='{html.escape(os.path.relpath(ens / p, files.report_dir))}'>"
                     f"<figcaption>{html.escape(p)}</figcaption></figure>" for p in pictures))
