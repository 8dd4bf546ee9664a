"""Self-describing checkpoints: weights + model arguments + resolved config + class names.

A member of an ensemble is rebuilt from its checkpoint alone, without the search space. Files
are written atomically and read with ``torch.load(weights_only=True)`` (no pickled code runs).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from trainables.errors import InputError
from trainables.io import atomic_torch_save
from trainables.models import build_model

FORMAT = "seghpo-checkpoint/1"
FILENAME = "model.pt"


def make_checkpoint(state_dict: dict, cfg: dict, class_names: list[str], task: str, metric: str,
                    score: float, epoch: int, fold: int | None, extra: dict | None = None,
                    weights: str | None = None) -> dict:
    """``weights``: what the model was actually initialised from (``imagenet``, ``random-init``, a
    path; ``build_model``'s ``weights_loaded``). The saved config then says that, not what was asked
    for (kept in ``extra["weights_requested"]``)."""
    model = cfg["model"]
    extra = dict(extra or {})
    if weights is not None:
        extra["weights_requested"] = model.get("weights")
        cfg = copy.deepcopy(cfg)
        cfg["model"]["weights"] = weights
    return {
        "format": FORMAT,
        "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()},
        "model": {"arch": model["arch"], "encoder": model["encoder"], "num_classes": len(class_names),
                  "kwargs": dict(model.get("kwargs") or {})},
        "config": cfg,
        "class_names": list(class_names),
        "task": task,
        "metric": metric,
        "score": float(score),
        "epoch": int(epoch),
        "fold": fold,
        "extra": extra,
    }


def save_checkpoint(ckpt: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix != ".pt":
        path = path / FILENAME
    atomic_torch_save(ckpt, path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise InputError(path, "checkpoint not found") from None
    except Exception as exc:  # torch raises RuntimeError/UnpicklingError/EOFError for damaged files
        raise InputError(path, f"cannot read checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InputError(path, f"not a {FORMAT} checkpoint")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> nn.Module:
    """Rebuild the network (random init, no download) and load the saved weights."""
    spec = ckpt["model"]
    model = build_model(spec["arch"], spec["encoder"], spec["num_classes"], weights=None, kwargs=spec["kwargs"])
    trimmed = tuple(f"{name}." for name in getattr(model, "trimmed_modules", []))
    # checkpoints written before unused encoder stages were dropped still carry their weights
    model.load_state_dict({k: v for k, v in ckpt["state_dict"].items() if not k.startswith(trimmed)} if trimmed
                          else ckpt["state_dict"])
    return model
