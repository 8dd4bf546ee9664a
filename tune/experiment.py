"""What a search leaves on disk besides Ray's own files: experiment.json, trials.csv, the summary.

``trials.csv`` has one row per trial (id, fold, status, error, node, epochs, best epoch, best
metric, every sampled parameter, checkpoint path). It is rewritten atomically by a Tune callback
whenever a trial ends, so it is complete after a crash and ``--resume`` too.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import platform
import re
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from ray.tune import Callback

from trainables.checkpoint import FILENAME
from trainables.errors import InputError
from trainables.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

PACKAGES = ("torch", "torchvision", "ray", "optuna", "segmentation-models-pytorch", "timm", "transformers",
            "albumentations", "pycocotools", "wandb", "numpy")
SECRET_HINTS = ("key", "token", "secret", "password")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def redact(argv: list[str]) -> list[str]:
    """Drop values of flags that look like credentials (never write API keys to disk)."""
    out, hide = [], False
    for arg in argv:
        out.append("***" if hide else arg)
        hide = arg.startswith("--") and any(h in arg.lower() for h in SECRET_HINTS) and "=" not in arg
    return out


def write_experiment_json(run_dir: Path, settings: dict, data_info: dict) -> None:
    """Record the resolved settings; on resume the dataset fingerprint must match."""
    path = run_dir / "experiment.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["dataset"]["fingerprint"] != data_info["fingerprint"]:
            raise InputError(path, f"the dataset changed since this experiment started (fingerprint "
                                   f"{saved['dataset']['fingerprint']} -> {data_info['fingerprint']}); "
                                   "start a new experiment with another --name")
    atomic_write_json(path, {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": redact(sys.argv),
        "settings": settings,
        "dataset": data_info,
        "versions": package_versions(),
    })


def trial_status(trial, max_epochs: int, ended: bool = False) -> str:
    """``ended``: the trial is ending now (Tune calls ``on_trial_complete`` before it sets TERMINATED)."""
    if trial.status == "ERROR":
        return "error"
    if trial.status == "TERMINATED" or ended:
        epochs = (trial.last_result or {}).get("epoch", 0)
        retrain = trial.config.get("retrain")
        planned = int(retrain["epochs"]) if retrain else max_epochs
        return "completed" if epochs >= planned else "stopped"
    return trial.status.lower()


def trial_error(trial) -> str:
    """The last exception line of the trial's error file (``DivergedError: training loss ...``)."""
    path = getattr(trial, "error_file", None)
    try:
        lines = Path(path).read_text().strip().splitlines() if path else []
    except OSError:
        lines = []
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line.strip()):
            name, sep, message = line.strip().partition(":")
            return name.rsplit(".", 1)[-1] + sep + message
    return lines[-1].strip() if lines else "error"


def trial_row(trial, metric: str, max_epochs: int, ended: bool = False) -> dict:
    result = trial.last_result or {}
    checkpoint = trial.checkpoint
    error = trial_error(trial) if trial.status == "ERROR" else ""
    params = {k: json.dumps(v) if isinstance(v, (list, dict)) else v
              for k, v in trial.config.items() if k not in ("fold", "retrain")}
    return {
        "trial_id": trial.trial_id,
        "fold": trial.config.get("fold"),
        "status": trial_status(trial, max_epochs, ended),
        "retrain": bool(trial.config.get("retrain")),
        "epochs": result.get("epoch", 0),
        "best_epoch": result.get("best_epoch"),
        f"best_{metric}": result.get("best_score"),
        "node": result.get("node", ""),
        "error": error,
        "checkpoint": str(Path(checkpoint.path) / FILENAME) if checkpoint else "",
        **{f"param:{k}": v for k, v in params.items()},
    }


def write_trials_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


def read_trials_csv(path: Path) -> list[dict]:
    if not path.exists():
        raise InputError(path, "no trials.csv: is this a finished (or resumed) experiment directory?")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


class TrialsTable(Callback):
    """Keeps ``trials.csv`` current as trials end (and at the end of the experiment)."""

    def __init__(self, path: Path, metric: str, max_epochs: int):
        self.path, self.metric, self.max_epochs = Path(path), metric, max_epochs

    def write(self, trials, ending=None) -> None:
        write_trials_csv(self.path, [trial_row(t, self.metric, self.max_epochs, ended=t is ending) for t in trials])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.write(trials, ending=trial)  # still RUNNING here: Tune sets TERMINATED after the callbacks

    def on_trial_error(self, iteration, trials, trial, **info):
        self.write(trials)

    def on_experiment_end(self, trials, **info):
        self.write(trials)


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def best_per_fold(rows: list[dict], metric: str, mode: str) -> dict[int, dict]:
    best: dict[int, dict] = {}
    sign = 1 if mode == "max" else -1
    for row in rows:
        score = _num(row.get(f"best_{metric}"))
        if row["status"] not in ("completed", "stopped") or math.isnan(score):
            continue
        fold = int(row["fold"])
        if fold not in best or sign * score > sign * _num(best[fold][f"best_{metric}"]):
            best[fold] = row
    return best


def summary_table(rows: list[dict], metric: str, mode: str) -> str:
    best = best_per_fold(rows, metric, mode)
    shown = [k for k in ("param:model.arch", "param:model.encoder", "param:loss.name", "param:optimizer.lr")
             if any(row.get(k) for row in rows)]
    lines = [f"{'fold':>4}  {'trial':<14} {metric:>9}  {'epoch':>5}  " + "  ".join(k[6:] for k in shown)]
    for fold, row in sorted(best.items()):
        lr = row.get("param:optimizer.lr", "")
        values = [str(row.get(k, "") or "-") if k != "param:optimizer.lr" else (f"{_num(lr):.2e}" if lr else "-")
                  for k in shown]
        lines.append(f"{fold:>4}  {row['trial_id']:<14} {_num(row[f'best_{metric}']):9.4f}  "
                     f"{row['best_epoch']:>5}  " + "  ".join(values))
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines.append("trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines)
