"""Segmentation metrics accumulated on the device: confusion counts, IoU, Dice, boundary IoU.

Every ``update`` only launches tensor ops on the device of its inputs (no ``.item()``, no
``.cpu()``, no boolean indexing), so validation loops never stall the GPU; the counts are
copied to the host once, in :meth:`SegMetrics.compute`.

IoU and Dice are dataset-level: counts are summed over all images first and divided once,
which is what segmentation benchmarks report (a mean of per-image IoUs is a different and
noisier number). A class with no pixel in the truth nor in the prediction has no defined
score; it is reported as NaN and left out of the means rather than counted as 0 or 1.

Boundary IoU follows Cheng et al. 2021 ("Boundary IoU: Improving Object-Centric Image
Segmentation Evaluation") with one deliberate difference: pixels outside the image count as
foreground, so the image border is never a boundary (the reference code pads with
background, which rewards or punishes a class merely for touching the frame).
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# Largest number of mask elements eroded at once; bounds the memory of the boundary pass
# (float32: 2**24 elements = 64 MiB per temporary) for datasets with many classes.
_BOUNDARY_CHUNK_ELEMENTS = 2**24


def boundary_region(mask: torch.Tensor, d: int) -> torch.Tensor:
    """Return the pixels of the bool masks ``mask`` (N,K,H,W) within ``d`` pixels of their edge.

    The region is ``mask`` minus its erosion by a (2d+1)-square, computed as
    ``erode(M) = 1 - maxpool(1 - M)``. ``max_pool2d`` pads with -inf, so pixels outside the
    image never count as background and the image border is not a boundary.
    """
    background_near = F.max_pool2d((~mask).float(), kernel_size=2 * d + 1, stride=1, padding=d)
    return mask & (background_near > 0)


def _boundary_width(height: int, width: int, dilation: float) -> int:
    """Erosion depth d in pixels: ``dilation`` times the image diagonal, at least 1."""
    return max(1, round(dilation * math.hypot(height, width)))


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` elementwise, NaN where ``den`` is 0 (the score is undefined there)."""
    return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, math.nan))


def _mean(values: torch.Tensor) -> float:
    """Mean over the defined (non-NaN) entries; NaN when none is defined."""
    return torch.nanmean(values).item()


class SegMetrics:
    """Accumulates pixel counts over a dataset and turns them into segmentation scores.

    ``task="multiclass"``: one label per pixel, a CxC confusion matrix (rows true, columns
    predicted); pixels whose target is ``ignore_index`` are excluded everywhere.
    ``task="multilabel"``: C independent binary masks per pixel, per-class TP/FP/FN/TN;
    predictions are thresholded with ``> threshold``.
    """

    def __init__(self, num_classes: int, task: str = "multiclass", ignore_index: int = 255,
                 boundary: bool = True, boundary_dilation: float = 0.02, threshold: float = 0.5,
                 class_names: list[str] | None = None):
        if task not in ("multiclass", "multilabel"):
            raise ValueError(f"task must be 'multiclass' or 'multilabel', not {task!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, not {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.task = task
        self.ignore_index = ignore_index
        self.boundary = boundary
        self.boundary_dilation = boundary_dilation
        self.threshold = threshold
        self.class_names = (list(class_names) if class_names
                            else [str(c) for c in range(num_classes)])
        self.reset()

    def reset(self) -> None:
        """Zero every count (on the CPU; the first update moves them to its device)."""
        c = self.num_classes
        zeros = functools.partial(torch.zeros, dtype=torch.int64)
        # multiclass: flattened confusion matrix plus one trailing slot that swallows
        # excluded pixels; multilabel: per-class TP, FP, FN, TN.
        self._counts = zeros(c * c + 1) if self.task == "multiclass" else zeros((4, c))
        self._out_of_range = zeros(())  # target labels outside [0, C) that are not ignore_index
        self._b_inter = zeros(c)
        self._b_union = zeros(c)

    def _to(self, device: torch.device) -> None:
        """Move the counts to the device of the incoming batch (once, on the first update)."""
        if self._counts.device != device:
            for name in ("_counts", "_out_of_range", "_b_inter", "_b_union"):
                setattr(self, name, getattr(self, name).to(device))

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, *, from_logits: bool = False,
               valid: torch.Tensor | None = None) -> None:
        """Add one batch.

        multiclass: ``pred`` (B,H,W) labels or (B,C,H,W) scores (argmax over dim 1, so
        ``from_logits`` does not matter); ``target`` (B,H,W) labels.
        multilabel: ``pred`` (B,C,H,W) probabilities, logits (``from_logits=True``) or bool;
        ``target`` (B,C,H,W) in {0, 1}.
        ``valid`` (B,H,W) bool, optional: pixels to score (multiclass also drops ignore_index).
        """
        self._to(target.device)
        if self.task == "multiclass":
            self._update_multiclass(pred, target, valid)
        else:
            self._update_multilabel(pred, target, from_logits, valid)

    def _update_multiclass(self, pred: torch.Tensor, target: torch.Tensor,
                           valid: torch.Tensor | None) -> None:
        c = self.num_classes
        if pred.dim() == 4:
            if pred.shape[1] != c:
                raise ValueError(f"pred has {pred.shape[1]} channels, expected {c}")
            pred = pred.argmax(1)
        if pred.shape != target.shape or target.dim() != 3:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                             "must both be (B,H,W)")
        pred, target = pred.long(), target.long()
        keep = target != self.ignore_index
        if valid is not None:
            keep &= valid.bool()
        in_range = (target >= 0) & (target < c)
        self._out_of_range += (keep & ~in_range).sum()
        keep &= in_range & (pred >= 0) & (pred < c)
        # scatter_add_ into a fixed-size buffer instead of bincount: bincount reads the
        # maximum back to size its output, a host sync on CUDA.
        idx = torch.where(keep, target * c + pred, c * c).flatten()
        self._counts.scatter_add_(0, idx, torch.ones_like(idx))
        if self.boundary:
            target = torch.where(keep, target, -1)  # excluded pixels belong to no class
            classes = torch.arange(c, device=target.device).view(1, c, 1, 1)
            for part in self._class_chunks(target.shape):
                cls = classes[:, part]
                self._add_boundary(target.unsqueeze(1) == cls, pred.unsqueeze(1) == cls,
                                   keep.unsqueeze(1), part)

    def _update_multilabel(self, pred: torch.Tensor, target: torch.Tensor, from_logits: bool,
                           valid: torch.Tensor | None) -> None:
        c = self.num_classes
        if pred.shape != target.shape or target.dim() != 4 or target.shape[1] != c:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                             f"must both be (B,{c},H,W)")
        if pred.dtype != torch.bool:
            pred = (pred.sigmoid() if from_logits else pred) > self.threshold
        target = target > 0.5
        keep = torch.ones_like(target[:, :1]) if valid is None else valid.bool().unsqueeze(1)
        dims = (0, 2, 3)
        self._counts += torch.stack([
            (pred & target & keep).sum(dims),
            (pred & ~target & keep).sum(dims),
            (~pred & target & keep).sum(dims),
            (~pred & ~target & keep).sum(dims),
        ])
        if self.boundary:
            for part in self._class_chunks(target[:, 0].shape):
                self._add_boundary(target[:, part], pred[:, part], keep, part)

    def _class_chunks(self, batch_shape: torch.Size) -> list[slice]:
        """Split the classes so one boundary pass erodes at most _BOUNDARY_CHUNK_ELEMENTS."""
        step = max(1, _BOUNDARY_CHUNK_ELEMENTS // max(1, batch_shape.numel()))
        return [slice(s, s + step) for s in range(0, self.num_classes, step)]

    def _add_boundary(self, true: torch.Tensor, pred: torch.Tensor, keep: torch.Tensor,
                      part: slice) -> None:
        """Add |G_d ∩ P_d| and |G_d ∪ P_d| over kept pixels for the classes in ``part``."""
        d = _boundary_width(true.shape[-2], true.shape[-1], self.boundary_dilation)
        g, p = boundary_region(true, d), boundary_region(pred, d)
        self._b_inter[part] += (g & p & keep).sum((0, 2, 3))
        self._b_union[part] += ((g | p) & keep).sum((0, 2, 3))

    def compute(self) -> dict:
        """Scores from the counts so far, as plain floats/lists (NaN where undefined)."""
        counts = self._counts.cpu().double()
        if self.task == "multiclass":
            cm = counts[:-1].view(self.num_classes, self.num_classes)
            tp = cm.diag()
            fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
            pixel_acc = _ratio(tp.sum(), cm.sum()).item()
        else:
            tp, fp, fn, tn = counts
            pixel_acc = _mean(_ratio(tp + tn, tp + fp + fn + tn))
        bad = int(self._out_of_range)
        if bad:
            logger.warning("%d target pixels had labels outside [0, %d) and were not scored",
                           bad, self.num_classes)
        iou = _ratio(tp, tp + fp + fn)
        dice = _ratio(2 * tp, 2 * tp + fp + fn)
        result = {
            "miou": _mean(iou),
            "dice": _mean(dice),
            "pixel_acc": pixel_acc,
            "iou_per_class": iou.tolist(),
            "dice_per_class": dice.tolist(),
        }
        if self.boundary:
            biou = _ratio(self._b_inter.cpu().double(), self._b_union.cpu().double())
            result["biou"] = _mean(biou)
            result["biou_per_class"] = biou.tolist()
        if self.task == "multiclass":
            result["confusion"] = cm.long().tolist()
        return result


def summary_line(result: dict, class_names: Sequence[str]) -> str:
    """One line for the epoch log: the means, then each class's IoU ("-" when undefined)."""
    parts = [f"mIoU {result['miou']:.3f}", f"Dice {result['dice']:.2f}",
             f"acc {result['pixel_acc']:.2f}"]
    if "biou" in result:
        parts.append(f"bIoU {result['biou']:.2f}")
    per_class = " ".join(f"{name} {'-' if math.isnan(v) else f'{v:.2f}'}"
                         for name, v in zip(class_names, result["iou_per_class"]))
    return " | ".join(parts + [per_class])
