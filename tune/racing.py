"""Fold racing (``search.racing: {eta: 3}``): successive halving over folds, so that the search spends
its trials on the configurations whose mean over every fold, what a Kaggle team selects on, is good.

* A new configuration is proposed as without racing, by fold 0's TPE or (``share_folds``) the shared
  model (:meth:`FoldedOptunaSearch._ask`), and trains on fold 0 first. ``search.num_samples`` counts
  these new configurations, in total.
* When its trial on fold ``n - 1`` ends it is judged: a trial stopped by its fold's ASHA (PRUNED) or
  one that failed is out of the race; a trial that trained its planned epochs (COMPLETE) adds its score
  (the Optuna value: its best score) and the configuration earns fold ``n`` while its mean over its
  ``n`` folds ranks in the top ``1/eta`` of the configurations that have completed ``n`` folds
  (:func:`promotable`). The last fold ends its race.
* Asynchronous, like ASHA: a configuration is judged once, when it arrives, against the configurations
  seen so far at that level (itself included; all ran the same folds 0..n-1, so their means compare).
  A lone first arrival passes, a promotion is never taken back and a configuration that lost is not
  revived by later, worse arrivals. A PRUNED or failed configuration never reaches the level, so it does
  not count among those the next ones are ranked against.
* Promoted (configuration, fold) trials are handed out before new configurations. They train with
  the fold's ASHA like any trial and are recorded in that fold's study (parameters enqueued, so they are
  exactly the configuration's), so the per-fold records, the report and ``--resume`` (tune/resume.py
  counts the trials Tune has of each fold, which here are fold 0's new configurations and the other
  folds' promotions) work as without racing.
* Every Optuna trial carries the user attribute ``config_id`` (the Optuna number of the
  configuration's fold-0 trial), and every Tune config the key ``config_id``, so trials.csv joins a
  configuration's folds (tune/report_crossfold.py, ensemble/members.py).
* The search ends (``Searcher.FINISHED``) once every new configuration has been asked, no promotion is
  queued and no trial that could still earn one (on a fold before the last) runs; until then the
  searcher waits (None). Tune's ``num_samples`` is the upper bound ``num_samples * folds``.

The race (each configuration's parameters, scores per fold, status) and the queue of promotions are
part of the searcher state, so a restored search goes on without asking a configuration twice.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from optuna.trial import TrialState
from ray.tune.search import Searcher

from tune.budget import Budget
from tune.searcher import FoldedOptunaSearch
from tune.space import SearchSpec, sample

logger = logging.getLogger(__name__)

# a configuration's status in the race
RUNNING, QUEUED, ELIMINATED, RACED, PRUNED, FAILED, LOST = \
    "running", "queued", "eliminated", "raced", "pruned", "failed", "lost"


def promotable(value: float, level: Sequence[float], eta: int, mode: str) -> bool:
    """Whether a configuration whose mean over its first ``n`` folds is ``value`` earns fold ``n``:
    ``level`` holds the means over their first ``n`` folds of every configuration that has completed
    ``n`` folds so far, itself included. It passes when it ties or beats the ``k``-th best,
    ``k = max(1, len(level) // eta)`` (Optuna's SuccessiveHalvingPruner rule): a lone first arrival
    passes, and with eta 3 the best of the first 5, the best 2 of 6 to 8."""
    if not level:
        raise ValueError("the level holds at least the configuration judged")
    k = max(1, len(level) // int(eta))
    kth = sorted(level, reverse=mode == "max")[k - 1]
    return value >= kth if mode == "max" else value <= kth


def level_means(race: dict[str, dict], n: int) -> list[float]:
    """The means over their first ``n`` folds of the configurations that completed ``n`` folds."""
    return [float(np.mean(entry["scores"][:n])) for entry in race.values() if len(entry["scores"]) >= n]


class RacingSearch(FoldedOptunaSearch):
    """:class:`FoldedOptunaSearch` with fold racing (the module doc); two-stage mode does not apply."""

    def __init__(self, spec: SearchSpec, num_folds: int, num_classes: int, storage: str, experiment: str,
                 max_epochs: int, budget: Budget | None = None):
        super().__init__(spec, num_folds, num_classes, storage, experiment, max_epochs, budget)
        self.eta = int(spec.search["racing"]["eta"])
        self.num_folds = num_folds
        self.retrain_folds = []  # racing runs on every fold (tune/space.py refuses search_folds with it)
        self.search_folds = list(range(num_folds))
        self.suggested = {f: 0 for f in self.search_folds}  # fold 0: new configurations; others: promotions
        # config id (str, JSON keys) -> {"params": Optuna's values, "scores": [per fold, in fold order],
        # "status": running | queued | eliminated | raced | pruned | failed | lost, "trial": Tune trial id}
        self.race: dict[str, dict] = {}
        self.queue: list[str] = []  # config ids promoted to their next fold, in the order they earned it

    @property
    def total_trials(self) -> int:
        return self.num_samples * self.num_folds

    # -- handing out trials ----------------------------------------------------------------
    def suggest(self, trial_id: str) -> dict | None:
        if trial_id in self.live:  # a restored trial asking again
            return self.live[trial_id]["config"]
        if self.queue or self.suggested[0] < self.num_samples:
            if self.budget is not None and not self.budget.may_start(self.marks({})[0]):
                return self._refuse()
            return self._promote(trial_id, self.queue.pop(0)) if self.queue else self._new(trial_id)
        if any(info["fold"] < self.num_folds - 1 for info in self.live.values()):
            return None  # a running configuration may still earn a fold
        return Searcher.FINISHED

    def _hand_out(self, trial_id: str, trial, fold: int, config_id: int) -> dict:
        trial.set_user_attr("tune_trial_id", trial_id)
        trial.set_user_attr("config_id", config_id)
        sampled = sample(self.spec, trial, self.num_classes)
        self.suggested[fold] += 1
        config = {"fold": fold, "config_id": config_id, **sampled}
        self.live[trial_id] = {"fold": fold, "number": trial.number, "config": config}
        entry = self.race.setdefault(str(config_id), {"params": dict(trial.params), "scores": []})
        entry.update(status=RUNNING, trial=trial_id)
        if self.budget is not None:
            self.budget.start(trial_id, self.marks(config))
        return config

    def _new(self, trial_id: str) -> dict:
        trial = self._ask(0)
        return self._hand_out(trial_id, trial, 0, trial.number)

    def _promote(self, trial_id: str, config_id: str) -> dict:
        entry = self.race[config_id]
        fold = len(entry["scores"])
        study = self.study(fold)
        study.enqueue_trial(entry["params"])
        trial = study.ask()  # sample() gets the enqueued values back
        trial.set_user_attr("proposed_by", "race")
        logger.info("racing: configuration %s on fold %d (mean %.4f over %d folds)", config_id, fold,
                    float(np.mean(entry["scores"])), fold)
        return self._hand_out(trial_id, trial, fold, int(config_id))

    # -- judging ---------------------------------------------------------------------------
    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        info = self.live.get(trial_id)
        super().on_trial_complete(trial_id, result, error)
        if info and info.get("number") is not None:
            self._judge(info)

    def _judge(self, info: dict) -> None:
        """The race after the trial ``info`` (a live entry) ended; what its study holds is the truth (a
        trial told before a restore and run again keeps its first result)."""
        config_id = str(info["config"]["config_id"])
        entry = self.race.get(config_id)
        if entry is None or entry["status"] != RUNNING or len(entry["scores"]) != info["fold"]:
            return  # already judged
        frozen = self.study(info["fold"])._storage.get_trial(self._internal_id(info))
        if frozen.state != TrialState.COMPLETE or frozen.value is None:
            entry["status"] = PRUNED if frozen.state == TrialState.PRUNED else FAILED
            logger.info("racing: configuration %s out of the race on fold %d (%s)", config_id, info["fold"],
                        entry["status"])
            return
        entry["scores"].append(float(frozen.value))
        n = len(entry["scores"])
        if n >= self.num_folds:
            entry["status"] = RACED
        elif promotable(float(np.mean(entry["scores"])), level_means(self.race, n), self.eta, self._mode):
            entry["status"] = QUEUED
            self.queue.append(config_id)
        else:
            entry["status"] = ELIMINATED

    # -- checkpointing ---------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        return {**super().get_state(), "race": self.race, "queue": self.queue}

    def set_state(self, state: dict[str, Any]) -> None:
        self.race = {str(k): v for k, v in state.get("race", {}).items()}
        self.queue = [str(c) for c in state.get("queue", [])]
        super().set_state(state)  # its _fail_orphans first brings the race in line with the live trials

    def _fail_orphans(self) -> None:
        self._sync_race()
        super()._fail_orphans()

    def _sync_race(self) -> None:
        """Make the restored race agree with the live trials, which tune/resume.py may have recomputed
        from Tune's experiment state (a snapshot apart from this state):

        * a live trial the race does not show running (asked after this state was saved): its
          configuration is running on its fold, no longer queued; one on a fold its configuration was
          already judged on (a trial that ended after Tune's snapshot, which Tune runs again) changes nothing;
        * a configuration shown running without a live trial: judged by its study if the trial ended
          there, else it was never run (the orphan is failed next): a promotion goes back to the front
          of the queue, a new configuration is lost (Tune's trial count, recomputed, asks another)."""
        running = {}
        for trial_id, info in self.live.items():
            if info.get("number") is None or "config_id" not in info["config"]:
                continue
            config_id = str(info["config"]["config_id"])
            entry = self.race.get(config_id)
            if entry is None and info["fold"] == 0:
                frozen = self.study(0)._storage.get_trial(self._internal_id(info))
                entry = self.race[config_id] = {"params": dict(frozen.params), "scores": []}
            if entry is None or info["fold"] != len(entry["scores"]):
                continue  # a trial judged before this state was saved, run again by Tune: its study keeps the result
            running[config_id] = trial_id
            if config_id in self.queue:
                self.queue.remove(config_id)
            entry.update(status=RUNNING, trial=trial_id)
        for config_id, entry in self.race.items():
            if entry["status"] != RUNNING or config_id in running:
                continue
            fold = len(entry["scores"])
            ended = [t for t in self.study(fold).get_trials(deepcopy=False)
                     if t.user_attrs.get("tune_trial_id") == entry.get("trial") and t.state != TrialState.RUNNING]
            if ended:
                self._judge({"fold": fold, "number": ended[-1].number, "config": {"config_id": config_id}})
            elif fold > 0:
                entry["status"] = QUEUED
                self.queue.insert(0, config_id)
            else:
                entry["status"] = LOST
