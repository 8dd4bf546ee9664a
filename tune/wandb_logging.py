"""Weights & Biases: per-trial runs through Ray's WandbLoggerCallback, and W&B sweep export.

* ``wandb_callback`` - one W&B run per trial, grouped by experiment, tagged with fold,
  architecture and loss; config = the sampled parameters; per-epoch metrics; at every new best
  epoch a few validation images with true and predicted masks and the class-wise IoU table
  (read from the ``preview.npz`` the trainable stores in its best checkpoint).
* ``sweep_config`` - the same search space as a W&B sweep (method bayes, Hyperband early
  termination mirroring the ASHA settings) whose program is ``tune/sweep_agent.py``: it runs
  the same training loop and logs the same metric names, so Tune/Optuna/ASHA and W&B's own
  sweep can be compared side by side in one W&B project.

Parameter names are the ones Optuna sees (tune/space.py): dotted keys, ``key|parent=value`` for
architecture-dependent lists, ``key[i]`` for per-class weights. W&B sweeps have no conditional
parameters: inactive ones are sampled by W&B but ignored by the agent, which applies the
space's ``when``/``choice_by`` rules exactly as the Optuna searcher does (:class:`SweepTrial`).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

from trainables.runfiles import PREVIEW_FILE
from tune.space import Param, SearchSpec

logger = logging.getLogger(__name__)

def wandb_callback(project: str, group: str, directory: str, mode: str, class_names: list[str], base: dict):
    """A WandbLoggerCallback that tags runs and logs example masks at each new best epoch.
    ``base`` (the fixed trial config) supplies the tags of settings that are not searched."""
    from ray.air.integrations.wandb import WandbLoggerCallback

    class SegWandbCallback(WandbLoggerCallback):
        def log_trial_start(self, trial):
            config = trial.config
            self.kwargs["tags"] = [f"fold{config.get('fold')}", str(config.get("model.arch", base["model"]["arch"])),
                                   str(config.get("loss.name", base["loss"]["name"]))]
            self.kwargs["tags"] = [t for t in self.kwargs["tags"] if t]
            super().log_trial_start(trial)

        def log_trial_save(self, trial):
            super().log_trial_save(trial)
            try:
                media = best_epoch_media(trial, class_names)
            except Exception as exc:  # media are a bonus: never fail a search over them
                logger.warning("W&B media for trial %s skipped: %s", trial.trial_id, exc)
                return
            if media:
                self.log_trial_result(0, trial, media)

    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    return SegWandbCallback(project=project, group=group, dir=directory, mode=mode,
                            excludes=["node", "improved"])


def best_epoch_media(trial, class_names: list[str]) -> dict[str, Any]:
    import wandb

    result = trial.last_result or {}
    checkpoint = trial.checkpoint
    if checkpoint is None:
        return {}
    media: dict[str, Any] = {"training_iteration": result.get("training_iteration")}
    table = wandb.Table(columns=["class", "iou"],
                        data=[[n, result.get(f"val_iou/{n}")] for n in class_names])
    media["best/class_iou"] = table
    preview_path = f"{checkpoint.path}/{PREVIEW_FILE}"
    if checkpoint.filesystem.get_file_info(preview_path).type.name == "NotFound":
        return media  # train.preview_images: 0
    with checkpoint.filesystem.open_input_file(preview_path) as fh:
        preview = dict(np.load(fh))
    if preview["truth"].ndim == 3:  # multiclass: label maps
        labels = dict(enumerate(class_names))
        media["best/examples"] = [
            wandb.Image(img, masks={"prediction": {"mask_data": pred, "class_labels": labels},
                                    "ground_truth": {"mask_data": np.where(truth == 255, 0, truth),
                                                     "class_labels": labels}})
            for img, truth, pred in zip(preview["images"], preview["truth"], preview["pred"])]
    return media


# ------------------------------------------------------------------------ sweep export
def _values(choices: list[Any]) -> list[Any]:
    """Choices as the agent reads them back: plain values, or JSON text (as Optuna sees them)."""
    if all(isinstance(c, (str, int, float)) for c in choices):
        return list(choices)
    return [json.dumps(c) for c in choices]


def _numeric(param: Param) -> dict:
    if param.kind == "int":
        if param.log:
            return {"distribution": "q_log_uniform_values", "min": param.low, "max": param.high, "q": 1}
        if param.step and param.step != 1:
            return {"distribution": "q_uniform", "min": param.low, "max": param.high, "q": param.step}
        return {"distribution": "int_uniform", "min": int(param.low), "max": int(param.high)}
    if param.log:
        return {"distribution": "log_uniform_values", "min": float(param.low), "max": float(param.high)}
    if param.step:
        return {"distribution": "q_uniform", "min": float(param.low), "max": float(param.high), "q": param.step}
    return {"distribution": "uniform", "min": float(param.low), "max": float(param.high)}


def sweep_parameters(spec: SearchSpec, num_classes: int) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for key, param in spec.space.items():
        if param.kind == "categorical":
            out[key] = {"values": _values(param.choices)}
        elif param.kind == "dependent":
            for value, options in param.by.items():
                label = value if isinstance(value, str) else json.dumps(value)
                out[f"{key}|{param.parent}={label}"] = {"values": _values(options)}
        elif param.kind == "per_class":
            inner = param.inner
            for i in range(num_classes):
                out[f"{key}[{i}]"] = ({"values": _values(inner.choices)} if inner.kind == "categorical"
                                      else _numeric(inner))
        else:
            out[key] = _numeric(param)
    return out


def sweep_config(spec: SearchSpec, num_classes: int, fold: int, project: str, space_arg: str,
                 data: str | None = None) -> dict:
    """A W&B sweep config equivalent to ``spec`` on one fold (run one sweep per fold)."""
    search = spec.search
    command = ["${env}", "${interpreter}", "tune/sweep_agent.py", "--space", space_arg, "--fold", str(fold)]
    if data:
        command += ["--data", data]
    config = {
        "name": f"{spec.name}-fold{fold}",
        "project": project,
        "program": "tune/sweep_agent.py",
        "command": command,
        "method": "bayes",
        "metric": {"name": search["metric"], "goal": "maximize" if search["mode"] == "max" else "minimize"},
        "parameters": sweep_parameters(spec, num_classes),
        "run_cap": int(search["num_samples"]),
    }
    if search.get("asha"):
        config["early_terminate"] = {"type": "hyperband", "min_iter": int(search["asha"]["grace_period"]),
                                     "eta": int(search["asha"]["reduction_factor"])}
    return config


class SweepTrial:
    """Answers Optuna's ``suggest_*`` calls from a W&B sweep's parameters, so the agent samples
    through :func:`tune.space.sample` (same ``when``/``choice_by`` rules as the Optuna search)."""

    def __init__(self, params: dict[str, Any]):
        self.params = params

    def _get(self, name: str):
        if name not in self.params:
            raise KeyError(f"the sweep gave no value for parameter {name!r}")
        return self.params[name]

    def suggest_categorical(self, name: str, choices):
        value = self._get(name)
        if value not in choices:
            raise ValueError(f"sweep value {value!r} for {name!r} is not one of {choices}")
        return value

    def suggest_int(self, name: str, low, high, step=1, log=False):
        return int(round(float(self._get(name))))

    def suggest_float(self, name: str, low, high, step=None, log=False):
        return float(self._get(name))
