"""The search's side of the run directory: the Tune callback that keeps trials.csv current, and its rows.

The format itself (paths, experiment.json, reading and writing trials.csv) is in
``trainables/runfiles.py``, which imports no Ray, so the ensemble and the report read it without Ray.

``trials.csv`` has one row per trial (id, fold, status, error, node, the nodes of every attempt,
failures, epochs, best epoch, best metric, every sampled parameter, checkpoint). It is rewritten
atomically by a Tune callback whenever a trial ends, starts on a node or is retried after a failure
(a lost node), so it is complete after a crash and ``--resume`` too, and shows where trials run.

The checkpoint column is a path, or a URI (``s3://...``) when the trials' storage is an object
store; ``ensemble/members.py`` reads either.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
from pathlib import Path

from ray.tune import Callback

from trainables.checkpoint import FILENAME
from trainables.runfiles import (PARAM_PREFIX, best_per_fold, is_uri, number, read_trials_csv, score_column,
                                 write_trials_csv)

logger = logging.getLogger(__name__)

def planned_epochs(config: dict, max_epochs: int) -> int:
    """The epochs a trial sets out to train: a retrain trial's best epoch count, its sampled
    ``train.epochs`` when the space searches it (without ASHA), else the base ``max_epochs``."""
    retrain = config.get("retrain")
    if retrain:
        return int(retrain["epochs"])
    return int(config.get("train.epochs", max_epochs))


def trial_status(trial, max_epochs: int, ended: bool = False) -> str:
    """``ended``: the trial is ending now (Tune calls ``on_trial_complete`` before it sets TERMINATED)."""
    if trial.status == "ERROR":
        return "error"
    if trial.status == "TERMINATED" or ended:
        epochs = (trial.last_result or {}).get("epoch", 0)
        return "completed" if epochs >= planned_epochs(trial.config, max_epochs) else "stopped"
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


def trial_row(trial, metric: str, max_epochs: int, ended: bool = False, result: dict | None = None,
              nodes: list[str] | None = None, storage: str | None = None) -> dict:
    """``result``: the result being processed (Tune sets ``last_result`` after the callbacks);
    ``nodes``: the node of each attempt, in order (a trial retried after a node loss has two)."""
    result = result or trial.last_result or {}
    checkpoint = trial.checkpoint
    error = trial_error(trial) if trial.status == "ERROR" else ""
    params = {k: json.dumps(v) if isinstance(v, (list, dict)) else v
              for k, v in trial.config.items() if k not in ("fold", "retrain", "config_id")}
    return {
        "trial_id": trial.trial_id,
        "fold": trial.config.get("fold"),
        "status": trial_status(trial, max_epochs, ended),
        "retrain": bool(trial.config.get("retrain")),
        **({"config_id": trial.config["config_id"]} if "config_id" in trial.config else {}),  # racing (tune/racing.py)
        "epochs": result.get("epoch", 0),
        "best_epoch": result.get("best_epoch"),
        score_column(metric): result.get("best_score"),
        "node": result.get("node", ""),
        "nodes": ">".join(nodes or ([result["node"]] if result.get("node") else [])),
        "failures": getattr(trial, "num_failures", 0),
        "weights": result.get("weights", ""),  # what the model started from: imagenet | random-init | a path
        "error": error,
        # a multi-worker trial's best weights are in its Ray Train run, not a Tune checkpoint (tune/train_adapter.py)
        "checkpoint": checkpoint_ref(checkpoint, storage) if checkpoint else result.get("best_checkpoint", ""),
        **{f"{PARAM_PREFIX}{k}": v for k, v in params.items()},
    }


class TrialsTable(Callback):
    """Keeps ``trials.csv`` current: when a trial ends, when it starts on a node (its first result
    there) and when it is retried after a failure, and at the end of the experiment.

    ``storage``: the trials' storage when it is not the run directory (a shared path or a URI)."""

    def __init__(self, path: Path, metric: str, max_epochs: int, storage: str | None = None):
        self.path, self.metric, self.max_epochs, self.storage = Path(path), metric, max_epochs, storage
        self.nodes: dict[str, list[str]] = {}  # trial id -> node of each attempt
        self.retried: set[str] = set()
        self.weights: set[str] = set()  # initialisations seen (warned once when there is more than one)
        if self.path.exists():  # --resume: keep the history of the trials run before
            for row in read_trials_csv(self.path):
                if row.get("nodes"):
                    self.nodes[row["trial_id"]] = row["nodes"].split(">")
                if row.get("weights"):
                    self.weights.add(row["weights"])

    def write(self, trials, ending=None, current: tuple | None = None) -> None:
        rows = []
        for t in trials:
            result = current[1] if current and current[0] is t else None
            rows.append(trial_row(t, self.metric, self.max_epochs, ended=t is ending, result=result,
                                  nodes=self.nodes.get(t.trial_id), storage=self.storage))
        write_trials_csv(self.path, rows)

    def note_weights(self, weights: str | None) -> None:
        """Warn once when trials start from different weights (e.g. some could not download theirs):
        their scores are then not comparable, and the search would favour the pretrained ones."""
        if not weights or weights in self.weights:
            return
        self.weights.add(weights)
        if len(self.weights) == 2:
            logger.warning("this search mixes trials started from different weights (%s): their scores are not "
                           "comparable; see the weights column of %s", ", ".join(sorted(self.weights)), self.path)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.note_weights(result.get("weights"))
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


def summary_table(rows: list[dict], metric: str, mode: str) -> str:
    best = best_per_fold(rows, metric, mode)
    shown = [k for k in ("param:model.arch", "param:model.encoder", "param:loss.name", "param:optimizer.lr")
             if any(row.get(k) for row in rows)]
    lines = [f"{'fold':>4}  {'trial':<14} {metric:>9}  {'epoch':>5}  " + "  ".join(k[6:] for k in shown)]
    for fold, row in sorted(best.items()):
        lr = row.get("param:optimizer.lr", "")
        values = [str(row.get(k, "") or "-") if k != "param:optimizer.lr" else (f"{number(lr):.2e}" if lr else "-")
                  for k in shown]
        lines.append(f"{fold:>4}  {row['trial_id']:<14} {number(row[score_column(metric)]):9.4f}  "
                     f"{row['best_epoch']:>5}  " + "  ".join(values))
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines.append("trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines)
