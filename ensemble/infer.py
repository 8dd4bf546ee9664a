"""Inference with the whole ensemble (every fold's members) on new images.

Input: a folder of images, or a COCO json / mask folder (with annotations: test rows too).
Output (``--out DIR``):

* ``masks/<stem>.png``: multiclass, one uint8 PNG of class indices at the original image size
  (255 = void, only when the tuned rule has no background class to fall back to);
  multilabel, ``masks/<class name>/<stem>.png`` per class, 0 or 255.
* ``submission.csv``: ``image_id,class,rle,height,width`` with one row per image and class
  (multiclass: background left out), RLE as in :mod:`ensemble.rle` (Kaggle style: 1-indexed
  ``start length`` pairs over the column-major flattened mask; empty when absent), or in a
  competition's format (:mod:`ensemble.submission`).
* ``probs/<stem>.npy`` with ``--save-probs``: float16 (C, H, W) averaged probabilities.
* ``test_metrics.json`` when the input has annotations: the rows of the out-of-fold table on it,
  (a) the best single member by validation score, (b) the ensemble at default decisions
  (argmax / 0.5), (c) the ensemble with the kept post-processing (thresholds, min-areas and
  the CRF when kept), each with mIoU, Dice, pixel accuracy and per-class IoU (boundary IoU
  too with ``boundary``); the top-level keys repeat (c), what the masks are.

:func:`score_rows` computes the same rows for images of a :class:`SegData` (a holdout split).

Writing masks, probabilities and ``submission.csv`` needs no torch (``--runtime onnx``). Scoring
annotated inputs does (``SegMetrics``): without torch the predictions are written and the test
rows left out, saying so in one line.
"""
from __future__ import annotations

import logging
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from ensemble.bundle import shipped_refits
from ensemble.submission import Submission
from ensemble.voting import Voting
from trainables.data import IMAGE_SUFFIXES, load_dataset, read_image
from trainables.errors import ConfigError, InputError
from trainables.io import atomic_path, atomic_write_json
from trainables.rows import ROWS
from trainables.runfiles import TEST_METRICS_JSON

logger = logging.getLogger(__name__)


def _annotated(data) -> bool:
    flag = getattr(data, "has_annotations", None)
    return bool(flag) if flag is not None else bool(data.pixel_counts.sum() > 0)


def list_inputs(path: Path, task: str, unannotated: str, cache_dir,
                options: dict | None = None) -> tuple[list[Path], list[str], object]:
    """(image paths, image ids, SegData or None) for a folder of images or a COCO json; ``options``:
    the experiment's other dataset options (``trainables.data.dataset_options``: crowd, background)."""
    if not path.exists():
        raise InputError(path, "nothing to predict: path not found")
    if path.is_dir() and not any(path.glob("*.json")) and not (path / "masks").is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise InputError(path, "no images found")
        return images, [p.name for p in images], None
    data = load_dataset(path, None, task, unannotated, cache_dir, **(options or {}))
    return data.image_paths, data.ids, data if _annotated(data) else None


def check_stems(ids: list[str], inputs: Path) -> None:
    """Outputs are named by the image's file stem: two inputs with one stem (``a.png``, ``a.jpg``)
    would write one mask. Refused, naming both."""
    seen: dict[str, str] = {}
    for image_id in ids:
        stem = Path(image_id).stem
        if stem in seen:
            raise InputError(inputs, f"two images share the file stem {stem!r} ({seen[stem]}, {image_id}): "
                                     "their masks would collide")
        seen[stem] = image_id


def check_out(out: Path) -> None:
    """``out`` is a folder, or nothing yet below a folder (never a file, nor under one)."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                raise InputError(path, "exists and is not a folder: predictions go into a folder (--out)")
            return


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError("command line", "--batch-size", f"must be at least 1, got {batch_size}")


def check_prediction(inputs: Path, ids: list[str], out: Path, batch_size: int,
                     submission: Submission | None = None) -> None:
    """Everything about a prediction's input that can be refused before the first image is predicted
    (the local and the Ray path both): batch size, ``out``, unique stems, the sample submission."""
    check_batch_size(batch_size)
    check_out(Path(out))
    check_stems(ids, inputs)
    if submission is not None:
        submission.check(ids, inputs)


def _save_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def iterate(ens: Voting, read: Callable[[int], np.ndarray], items: list[int], batch_size: int,
            keep: int | None = None, desc: str = "predicting") -> Iterator[tuple[int, np.ndarray, np.ndarray, object]]:
    """(item, image, ensemble probabilities, member ``keep``'s probabilities or None) per item,
    predicted in batches, with a progress bar over images."""
    with tqdm(total=len(items), desc=desc, unit="img", disable=None) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            images = [read(i) for i in batch]
            if keep is None:
                outs = [(p, None) for p in ens.predict_batch(images)]
            else:
                outs = ens.predict_batch_and_member(images, keep)
            for i, image, (probs, member) in zip(batch, images, outs):
                yield i, image, probs, member
            bar.update(len(batch))


class RowScorer:
    """SegMetrics of rows (a), (b), (c) over the images seen."""

    def __init__(self, num_classes: int, task: str, ignore_index: int = 255, single: bool = True,
                 boundary: bool = False):
        # lazy: scoring needs torch (SegMetrics); predicting with --runtime onnx does not
        from trainables.metrics import SegMetrics

        keys = ("single", "ensemble", "tuned") if single else ("ensemble", "tuned")
        self.task = task
        # boundary IoU at full resolution costs more than the rest of scoring together: asked for
        self.metrics = {k: SegMetrics(num_classes, task, ignore_index, boundary=boundary) for k in keys}

    def add(self, mask: np.ndarray, decisions: dict) -> None:
        from ensemble.scoring import score_into, target_of  # lazy: torch, as in __init__

        target, valid = target_of(mask, self.task, 255)
        for key, decision in decisions.items():
            if key == "tuned" and decision is decisions["ensemble"]:  # no post-processing kept: (c) is (b)
                self.same = True
                continue
            score_into(self.metrics[key], decision, target, valid, self.task)

    def merge(self, other: "RowScorer") -> None:
        """Add the counts of images ``other`` scored (another process's share of the images)."""
        for key, metrics in self.metrics.items():
            metrics.merge(other.metrics[key])
        if getattr(other, "same", False):
            self.same = True

    def compute(self) -> dict:
        out = {k: m.compute() for k, m in self.metrics.items() if not (k == "tuned" and getattr(self, "same", False))}
        if "tuned" not in out:
            out["tuned"] = dict(out["ensemble"])
        return {k: out[k] for k in self.metrics}


def decisions(ens: Voting, probs, member_probs, image, thresholds, refine) -> dict:
    """Row key -> decision: (a) the kept member at default decisions, (b) the ensemble at default
    decisions, (c) the ensemble with the rule (refined first when a CRF is kept)."""
    out = {"ensemble": ens.decide(probs)}
    if member_probs is not None:
        out["single"] = ens.decide(member_probs)
    if thresholds or refine is not None:
        out["tuned"] = ens.decide(refine(probs, image) if refine is not None else probs, thresholds)
    else:
        out["tuned"] = out["ensemble"]
    return out


def score_rows(ens: Voting, data, indices: list[int], thresholds: dict | None, refine=None, best: int | None = 0,
               batch_size: int = 8, boundary: bool = False) -> dict:
    """Rows (a)/(b)/(c) on images ``indices`` of ``data`` (a SegData) at their stored size;
    ``best`` indexes the member of row (a) (None: no row (a))."""
    scorer = RowScorer(data.num_classes, data.task, data.ignore_index, single=best is not None, boundary=boundary)
    for i, image, probs, member in iterate(ens, data.read_image, list(indices), batch_size, best, "scoring"):
        scorer.add(data.read_mask(i), decisions(ens, probs, member, image, thresholds, refine))
    return scorer.compute()


def submission_skip(thresholds: dict | None, has_background: bool | None):
    """Classes left out of ``submission.csv``: () when class 0 is a real class (a dataset without
    background), None (the default: background class 0 left out) otherwise. Without
    ``has_background`` (older bundles) the rule tells: a fallback of None means no background."""
    if has_background is None:
        has_background = not (thresholds is not None and thresholds.get("fallback", 0) is None)
    return None if has_background else ()


def write_image_outputs(out: Path, stem: str, task: str, class_names: list[str], decision: np.ndarray,
                        probs: np.ndarray | None = None) -> list[str]:
    """Write one image's mask(s) (and float16 probabilities when given) under ``out``, each atomically;
    returns the paths written, relative to ``out``."""
    written = []
    if task == "multiclass":
        written.append(f"masks/{stem}.png")
        _save_png(out / written[-1], decision)
    else:
        for c, name in enumerate(class_names):
            written.append(f"masks/{name}/{stem}.png")
            _save_png(out / written[-1], decision[c].astype(np.uint8) * 255)
    if probs is not None:
        written.append(f"probs/{stem}.npy")
        with atomic_path(out / written[-1]) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, probs.astype(np.float16))
    return written


def can_score() -> bool:
    """Whether annotated inputs can be scored here: ``SegMetrics`` needs torch."""
    try:
        # lazy: only asked whether torch is installed
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class PredictOptions:
    """What :func:`predict_folder` predicts and how: ``inputs`` (a folder of images, a COCO json or a
    mask folder) into ``out``; the rest keyword-only. ``refine(probs, image)``: post-processing of
    the probabilities before the decision (the CRF). ``best``: the member of row (a) in the test table
    (None: the first). ``options``: dataset options of annotated inputs (crowd, background);
    ``has_background``: whether class 0 is background (left out of the submission; None: decided by
    the rule, as before). ``submission``: the writer (None: one of ``class_names`` in ``rle_order``)."""

    inputs: Path
    out: Path
    _: KW_ONLY
    task: str
    unannotated: str
    class_names: list[str]
    batch_size: int = 8
    save_probs: bool = False
    cache_dir: Path | None = None
    refine: Callable | None = None
    best: int | None = None
    submission: Submission | None = None
    rle_order: str = "column"
    boundary: bool = False
    options: dict | None = None
    has_background: bool | None = None


def predict_folder(ens: Voting, thresholds: dict | None, job: PredictOptions) -> dict:
    """Predict ``job.inputs`` with ``ens`` and the decision rule ``thresholds`` (None: argmax / 0.5)
    into ``job.out``: masks, optional probabilities, ``submission.csv`` and, for annotated inputs
    (when torch is here to score them), the test rows."""
    inputs, out, task, class_names = Path(job.inputs), Path(job.out), job.task, job.class_names
    paths, ids, data = list_inputs(inputs, task, job.unannotated, job.cache_dir, job.options)
    if data is not None and data.class_names != class_names:
        raise InputError(inputs, f"classes {data.class_names} differ from the experiment's {class_names}")
    submission = job.submission or Submission(class_names, task, submission_skip(thresholds, job.has_background),
                                              job.rle_order)
    check_prediction(inputs, ids, out, job.batch_size, submission)  # nothing predicted or written before
    if data is not None and not can_score():
        logger.warning("%s is annotated, but scoring needs torch (not installed): predictions are written, "
                       "test rows are not", inputs)
        data = None
    scorer = RowScorer(len(class_names), task, 255, boundary=job.boundary) if data is not None else None
    keep = (job.best or 0) if scorer is not None else None
    for i, image, probs, member in iterate(ens, lambda i: read_image(paths[i]), list(range(len(paths))),
                                           job.batch_size, keep):
        rows = decisions(ens, probs, member, image, thresholds, job.refine)
        decision = rows["tuned"]
        write_image_outputs(out, Path(ids[i]).stem, task, class_names, decision, probs if job.save_probs else None)
        submission.add(ids[i], decision)
        if scorer is not None:
            scorer.add(data.read_mask(i), rows)
    submission.write(out / "submission.csv")
    result = {"images": len(paths), "out": str(out)}
    if scorer is not None:
        rows = scorer.compute()
        result["test_rows"] = rows
        result["test_metrics"] = {**rows["tuned"], "images": len(paths), "rows": rows,
                                  "labels": {k: ROWS[k] for k in rows},
                                  "best_single": ens.members[keep].name,
                                  "refits": shipped_refits(ens.members)}
        atomic_write_json(out / TEST_METRICS_JSON, result["test_metrics"])
    return result
