"""One Optuna study per fold behind one Ray Tune searcher, with multi-fidelity feedback.

Ray's stock ``OptunaSearch`` tells Optuna that an ASHA-stopped trial COMPLETED with its
truncated score, so TPE learns from partial-budget numbers as if they were final. Here:

* each fold has its own study in persistent storage (SQLite under the run directory): the record of
  its trials, which ``--resume`` reconciles and the two-stage mode ranks;
* what proposes a fold's next trial is, by default (``search.share_folds: true``), one TPE model
  over every fold's trials (:func:`shared_history`), or with ``share_folds: false`` the fold's own
  TPE (seeded per fold), which learns from that fold's trials only. Shared: the folds are random
  splits of one dataset, so what is good on one is largely good on the others, and the
  ``n_startup_trials`` random trials count over all folds together. Folds differ in difficulty,
  so each trial's scores are shifted by its fold's offset (:func:`fold_offset`: the median score
  of the fold's trials at the first ASHA rung) before TPE ranks them. The fold is still assigned by the searcher (round
  robin), never sampled, and the model is rebuilt from the studies at each proposal, so
  ``--resume`` needs nothing more;
* every epoch's metric is reported to the Optuna trial as an intermediate value;
* a trial that ends before its planned epochs (``max_epochs``, or its own sampled ``train.epochs``
  in a space that searches it without ASHA) is told as PRUNED (stopped by ASHA), a trial that
  raised as FAIL, and only trials that trained to the end as COMPLETE with their best score;
* with ``search_folds`` (two-stage mode) only those folds are searched; once all their trials
  have ended, the top ``retrain_top`` configs of each searched fold (folds differ in difficulty,
  so they are not ranked together) are retrained on every other fold for their best epoch count
  (these retrain trials are not searched and not early-stopped).
* under a budget (tune/budget.py) no trial is suggested that would not fit its first rung: the
  searcher waits while trials run and ends the search when none does.

The map from Tune trial id to Optuna trial is kept in the Optuna trials' user attributes and in
the searcher checkpoint, so ``--resume`` continues the same studies.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState, create_trial
from ray.tune.search import Searcher

from tune.budget import Budget, milestones
from tune.experiment import planned_epochs
from tune.space import SearchSpec, sample
from trainables.io import atomic_write_text

logger = logging.getLogger(__name__)


def study_name(experiment: str, fold: int) -> str:
    return f"{experiment}-fold{fold}"


def planned_trials(num_samples: int, search_folds: int, retrain_folds: int, retrain_top: int) -> int:
    """Trials of a search: ``num_samples`` per searched fold, then (two-stage mode) the
    ``retrain_top`` best of each searched fold retrained on each other fold. With racing
    (tune/racing.py: every fold searched, ``num_samples`` configurations in all) the same
    ``num_samples * folds`` is the most it can run: every configuration promoted to every fold."""
    return num_samples * search_folds + (retrain_top * search_folds * retrain_folds if retrain_folds else 0)


def random_start_warning(search: dict, folds: int = 1) -> str | None:
    """Whether TPE will propose few or none of the search's trials, in the user's words (None: it will
    propose most). Optuna's TPE draws at random until ``n_startup_trials`` trials of its study have
    finished: of each fold's study (one per fold), or with ``share_folds`` of all ``folds`` searched
    folds together (with racing, the ``num_samples`` new configurations are all it proposes). Trials started
    while those run are random too."""
    n, startup = int(search["num_samples"]), int(search["n_startup_trials"])
    shared = bool(search.get("share_folds")) and folds > 1
    total, per = (n * folds, f"over the {folds} folds together") if shared else (n, "per fold")
    what = f"search.num_samples={n} x {folds} folds" if shared else f"search.num_samples={n}"
    if search.get("racing"):  # num_samples new configurations in all, the only trials TPE proposes
        total, per, what = n, "in all", f"search.num_samples={n} (configurations, racing)"
    if startup >= total:
        return (f"search.n_startup_trials={startup} >= {what}: every trial is drawn at random and TPE never "
                f"proposes one; lower n_startup_trials (e.g. {max(1, total // 4)}) or raise num_samples"
                + ("" if shared else ", or let the folds share one model (search.share_folds: true)"))
    if 2 * startup > total:
        return (f"search.n_startup_trials={startup} of {what}: TPE proposes at most {total - startup} "
                f"trials {per} (fewer while trials run in parallel); lower n_startup_trials or raise num_samples "
                "for a search that learns")
    return None


def fold_offset(trials: list[FrozenTrial], step: int | None) -> float | None:
    """What a fold's scores are shifted by in the shared model: the median of its trials' scores at
    ``step`` (the first ASHA rung, which every trial that was not lost reaches; running trials'
    reports count), or without ASHA (``step`` None) the median of its COMPLETE trials' values. None
    while no trial of the fold has such a score."""
    if step is None:
        values = [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    else:
        values = [t.intermediate_values[step] for t in trials
                  if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
                  and step in t.intermediate_values]
    return float(np.median(values)) if values else None


def shared_history(fold_trials: dict[int, list[FrozenTrial]], step: int | None) -> list[FrozenTrial]:
    """Every fold's trials as one study's history: finished ones (COMPLETE, PRUNED) with their value and
    intermediate values minus their fold's :func:`fold_offset` (a fold without one contributes no finished
    trials yet), running ones with their parameters only (TPE's constant liar). FAIL and WAITING trials
    carry nothing."""
    out = []
    for trials in fold_trials.values():
        offset = fold_offset(trials, step)
        for t in trials:
            if t.state == TrialState.RUNNING and t.params:
                out.append(create_trial(state=TrialState.RUNNING, params=t.params, distributions=t.distributions))
            elif t.state in (TrialState.COMPLETE, TrialState.PRUNED) and offset is not None:
                out.append(create_trial(
                    state=t.state, value=None if t.value is None else t.value - offset, params=t.params,
                    distributions=t.distributions,
                    intermediate_values={s: v - offset for s, v in t.intermediate_values.items()}))
    return out


def finished(trials: list[FrozenTrial]) -> int:
    """The trials TPE counts towards ``n_startup_trials`` (Optuna 5.0: COMPLETE and PRUNED)."""
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)


class FoldedOptunaSearch(Searcher):
    budget: Budget | None = None  # an experiment pickled before budgets existed has none
    share_folds, reference_step = False, None  # one pickled before share_folds: per-fold studies, as it began

    def __init__(self, spec: SearchSpec, num_folds: int, num_classes: int, storage: str, experiment: str,
                 max_epochs: int, budget: Budget | None = None):
        search = spec.search
        super().__init__(metric=search["metric"], mode=search["mode"])
        self.spec, self.num_classes, self.max_epochs = spec, num_classes, max_epochs
        self.storage, self.experiment = storage, experiment
        self.num_samples = int(search["num_samples"])
        self.search_folds = list(search["search_folds"]) if search["search_folds"] is not None \
            else list(range(num_folds))
        self.retrain_folds = [f for f in range(num_folds) if f not in self.search_folds]
        self.retrain_top = int(search.get("retrain_top") or 0)
        self.share_folds = bool(search.get("share_folds", False))
        asha = search.get("asha")
        self.reference_step = int(asha["grace_period"]) if asha else None  # fold_offset's step
        self.suggested = {f: 0 for f in self.search_folds}
        self.live: dict[str, dict] = {}  # tune trial id -> {"fold", "number"}
        self.retrain_queue: list[dict] | None = None
        self._studies: dict[int, optuna.Study] = {}
        self.budget = budget  # tune/budget.py: refuses trials that would not fit (None: no budget)

    # -- studies ---------------------------------------------------------------------------
    def study(self, fold: int) -> optuna.Study:
        if fold not in self._studies:
            sampler = optuna.samplers.TPESampler(seed=int(self.spec.search["seed"]) + fold,
                                                 n_startup_trials=int(self.spec.search["n_startup_trials"]),
                                                 constant_liar=True)
            self._studies[fold] = optuna.create_study(
                study_name=study_name(self.experiment, fold), storage=self.storage, sampler=sampler,
                direction="maximize" if self._mode == "max" else "minimize", load_if_exists=True)
        return self._studies[fold]

    @property
    def total_trials(self) -> int:
        return planned_trials(self.num_samples, len(self.search_folds), len(self.retrain_folds), self.retrain_top)

    # -- Tune searcher API -----------------------------------------------------------------
    def marks(self, config: dict) -> list[int]:
        """The epochs at which a trial of ``config`` may be cut (tune/budget.py: its ASHA rungs and planned epochs)."""
        asha = None if config.get("retrain") else self.spec.search.get("asha")
        return milestones(planned_epochs(config, self.max_epochs), asha, self.max_epochs)

    def _refuse(self) -> str | None:
        """The budget has no room for another trial: wait while trials run (one stopped early frees
        its reservation), else the search is over."""
        return None if self.budget.running() else Searcher.FINISHED

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id in self.live:  # a restored trial asking again
            return self.live[trial_id]["config"]
        open_folds = [f for f in self.search_folds if self.suggested[f] < self.num_samples]
        if open_folds:
            if self.budget is not None and not self.budget.may_start(self.marks({})[0]):
                return self._refuse()
            fold = min(open_folds, key=lambda f: (self.suggested[f], f))
            trial = self._ask(fold)
            trial.set_user_attr("tune_trial_id", trial_id)
            sampled = sample(self.spec, trial, self.num_classes)
            self.suggested[fold] += 1
            config = {"fold": fold, **sampled}
            self.live[trial_id] = {"fold": fold, "number": trial.number, "config": config}
            if self.budget is not None:
                self.budget.start(trial_id, self.marks(config))
            return config
        return self._next_retrain(trial_id)

    def _ask(self, fold: int) -> optuna.Trial:
        """A new trial of ``fold``'s study, its parameters proposed by the fold's own TPE or (``share_folds``)
        by one TPE over every fold's normalised trials; ``proposed_by`` (user attribute) says whether TPE
        modelled them or they were a start-up trial drawn at random."""
        startup = int(self.spec.search["n_startup_trials"])
        study = self.study(fold)
        if not self.share_folds:
            seen = finished(study.get_trials(deepcopy=False))
            trial = study.ask()
        else:
            history = shared_history({f: self.study(f).get_trials(deepcopy=False) for f in self.search_folds},
                                     self.reference_step)
            seen = finished(history)
            seed = int(np.random.SeedSequence([int(self.spec.search["seed"]), len(history)]).generate_state(1)[0])
            model = optuna.create_study(direction="maximize" if self._mode == "max" else "minimize",
                                        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup,
                                                                           constant_liar=True))
            model.add_trials(history)
            proposal = model.ask()
            sample(self.spec, proposal, self.num_classes)  # every parameter the space's branches reach
            study.enqueue_trial(proposal.params)
            trial = study.ask()  # the fold's record: sample() below gets the enqueued values back
        trial.set_user_attr("proposed_by", "tpe" if seen >= startup else "random")
        return trial

    def _next_retrain(self, trial_id: str) -> dict | None:
        if not self.retrain_folds or self.retrain_top <= 0:
            return Searcher.FINISHED
        if self.retrain_queue is None:
            if any(v.get("number") is not None for v in self.live.values()):
                return None  # wait until every search trial has ended
            self.retrain_queue = self._plan_retrain()
        if not self.retrain_queue:
            return Searcher.FINISHED
        if self.budget is not None and not self.budget.may_start(self.marks(self.retrain_queue[0])[0]):
            return self._refuse()
        config = self.retrain_queue.pop(0)
        if self.budget is not None:
            self.budget.start(trial_id, self.marks(config))
        self.live[trial_id] = {"fold": config["fold"], "number": None, "config": config, "retrain": True}
        return config

    def _plan_retrain(self) -> list[dict]:
        """The ``retrain_top`` best COMPLETE trials of each searched fold (ties: fewer epochs), each
        on every other fold; a config that two folds both chose is retrained once."""
        chosen, seen = [], set()
        for fold in self.search_folds:
            ranked = [(t.value, t.user_attrs["best_epoch"], t.user_attrs["config"])
                      for t in self.study(fold).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                      if t.value is not None and "config" in t.user_attrs]
            ranked.sort(key=lambda r: (-r[0] if self._mode == "max" else r[0], r[1]))
            for _, best_epoch, config in ranked[: self.retrain_top]:
                key = json.dumps(config, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    chosen.append((best_epoch, config))
        plan = [{**config, "fold": fold, "retrain": {"epochs": int(best_epoch)}}
                for best_epoch, config in chosen for fold in self.retrain_folds]
        logger.info("two-stage search: retraining %d configs (the best %d of each of folds %s) on folds %s",
                    len(chosen), self.retrain_top, self.search_folds, self.retrain_folds)
        return plan

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        info = self.live.get(trial_id)
        value = result.get(self._metric)
        if not info or info.get("number") is None or value is None or not math.isfinite(value):
            return
        trial = optuna.trial.Trial(self.study(info["fold"]), self._internal_id(info))
        try:
            trial.report(float(value), step=int(result.get("epoch", result.get("training_iteration", 0))))
        except optuna.exceptions.UpdateFinishedTrialError:
            # told before a crash, then resumed by Tune from an older experiment snapshot: keep what was told
            logger.debug("trial %s already finished in its study; result not reported", trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self.budget is not None:
            self.budget.end(trial_id, (result or {}).get("epoch"))
        info = self.live.pop(trial_id, None)
        if not info or info.get("number") is None:
            return
        study = self.study(info["fold"])
        number = info["number"]
        internal = self._internal_id(info)
        frozen = study._storage.get_trial(internal)
        if frozen.state != TrialState.RUNNING:
            return  # already told (e.g. before a restore)
        best = (result or {}).get("best_score")
        epochs = int((result or {}).get("epoch", 0))
        if error or not result or best is None or not math.isfinite(best):
            study.tell(number, state=TrialState.FAIL)
            return
        value = result.get(self._metric)
        if value is not None and math.isfinite(value) and epochs not in frozen.intermediate_values:
            # the result on which the scheduler stopped the trial (ASHA at a rung, or at max_t) comes
            # only here, never through on_trial_result: without it a trial stopped at the first rung
            # would be PRUNED with no intermediate value at all
            study._storage.set_trial_intermediate_value(internal, epochs, float(value))
        study._storage.set_trial_user_attr(internal, "best_epoch", int(result.get("best_epoch", epochs)))
        config = {k: v for k, v in info["config"].items() if k not in ("fold", "retrain", "config_id")}
        study._storage.set_trial_user_attr(internal, "config", config)
        if epochs < planned_epochs(info["config"], self.max_epochs):
            study.tell(number, state=TrialState.PRUNED)
        else:
            study.tell(number, float(best))

    def _internal_id(self, info: dict) -> int:
        study = self.study(info["fold"])
        return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, info["number"])

    # -- checkpointing ---------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        return {"suggested": self.suggested, "live": self.live, "retrain_queue": self.retrain_queue,
                "num_samples": self.num_samples}

    def set_state(self, state: dict[str, Any]) -> None:
        # a --resume with more samples raises the saved count (tune/resume.py: grow_samples)
        self.num_samples = int(state.get("num_samples", self.num_samples))
        self.suggested = {int(k): v for k, v in state["suggested"].items()}
        self.live = state["live"]
        self.retrain_queue = state["retrain_queue"]
        self._fail_orphans()

    def save(self, checkpoint_path: str) -> None:
        atomic_write_text(checkpoint_path, json.dumps(self.get_state()))

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as fh:
            self.set_state(json.load(fh))

    def _fail_orphans(self) -> None:
        """Optuna trials left RUNNING by a crash that Tune never started are marked FAIL."""
        known = {(v["fold"], v["number"]) for v in self.live.values() if v.get("number") is not None}
        for fold in self.search_folds:
            study = self.study(fold)
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if (fold, t.number) not in known:
                    study.tell(t.number, state=TrialState.FAIL)
