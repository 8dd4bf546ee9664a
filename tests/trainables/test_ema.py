"""Weight averaging in the fold loop (``train.ema_decay``, timm's ModelEmaV3): the average against
one computed by hand, validation and the best checkpoint on the averaged weights, resume, and EMA off
leaving training as it was. Tiny Unet, 64x96 images, 4-image batches, a few steps each."""
from __future__ import annotations

import io

import pytest
import torch

from tests.conftest import tiny_config
from trainables.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from trainables.config import setting_problem
from trainables.folds import make_folds, train_val_indices
from trainables.loop import FoldTrainer

SMALL = {"train.batch_size": 4, "train.max_train_batches": 2, "train.epochs": 2, "augment.hflip": 0.0}


@pytest.fixture(scope="module")
def split(sample):
    folds = make_folds("kfold", 5, 0, sample.ids, sample.presence)
    train_idx, val_idx = train_val_indices(folds, 0, sample.ids)
    return train_idx, val_idx[:4]  # one validation batch


def make(sample, split, **overrides) -> FoldTrainer:
    return FoldTrainer(tiny_config(**{**SMALL, **overrides}), sample, *split, fold=0)


def copied(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def run_steps(trainer: FoldTrainer, steps: int, epoch: int = 0) -> list[dict]:
    """``steps`` optimiser steps on the first batches of ``epoch``; the raw weights after each."""
    trainer.model.train()
    trainer.set_epoch(epoch)
    trainer.epoch = epoch
    after = []
    for _, (images, target) in zip(range(steps), trainer.train_loader):
        trainer.train_step(*trainer._to_device(images, target))
        after.append(copied(trainer.model.state_dict()))
    return after


def hand_average(raw_after: list[dict], decay: float, warmup: bool, counted: list[bool]) -> dict:
    """timm's rule written out: the n-th counted step (n = 1, 2, ...) averages with weight
    d_n = 0 for n = 1, else min(decay, 1 - n ** (-2/3)) with warmup, else decay; a step before the
    start epoch (not counted, n = 0) copies. Floating tensors (parameters, BatchNorm running stats):
    avg = d * avg + (1 - d) * w; integer buffers (num_batches_tracked) are copied."""
    avg, n = None, 0
    for weights, count in zip(raw_after, counted):
        n += count
        d = 0.0 if n <= 1 else (min(decay, 1 - n ** (-2 / 3)) if warmup else decay)
        if avg is None:
            avg = copied(weights)  # the EMA starts as a copy of the initial model: replaced by d = 0
        avg = {k: (d * avg[k] + (1 - d) * w if w.is_floating_point() else w.clone()) for k, w in weights.items()}
    return avg


@pytest.mark.parametrize("warmup, start_epoch", [(True, 0), (False, 0), (True, 1)])
def test_ema_matches_a_hand_computed_average(sample, split, warmup, start_epoch):
    decay = 0.5  # warmup decays 0, 0.37, 0.52 -> capped at 0.5: the cap is exercised too
    trainer = make(sample, split, **{"train.ema_decay": decay, "train.ema_warmup": warmup,
                                     "train.ema_start_epoch": start_epoch})
    raw = run_steps(trainer, 2, epoch=0) + run_steps(trainer, 2, epoch=1)
    counted = [False, False, True, True] if start_epoch == 1 else [True] * 4
    expected = hand_average(raw, decay, warmup, counted)
    ema = trainer.ema.module.state_dict()
    assert trainer.ema_steps == sum(counted)
    assert set(ema) == set(expected)
    assert any(k.endswith("running_mean") for k in ema) and any(k.endswith("num_batches_tracked") for k in ema)
    for key, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(ema[key], value, rtol=1e-5, atol=1e-6, msg=key)
        else:
            assert torch.equal(ema[key], value), key
    # the average is not the last raw weights: the EMA really averages
    assert any(not torch.equal(ema[k], raw[-1][k]) for k in ema if ema[k].is_floating_point())


def test_validation_and_best_checkpoint_use_the_average(sample, split, tmp_path):
    trainer = make(sample, split, **{"train.ema_decay": 0.9, "train.epochs": 1})
    (record,) = trainer.epochs()
    ema, raw = copied(trainer.ema.module.state_dict()), copied(trainer.model.state_dict())
    ckpt = trainer.best_checkpoint()
    assert ckpt["state_dict"].keys() == raw.keys()  # a plain model's keys: no module., no n_averaged
    assert all(torch.equal(ckpt["state_dict"][k], ema[k]) for k in ema)
    assert any(not torch.equal(ckpt["state_dict"][k], raw[k]) for k in raw if raw[k].is_floating_point())
    # the checkpoint loads (strictly) into a plain model, as the ensemble loads it, and predicts as the EMA
    model = model_from_checkpoint(load_checkpoint(save_checkpoint(ckpt, tmp_path))).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trainer.ema.module(x))
    # the epoch's record scored the EMA: the raw weights score otherwise, the EMA's loaded raw the same
    assert trainer.validate()["val_loss"] == record["val_loss"]
    held, trainer.ema = trainer.ema, None
    assert trainer.validate()["val_loss"] != record["val_loss"]
    trainer.model.load_state_dict(ema)
    assert trainer.validate()["val_loss"] == pytest.approx(record["val_loss"], rel=1e-6)
    trainer.ema = held


def test_resume_restores_ema_and_raw_weights(sample, split):
    cfg = {"train.ema_decay": 0.9, "train.max_train_batches": 1}
    straight = make(sample, split, **cfg)
    records = straight.epochs()
    next(records)
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)  # as the Tune adapter does: torch.save + weights_only load
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state["ema"]) == set(state["model"]) and state["ema_steps"] == 1
    end = next(records)  # the uninterrupted second epoch

    torch.manual_seed(123)
    resumed = make(sample, split, **cfg)
    resumed.load_state_dict(state)
    assert resumed.ema_steps == 1
    assert all(torch.equal(v, state["ema"][k]) for k, v in resumed.ema.module.state_dict().items())
    (again,) = resumed.epochs()
    assert again["train_loss"] == end["train_loss"] and again["val_loss"] == end["val_loss"]
    for mine, theirs in ((resumed.model, straight.model), (resumed.ema.module, straight.ema.module)):
        other = theirs.state_dict()
        assert all(torch.equal(v, other[k]) for k, v in mine.state_dict().items())


def test_state_without_ema_still_loads(sample, split):
    """A state saved with EMA off (or before it existed) loads into an EMA trainer: the EMA restarts
    from the restored weights."""
    plain = make(sample, split)
    run_steps(plain, 1)
    state = plain.state_dict()
    assert "ema" not in state
    trainer = make(sample, split, **{"train.ema_decay": 0.9})
    trainer.load_state_dict(state)
    assert trainer.ema_steps == 0
    assert all(torch.equal(v, state["model"][k]) for k, v in trainer.ema.module.state_dict().items())


def test_tune_checkpoint_files_resume_ema_and_raw_weights(sample, split, tmp_path):
    """model.pt holds the averaged weights (once), state.pt the raw ones: both come back."""
    pytest.importorskip("ray")
    from tune.trainable import load_trial_state, write_trial_checkpoint

    cfg = tiny_config(**{**SMALL, "train.ema_decay": 0.9, "train.preview_images": 0, "train.max_train_batches": 1})
    first = FoldTrainer(cfg, sample, *split, fold=0)
    next(first.epochs())
    write_trial_checkpoint(first, cfg, tmp_path)
    assert "ema" not in torch.load(tmp_path / "state.pt", weights_only=True)
    second = FoldTrainer(cfg, sample, *split, fold=0)
    load_trial_state(second, tmp_path)
    for mine, theirs in ((second.model, first.model), (second.ema.module, first.ema.module)):
        other = theirs.state_dict()
        assert all(torch.equal(v, other[k]) for k, v in mine.state_dict().items())
    assert second.ema_steps == first.ema_steps


def test_ema_off_trains_as_before(sample, split):
    """Off (the default): no EMA, validation and checkpoints on the model itself, and the raw training
    is the same with or without an EMA beside it."""
    off = make(sample, split)
    on = make(sample, split, **{"train.ema_decay": 0.999})
    assert off.ema is None and off.eval_model is off.model
    assert "ema" not in off.state_dict() and "ema_steps" not in off.state_dict()
    after_off, after_on = run_steps(off, 2), run_steps(on, 2)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(after_off, after_on) for k in a)


def test_a_step_the_grad_scaler_skips_is_not_averaged(sample, split, monkeypatch):
    """fp16's GradScaler skips a step with inf/NaN gradients (and lowers its scale): no EMA update."""
    trainer = make(sample, split, **{"train.ema_decay": 0.9})
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, enabled=True)  # as fp16 on CUDA
    run_steps(trainer, 1)
    before = copied(trainer.ema.module.state_dict())
    loss_fn = trainer.loss_fn
    monkeypatch.setattr(trainer, "loss_fn", lambda logits, target: loss_fn(logits, target) * float("inf"))
    run_steps(trainer, 1)
    assert trainer.scaler.get_scale() == 2.0 ** 7 and trainer.ema_steps == 1  # skipped, not averaged
    for key, value in trainer.ema.module.state_dict().items():
        if value.is_floating_point():  # BatchNorm statistics of the forward would have moved it
            assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("key, value, ok", [
    ("train.ema_decay", None, True), ("train.ema_decay", 0.999, True), ("train.ema_decay", 0, False),
    ("train.ema_decay", 1, False), ("train.ema_decay", "0.99", False), ("train.ema_decay", True, False),
    ("train.ema_warmup", False, True), ("train.ema_warmup", "yes", False),
    ("train.ema_start_epoch", 3, True), ("train.ema_start_epoch", -1, False), ("train.ema_start_epoch", 1.5, False),
])
def test_ema_settings_are_checked(key, value, ok):
    assert (setting_problem(key, value) is None) == ok


def test_ema_decay_is_searchable_as_a_choice(tmp_path):
    from tune.space import load_space, trial_config

    (tmp_path / "space.yaml").write_text("space:\n  train.ema_decay: {choice: [null, 0.99, 0.999]}\n")
    spec = load_space(str(tmp_path / "space.yaml"), tmp_path)
    assert spec.space["train.ema_decay"] is not None
    assert trial_config(spec, {"train.ema_decay": None})["train"]["ema_decay"] is None


def _ddp_worker(rank: int, world: int, init_file: str, cache: str, out: str) -> None:
    """One gloo rank of a 2-worker EMA trainer: one epoch, then its raw and averaged weights."""
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from trainables.data import load_dataset

        cfg = tiny_config(**{"train.epochs": 1, "train.batch_size": 4, "train.image_size": [32, 48],
                             "train.max_train_batches": 2, "train.ema_decay": 0.9})
        trainer = FoldTrainer(cfg, load_dataset(cache_dir=cache), list(range(8)), list(range(40, 44)), fold=0)
        next(trainer.epochs())
        torch.save({"ema": copied(trainer.ema.module.state_dict()), "raw": copied(trainer.model.state_dict()),
                    "best": trainer.best_checkpoint()["state_dict"], "steps": trainer.ema_steps},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_keep_one_ema_of_the_unwrapped_model(tmp_path, sample_cache):
    """Under DDP each rank averages ``self.model`` (plain keys); after the epoch every rank holds the
    same EMA (parameters from identical steps, BatchNorm statistics broadcast from rank 0)."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(sample_cache), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2
    assert ranks[0]["ema"].keys() == ranks[0]["raw"].keys()  # the plain model's: no "module." keys
    for key, value in ranks[0]["ema"].items():
        assert torch.equal(ranks[1]["ema"][key], value), key
        assert torch.equal(ranks[0]["best"][key], value), key
    assert any(not torch.equal(ranks[0]["raw"][k], v) for k, v in ranks[0]["ema"].items() if v.is_floating_point())
