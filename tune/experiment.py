"""What a search leaves on disk besides Ray's own files: experiment.json, trials.csv, the summary.

``trials.csv`` has one row per trial (id, fold, status, error, node, the nodes of every attempt,
failures, epochs, best epoch, best metric, every sampled parameter, checkpoint). It is rewritten
atomically by a Tune callback whenever a trial ends, starts on a node or is retried after a failure
(a lost node), so it is complete after a crash and ``--resume`` too, and shows where trials run.

The checkpoint column is a path, or a URI (``s3://...``) when the trials' storage is an object
store; ``ensemble/members.py`` reads either.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import platform
import os
import re
import socket
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


def node_label() -> str:
    """The node a trial runs on: ``$SEGHPO_NODE_LABEL`` of the node's Ray processes, else the host
    name and the start of the Ray node id (several nodes can share one host)."""
    label = os.environ.get("SEGHPO_NODE_LABEL")
    if label:
        return label
    host = socket.gethostname()
    try:
        import ray

        return f"{host}/{ray.get_runtime_context().get_node_id()[:8]}" if ray.is_initialized() else host
    except Exception:  # no Ray context: the loop called directly
        return host


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def checkpoint_ref(checkpoint, storage: str | None) -> str:
    """Where a trial's best weights are: a path, or ``<storage URI>/<experiment>/<trial>/<checkpoint>/model.pt``
    when the trials write to an object store (the checkpoint's own path has lost the URI scheme)."""
    if checkpoint is None:
        return ""
    if not storage or not is_uri(storage):
        return str(Path(checkpoint.path) / FILENAME)
    import pyarrow.fs

    base, _, query = storage.partition("?")
    _, fs_root = pyarrow.fs.FileSystem.from_uri(base)
    relative = Path(checkpoint.path).relative_to(fs_root).as_posix()
    return f"{base.rstrip('/')}/{relative}/{FILENAME}" + (f"?{query}" if query else "")


def experiment_location(run_dir: Path, trial_storage: str | None, below: str = "") -> str:
    """Tune's experiment directory or URI (or ``below`` it): ``<run dir>/tune``, or
    ``<trial storage>/<name>`` (a URI's query string stays at the end)."""
    if not trial_storage:
        return str(Path(run_dir, "tune", below))
    base, _, query = trial_storage.partition("?")
    path = "/".join(filter(None, [base.rstrip("/"), Path(run_dir).name, below]))
    return path + (f"?{query}" if query else "")


def read_trial_file(run_dir: Path, trial_dir: str, name: str) -> str | None:
    """A file Tune wrote for a trial (``result.json``), wherever the experiment keeps its trials:
    ``<run dir>/tune/<trial dir>``, or the ``trial_storage`` recorded in experiment.json."""
    run_dir = Path(run_dir)
    storage = None
    if (run_dir / "experiment.json").exists():
        storage = json.loads((run_dir / "experiment.json").read_text())["settings"].get("trial_storage")
    if not storage:
        path = run_dir / "tune" / trial_dir / name
        return path.read_text() if path.exists() else None
    location = experiment_location(run_dir, storage, f"{trial_dir}/{name}")
    if not is_uri(location):
        return Path(location).read_text() if Path(location).exists() else None
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(location)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return fh.read().decode()


def trial_row(trial, metric: str, max_epochs: int, ended: bool = False, result: dict | None = None,
              nodes: list[str] | None = None, storage: str | None = None) -> dict:
    """``result``: the result being processed (Tune sets ``last_result`` after the callbacks);
    ``nodes``: the node of each attempt, in order (a trial retried after a node loss has two)."""
    result = result or trial.last_result or {}
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
        "nodes": ">".join(nodes or ([result["node"]] if result.get("node") else [])),
        "failures": getattr(trial, "num_failures", 0),
        "error": error,
        "checkpoint": checkpoint_ref(checkpoint, storage),
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
    """Keeps ``trials.csv`` current: when a trial ends, when it starts on a node (its first result
    there) and when it is retried after a failure, and at the end of the experiment.

    ``storage``: the trials' storage when it is not the run directory (a shared path or a URI)."""

    def __init__(self, path: Path, metric: str, max_epochs: int, storage: str | None = None):
        self.path, self.metric, self.max_epochs, self.storage = Path(path), metric, max_epochs, storage
        self.nodes: dict[str, list[str]] = {}  # trial id -> node of each attempt
        self.retried: set[str] = set()
        if self.path.exists():  # --resume: keep the history of the trials run before
            for row in read_trials_csv(self.path):
                if row.get("nodes"):
                    self.nodes[row["trial_id"]] = row["nodes"].split(">")

    def write(self, trials, ending=None, current: tuple | None = None) -> None:
        rows = []
        for t in trials:
            result = current[1] if current and current[0] is t else None
            rows.append(trial_row(t, self.metric, self.max_epochs, ended=t is ending, result=result,
                                  nodes=self.nodes.get(t.trial_id), storage=self.storage))
        write_trials_csv(self.path, rows)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        node = result.get("node")
        seen = self.nodes.setdefault(trial.trial_id, [])
        if node and (not seen or trial.trial_id in self.retried or seen[-1] != node):
            seen.append(node)
            self.retried.discard(trial.trial_id)
            self.write(trials, current=(trial, result))

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.retried.add(trial.trial_id)  # failed (e.g. its node was lost): Tune starts it again
        self.write(trials)

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
