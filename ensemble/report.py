"""Plots of the out-of-fold report: class-wise IoU of (a)/(b)/(c), threshold curves, confusion
matrix and prediction overlays, written as PNG files beside the JSON results (:func:`write_plots`,
called by ``ensemble/run.py`` once the ensemble step's files are written)."""
from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from trainables.dataset import SegDataset  # noqa: E402
from trainables.folds import train_val_indices  # noqa: E402
from trainables.io import atomic_save_figure  # noqa: E402
from trainables.rows import OOF_ROWS  # noqa: E402
from trainables.runfiles import EnsembleFiles  # noqa: E402

logger = logging.getLogger(__name__)

LABELS = OOF_ROWS  # the out-of-fold row labels of the printed table


def iou_bars(metrics: dict, class_names: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(class_names) + 2), 4))
    rows = [(key, label) for key, label in LABELS.items() if key in metrics]  # (d) with --crf only
    width = 0.8 / len(rows)
    x = np.arange(len(class_names))
    for k, (key, label) in enumerate(rows):
        values = np.nan_to_num(np.asarray(metrics[key]["iou_per_class"], dtype=float))
        ax.bar(x + (k - (len(rows) - 1) / 2) * width, values, width, label=f"{label}: mIoU {metrics[key]['miou']:.3f}")
    ax.set_xticks(x, class_names, rotation=45, ha="right")
    ax.set_ylabel("IoU (out-of-fold)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return atomic_save_figure(fig, path)


def threshold_curves(thresholds: dict, class_names: list[str], path: Path) -> Path:
    curves = thresholds.get("curves", {})
    grid = np.asarray(curves.get("thresholds", []))
    scores = curves.get("score") or curves.get("miou")
    fig, ax = plt.subplots(figsize=(7, 4))
    if scores is not None and len(grid):
        for c, name in enumerate(class_names):
            curve = np.asarray(scores[c] if c < len(scores) and scores[c] is not None else [np.nan], dtype=float)
            if np.isfinite(curve).any():  # the fallback class has no curve (its threshold is 0)
                ax.plot(grid, curve, label=name, lw=1)
                ax.axvline(thresholds["thresholds"][c], color=ax.lines[-1].get_color(), lw=0.5, ls=":")
    ax.set_xlabel("class threshold")
    ax.set_ylabel("mIoU" if "miou" in curves else thresholds.get("metric", "score"))
    ax.legend(fontsize=7, ncol=2)
    return atomic_save_figure(fig, path)


def confusion_plot(confusion: list[list[int]], class_names: list[str], path: Path) -> Path:
    cm = np.asarray(confusion, dtype=float)
    cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(0.5 * len(class_names) + 3, 0.5 * len(class_names) + 2.5))
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return atomic_save_figure(fig, path)


def overlays(samples: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], num_classes: int, path: Path) -> Path:
    """Rows of image | truth | prediction for (name, image, truth labels, predicted labels)."""
    cmap = plt.get_cmap("tab20", max(num_classes, 2))
    fig, axes = plt.subplots(len(samples), 3, figsize=(9, 2.6 * len(samples)), squeeze=False)
    for row, (name, image, truth, pred) in zip(axes, samples):
        for ax, (title, arr) in zip(row, (("image " + name, image), ("truth", truth), ("prediction", pred))):
            if arr.ndim == 2:
                ax.imshow(np.ma.masked_equal(arr, 255), cmap=cmap, vmin=0, vmax=max(num_classes - 1, 1),
                          interpolation="nearest")
            else:
                ax.imshow(arr)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    return atomic_save_figure(fig, path)


def write_plots(out_dir: Path, report: dict, thresholds: dict, data, ensembles: dict, folds: list[list[str]],
                max_size: int | None) -> None:
    """iou_bars.png, threshold_curves.png, confusion.png and (multiclass) overlays.png of two
    out-of-fold images of each fold, decided from their stored probabilities."""
    iou_bars(report, data.class_names, out_dir / "iou_bars.png")
    threshold_curves(thresholds, data.class_names, out_dir / "threshold_curves.png")
    if "confusion" in report["tuned"]:
        confusion_plot(report["tuned"]["confusion"], data.class_names, out_dir / "confusion.png")
    if data.task != "multiclass":
        return
    samples = []
    for fold, ens in sorted(ensembles.items()):
        _, val_idx = train_val_indices(folds, fold, data.ids)
        ds = SegDataset(data, val_idx[:2], transform=None, max_size=max_size, cache=False)
        for i in val_idx[:2]:
            image, mask = ds.load(i)
            probs = np.load(EnsembleFiles(out_dir).oof_probs_dir / f"{i}.npy").astype(np.float32)
            samples.append((data.ids[i], image, mask, ens.decide(probs, thresholds)))
    overlays(samples[:4], data.num_classes, out_dir / "overlays.png")
