"""Segmentation metrics accumulated on the device: confusion counts, IoU, Dice, boundary IoU.

Every ``update`` only launches tensor ops on the device of its inputs (no ``.item()``, no
``.cpu()``, no boolean indexing), so validation loops never stall the GPU; the counts are
copied to the host once, in :meth:`SegMetrics.compute`.

IoU and Dice are dataset-level: counts are summed over all images first and divided once,
which is what segmentation benchmarks report (a mean of per-image IoUs is a different and
noisier number). A class with no pixel in the truth nor in the prediction has no defined
score; it is reported as NaN and left out of the means rather than counted as 0 or 1.

A pixel *predicted* as void (any label outside ``[0, C)``, e.g. 255 from a decision rule that
abstains on a dataset without a background class) is a miss: a false negative of its true class
and a false positive of none, as smp, mmseg and torchmetrics count it. Only pixels whose *truth*
is ``ignore_index`` are left out. :func:`iou_from_counts`, :func:`dice_from_counts` and
:func:`mean_defined` are the one definition of the scores: the threshold tuner
(``ensemble/thresholds.py``) and the reports use them too.

Per-image scores (``per_image=True``; the ``metrics`` section of the trial config, Kaggle-style
scores such as Severstal's, SIIM's or UW-Madison's): the counts are also kept per image x class
pair, and ``compute`` adds ``miou_image`` and ``dice_image``. Each pair (image i, class c) scores
``IoU_ic = TP / (TP + FP + FN)`` (Dice: ``2 TP / (2 TP + FP + FN)``) from that image's pixels
only; a pair whose truth and prediction are both empty (TP + FP + FN = 0) scores ``empty``: 1
(the competition convention: correctly predicting "absent" is a hit) or NaN (left out). Image
i's score is the mean over its defined pairs; the score is the mean over images with at least
one defined pair. Void predictions and ignored truth count per pair as they do dataset-wide.
:func:`pair_scores` and :func:`image_score` are that definition (the per-image threshold
tuner, ``ensemble/image_thresholds.py``, uses them).

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

import cv2
import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# Largest number of mask elements eroded at once; bounds the memory of the boundary pass
# (float32: 2**24 elements = 64 MiB per temporary) for datasets with many classes.
_BOUNDARY_CHUNK_ELEMENTS = 2**24


def boundary_region(mask: torch.Tensor, d: int) -> torch.Tensor:
    """Return the pixels of the bool masks ``mask`` (N,K,H,W) within ``d`` pixels of their edge.

    The region is ``mask`` minus its erosion by a (2d+1)-square: the pixels of ``mask`` with a
    background pixel in their (2d+1)-square. Pixels outside the image never count as background,
    so the image border is not a boundary. The square's maximum is taken as a row pass then a
    column pass (it is separable): on a CPU by OpenCV's ``dilate`` (cost independent of ``d``),
    elsewhere by two 1-D ``max_pool2d`` (padding -inf), not by one (2d+1)^2 pool, which cost
    minutes a validation at 360x480 (d = 12).
    """
    if mask.device.type == "cpu":
        return mask & background_near_cpu(~mask, d)
    return mask & background_near_torch(~mask, d)


def background_near_torch(background: torch.Tensor, d: int) -> torch.Tensor:
    """Pixels with a ``background`` pixel in their (2d+1)-square, by two 1-D max pools."""
    near = F.max_pool2d(background.float(), kernel_size=(2 * d + 1, 1), stride=1, padding=(d, 0))
    return F.max_pool2d(near, kernel_size=(1, 2 * d + 1), stride=1, padding=(0, d)) > 0


def background_near_cpu(background: torch.Tensor, d: int) -> torch.Tensor:
    """The same as ``background_near_torch`` by OpenCV's dilation of each (H, W) plane (outside: 0)."""
    planes = np.ascontiguousarray(background.numpy(), dtype=np.uint8).reshape(-1, *background.shape[-2:])
    kernel = np.ones((2 * d + 1, 2 * d + 1), np.uint8)
    out = np.stack([cv2.dilate(plane, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0) for plane in planes])
    return torch.from_numpy(out.reshape(background.shape).astype(bool))


def _boundary_width(height: int, width: int, dilation: float) -> int:
    """Erosion depth d in pixels: ``dilation`` times the image diagonal, at least 1."""
    return max(1, round(dilation * math.hypot(height, width)))


def ratio(num, den) -> np.ndarray:
    """``num / den`` elementwise in float64, NaN where ``den`` is 0 (the score is undefined there)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def iou_from_counts(tp, fp, fn) -> np.ndarray:
    """IoU = TP / (TP + FP + FN) per class (any broadcastable shape); NaN where nothing to score."""
    tp = np.asarray(tp, dtype=np.float64)
    return ratio(tp, tp + fp + fn)


def dice_from_counts(tp, fp, fn) -> np.ndarray:
    """Dice = 2 TP / (2 TP + FP + FN) per class; NaN where nothing to score."""
    tp = np.asarray(tp, dtype=np.float64)
    return ratio(2 * tp, 2 * tp + fp + fn)


def mean_defined(values, axis: int = -1) -> np.ndarray:
    """Mean over ``axis`` of the defined (non-NaN) entries; NaN where none is (no warning)."""
    values = np.asarray(values, dtype=np.float64)
    present = ~np.isnan(values)
    return ratio(np.where(present, values, 0.0).sum(axis=axis), present.sum(axis=axis))


def _mean(values: np.ndarray) -> float:
    return float(mean_defined(values))


IMAGE_METRICS = ("miou_image", "dice_image")  # compute()'s per-image scores; reported as val_<name>
_PAIR_METRIC = {"miou_image": "iou", "dice_image": "dice", "iou": "iou", "dice": "dice"}


def empty_score(value) -> float | None:
    """The score of an empty-truth, empty-prediction pair from a setting: 1 -> 1.0, "nan"/NaN -> NaN;
    None when ``value`` is neither."""
    if isinstance(value, str) and value.strip().lower() == "nan":
        return math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value):
            return math.nan
        if value == 1:
            return 1.0
    return None


def pair_scores(tp, fp, fn, metric: str = "iou", empty: float = 1.0) -> np.ndarray:
    """IoU or Dice of each image x class pair (counts of any shape); ``empty`` where TP+FP+FN = 0."""
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    kind = _PAIR_METRIC.get(metric)
    if kind is None:
        raise ValueError(f"metric must be one of {', '.join(_PAIR_METRIC)}, got {metric!r}")
    score = iou_from_counts(tp, fp, fn) if kind == "iou" else dice_from_counts(tp, fp, fn)
    return np.where(tp + fp + fn > 0, score, empty)


def image_score(tp, fp, fn, metric: str = "iou", empty: float = 1.0) -> np.ndarray:
    """Mean over images (axis -2) of each image's mean over classes (axis -1) of :func:`pair_scores`;
    NaN pairs and images without a defined pair are left out. Leading axes are kept (candidates)."""
    return mean_defined(mean_defined(pair_scores(tp, fp, fn, metric, empty), axis=-1), axis=-1)


class SegMetrics:
    """Accumulates pixel counts over a dataset and turns them into segmentation scores.

    ``task="multiclass"``: one label per pixel, a CxC confusion matrix (rows true, columns
    predicted); pixels whose target is ``ignore_index`` are excluded everywhere.
    ``task="multilabel"``: C independent binary masks per pixel, per-class TP/FP/FN/TN;
    predictions are thresholded with ``> threshold``.
    ``per_image=True``: also TP/FP/FN per image x class pair (every image of a batch is one
    image), for ``miou_image`` / ``dice_image`` with ``empty`` as the score of an empty pair
    (1.0, or NaN to leave it out); see the module docstring.
    """

    def __init__(self, num_classes: int, task: str = "multiclass", ignore_index: int = 255,
                 boundary: bool = True, boundary_dilation: float = 0.02, threshold: float = 0.5,
                 class_names: list[str] | None = None, per_image: bool = False, empty: float = 1.0):
        if task not in ("multiclass", "multilabel"):
            raise ValueError(f"task must be 'multiclass' or 'multilabel', not {task!r}")
        if empty_score(empty) is None:
            raise ValueError(f"empty must be 1 or NaN, not {empty!r}")
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
        self.per_image = per_image
        self.empty = empty_score(empty)
        self.reset()

    def reset(self) -> None:
        """Zero every count (on the CPU; the first update moves them to its device)."""
        c = self.num_classes
        zeros = functools.partial(torch.zeros, dtype=torch.int64)
        # multiclass: flattened confusion matrix, then per true class the pixels predicted as void,
        # then one trailing slot that swallows excluded pixels; multilabel: per-class TP, FP, FN, TN.
        self._counts = zeros(c * c + c + 1) if self.task == "multiclass" else zeros((4, c))
        self._out_of_range = zeros(())  # target labels outside [0, C) that are not ignore_index
        self._b_inter = zeros(c)
        self._b_union = zeros(c)
        # per_image: one (B, 3, C) tensor of TP, FP, FN per batch, kept on the device until compute()
        self._image_counts: list[torch.Tensor] = []

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
        keep &= in_range
        void = (pred < 0) | (pred >= c)  # predicted as no class: a miss of the true class
        # scatter_add_ into a fixed-size buffer instead of bincount: bincount reads the
        # maximum back to size its output, a host sync on CUDA.
        idx = torch.where(keep, torch.where(void, c * c + target, target * c + pred), c * c + c).flatten()
        self._counts.scatter_add_(0, idx, torch.ones_like(idx))
        if self.per_image:
            self._add_images_multiclass(pred, target, keep, void)
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
        if self.per_image:
            self._image_counts.append(torch.stack([
                (pred & target & keep).sum((2, 3)),
                (pred & ~target & keep).sum((2, 3)),
                (~pred & target & keep).sum((2, 3)),
            ], dim=1))
        if self.boundary:
            for part in self._class_chunks(target[:, 0].shape):
                self._add_boundary(target[:, part], pred[:, part], keep, part)

    def _add_images_multiclass(self, pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor,
                               void: torch.Tensor) -> None:
        """Per image: pixels correct, predicted and true of each class, in one scatter_add_ (no sync)."""
        b, c = target.shape[0], self.num_classes
        base = (torch.arange(b, device=target.device) * (3 * c)).view(b, 1, 1)
        trash = b * 3 * c
        hit = torch.where(keep & ~void & (pred == target), base + target, trash)
        predicted = torch.where(keep & ~void, base + c + pred, trash)
        true = torch.where(keep, base + 2 * c + target, trash)
        idx = torch.cat([hit.flatten(), predicted.flatten(), true.flatten()])
        counts = torch.zeros(trash + 1, dtype=torch.int64, device=target.device)
        counts.scatter_add_(0, idx, torch.ones_like(idx))
        tp, n_pred, n_true = counts[:trash].view(b, 3, c).unbind(1)
        self._image_counts.append(torch.stack([tp, n_pred - tp, n_true - tp], dim=1))

    def all_reduce(self, group=None) -> None:
        """Data-parallel validation: sum every count over the processes of ``group`` (an initialised
        ``torch.distributed`` group; None = the default one), so each rank's :meth:`compute` scores
        the union of the ranks' images. Counts are summed, never scores averaged: a mean of per-rank
        mIoUs is not the mIoU of the dataset. Per-image counts are gathered in rank order, so ranks
        that hold consecutive slices of the images give the single-process order."""
        import torch.distributed as dist

        if dist.get_world_size(group) == 1:
            return
        home = self._counts.device
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
            else torch.device("cpu")
        parts = [self._counts, self._out_of_range.view(1), self._b_inter, self._b_union]
        flat = torch.cat([t.flatten().to(device) for t in parts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for name, t in zip(("_counts", "_out_of_range", "_b_inter", "_b_union"), parts):
            setattr(self, name, flat[offset:offset + t.numel()].view(t.shape).to(home))
            offset += t.numel()
        if self.per_image:
            gathered: list = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, self.image_counts(), group=group)
            self._image_counts = [torch.from_numpy(np.concatenate(gathered)).to(home)]

    def merge(self, other: "SegMetrics") -> None:
        """Add ``other``'s counts (images scored elsewhere, e.g. by another process): integer sums, so
        the order of merging never changes the scores. Per-image counts are appended in call order."""
        for name in ("_counts", "_out_of_range", "_b_inter", "_b_union"):
            setattr(self, name, getattr(self, name) + getattr(other, name).to(getattr(self, name).device))
        self._image_counts += other._image_counts

    def image_counts(self) -> np.ndarray:
        """TP, FP, FN of every image x class pair so far, ``(images, 3, C)`` (``per_image=True``)."""
        if not self.per_image:
            raise RuntimeError("per-image counts need SegMetrics(per_image=True)")
        if not self._image_counts:
            return np.zeros((0, 3, self.num_classes), dtype=np.int64)
        return torch.cat(self._image_counts).cpu().numpy().astype(np.int64)

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
        counts = self._counts.cpu().numpy().astype(np.int64)
        c = self.num_classes
        if self.task == "multiclass":
            cm = counts[:c * c].reshape(c, c)
            void = counts[c * c:c * c + c]
            tp = np.diag(cm)
            fp, fn = cm.sum(0) - tp, cm.sum(1) - tp + void
            pixel_acc = float(ratio(tp.sum(), cm.sum() + void.sum()))
        else:
            tp, fp, fn, tn = counts
            pixel_acc = _mean(ratio(tp + tn, tp + fp + fn + tn))
        bad = int(self._out_of_range)
        if bad:
            logger.warning("%d target pixels had labels outside [0, %d) and were not scored",
                           bad, self.num_classes)
        iou = iou_from_counts(tp, fp, fn)
        dice = dice_from_counts(tp, fp, fn)
        result = {
            "miou": _mean(iou),
            "dice": _mean(dice),
            "pixel_acc": pixel_acc,
            "iou_per_class": iou.tolist(),
            "dice_per_class": dice.tolist(),
        }
        if self.boundary:
            biou = ratio(self._b_inter.cpu().numpy(), self._b_union.cpu().numpy())
            result["biou"] = _mean(biou)
            result["biou_per_class"] = biou.tolist()
        if self.per_image:
            pairs = self.image_counts()
            tp_i, fp_i, fn_i = pairs[:, 0], pairs[:, 1], pairs[:, 2]
            for name, kind in (("miou_image", "iou"), ("dice_image", "dice")):
                result[name] = float(image_score(tp_i, fp_i, fn_i, kind, self.empty))
                # per class: the mean over images of that class's pair score (same empty convention)
                per_class = mean_defined(pair_scores(tp_i, fp_i, fn_i, kind, self.empty), axis=0)
                result[f"{kind}_image_per_class"] = per_class.tolist()
            result["images"] = len(pairs)
        if self.task == "multiclass":
            result["confusion"] = cm.tolist()
            result["void_per_class"] = void.tolist()  # true pixels of each class predicted as void
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
