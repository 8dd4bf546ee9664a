"""The thin adapter between Ray Tune and :class:`trainables.loop.FoldTrainer`.

Each Tune trial trains one sampled config on one fold. Per epoch it reports the metrics; when
the selection metric improves it also reports a checkpoint holding the best model
(``model.pt``, self-describing) and the state to continue from (``state.pt``), so Tune's
``CheckpointConfig(num_to_keep=1)`` keeps exactly the best epoch and a restored trial resumes.
With ``search.asha.promotion`` a trial also checkpoints at the epochs where the scheduler may pause it
(``pause_epochs``, tune/promotion.py): ``model.pt`` still holds the best epoch's weights and ``state.pt``
then the current ones too, so a promoted trial continues from the epoch it paused at, not from its best.
A trial on several workers (``resources.workers_per_trial``) runs the same pieces in each worker
of a Ray Train run instead (tune/train_adapter.py).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from ray import tune

from trainables.checkpoint import load_checkpoint, save_checkpoint
from trainables.config import merge
from trainables.data import load_data
from trainables.extra import with_extra_train
from trainables.folds import train_val_indices
from trainables.loop import FoldTrainer
from trainables.runfiles import PREVIEW_FILE
from tune.experiment import node_label

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
RESERVED = ("fold", "retrain", "config_id")  # config keys that are not trial-config settings (config_id: racing)


def split_config(config: dict) -> tuple[int, dict]:
    """Tune config -> (fold, sampled dotted settings)."""
    return int(config["fold"]), {k: v for k, v in config.items() if k not in RESERVED}


def build_trainer(config: dict, base: dict, folds: list[list[str]], device=None) -> tuple[FoldTrainer, dict]:
    """The fold trainer of one trial (the sampled ``config`` on its fold) and its resolved config."""
    fold, sampled = split_config(config)
    cfg = merge(base, sampled, source="search space")
    if config.get("retrain"):
        cfg["train"]["epochs"] = int(config["retrain"]["epochs"])
    d = cfg["data"]
    data = load_data(d)
    train_idx, val_idx = train_val_indices(folds, fold, data.ids)
    data, train_idx = with_extra_train(data, train_idx, d, fold)  # data.extra_train: training only
    return FoldTrainer(cfg, data, train_idx, val_idx, fold=fold, device=device), cfg


def load_trial_state(trainer: FoldTrainer, ckpt_dir: str | Path) -> None:
    """Continue ``trainer`` from a checkpoint directory written by :func:`write_trial_checkpoint`."""
    state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location=trainer.device, weights_only=True)
    weights = load_checkpoint(ckpt_dir)["state_dict"]  # kept once, in model.pt
    state["best_state"] = weights
    # at the best epoch model.pt holds the evaluated weights of this state: the EMA's when state.pt has the
    # raw ones (train.ema_decay), else the model's. At a pause epoch that was not the best, state.pt has both
    # (an "ema" added for a trainer without one is ignored)
    state.setdefault("ema" if "model" in state else "model", weights)
    trainer.load_state_dict(state)
    logger.info("trial resumed after epoch %d", trainer.epoch)


def write_trial_checkpoint(trainer: FoldTrainer, cfg: dict, folder: str | Path) -> None:
    """The best epoch's files: model.pt, state.pt (with the current weights unless this is the best epoch),
    and W&B's preview."""
    save_checkpoint(trainer.best_checkpoint(), folder)
    state = trainer.state_dict()
    del state["best_state"]  # model.pt's
    if trainer.best_epoch == trainer.epoch:
        # the current evaluated weights are the best, model.pt's: written once. With train.ema_decay they
        # are the EMA's, and the raw weights that keep training stay in state.pt
        del state["ema" if "ema" in state else "model"]
    torch.save(state, Path(folder) / STATE_FILE)
    if cfg["train"]["preview_images"]:  # only W&B shows them (tune/run.py sets 0 without it)
        np.savez_compressed(Path(folder) / PREVIEW_FILE, **trainer.preview(int(cfg["train"]["preview_images"])))


def train_trial(config: dict, base: dict, folds: list[list[str]], cpus: float, pause_epochs=()) -> None:
    """Ray Tune function trainable: ``base`` is the fixed config, ``config`` the sampled part;
    ``pause_epochs``: epochs that checkpoint even without an improvement (the scheduler may pause there)."""
    torch.set_num_threads(max(1, int(cpus)))
    trainer, cfg = build_trainer(config, base, folds)
    restored = tune.get_checkpoint()
    if restored:
        with restored.as_directory() as ckpt_dir:
            load_trial_state(trainer, ckpt_dir)
    node = node_label()
    for record in trainer.epochs():
        record["node"] = node
        if not record.pop("improved") and trainer.epoch not in pause_epochs:
            tune.report(record)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            write_trial_checkpoint(trainer, cfg, tmp)
            tune.report(record, checkpoint=tune.Checkpoint.from_directory(tmp))
