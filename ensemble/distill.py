"""One model from the ensemble: ``ensemble/run.py --distill ARCH`` trains a single student on the
ensemble's probabilities (knowledge distillation) and gives it a bundle of its own.

Where the student's targets come from:

* a **training image** (every image of the folds; the holdout never) is taught by the probabilities
  of the out-of-fold pass (``oof_probs/<index>.npy``, :mod:`ensemble.oof`): the average of the
  members of the fold where it was a validation image, never of members that trained on it;
* an **unlabeled image** (``--unlabeled DIR``) is taught by the ensemble the bundle ships (every
  fold's members with the holdout's combination weights, the bundle's TTA and voting), as
  ``--predict`` would see it. These go to ``distill/unlabeled_probs/``.

Both are stored float16 at the image's working size (``data.max_size``), where the student trains.
The loss is :class:`trainables.losses.DistillLoss`: ``alpha * T^2 * KL(teacher_T || student_T) +
(1 - alpha) * the search's loss on the true labels`` (multilabel: binary cross-entropy against the
teacher's softened sigmoid probabilities); unlabeled images add to the soft term only. The student
is the best member's configuration with ``ARCH`` (``Unet:resnet18``, or ``Unet`` keeping the
encoder) and ``--distill-epochs``, trained in this process (:class:`trainables.kd.DistillTrainer`),
its last epoch kept.

Its bundle (``distill/bundle``) is the ensemble's format with one member, no TTA and argmax / 0.5
decisions (the ensemble's thresholds were tuned for the ensemble), so ``ensemble/predict.py``,
``--export onnx`` and the latency report apply unchanged. ``distill/distill.json`` puts it beside
(a) the best single member, (b) the ensemble and (c) the ensemble as the bundle decides, on the
holdout (``folds.holdout``) and on annotated ``--predict`` inputs, with the milliseconds per image
of both bundles on the same device and image.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ensemble.bundle import load_bundle, write_bundle
from ensemble.crossfit import score_key
from ensemble.holdout import holdout_indices
from ensemble.infer import list_inputs, score_rows
from ensemble.latency import time_ms
from ensemble.predictor import Ensemble, best_member_index, load_member
from trainables.checkpoint import load_checkpoint, save_checkpoint
from trainables.data import IMAGE_SUFFIXES, dataset_options
from trainables.errors import ConfigError, InputError
from trainables.folds import read_holdout
from trainables.io import atomic_path, atomic_write_json
from trainables.kd import DistillTrainer, SoftItem, working_image
from trainables.models import arch_names, is_hf_arch, model_problem, smp_archs
from trainables.rows import ROWS
from trainables.runfiles import EnsembleFiles, RunFiles

logger = logging.getLogger("ensemble")

FLAG = "--distill"


@dataclass(frozen=True)
class DistillOptions:
    """``--distill ARCH`` and its companions."""
    arch: str  # "Unet:resnet18", or "Unet" (the best member's encoder)
    unlabeled: Path | None = None
    temperature: float = 2.0
    alpha: float = 0.5
    epochs: int | None = None  # None: the best member's train.epochs


def parse_arch(text: str) -> tuple[str, str | None]:
    """``"Unet:resnet18"`` -> ``("Unet", "resnet18")``; ``"Unet"`` -> ``("Unet", None)``."""
    arch, _, encoder = str(text).partition(":")
    if not arch.strip() or (_ and not encoder.strip()):
        raise ConfigError("command line", FLAG, f"expected ARCH or ARCH:ENCODER (e.g. Unet:resnet18), got {text!r}")
    return arch.strip(), (encoder.strip() or None)


def unlabeled_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (sorted); InputError when there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "--unlabeled: folder not found")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InputError(folder, f"--unlabeled: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the folder")
    return images


def check_options(options: DistillOptions, encoder: str | None = None) -> None:
    """The flags' values, before anything is trained (each a one-line user error). ``encoder``: the
    encoder a bare ARCH keeps (None: the architecture alone is checked)."""
    arch, own = parse_arch(options.arch)
    if own or encoder:
        problem = model_problem(arch, own or encoder)
    elif is_hf_arch(arch) or arch.lower() in smp_archs():
        problem = None
    else:
        problem = f"unknown architecture {arch!r}; options: {', '.join(arch_names())}"
    if problem:
        raise ConfigError("command line", FLAG, problem)
    if not (math.isfinite(options.temperature) and options.temperature > 0):
        raise ConfigError("command line", "--distill-temperature", f"expected a number > 0, got {options.temperature}")
    if not 0.0 <= options.alpha <= 1.0:
        raise ConfigError("command line", "--distill-alpha", f"expected a number in [0, 1], got {options.alpha}")
    if options.epochs is not None and options.epochs < 1:
        raise ConfigError("command line", "--distill-epochs", f"expected at least 1, got {options.epochs}")
    if options.unlabeled is not None:
        unlabeled_images(options.unlabeled)


def oof_targets(images: list[int], out_root: Path) -> list[SoftItem]:
    """One item per out-of-fold image (``oof_evaluate``'s ``images``): its probabilities from the
    members of the fold where it was validation, as the out-of-fold pass stored them."""
    prob_dir = EnsembleFiles(out_root).oof_probs_dir
    items = [SoftItem(prob_dir / f"{i}.npy", index=int(i)) for i in images]
    missing = [it.probs for it in items if not it.probs.is_file()]
    if missing:
        raise InputError(missing[0], "out-of-fold probabilities missing: rerun the ensemble step")
    return items


def unlabeled_targets(ens: Ensemble, paths: list[Path], *, max_size: int | None, out_dir: Path,
                      batch_size: int = 8) -> list[SoftItem]:
    """The ensemble's probabilities of each image at its working size (float16 ``out_dir/<k>.npy``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    items = []
    for start in range(0, len(paths), batch_size):
        batch = paths[start:start + batch_size]
        probs = ens.predict_batch([working_image(path, max_size) for path in batch])
        for k, (path, p) in enumerate(zip(batch, probs), start):
            target = out_dir / f"{k}.npy"
            with atomic_path(target) as tmp, open(tmp, "wb") as fh:
                np.save(fh, p.astype(np.float16))
            items.append(SoftItem(target, image=path))
    return items


def student_config(cfg: dict, options: DistillOptions, device: str) -> dict:
    """The best member's configuration with the student's architecture, epochs and device; model
    keyword arguments are kept only for the same architecture."""
    arch, encoder = parse_arch(options.arch)
    out = copy.deepcopy(cfg)
    model = out["model"]
    if (arch, encoder or model["encoder"]) != (model["arch"], model["encoder"]):
        model["kwargs"] = {}
    model["arch"], model["encoder"] = arch, encoder or model["encoder"]
    if options.epochs is not None:
        out["train"]["epochs"] = int(options.epochs)
    out["train"]["device"] = device
    return out


def train_student(cfg: dict, data, *, items: list[SoftItem], options: DistillOptions, out: Path) -> Path:
    """Train the student on ``items``; its checkpoint (the last epoch) -> ``out/model.pt``."""
    trainer = DistillTrainer(cfg, data, items, temperature=options.temperature, alpha=options.alpha)
    for rec in trainer.epochs():
        print(f"student epoch {rec['epoch']:3d} loss {rec['train_loss']:.4f} | {rec['epoch_time_s']:.1f}s", flush=True)
    return save_checkpoint(trainer.best_checkpoint(), out / "model.pt")


def write_student_bundle(run, checkpoint: Path, *, out: Path, teacher_bundle: Path) -> Path:
    """The student as a one-member bundle (no TTA, argmax / 0.5) in ``out``."""
    member = load_member(checkpoint, "student", "cpu")
    return write_bundle(out, [member], tta="none", voting="soft",
                        rule={"thresholds": None, "crf": None, "max_size": run.max_size}, metric=run.metric,
                        mode=run.mode, source={"experiment": str(run.run_dir.resolve()),
                                               "distilled_from": str(Path(teacher_bundle).resolve())},
                        data=run.bundle_data)


def side_by_side(teacher, student, *, data, indices: list[int], device, batch_size: int = 8,
                 teacher_rows: dict | None = None) -> dict:
    """Rows (a)-(c) of the teacher bundle (as the bundle predicts; ``teacher_rows`` when already
    scored) and the student's row, on images ``indices`` of ``data``."""
    if teacher_rows is None:
        teacher_rows = score_rows(teacher.ensemble(device), data, indices, teacher.thresholds, teacher.refiner(),
                                  teacher.best_member(), batch_size)
    rows = {k: teacher_rows[k] for k in ROWS if k in teacher_rows}
    rows["student"] = score_rows(student.ensemble(device), data, indices, None, None, None, batch_size)["ensemble"]
    rows["images"] = len(indices)
    return rows


def gain_kept(rows: dict, key: str) -> float:
    """The share of the ensemble's gain over the best single member that the student keeps
    ((student - single) / (ensemble - single), NaN when the ensemble gained nothing)."""
    gain = rows["ensemble"][key] - rows["single"][key]
    return (rows["student"][key] - rows["single"][key]) / gain if gain > 0 else math.nan


def latency(teacher, student, *, image: np.ndarray, device, reps: int = 5) -> dict:
    """Milliseconds per image of both bundles (median of ``reps``, after a warm-up) on ``image``."""
    ens, one = teacher.ensemble(device), student.ensemble(device)
    return {"device": str(ens.device), "image": list(image.shape[:2]), "reps": reps,
            "ensemble_ms": time_ms(ens, image, reps), "student_ms": time_ms(one, image, reps),
            "ensemble_members": len(ens.members), "ensemble_views": len(ens.tta.views())}


def distill_step(run, members, *, oof, combined, bundle_dir: Path, options, distill: DistillOptions,
                 test: Path | None = None, test_rows: dict | None = None) -> dict:
    """Train the student, write its bundle and ``distill/distill.json`` (its rows beside the
    ensemble's on the holdout and on ``test`` when annotated, and both latencies); returns the record.
    ``test_rows``: the ensemble's rows on ``test`` when ``--predict`` scored them already."""
    out = run.out.root / "distill"
    best = combined.shipped[best_member_index(combined.shipped, run.mode)]  # whose configuration it keeps
    cfg = load_checkpoint(best.meta["path"])["config"]
    check_options(distill, cfg["model"]["encoder"])
    items = oof_targets(oof.result["images"], run.out.root)
    if distill.unlabeled is not None:
        teacher = Ensemble(combined.shipped, members.tta, options.voting, run.device)
        items += unlabeled_targets(teacher, unlabeled_images(distill.unlabeled), max_size=run.max_size,
                                   out_dir=out / "unlabeled_probs", batch_size=options.batch_size)
    student_cfg = student_config(cfg, distill, str(run.device))
    checkpoint = train_student(student_cfg, run.data, items=items, options=distill, out=out / "student")
    student_dir = write_student_bundle(run, checkpoint, out=out / "bundle", teacher_bundle=bundle_dir)
    model = student_cfg["model"]
    record = {"student": {"arch": model["arch"], "encoder": model["encoder"], "epochs": student_cfg["train"]["epochs"],
                          "temperature": distill.temperature, "alpha": distill.alpha, "config_of": best.name,
                          "labelled_images": sum(it.index is not None for it in items),
                          "unlabeled_images": sum(it.index is None for it in items),
                          "bundle": str(student_dir)},
              "targets": ("training images: out-of-fold probabilities (the members of the fold where each was "
                          "validation); unlabeled images: the shipped ensemble's"),
              "metric": score_key(run.data.task, run.metric)}
    record.update(score_student(run, combined, teacher=load_bundle(bundle_dir, run.device),
                                student=load_bundle(student_dir, run.device), key=record["metric"],
                                test=test, test_rows=test_rows, batch_size=options.batch_size,
                                first_image=items[0].index))
    atomic_write_json(out / "distill.json", record)
    print(summary(record))
    return record


def score_student(run, combined, *, teacher, student, key: str, test: Path | None, test_rows: dict | None,
                  batch_size: int, first_image: int) -> dict:
    """``holdout`` and ``test``: the student's row beside the ensemble bundle's (a)-(c) (None where
    there is no holdout, or ``test`` is not annotated), and ``latency``: both bundles' ms per image
    on a holdout image (else image ``first_image`` of the data)."""
    out = {"holdout": None, "test": None}
    holdout = read_holdout(RunFiles(run.run_dir).folds_json)
    index = holdout_indices(run.data, holdout) if holdout else []
    if index:
        shipped = None if combined.holdout is None else {k: combined.holdout[k] for k in ROWS if k in combined.holdout}
        out["holdout"] = side_by_side(teacher, student, data=run.data, indices=index, device=run.device,
                                      batch_size=batch_size, teacher_rows=shipped)
        out["holdout"]["gain_kept"] = gain_kept(out["holdout"], key)
    if test is not None:
        d = run.data_settings
        _, _, data = list_inputs(Path(test), run.data.task, d["unannotated"], d["cache_dir"], dataset_options(d))
        if data is not None and data.has_annotations:
            out["test"] = side_by_side(teacher, student, data=data, indices=list(range(len(data))), device=run.device,
                                       batch_size=batch_size, teacher_rows=test_rows)
            out["test"].update(gain_kept=gain_kept(out["test"], key), source=str(test))
    image = run.data.read_image(index[0] if index else first_image)
    out["latency"] = latency(teacher, student, image=image, device=run.device)
    return out


def summary(record: dict) -> str:
    """The student's table: rows (a)-(c) and the student on the holdout and the test data, then the
    milliseconds per image of the ensemble and the student."""
    s, key = record["student"], record["metric"]
    lines = [(f"\nstudent {s['arch']}:{s['encoder']} (T={s['temperature']:g}, alpha={s['alpha']:g}, "
              f"{s['epochs']} epochs; {s['labelled_images']} training images taught out-of-fold, "
              f"{s['unlabeled_images']} unlabeled) -> {s['bundle']}")]
    sets = [(name, record[name]) for name in ("holdout", "test") if record.get(name)]
    if not sets:
        lines.append("no holdout (folds.holdout) and no annotated --predict inputs: the student is not scored")
    else:
        heads = [f"{name} ({rows['images']} images)" for name, rows in sets]
        label = {"miou": "mIoU", "dice": "mean Dice"}.get(key, key)
        lines.append(f"{label:<28}" + "".join(f"{head:>24}" for head in heads))
        for row, label in (*((k, ROWS[k]) for k in ("single", "ensemble", "tuned")), ("student", "student")):
            if all(row in rows for _, rows in sets):
                lines.append(f"{label:<28}" + "".join(f"{rows[row][key]:>24.4f}" for _, rows in sets))
        lines.append(f"{'gain kept by the student':<28}" + "".join(f"{rows['gain_kept']:>24.2f}" for _, rows in sets))
    lat = record["latency"]
    lines.append(f"ms per image on {lat['device']} ({lat['image'][1]}x{lat['image'][0]}): ensemble "
                 f"{lat['ensemble_ms']:.1f} ({lat['ensemble_members']} members x {lat['ensemble_views']} views), "
                 f"student {lat['student_ms']:.1f}")
    return "\n".join(lines)
