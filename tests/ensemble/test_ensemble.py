"""Ensembling end to end on a tiny experiment built without Ray.

The module fixture trains 2 tiny configs x 2 folds (1 short epoch each) on the shipped CamVid
sample and writes the run directory exactly as ``tune/run.py`` does (experiment.json,
folds.json, trials.csv, tune/<trial>/checkpoint_000000/model.pt); ``ensemble/run.py`` then runs
on it as a subprocess.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ensemble.members import greedy_select, top_k
from trainables.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
VAL_JSON = ROOT / "data" / "camvid-sample" / "val" / "annotations.json"
NUM_IMAGES, NUM_CLASSES = 72, 12
MAX_SIZE = 96
LRS = (1e-2, 1e-4)  # config 0 and 1 of every fold: different learning rates, different scores
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- fixtures


def _env(cache: Path) -> dict:
    # one thread: tiny models gain nothing from more, and a busy 2-core machine loses a lot
    return {**os.environ, "HF_HUB_OFFLINE": "1", "SEGHPO_CACHE": str(cache), "WANDB_MODE": "disabled",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_cli(args: list, cache: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "ensemble/run.py", *map(str, args)], cwd=ROOT, env=_env(cache),
                          capture_output=True, text=True, timeout=timeout)


def _check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def _copy_experiment(src: Path, dst: Path) -> Path:
    """A second run directory sharing the checkpoints (trials.csv holds absolute paths)."""
    dst.mkdir(parents=True)
    for name in ("experiment.json", "folds.json", "trials.csv"):
        shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """runs/<name>/ as tune/run.py leaves it, made with FoldTrainer directly (no Ray)."""
    exp = build_experiment(tmp_path_factory.mktemp("ensemble"))
    assert len(exp.data) == NUM_IMAGES and exp.data.num_classes == NUM_CLASSES
    return exp


def build_experiment(tmp: Path, data_settings: dict | None = None, folds_settings: dict | None = None,
                     lrs=LRS) -> SimpleNamespace:
    """Train len(lrs) tiny configs x 2 folds on the shipped sample and write the run directory."""
    from trainables.checkpoint import save_checkpoint
    from trainables.config import resolve
    from trainables.data import load_data
    from trainables.folds import load_or_make_folds, train_val_indices
    from trainables.loop import FoldTrainer
    from trainables.runfiles import write_experiment_json, write_trials_csv

    run_dir, cache = tmp / "run", tmp / "cache"
    run_dir.mkdir()
    base = resolve({"data": {"max_size": MAX_SIZE, "cache_dir": str(cache), **(data_settings or {})}})
    data = load_data(base["data"])
    base = resolve({
        "data": {**base["data"], "path": str(data.source)},
        "folds": {"k": 2, "seed": 0, **(folds_settings or {})},
        "model": {"arch": "Unet", "encoder": "resnet18", "weights": None,
                  "kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}},
        "train": {"epochs": 1, "batch_size": 8, "image_size": [64, 96], "device": "cpu", "num_workers": 0,
                  "max_train_batches": 1},
    })
    f = base["folds"]
    folds = load_or_make_folds(run_dir / "folds.json", f["strategy"], k=f["k"], seed=f["seed"], ids=data.ids,
                               presence=data.presence,
                               fingerprint=data.fingerprint, group_regex=f["group_regex"], holdout=f["holdout"])
    rows = []
    for fold in range(2):
        train_idx, val_idx = train_val_indices(folds, fold, data.ids)
        for j, lr in enumerate(lrs):
            cfg = resolve(base, {"optimizer.lr": lr})
            # validation on part of the fold keeps the fixture fast; it only ranks the trials
            trainer = FoldTrainer(cfg, data, train_idx, val_idx[:16], fold=fold)
            last = list(trainer.epochs())[-1]
            trial_id = f"f{fold}c{j}_{fold * 2 + j:05d}"
            path = save_checkpoint(trainer.best_checkpoint(), run_dir / "tune" / f"fold{fold}_{trial_id}"
                                   / "checkpoint_000000" / "model.pt")
            rows.append({"trial_id": trial_id, "fold": fold, "status": "completed", "retrain": False,
                         "epochs": last["epoch"], "best_epoch": trainer.best_epoch,
                         "best_val_miou": trainer.best_score, "node": "test", "error": "",
                         "checkpoint": str(path), "param:optimizer.lr": lr})
    write_trials_csv(run_dir / "trials.csv", rows)
    settings = {"space": "test", "name": "tiny", "fixed": base, "search": {"metric": "val_miou", "mode": "max"},
                "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0}, "space_params": ["optimizer.lr"]}
    write_experiment_json(run_dir, settings, {"fingerprint": data.fingerprint, "source": str(data.source),
                                              "class_names": data.class_names, "task": data.task,
                                              "images": len(data)})
    for fold in range(2):  # the configs of a fold must be told apart by their score
        scores = [r["best_val_miou"] for r in rows if r["fold"] == fold]
        assert len(set(scores)) == len(scores)
    return SimpleNamespace(tmp=tmp, run_dir=run_dir, cache=cache, data=data, folds=folds, rows=rows)


@pytest.fixture(scope="module")
def ensemble_run(experiment):
    """``ensemble/run.py --top-k 2 --predict <val COCO json>`` on the experiment."""
    out = experiment.tmp / "pred_val"
    proc = run_cli(["--experiment", experiment.run_dir, "--top-k", 2, "--predict", VAL_JSON, "--out", out],
                   experiment.cache)
    _check_ok(proc)
    return SimpleNamespace(proc=proc, out=out, report=experiment.run_dir / "ensemble")


# --------------------------------------------------------------------------- 1. members


def _rows(tmp_path: Path, specs: list[tuple]) -> list[dict]:
    """(trial_id, fold, status, score, epochs[, checkpoint?]) -> trials.csv rows as read back (strings)."""
    rows = []
    for spec in specs:
        trial_id, fold, status, score, epochs = spec[:5]
        has_ckpt = spec[5] if len(spec) > 5 else True
        ckpt = tmp_path / trial_id / "model.pt"
        if has_ckpt:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            ckpt.write_bytes(b"")
        rows.append({"trial_id": trial_id, "fold": str(fold), "status": status, "retrain": "False",
                     "epochs": str(epochs), "best_epoch": str(epochs), "best_val_miou": "" if score is None else
                     str(score), "node": "", "error": "", "checkpoint": str(ckpt) if has_ckpt else ""})
    return rows


def test_top_k_order_ties_status_and_errors(tmp_path):
    rows = _rows(tmp_path, [
        ("a", 0, "completed", 0.50, 10),
        ("b", 0, "completed", 0.50, 5),  # same score as a, fewer epochs: first
        ("c", 0, "stopped", 0.90, 2),  # best score but stopped early: fold 0 has completed trials
        ("d", 0, "completed", 0.30, 10),
        ("e", 0, "error", None, 1),
        ("f", 0, "completed", 0.99, 10, False),  # no checkpoint: unusable
        ("g", 0, "completed", None, 10),  # no score: unusable
        ("h", 1, "stopped", 0.20, 3),
        ("i", 1, "stopped", 0.40, 3),
        ("j", 1, "running", 0.95, 3),
    ])
    ids = lambda chosen: {fold: [r["trial_id"] for r in rs] for fold, rs in chosen.items()}  # noqa: E731
    assert ids(top_k(rows, "val_miou", "max", 1)) == {0: ["b"], 1: ["i"]}
    assert ids(top_k(rows, "val_miou", "max", 2)) == {0: ["b", "a"], 1: ["i", "h"]}
    # stopped trials are used only in a fold without any completed one (fold 1)
    assert ids(top_k(rows, "val_miou", "max", 10)) == {0: ["b", "a", "d"], 1: ["i", "h"]}
    assert ids(top_k(rows, "val_miou", "min", 2)) == {0: ["d", "b"], 1: ["h", "i"]}

    unusable = [r for r in rows if r["trial_id"] in ("e", "f", "g", "j")]
    with pytest.raises(InputError, match="nothing to ensemble"):
        top_k(unusable, "val_miou", "max", 2)
    with pytest.raises(InputError):
        top_k([], "val_miou", "max", 2)

    Path(rows[1]["checkpoint"]).unlink()  # b's checkpoint vanished
    with pytest.raises(InputError) as err:
        top_k(rows, "val_miou", "max", 2)
    assert err.value.path == rows[1]["checkpoint"]


def test_greedy_select_sequence_repetition_and_stop():
    values = {"a": 0.0, "b": 1.0, "c": 4.0}
    calls = []

    def score(chosen):
        calls.append(list(chosen))
        return -abs(np.mean([values[c] for c in chosen]) - 2.0)

    # b (|1-2|=1), then c (mean 2.5), then b again (mean 2.0, exact): nothing improves on 0 after
    assert greedy_select(list(values), score, max_members=10) == ["b", "c", "b"]
    assert len(calls) == 4 * len(values)  # the fourth round found no gain and stopped
    assert greedy_select(list(values), score, max_members=2) == ["b", "c"]
    assert greedy_select(list(values), score, max_members=0) == []
    # mode="min" minimises: the same score with the sign flipped gives the same sequence
    assert greedy_select(list(values), lambda ch: -score(ch), max_members=10, mode="min") == ["b", "c", "b"]
    # a candidate that is best alone and never improved on: one member only
    assert greedy_select(["x", "y"], lambda ch: 1.0 if ch == ["x"] else 0.5, max_members=5) == ["x"]


# --------------------------------------------------------------------------- 2. predictor


@pytest.mark.slow
def test_soft_voting_of_identical_members_and_tta(experiment):
    import torch

    from ensemble.predictor import TTA, Ensemble, load_member

    cpu = torch.device("cpu")
    path = experiment.rows[0]["checkpoint"]
    member = load_member(path, "m", cpu)
    again = load_member(path, "m2", cpu)
    assert member.image_size == (64, 96) and member.fold == 0 and len(member.class_names) == NUM_CLASSES
    data = experiment.data
    images = [data.read_image(0), data.read_image(1)[:100, 10:150]]  # two sizes in one call
    one = Ensemble([member], device=cpu).predict_batch(images)
    assert [p.shape for p in one] == [(NUM_CLASSES, 120, 160), (NUM_CLASSES, 100, 140)]
    for members in ([member, member], [member, again]):
        two = Ensemble(members, device=cpu).predict_batch(images)
        for p1, p2 in zip(one, two):
            np.testing.assert_allclose(p2, p1, atol=1e-6)
    per_member = Ensemble([member, again], device=cpu).predict_batch(images, per_member=True)
    assert per_member[0].shape == (2, NUM_CLASSES, 120, 160)
    np.testing.assert_allclose(per_member[0][0], per_member[0][1], atol=1e-6)
    for p in one:
        np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-5)

    flip = Ensemble([member], TTA.parse("hflip"), device=cpu)
    assert TTA.parse("hflip").views() == [(1.0, False), (1.0, True)]
    tta = flip.predict_batch(images)
    for p, q in zip(one, tta):
        assert np.abs(p - q).max() > 1e-3  # the flipped view changes the average
        assert q.min() >= 0.0 and q.max() <= 1.0
        np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)
    # original + flipped view: predicting the mirrored image gives the mirrored probabilities
    mirrored = flip.predict_batch([images[0][:, ::-1].copy()])[0]
    np.testing.assert_allclose(mirrored, tta[0][:, :, ::-1], atol=1e-5)

    hard = Ensemble([member], voting="hard", device=cpu).predict_batch(images[:1])[0]
    assert set(np.unique(hard)) <= {0.0, 1.0}
    np.testing.assert_array_equal(hard.sum(0), 1.0)
    np.testing.assert_array_equal(hard.argmax(0), one[0].argmax(0))
    with pytest.raises(ValueError):
        TTA.parse("vflip")


# --------------------------------------------------------------------------- 3. the full run


def _is_png(path: Path) -> bool:
    if not path.is_file() or path.read_bytes()[:8] != PNG_MAGIC:
        return False
    with Image.open(path) as im:
        im.verify()
    return True


@pytest.mark.slow
def test_run_oof_report_and_predictions(experiment, ensemble_run):
    data, report = experiment.data, ensemble_run.report
    # every image exactly once out of fold
    probs = sorted(report.glob("oof_probs/*.npy"))
    assert sorted(int(p.stem) for p in probs) == list(range(NUM_IMAGES))
    sample = np.load(probs[0])
    assert sample.dtype == np.float16 and sample.shape == (NUM_CLASSES, 72, 96)  # 120x160 at max_size 96
    np.testing.assert_allclose(sample.astype(np.float32).sum(0), 1.0, atol=1e-2)

    metrics = json.loads((report / "oof_metrics.json").read_text())
    assert metrics["oof_images"] == NUM_IMAGES
    assert metrics["class_names"] == data.class_names
    for key in ("single", "ensemble", "tuned"):
        assert 0.0 < metrics[key]["miou"] <= 1.0
        assert len(metrics[key]["iou_per_class"]) == NUM_CLASSES

    thresholds = json.loads((report / "thresholds.json").read_text())
    assert len(thresholds["thresholds"]) == NUM_CLASSES and thresholds["fallback"] == 0
    assert thresholds["thresholds"][0] == 0.0
    assert all(0.0 <= t <= 1.0 for t in thresholds["thresholds"])
    # in-sample (b) and (c) are what the tuner counted: same pixels, same probabilities
    assert math.isclose(metrics["ensemble"]["miou"], thresholds["default_miou"], abs_tol=1e-9)
    assert math.isclose(metrics["tuned_in_sample"]["miou"], thresholds["miou"], abs_tol=1e-9)
    # (c) is cross-fitted: recomputed here with one tuner per held-out fold and sklearn's confusion matrix
    expected = _cross_fitted_miou(experiment, report)
    assert math.isclose(metrics["tuned"]["miou"], expected, abs_tol=1e-9)
    step = metrics["steps"]["thresholds"]
    assert step["kept"] == (metrics["tuned"]["miou"] > metrics["ensemble"]["miou"])
    assert math.isclose(step["gain"], metrics["tuned"]["miou"] - metrics["ensemble"]["miou"], abs_tol=1e-12)
    assert math.isclose(metrics["optimism"]["tuned"], metrics["tuned_in_sample"]["miou"] - metrics["tuned"]["miou"])
    worse = [n for n, a, b in zip(data.class_names, metrics["tuned"]["iou_per_class"],
                                  metrics["ensemble"]["iou_per_class"]) if a < b - 1e-12]
    assert step["worse_classes"] == worse

    members = json.loads((report / "members.json").read_text())
    assert members["top_k"] == 2 and members["selection"] == "topk"
    for fold in range(2):
        listed = members["members"][str(fold)]
        expected = sorted((r for r in experiment.rows if r["fold"] == fold), key=lambda r: -r["best_val_miou"])
        assert [m["trial_id"] for m in listed] == [r["trial_id"] for r in expected]
        assert [m["checkpoint"] for m in listed] == [r["checkpoint"] for r in expected]
        assert all(math.isclose(m["score"], r["best_val_miou"]) for m, r in zip(listed, expected))

    for name in ("iou_bars.png", "threshold_curves.png", "confusion.png", "overlays.png"):
        assert _is_png(report / name), name

    # predictions at the original size of every val image
    coco = json.loads(VAL_JSON.read_text())
    sizes = {Path(im["file_name"]).stem: (im["height"], im["width"]) for im in coco["images"]}
    assert set(sizes.values()) == {(120, 160)}
    out = ensemble_run.out
    masks = {p.stem: np.asarray(Image.open(p)) for p in (out / "masks").glob("*.png")}
    assert set(masks) == set(sizes)
    for stem, mask in masks.items():
        assert mask.shape == sizes[stem] and mask.dtype == np.uint8
        assert mask.max() < NUM_CLASSES  # fallback 0: never void

    from ensemble.rle import rle_decode

    with open(out / "submission.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(sizes) * (NUM_CLASSES - 1)  # background left out
    assert {r["class"] for r in rows} == set(data.class_names[1:])
    checked = 0
    for row in rows:
        stem, c = Path(row["image_id"]).stem, data.class_names.index(row["class"])
        shape = (int(row["height"]), int(row["width"]))
        assert shape == sizes[stem]
        truth = masks[stem] == c
        np.testing.assert_array_equal(rle_decode(row["rle"], shape), truth)
        checked += bool(truth.any())
    present = sum(len(set(np.unique(m)) - {0}) for m in masks.values())
    assert checked == present > 0

    test_metrics = json.loads((out / "test_metrics.json").read_text())
    assert 0.0 < test_metrics["miou"] <= 1.0
    assert "predicted 24 images with 4 members" in ensemble_run.proc.stdout


def _cross_fitted_miou(experiment, report: Path) -> float:
    """Thresholds fitted on one fold's out-of-fold probabilities, applied to the other fold's, pooled."""
    from sklearn.metrics import confusion_matrix

    from ensemble.rules import apply_multiclass
    from ensemble.thresholds import MulticlassThresholdTuner
    from trainables.dataset import SegDataset
    from trainables.folds import train_val_indices

    data = experiment.data
    ds = SegDataset(data, [], transform=None, max_size=MAX_SIZE, cache=False)
    per_fold = [train_val_indices(experiment.folds, f, data.ids)[1] for f in range(2)]
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for f in range(2):
        tuner = MulticlassThresholdTuner(NUM_CLASSES, fallback=0)
        for i in per_fold[1 - f]:
            tuner.update(np.load(report / "oof_probs" / f"{i}.npy").astype(np.float64), ds.load(i)[1])
        rule = tuner.fit()
        for i in per_fold[f]:
            mask = ds.load(i)[1]
            pred = apply_multiclass(np.load(report / "oof_probs" / f"{i}.npy").astype(np.float32), rule["thresholds"],
                                    0, rule["min_area"])
            cm += confusion_matrix(mask.ravel(), pred.ravel(), labels=range(NUM_CLASSES))
    tp = np.diag(cm)
    with np.errstate(invalid="ignore"):
        iou = tp / (cm.sum(0) + cm.sum(1) - tp)
    return float(np.nanmean(iou))


# --------------------------------------------------------------------------- 4. plain folder


@pytest.mark.slow
def test_predict_plain_folder_keeps_each_size(experiment, tmp_path):
    coco = json.loads(VAL_JSON.read_text())
    names = [im["file_name"] for im in coco["images"][:3]]
    src = VAL_JSON.parent / "images"
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(src / names[0], folder / names[0])
    with Image.open(src / names[1]) as im:
        im.resize((130, 90)).save(folder / names[1])
    with Image.open(src / names[2]) as im:
        im.convert("L").save(folder / (Path(names[2]).stem + ".png"))
    expected = {Path(names[0]).stem: (120, 160), Path(names[1]).stem: (90, 130), Path(names[2]).stem: (120, 160)}

    run_dir = _copy_experiment(experiment.run_dir, tmp_path / "run")
    out = tmp_path / "out"
    proc = run_cli(["--experiment", run_dir, "--top-k", 1, "--tta", "hflip", "--predict", folder, "--out", out],
                   experiment.cache)
    _check_ok(proc)
    masks = {p.stem: np.asarray(Image.open(p)) for p in (out / "masks").glob("*.png")}
    assert {k: m.shape for k, m in masks.items()} == expected
    assert not (out / "test_metrics.json").exists()
    with open(out / "submission.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 * (NUM_CLASSES - 1)
    assert {Path(r["image_id"]).stem: (int(r["height"]), int(r["width"])) for r in rows} == expected
    members = json.loads((run_dir / "ensemble" / "members.json").read_text())
    assert members["tta"] == "hflip"
    assert {f: len(m) for f, m in members["members"].items()} == {"0": 1, "1": 1}
    assert "predicted 3 images with 2 members" in proc.stdout


def test_submission_keeps_class_zero_without_background(experiment, tmp_path):
    """Without a background class (fallback None) class 0 is a real class: it gets its rows."""
    import torch

    from ensemble.infer import PredictOptions, predict_folder
    from ensemble.predictor import Ensemble, load_member

    cpu = torch.device("cpu")
    ens = Ensemble([load_member(experiment.rows[0]["checkpoint"], "m", cpu)], device=cpu)
    folder = tmp_path / "images"
    folder.mkdir()
    name = json.loads(VAL_JSON.read_text())["images"][0]["file_name"]
    shutil.copy(VAL_JSON.parent / "images" / name, folder / name)
    names = experiment.data.class_names
    for fallback, classes in ((0, names[1:]), (None, names)):
        thresholds = {"thresholds": [0.0] * NUM_CLASSES, "fallback": fallback, "min_area": [0] * NUM_CLASSES}
        out = tmp_path / f"out_{fallback}"
        res = predict_folder(ens, thresholds, PredictOptions(folder, out, task="multiclass", unannotated="background",
                                                             class_names=names))
        assert res["images"] == 1
        with open(out / "submission.csv", newline="") as fh:
            assert [r["class"] for r in csv.DictReader(fh)] == classes


# --------------------------------------------------------------------------- 5. bad input


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert lines[-1] == errors[0]
    return errors[0]


def test_bad_experiment_dir_and_missing_checkpoint(experiment, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_error_line(run_cli(["--experiment", empty], experiment.cache))
    assert "experiment.json" in line

    run_dir = _copy_experiment(experiment.run_dir, tmp_path / "broken")
    from trainables.runfiles import read_trials_csv, write_trials_csv

    rows = read_trials_csv(run_dir / "trials.csv")
    gone = tmp_path / "gone" / "checkpoint_000000" / "model.pt"
    rows[0]["checkpoint"] = str(gone)
    write_trials_csv(run_dir / "trials.csv", rows)
    # in process (the same entry point, without paying for the imports again)
    from ensemble.run import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["--experiment", str(run_dir), "--top-k", "2"])
    finally:
        root.handlers[:], root.level = handlers, level
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    line = _one_error_line(subprocess.CompletedProcess([], 2, "", err))
    assert str(gone) in line
    assert not (run_dir / "ensemble").exists()


# --------------------------------------------------------------------------- 6. thresholds


def test_streaming_thresholds_match_brute_force_on_oof(experiment, ensemble_run):
    from ensemble.thresholds import MulticlassThresholdTuner, brute_force_multiclass_class
    from trainables.dataset import SegDataset

    data, bins = experiment.data, 100
    idx = list(range(4))
    ds = SegDataset(data, idx, transform=None, max_size=MAX_SIZE, cache=False)
    probs = [np.load(ensemble_run.report / "oof_probs" / f"{i}.npy").astype(np.float64) for i in idx]
    targets = [ds.load(i)[1].astype(np.int64) for i in idx]
    assert probs[0].shape[1:] == targets[0].shape
    tuner = MulticlassThresholdTuner(NUM_CLASSES, fallback=0, bins=bins)
    for p, t in zip(probs, targets):
        tuner.update(p, t, ignore_index=data.ignore_index)
    fit = tuner.fit()
    assert fit["miou"] >= fit["default_miou"]
    # the classes the ensemble predicts most (the curves of never-predicted classes are flat)
    counts = np.bincount(np.concatenate([p.argmax(0).ravel() for p in probs]), minlength=NUM_CLASSES)
    counts[0] = 0
    classes = [int(c) for c in np.argsort(-counts)[:2] if counts[c] > 0]
    assert classes
    grid = tuner.grid
    for c in classes:
        t_brute, miou_brute = brute_force_multiclass_class(probs, targets, c, grid, fit["thresholds"], 0,
                                                           data.ignore_index)
        # coordinate ascent has converged: no threshold of class c beats the tuned one
        assert math.isclose(miou_brute, fit["miou"], abs_tol=1e-9)
        assert abs(t_brute - fit["thresholds"][c]) <= 1.0 / bins or math.isclose(
            brute_force_multiclass_class(probs, targets, c, [fit["thresholds"][c]], fit["thresholds"], 0)[1],
            miou_brute, abs_tol=1e-9)
        # and the whole streamed curve equals thresholding the pixels, candidate by candidate
        curve = fit["curves"]["miou"][c]
        for k in range(0, bins + 1, 10):
            _, value = brute_force_multiclass_class(probs, targets, c, grid[k:k + 1], fit["thresholds"], 0,
                                                    data.ignore_index)
            assert math.isclose(curve[k], value, abs_tol=1e-9) or (math.isnan(curve[k]) and math.isnan(value))


@pytest.mark.slow
def test_rerun_after_a_crash_gives_the_same_outputs(experiment, ensemble_run, tmp_path, monkeypatch):
    """Re-running the ensemble step (as after a crash) on a copy rewrites identical results; the
    W&B offline run of the report lands in the experiment (its files written as a group member)."""
    from ensemble.run import main

    first = {name: (ensemble_run.report / name).read_text() for name in ("members.json", "thresholds.json")}
    oof = json.loads((ensemble_run.report / "oof_metrics.json").read_text())
    rerun = _copy_experiment(experiment.run_dir, tmp_path / "rerun")
    (rerun / "ensemble").mkdir()
    (rerun / "ensemble" / "thresholds.json").write_text('{"trunc')  # a half-written leftover is replaced
    monkeypatch.setenv("SEGHPO_CACHE", str(experiment.cache))
    main(["--experiment", str(rerun), "--top-k", "2", "--wandb", "offline"])
    assert (rerun / "ensemble" / "thresholds.json").read_text() == first["thresholds.json"]
    members = json.loads((rerun / "ensemble" / "members.json").read_text())
    assert members == json.loads(first["members.json"])
    again = json.loads((rerun / "ensemble" / "oof_metrics.json").read_text())
    assert again["tuned"]["miou"] == oof["tuned"]["miou"] and again["single"] == oof["single"]
    assert list((rerun / "wandb").glob("offline-run-*/run-*.wandb"))


# --------------------------------------------------------------------------- 6. greedy selection


@pytest.mark.slow
def test_greedy_selection_follows_the_metric_and_is_cross_fitted_on_half_folds(experiment):
    """Greedy selection maximises the search's metric (here pixel accuracy), selects on one half of a
    fold's images and scores on the other; recomputed here with a hand-written pixel accuracy."""
    import torch

    from ensemble.members import top_k as pick
    from ensemble.predictor import Ensemble, load_member
    from ensemble.selection import _subsampled_probs, greedy_members
    from trainables.folds import train_val_indices

    cpu = torch.device("cpu")
    data = experiment.data
    ensembles = {f: Ensemble([load_member(r["checkpoint"], r["trial_id"], cpu) for r in rows], device=cpu)
                 for f, rows in pick(experiment.rows, "val_miou", "max", 2).items()}
    chosen, report = greedy_members(ensembles, data, experiment.folds, MAX_SIZE, 2, "val_pixel_acc", "max",
                                    pixels_per_image=256)
    assert report["metric"] == "pixel_acc" and report["note"] is None
    for fold, ens in ensembles.items():
        sel = report["folds"][str(fold)]
        _, val_idx = train_val_indices(experiment.folds, fold, data.ids)
        probs, target, owner = _subsampled_probs(ens, data, val_idx, MAX_SIZE, 256, seed=fold)
        names = [m.name for m in ens.members]

        def accuracy(members, rows):
            avg = probs[[names.index(m) for m in members]][:, :, rows].astype(np.float32).mean(0)
            return (avg.argmax(0) == target[rows]).sum(), len(rows)

        halves = [np.flatnonzero(owner % 2 == h) for h in (0, 1)]
        hits = [accuracy(sel["half_choices"][k], halves[1 - k]) for k in (0, 1)]
        assert math.isclose(sel["cross_fitted"], sum(h for h, _ in hits) / sum(n for _, n in hits), rel_tol=1e-9)
        hit, n = accuracy(names[:2], np.arange(len(target)))
        assert math.isclose(sel["topk"], hit / n, rel_tol=1e-9)
        assert sel["kept"] == (sel["cross_fitted"] > sel["topk"])
        assert [m.name for m in chosen[fold].members] == (sel["chosen"] if sel["kept"] else names[:2])
    _, report = greedy_members(ensembles, data, experiment.folds, MAX_SIZE, 2, "val_biou", "max", pixels_per_image=64)
    assert report["metric"] == "miou" and "cannot be computed on sampled pixels" in report["note"]


# --------------------------------------------------------------------------- 7. out-of-fold pass


def _iou_of(targets: list[np.ndarray], preds: list[np.ndarray]) -> float:
    """mIoU pooled over images, by scikit-learn's confusion matrix (classes never seen nor predicted: NaN, skipped)."""
    from sklearn.metrics import confusion_matrix

    cm = sum(confusion_matrix(t.ravel(), p.ravel(), labels=range(NUM_CLASSES)) for t, p in zip(targets, preds))
    tp = np.diag(cm)
    with np.errstate(invalid="ignore"):
        return float(np.nanmean(tp / (cm.sum(0) + cm.sum(1) - tp)))


def test_oof_pass_is_each_members_probabilities_averaged(experiment, tmp_path):
    """Rows (a) and (b) and the stored probabilities of the out-of-fold pass, recomputed here member
    by member (each member's own probabilities, averaged by hand over the members); hflip TTA,
    batches of 3 (the last one short), and in fold 1 a member listed twice (it weighs twice)."""
    import torch

    from ensemble.oof import oof_evaluate
    from ensemble.predictor import TTA, Ensemble, load_member
    from trainables.dataset import SegDataset
    from trainables.folds import train_val_indices

    cpu, data = torch.device("cpu"), experiment.data
    loaded = {r["trial_id"]: load_member(r["checkpoint"], r["trial_id"], cpu) for r in experiment.rows}
    by_fold = {f: [loaded[r["trial_id"]] for r in experiment.rows if r["fold"] == f] for f in range(2)}
    members = {0: by_fold[0], 1: [by_fold[1][1], by_fold[1][0], by_fold[1][1]]}  # member 0 of fold 1: config 1
    ensembles = {f: Ensemble(ms, TTA.parse("hflip"), device=cpu) for f, ms in members.items()}
    per_fold = 5
    result = oof_evaluate(ensembles, data, folds=experiment.folds, max_size=MAX_SIZE, out_dir=tmp_path, batch_size=3,
                          max_per_fold=per_fold)

    targets, firsts, means = [], [], []
    for fold, ens in ensembles.items():
        val_idx = train_val_indices(experiment.folds, fold, data.ids)[1][:per_fold]
        ds = SegDataset(data, val_idx, transform=None, max_size=MAX_SIZE, cache=False)
        for i in val_idx:
            image, mask = ds.load(i)
            own = [ens.member_probs(m, image[None])[0].numpy() for m in ens.members]  # (C, H, W) each
            mean = sum(own) / len(own)
            stored = np.load(tmp_path / "oof_probs" / f"{i}.npy")
            assert stored.dtype == np.float16 and stored.shape == mean.shape
            np.testing.assert_allclose(stored.astype(np.float32), mean, atol=1e-3)  # float16 rounding
            targets.append(mask)
            assert np.abs(own[0] - mean).max() > 1e-3  # member 0 alone is not the average
            firsts.append(own[0].argmax(0))
            means.append(stored.astype(np.float32).argmax(0))  # (b) decides on the stored (rounded) values
    held_out = [train_val_indices(experiment.folds, f, data.ids)[1][:per_fold] for f in range(2)]
    assert result["images"] == held_out[0] + held_out[1]
    assert math.isclose(result["single"]["miou"], _iou_of(targets, firsts), abs_tol=1e-9)
    assert math.isclose(result["ensemble"]["miou"], _iou_of(targets, means), abs_tol=1e-9)


_PEAK_SCRIPT = """
import json, resource, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from ensemble.oof import oof_evaluate
from ensemble.predictor import Ensemble, load_member
from ensemble.steps import load_experiment
from trainables.data import load_data
run_dir, copies, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
experiment, folds, rows = load_experiment(Path(run_dir))
data = load_data(experiment["settings"]["fixed"]["data"])
first = {}
for r in rows:
    first.setdefault(int(r["fold"]), load_member(r["checkpoint"], r["trial_id"], torch.device("cpu")))
ensembles = {f: Ensemble([m] * copies, device="cpu") for f, m in first.items()}
oof_evaluate(ensembles, data, folds=folds, max_size=experiment["settings"]["fixed"]["data"]["max_size"],
             out_dir=Path(out), batch_size=8, max_per_fold=8)
print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in kB on Linux")
def test_oof_pass_memory_does_not_grow_with_the_number_of_members(experiment, tmp_path):
    """Peak memory of the out-of-fold pass with 1 and with 40 members (one member listed 40 times, so
    the weights are the same): the 40 members' probability maps of a batch would be
    40 x 8 x 12 x 72 x 96 x 4 bytes = 106 MB (twice that while stacked); a running sum holds two maps."""
    copies, batch = 40, 8
    peaks = {}
    for n in (1, copies):
        proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(experiment.run_dir), str(n),
                               str(tmp_path / str(n))], cwd=ROOT, env=_env(experiment.cache), capture_output=True,
                              text=True, timeout=600)
        _check_ok(proc)
        peaks[n] = json.loads(proc.stdout.strip().splitlines()[-1])["maxrss_kb"] * 1024
    maps = copies * batch * NUM_CLASSES * 72 * 96 * 4  # bytes of every member's map of one batch
    grown = peaks[copies] - peaks[1]
    assert grown < maps / 4, \
        f"peak memory grew by {grown / 1e6:.0f} MB with {copies} members ({maps / 1e6:.0f} MB of maps)"


def test_oof_table_labels_row_b_in_sample_and_points_to_the_holdout(capsys):
    """The printed out-of-fold table: row (b)'s members were chosen on the images it is scored on."""
    from ensemble.run import print_table

    row = {"miou": 0.5, "dice": 0.6, "biou": 0.2, "pixel_acc": 0.9, "iou_per_class": [0.5, 0.5]}
    report = {"single": row, "ensemble": row, "tuned": row, "tuned_in_sample": row, "oof_images": 10}
    print_table(report, ["background", "road"])
    out = capsys.readouterr().out
    assert "(b) ensemble (in-sample)" in out and "(a) best single" in out
    assert ("row (b) is in-sample: its members were chosen on these same out-of-fold images (top-k by validation "
            "score, greedy selection, latency budget), as was (a)'s trial, so both flatter; quote the holdout's rows "
            "(folds.holdout); this search has no holdout: set folds.holdout") in out
    print_table({**report, "holdout": {"images": 3, "single": row}}, ["background", "road"])
    out = capsys.readouterr().out
    assert "quote the holdout's rows (folds.holdout)\n" in out and "this search has no holdout" not in out
