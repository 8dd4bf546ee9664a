"""Optimisers and learning-rate schedules by name, with the encoder/decoder learning-rate split."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from trainables.errors import ConfigError
from trainables.models import split_parameters

OPTIMIZERS: dict[str, Callable] = {
    "adamw": lambda groups, cfg: torch.optim.AdamW(groups, weight_decay=cfg["weight_decay"]),
    "adam": lambda groups, cfg: torch.optim.Adam(groups, weight_decay=cfg["weight_decay"]),
    "radam": lambda groups, cfg: torch.optim.RAdam(groups, weight_decay=cfg["weight_decay"]),
    "sgd": lambda groups, cfg: torch.optim.SGD(groups, momentum=cfg["momentum"], nesterov=True,
                                               weight_decay=cfg["weight_decay"]),
}
SCHEDULERS = ("cosine", "poly", "step", "plateau", "none")


def build_optimizer(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    """Encoder at ``lr * encoder_lr_mult``, decoder and head at ``lr``."""
    if cfg["name"] not in OPTIMIZERS:
        raise ConfigError("config", "optimizer.name", f"unknown optimizer {cfg['name']!r}; options: {list(OPTIMIZERS)}")
    encoder, rest = split_parameters(model)
    groups = [{"params": rest, "lr": cfg["lr"], "name": "decoder"}]
    if encoder:
        groups.append({"params": encoder, "lr": cfg["lr"] * cfg["encoder_lr_mult"], "name": "encoder"})
    return OPTIMIZERS[cfg["name"]](groups, cfg)


def lr_factor(cfg: dict, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate after ``step`` optimiser steps (warmup, then the schedule)."""
    warmup = cfg["warmup_epochs"] * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    name = cfg["name"]
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = cfg["min_lr_ratio"]
    if name == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if name == "poly":
        return floor + (1 - floor) * (1 - progress) ** cfg["poly_power"]
    if name == "step":
        return cfg["gamma"] ** ((step - warmup) // max(1, cfg["step_size"] * steps_per_epoch))
    return 1.0  # plateau and none: warmup only here; plateau also reduces on the metric


class Schedule:
    """Per-step warmup/cosine/poly/step factors plus ReduceLROnPlateau on the epoch metric."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: dict, epochs: int, steps_per_epoch: int, mode: str):
        if cfg["name"] not in SCHEDULERS:
            raise ConfigError("config", "scheduler.name", f"unknown scheduler {cfg['name']!r}; options: {SCHEDULERS}")
        self.optimizer, self.cfg = optimizer, cfg
        self.total, self.per_epoch = epochs * steps_per_epoch, steps_per_epoch
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.plateau_scale = 1.0
        self.best, self.bad_epochs, self.mode = None, 0, mode
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        factor = lr_factor(self.cfg, self.step_count, self.total, self.per_epoch) * self.plateau_scale
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = base * factor

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def epoch_end(self, metric: float) -> None:
        if self.cfg["name"] != "plateau" or metric is None or math.isnan(metric):
            return
        better = self.best is None or (metric > self.best if self.mode == "max" else metric < self.best)
        if better:
            self.best, self.bad_epochs = metric, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.cfg["patience"]:
                self.plateau_scale *= self.cfg["gamma"]
                self.bad_epochs = 0
                self._apply()

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("plateau_scale", "best", "bad_epochs", "step_count")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self._apply()
