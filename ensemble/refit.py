"""Refits (``ensemble/run.py --refit N``): the N best configurations retrained on every training image.

A fold trial trains on (k-1)/k of the training images. A refit trains its configuration on all of
them (every image of every fold; the holdout, ``folds.holdout``, stays excluded) and is offered to
the holdout's combination (:mod:`ensemble.combine`) as one more member.

* **Which configurations** (:func:`rank_configs`): trials are grouped into configurations by
  ``config_id`` (a racing run, tune/racing.py), else by identical sampled settings (the ``param:``
  columns of trials.csv: the two-stage search's retrain trials share their configuration's). Only
  completed trials count (one stopped early trained on part of the budget). Ranked as racing ranks
  them: most folds first, then the mean of the search's metric over those folds; a configuration
  that ran on one fold is ranked by that fold's score.
* **How long** (:func:`refit_epochs`): the median of the best epochs of the configuration's
  completed fold trials, rounded half up (at least 1). ``train.epochs`` is set to that count, so
  the learning-rate schedule runs to its end there, as the two-stage search's retrain trials do.
  With ``--debug``, one epoch of the search's debug batches instead (under ``ensemble-debug/``).
* **On what** (:func:`training_ids`): the union of the folds' validation lists, which the split made
  from every image but the holdout; no validation split. Without validation nothing chooses an
  epoch: the refit is the network after its last epoch (the EMA's with ``train.ema_decay``).
  ``data.extra_train`` is not added (a per-fold set belongs to one fold).
* **Where it trains**: one Ray task per configuration (:func:`run_refits`; the caller connects Ray,
  ``ensemble/run.py`` as ``--predict``'s actor pool does, ``ensemble/ray_predict.py``), with the
  search's ``resources.cpus_per_trial`` and ``gpus_per_trial``. The trained checkpoint comes back
  through Ray's object store and is written here (``ensemble/refits/<name>/model.pt``), so workers
  need no shared storage; a refit whose job (configuration, epochs, images) is unchanged is not
  trained again.

What may score a refit: it saw every training image, so out-of-fold rows never include it (they are
the per-fold ensembles alone); the holdout rows and the bundle's (hence annotated test data's) do,
and the record (:func:`refit_record`) says so. Without a holdout nothing can score it, and
``--refit`` is refused (:func:`check_refit`). A refit has no validation score (NaN), so it is never
"the best member" by validation score; it enters the bundle only through the combination.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ensemble.members import local_checkpoint
from ensemble.predictor import Ensemble, Member, load_member
from trainables.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from trainables.cli import DEBUG_SETTINGS
from trainables.data import load_data
from trainables.errors import ConfigError, InputError, SegHPOError
from trainables.io import atomic_write_json
from trainables.loop import FoldTrainer
from trainables.runfiles import PARAM_PREFIX, number, score_column

logger = logging.getLogger(__name__)

REFIT_FOLD = -1  # the key of the refits among the per-fold ensembles, and a refit member's fold
DEBUG_BATCHES = DEBUG_SETTINGS["train.max_train_batches"]  # a --debug refit: one epoch of these
EPOCH_RULE = "median of the best epochs of the configuration's completed fold trials, rounded half up"
ROWS_NOTE = ("refits are in the holdout rows and the bundle (so in annotated test rows) when the combination "
             "keeps them; never in out-of-fold rows (a refit trained on every out-of-fold image)")


@dataclass
class RefitPlan:
    """One configuration to refit: its fold trials, epochs and the images it trains on."""
    name: str  # the member's name: refit-<config id, or its best trial's id>
    config_key: str
    trials: dict[int, dict]  # fold -> its completed trials.csv row
    mean: float  # the search's metric, mean over ``trials``
    epochs: int
    best_epochs: dict[int, int]
    train_ids: list[str] = field(default_factory=list)

    @property
    def best_trial(self) -> dict:
        return next(iter(self.trials.values()))  # set best first by plan_refits


def config_key(row: dict) -> str:
    """A trial's configuration: its ``config_id`` (racing), else its sampled settings (``param:``
    columns); a trial with neither is its own configuration."""
    if row.get("config_id"):
        return f"config {row['config_id']}"
    params = {k: v for k, v in row.items() if k.startswith(PARAM_PREFIX)}
    return json.dumps(params, sort_keys=True) if params else f"trial {row['trial_id']}"


def rank_configs(rows: list[dict], metric: str, mode: str) -> list[dict]:
    """Configurations with a completed trial that has a checkpoint, best first:
    ``{"key", "rows": {fold: row}, "scores": {fold: score}, "mean"}``; most folds first, then the mean
    score, then the order of first appearance. A fold run twice keeps its better trial."""
    sign = 1.0 if mode == "max" else -1.0
    column = score_column(metric)
    configs: dict[str, dict] = {}
    for row in rows:
        score = number(row.get(column))
        if row.get("status") != "completed" or not row.get("checkpoint") or math.isnan(score):
            continue
        entry = configs.setdefault(config_key(row), {"key": config_key(row), "rows": {}, "scores": {},
                                                     "order": len(configs)})
        fold = int(row["fold"])
        if fold not in entry["scores"] or sign * score > sign * entry["scores"][fold]:
            entry["rows"][fold], entry["scores"][fold] = row, score
    for entry in configs.values():
        entry["mean"] = sum(entry["scores"].values()) / len(entry["scores"])
    ranked = sorted(configs.values(), key=lambda e: (-len(e["scores"]), -sign * e["mean"], e["order"]))
    for entry in ranked:
        del entry["order"]
    return ranked


def refit_epochs(best_epochs: list[int]) -> int:
    """:data:`EPOCH_RULE`: the median of ``best_epochs`` rounded half up, at least 1."""
    if not best_epochs:
        raise ValueError("no best epoch to refit for")
    return max(1, math.floor(statistics.median(best_epochs) + 0.5))


def training_ids(folds: list[list[str]], holdout: list[str]) -> list[str]:
    """The images a refit trains on: every fold's (validation) images, none of the holdout, sorted."""
    aside = set(holdout)
    return sorted({i for fold in folds for i in fold if i not in aside})


def plan_refits(rows: list[dict], metric: str, mode: str, n: int, *, folds: list[list[str]],
                holdout: list[str]) -> list[RefitPlan]:
    """The ``n`` best configurations (:func:`rank_configs`) with their epochs and training images;
    fewer (with a warning) when fewer completed; InputError when none did."""
    ranked = rank_configs(rows, metric, mode)
    if not ranked:
        raise InputError("trials.csv", "--refit: no completed trial with a checkpoint to refit")
    if len(ranked) < n:
        logger.warning("--refit %d: only %d configurations completed a trial; refitting those", n, len(ranked))
    sign = 1.0 if mode == "max" else -1.0
    train = training_ids(folds, holdout)
    plans = []
    for entry in ranked[:n]:
        order = sorted(entry["rows"], key=lambda f: (-sign * entry["scores"][f], f))  # best fold trial first
        best_epochs = {f: int(number(entry["rows"][f].get("best_epoch"))) for f in order
                       if not math.isnan(number(entry["rows"][f].get("best_epoch")))}
        if not best_epochs:
            raise InputError("trials.csv", f"--refit: {entry['key']} has no best_epoch")
        best = entry["rows"][order[0]]
        label = str(best.get("config_id") or best["trial_id"])
        plans.append(RefitPlan(f"refit-{label}", entry["key"], {f: entry["rows"][f] for f in order}, entry["mean"],
                               refit_epochs(list(best_epochs.values())), best_epochs, train))
    return plans


def check_refit(n: int | None, holdout: list[str]) -> None:
    """``--refit N``: N >= 1, and a holdout to score the refits on (ConfigError: one line, exit 2)."""
    if n is None:
        return
    if n < 1:
        raise ConfigError("command line", "--refit", f"expected a number of configurations >= 1, got {n}")
    if not holdout:
        raise ConfigError("command line", "--refit", "needs a holdout: a refit trains on every out-of-fold image, "
                                                     "so only held-out images can score it and decide whether it is "
                                                     "shipped; search with --set folds.holdout=0.1")


# ------------------------------------------------------------------------------------------ training

def refit_config(ckpt: dict, epochs: int) -> dict:
    """The fold trial's resolved config (from its checkpoint) for a refit of ``epochs`` epochs: the
    pretrained start it asked for, no ``data.extra_train``."""
    cfg = json.loads(json.dumps(ckpt["config"]))
    requested = (ckpt.get("extra") or {}).get("weights_requested", cfg["model"].get("weights"))
    cfg["model"]["weights"] = requested
    cfg["train"]["epochs"] = int(epochs)
    if cfg["data"].get("extra_train"):
        logger.warning("refit: data.extra_train %s is not added to the refit's training images",
                       cfg["data"]["extra_train"])
        cfg["data"]["extra_train"] = None
    return cfg


def job_digest(job: dict) -> str:
    """What decides a refit: its config, the images and the dataset (a rerun reuses an equal refit)."""
    keys = {k: job[k] for k in ("config", "train_ids", "fingerprint")}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_refit(job: dict) -> dict:
    """Train ``job["config"]`` on ``job["train_ids"]`` with no validation images and return the
    checkpoint of the last epoch (no Ray here: a Ray task runs it, a test may call it)."""
    if job.get("threads"):
        torch.set_num_threads(max(1, int(job["threads"])))
    cfg = job["config"]
    data = load_data(cfg["data"])
    if data.fingerprint != job["fingerprint"]:
        raise InputError(cfg["data"]["path"], "the dataset changed since the search: the refit would train on other images")
    position = {image_id: i for i, image_id in enumerate(data.ids)}
    missing = [i for i in job["train_ids"] if i not in position]
    if missing:
        raise InputError(cfg["data"]["path"], f"refit: {len(missing)} training images are not in the dataset, "
                                              f"e.g. {missing[0]!r}")
    trainer = FoldTrainer(cfg, data, [position[i] for i in job["train_ids"]], [], fold=None, device=job.get("device"))
    losses = []
    for record in trainer.epochs():  # no validation images: val_* are NaN, nothing is "best"
        losses.append(record["train_loss"])
        logger.info("refit %s epoch %d/%d train_loss %.4f", job["name"], record["epoch"], cfg["train"]["epochs"],
                    record["train_loss"])
    weights = trainer.eval_model.state_dict()  # the last epoch's (the EMA's with train.ema_decay)
    extra = {"dataset": data.fingerprint, "refit": {"job": job_digest(job), "train_images": len(job["train_ids"]),
                                                    "train_loss": losses}}
    return make_checkpoint(weights, cfg, data.class_names, data.task, trainer.metric, float("nan"), trainer.epoch,
                           None, extra=extra, weights=trainer.weights)


def run_refits(jobs: list[dict], cpus: float = 1, gpus: float = 0) -> list[dict]:
    """The jobs' checkpoints (in their order), each trained by one Ray task (Ray connected by the
    caller; otherwise Ray starts a local one)."""
    import ray  # lazy: Ray only for --refit

    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_refit_task)
    results = ray.get([task.remote({**job, "threads": cpus}) for job in jobs])
    for job, (error, _) in zip(jobs, results):
        if error is not None:  # a problem of the user's input stays one line (exit 2)
            raise InputError(job["name"], error)
    return [ckpt for _, ckpt in results]


def _refit_task(job: dict) -> tuple[str | None, dict | None]:
    """:func:`train_refit` as a Ray task: (None, checkpoint), or (the problem, None) for an error in the
    user's input (its class does not survive Ray's serialisation of exceptions)."""
    try:
        return None, train_refit(job)
    except SegHPOError as exc:
        return str(exc), None


def refit_members(plans: list[RefitPlan], *, checkpoints: Path, out_dir: Path, fingerprint: str,
                  device: torch.device, resources: dict | None = None, runner=None,
                  connect=None, debug: bool = False) -> tuple[list[Member], list[dict]]:
    """Train (or reuse) the refits of ``plans`` under ``out_dir/<name>/model.pt`` and load them as
    members (fold :data:`REFIT_FOLD`, NaN score, ``meta["refit"]``); with their records.
    ``runner(jobs)`` -> checkpoints (default :func:`run_refits` with ``resources``, after ``connect()``
    when there is something to train). ``debug`` (``--debug``): each refit trains one epoch of
    :data:`DEBUG_BATCHES` batches, whatever its plan says, so the check stays about a minute."""
    resources = resources or {}
    jobs, todo = [], []
    for plan in plans:
        source = load_checkpoint(local_checkpoint(plan.best_trial["checkpoint"], checkpoints))
        config = refit_config(source, 1 if debug else plan.epochs)
        if debug:
            config["train"]["max_train_batches"] = DEBUG_BATCHES
        job = {"name": plan.name, "config": config, "train_ids": plan.train_ids,
               "fingerprint": fingerprint, "device": None}
        path = out_dir / plan.name / "model.pt"
        if not (path.exists() and (load_checkpoint(path).get("extra") or {}).get("refit", {}).get("job")
                == job_digest(job)):
            todo.append(len(jobs))
        jobs.append(job)
    if todo:
        logger.info("refitting %d configurations on %d images: %s%s", len(todo), len(plans[0].train_ids),
                    ", ".join(f"{jobs[k]['name']} ({plans[k].epochs} epochs)" for k in todo),
                    f" (--debug: 1 epoch of {DEBUG_BATCHES} batches each)" if debug else "")
        if runner is None:
            if connect is not None:
                connect()
            runner = lambda js: run_refits(js, float(resources.get("cpus_per_trial") or 1),  # noqa: E731
                                           float(resources.get("gpus_per_trial") or 0))
        for k, ckpt in zip(todo, runner([jobs[k] for k in todo]), strict=True):
            save_checkpoint(ckpt, out_dir / plans[k].name / "model.pt")
    members, records = [], []
    for plan in plans:
        record = refit_record(plan)
        if debug:  # what was trained, not what was planned
            record.update(epochs=1, planned_epochs=plan.epochs, debug=f"1 epoch of {DEBUG_BATCHES} batches (--debug)")
        member = load_member(out_dir / plan.name / "model.pt", plan.name, device)
        member.meta["refit"] = record
        members.append(member)
        records.append(record)
    atomic_write_json(out_dir / "refits.json", {"epoch_rule": EPOCH_RULE, "refits": records})
    return members, records


def refit_record(plan: RefitPlan) -> dict:
    """What refits.json and the report say about one refit."""
    return {"name": plan.name, "config": plan.config_key,
            "fold_trials": {str(f): r["trial_id"] for f, r in plan.trials.items()},
            "mean_score": plan.mean, "epochs": plan.epochs, "best_epochs": {str(f): e for f, e in plan.best_epochs.items()},
            "epoch_rule": EPOCH_RULE, "train_images": len(plan.train_ids)}


def with_refits(ensembles: dict[int, Ensemble], refits: list[Member] | None) -> dict[int, Ensemble]:
    """The per-fold ensembles and, under :data:`REFIT_FOLD` (last), the refits: what the holdout's
    combination chooses among. Out-of-fold evaluation keeps using ``ensembles`` alone."""
    if not refits:
        return ensembles
    first = next(iter(ensembles.values()))
    return {**ensembles, REFIT_FOLD: Ensemble(list(refits), first.tta, first.voting, first.device)}
