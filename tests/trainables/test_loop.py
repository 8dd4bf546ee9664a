"""The fold training loop on the shipped CamVid sample with a tiny model, and the training CLI."""
from __future__ import annotations

import csv
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO, tiny_config
from trainables import loop as loop_module
from trainables.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from trainables.dataset import normalise
from trainables.errors import ConfigError
from trainables.folds import make_folds, train_val_indices
from trainables.loop import DivergedError, FoldTrainer

METRICS = ("val_miou", "val_dice", "val_biou", "val_pixel_acc")


@pytest.fixture(scope="module")
def split(sample):
    folds = make_folds("kfold", 5, 0, sample.ids, sample.presence)
    return train_val_indices(folds, 0, sample.ids)  # 57 train / 15 val images


@pytest.fixture(scope="module")
def two_epochs(sample, split):
    """One uninterrupted 2-epoch run: (trainer, records)."""
    trainer = FoldTrainer(tiny_config(), sample, *split, fold=0)
    return trainer, list(trainer.epochs())


@pytest.mark.slow
def test_training_lowers_the_loss_and_reports_metrics(two_epochs, sample):
    trainer, records = two_epochs
    assert [r["epoch"] for r in records] == [1, 2] and trainer.epoch == 2
    assert records[1]["train_loss"] < records[0]["train_loss"]
    for rec in records:
        assert np.isfinite(rec["train_loss"]) and np.isfinite(rec["val_loss"])
        for key in METRICS:
            if key != "val_biou" or rec["epoch"] == 2:  # boundary IoU: at the last epoch by default
                assert 0.0 <= rec[key] <= 1.0, key
        assert ("val_biou" in rec) == (rec["epoch"] == 2)
        per_class = [rec[f"val_iou/{name}"] for name in sample.class_names]
        assert len(per_class) == 12
        assert np.nanmean(per_class) == pytest.approx(rec["val_miou"])
        assert rec["fold"] == 0 and rec["lr"] > 0
    best = max(records, key=lambda r: r["val_miou"])
    assert trainer.best_epoch == best["epoch"] and trainer.best_score == best["val_miou"]
    assert records[-1]["best_score"] == trainer.best_score


def test_best_checkpoint_loads_and_predicts(two_epochs, sample, tmp_path):
    trainer, _ = two_epochs
    ckpt = trainer.best_checkpoint()
    assert ckpt["epoch"] == trainer.best_epoch and ckpt["score"] == trainer.best_score
    assert ckpt["extra"] == {"dataset": sample.fingerprint, "weights_requested": None}
    assert ckpt["class_names"] == sample.class_names
    assert ckpt["config"]["model"]["weights"] == "random-init"  # what was loaded, not what was asked
    path = save_checkpoint(ckpt, tmp_path)
    model = model_from_checkpoint(load_checkpoint(path)).eval()
    images = normalise(np.stack([sample.read_image(i)[:64, :96] for i in range(2)]))
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (2, 12, 64, 96) and torch.isfinite(logits).all()
    # the saved weights are those of the best epoch: the final ones exactly when epoch 2 was best
    final = trainer.model.state_dict()
    same_as_final = all(torch.equal(value, final[name]) for name, value in model.state_dict().items())
    assert same_as_final == (trainer.best_epoch == 2)


SHORT = {"train.max_train_batches": 3}  # 3 of the 7 training batches per epoch


@pytest.fixture(scope="module")
def short_split(split):
    train_idx, val_idx = split
    return train_idx, val_idx[:8]  # one validation batch


@pytest.fixture(scope="module")
def short_two_epochs(sample, short_split):
    """An uninterrupted 2-epoch run of 3 batches per epoch (the reference for determinism and resume)."""
    return list(FoldTrainer(tiny_config(**SHORT), sample, *short_split, fold=0).epochs())


@pytest.mark.slow
def test_same_seed_same_losses(short_two_epochs, sample, short_split):
    again = list(FoldTrainer(tiny_config(**SHORT), sample, *short_split, fold=0).epochs())
    assert [r["train_loss"] for r in again] == [r["train_loss"] for r in short_two_epochs]
    assert [r["val_loss"] for r in again] == [r["val_loss"] for r in short_two_epochs]
    other_seed = FoldTrainer(tiny_config(**SHORT, **{"train.seed": 1}), sample, *short_split, fold=0)
    assert next(other_seed.epochs())["train_loss"] != short_two_epochs[0]["train_loss"]


def test_generator_can_stop_after_one_epoch(sample, short_split):
    trainer = FoldTrainer(tiny_config(**{"train.max_train_batches": 2}), sample, *short_split, fold=0)
    for record in trainer.epochs():
        break
    assert record["epoch"] == 1 and trainer.epoch == 1
    assert trainer.best_checkpoint()["epoch"] == 1


def test_resume_continues_exactly(short_two_epochs, sample, short_split):
    """1 epoch, save the state (as the Tune adapter does: torch.save + weights_only load), resume in
    a new trainer: epoch 2 matches the uninterrupted run exactly, random augmentation included."""
    assert tiny_config()["augment"]["hflip"] == 0.5  # the augmentation's random state is part of the state
    first = FoldTrainer(tiny_config(**SHORT), sample, *short_split, fold=0)
    for record in first.epochs():
        break
    assert record["train_loss"] == short_two_epochs[0]["train_loss"]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    torch.manual_seed(123)  # the process's random state in between must not matter
    second = FoldTrainer(tiny_config(**SHORT), sample, *short_split, fold=0)
    second.load_state_dict(state)
    assert second.epoch == 1 and second.best_epoch == 1
    resumed = list(second.epochs())
    assert [r["epoch"] for r in resumed] == [2]
    assert resumed[0]["train_loss"] == short_two_epochs[1]["train_loss"]
    assert resumed[0]["val_miou"] == short_two_epochs[1]["val_miou"]
    assert resumed[0]["lr"] == short_two_epochs[1]["lr"]


def test_nan_loss_raises_diverged(sample, short_split, monkeypatch):
    trainer = FoldTrainer(tiny_config(**{"train.max_train_batches": 2}), sample, *short_split, fold=0)
    monkeypatch.setattr(trainer, "loss_fn", lambda logits, target: logits.mean() * float("nan"))
    with pytest.raises(DivergedError, match="epoch 1"):
        next(trainer.epochs())


def test_huge_learning_rate_diverges(sample, short_split):
    cfg = tiny_config(**{"optimizer.lr": 1e30, "train.max_train_batches": 3})
    trainer = FoldTrainer(cfg, sample, *short_split, fold=0)
    with pytest.raises(DivergedError, match="training loss became (nan|inf) in epoch 1"):
        list(trainer.epochs())
    assert issubclass(loop_module.DivergedError, FloatingPointError)


def test_multilabel_epoch(sample_cache):
    from tests.conftest import SAMPLE_DIR
    from trainables.data import load_dataset

    data = load_dataset(SAMPLE_DIR / "annotations-multilabel.json", task="multilabel", cache_dir=sample_cache)
    cfg = tiny_config(**{"data.task": "multilabel", "loss.name": "0.5*focal+0.5*dice",
                         "loss.class_weights": "inverse", "train.epochs": 1, "train.max_train_batches": 2})
    train_idx, val_idx = list(range(0, 72, 2)), list(range(1, 72, 8))
    (record,) = FoldTrainer(cfg, data, train_idx, val_idx, fold=None).epochs()
    assert np.isfinite(record["train_loss"]) and np.isfinite(record["val_loss"])
    assert sum(key.startswith("val_iou/") for key in record) == 14
    assert 0.0 <= record["val_miou"] <= 1.0 and record["fold"] is None


# ---------------------------------------------------------------- the command line

TINY_SETS = ["model.arch=Unet", "model.encoder=resnet18", "model.weights=null",
             "model.kwargs={encoder_depth: 3, decoder_channels: [32, 16, 8]}", "train.image_size=[64,96]",
             "train.epochs=1", "train.device=cpu", "optimizer.lr=3e-3"]


def run_cli(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1", SEGHPO_CACHE=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "trainables.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_trains_one_epoch(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(["--set", *TINY_SETS, f"data.cache_dir={tmp_path / 'cache'}", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "72 images, 12 classes; fold 0: 57 train / 15 val" in proc.stdout
    assert "best val_miou" in proc.stdout and "at epoch 1" in proc.stdout
    ckpt = load_checkpoint(out / "fold0" / "model.pt")
    assert ckpt["epoch"] == 1 and ckpt["model"]["kwargs"]["encoder_depth"] == 3
    rows = list(csv.DictReader((out / "fold0" / "epochs.csv").open()))
    assert len(rows) == 1 and rows[0]["epoch"] == "1" and "val_iou/Sky" in rows[0]
    assert (out / "folds.json").exists()


@pytest.mark.slow
def test_cli_bad_setting_is_one_line_and_exit_2(tmp_path):
    proc = run_cli(["--set", "nosuch.key=1", "--out", str(tmp_path / "run")], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: command line: nosuch.key: unknown setting")
    assert not (tmp_path / "run").exists()


def test_parse_sets_reads_exponents_as_numbers():
    from trainables.cli import parse_sets

    sets = parse_sets(["optimizer.lr=3e-3", "optimizer.weight_decay=1.0e-4", "train.image_size=[64, 96]",
                       "model.weights=null", "model.encoder=resnet18", "model.kwargs={a: 1e2}", "x.y='1e5'"])
    assert sets == {"optimizer.lr": 0.003, "optimizer.weight_decay": 0.0001, "train.image_size": [64, 96],
                    "model.weights": None, "model.encoder": "resnet18", "model.kwargs": {"a": 100.0},
                    "x.y": "1e5"}


@pytest.mark.parametrize("setting, metric, with_boundary", [
    ("last", "val_miou", [False, False, True]),
    ("every", "val_miou", [True, True, True]),
    ("off", "val_miou", [False, False, False]),
    ("off", "val_biou", [True, True, True]),  # the selection metric is always computed
])
def test_boundary_iou_epochs(sample, split, setting, metric, with_boundary):
    trainer = FoldTrainer(tiny_config(**{"train.boundary_iou": setting, "train.metric": metric, "train.epochs": 3}),
                          sample, split[0], split[1][:4], fold=0)
    seen = []
    for epoch in range(3):
        trainer.epoch = epoch  # validate() as it would run in epoch + 1
        seen.append("val_biou" in trainer.validate())
    assert seen == with_boundary


def test_boundary_iou_setting_is_checked(sample, split):
    with pytest.raises(ConfigError, match=r"^config: train.boundary_iou: expected every, last or off, got 'sometimes'$"):
        FoldTrainer(tiny_config(**{"train.boundary_iou": "sometimes"}), sample, split[0], split[1][:4], fold=0)
