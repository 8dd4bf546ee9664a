"""ASHA with one bracket set per fold, whose rung state survives ``--resume``.

Folds differ in difficulty, so a fold-1 trial must never be stopped because fold-0 trials scored
higher: each fold gets its own :class:`ASHAScheduler`. Tune's restore does not bring back ASHA's
rungs (ray-project/ray#30838): the rung state is written to a JSON file after every decision
and read back when the scheduler is unpickled by ``Tuner.restore``. Retrain trials of the
two-stage mode run to their planned epoch count and are never stopped.

``recheck`` (``search.asha.recheck``): ASHA decides a trial's fate once, when it reaches a rung,
against the trials recorded there so far, so the first arrivals at every rung pass unconditionally
(with 8 trials a fold and 2 at a time, that is a large share of them). With ``recheck`` a trial
that passed a rung is ranked again at each of its later epochs against everything recorded at that
rung by then, and stopped as soon as it falls below the rung's cut (the same top 1/reduction_factor
quantile): what waiting at the rung for more arrivals would decide, without pausing the trial.

``promotion`` (``search.asha.promotion``) waits instead: trials are paused at a rung and promoted
once the rung is decided (:class:`tune.promotion.PerFoldPromotion`; :func:`build_scheduler` chooses).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from trainables.io import atomic_write_text
from tune.promotion import PerFoldPromotion

logger = logging.getLogger(__name__)


class PerFoldASHA(FIFOScheduler):
    def __init__(self, metric: str, mode: str, max_t: int, grace_period: int = 1, reduction_factor: float = 3,
                 brackets: int = 1, state_path: str | None = None, time_attr: str = "training_iteration",
                 recheck: bool = False, promotion: bool = False):
        super().__init__()
        if promotion:  # a search.asha mapping passed whole: promotion is another scheduler
            raise ValueError("search.asha.promotion is PerFoldPromotion's (tune/promotion.py): use build_scheduler")
        self._metric, self._mode = metric, mode
        if grace_period > max_t:  # e.g. --max-epochs 1: nothing to stop early, ASHA would refuse
            logger.info("ASHA grace period %s is above the %s epochs of a trial: using %s", grace_period, max_t, max_t)
            grace_period = max_t
        self.asha_args = dict(metric=metric, mode=mode, max_t=max_t, grace_period=grace_period,
                              reduction_factor=reduction_factor, brackets=brackets, time_attr=time_attr)
        self.recheck = bool(recheck)
        self.state_path = state_path
        self.folds: dict[int, ASHAScheduler] = {}
        self._load()

    def __setstate__(self, state: dict) -> None:
        """On ``Tuner.restore`` the pickled (initial) scheduler comes back: reload the rungs."""
        self.__dict__.update(state)
        self._load()

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # fixed at construction

    def _asha(self, fold: int) -> ASHAScheduler:
        if fold not in self.folds:
            self.folds[fold] = ASHAScheduler(**self.asha_args)
        return self.folds[fold]

    @staticmethod
    def _skip(trial) -> bool:
        return bool(trial.config.get("retrain"))

    def on_trial_add(self, tune_controller, trial) -> None:
        if self._skip(trial):
            return
        asha = self._asha(int(trial.config["fold"]))
        if trial.trial_id not in asha._trial_info:  # a restored trial keeps its bracket
            asha.on_trial_add(tune_controller, trial)
        self._save()

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self._skip(trial):
            return TrialScheduler.CONTINUE
        asha = self._asha(int(trial.config["fold"]))
        decision = asha.on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.CONTINUE and getattr(self, "recheck", False) and self._cut_later(asha, trial, result):
            asha._num_stopped += 1
            decision = TrialScheduler.STOP
        self._save()
        return decision

    @staticmethod
    def _cut_later(asha: ASHAScheduler, trial, result: dict) -> bool:
        """Whether a rung ``trial`` passed earlier (its epoch is past the milestone) now ranks it below its cut."""
        bracket = asha._trial_info.get(trial.trial_id)
        if bracket is None or asha._time_attr not in result:
            return False
        for milestone, recorded in bracket._rungs:
            if result[asha._time_attr] > milestone and trial.trial_id in recorded:
                cutoff = bracket.cutoff(recorded)
                if cutoff is not None and recorded[trial.trial_id] < cutoff:
                    return True
        return False

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        asha = self._asha(int(trial.config["fold"]))
        if not self._skip(trial) and trial.trial_id in asha._trial_info:
            asha.on_trial_complete(tune_controller, trial, result)
            self._save()

    def on_trial_remove(self, tune_controller, trial) -> None:
        asha = self._asha(int(trial.config["fold"]))
        if trial.trial_id in asha._trial_info:
            asha.on_trial_remove(tune_controller, trial)
            self._save()

    def on_trial_error(self, tune_controller, trial) -> None:
        self.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"fold {f}: {asha.debug_string()}" for f, asha in sorted(self.folds.items()))

    # -- rung state ------------------------------------------------------------------------
    def rung_state(self) -> dict:
        out = {}
        for fold, asha in self.folds.items():
            brackets = asha._brackets
            out[str(fold)] = {
                "rungs": [[[milestone, recorded] for milestone, recorded in b._rungs] for b in brackets],
                "trial_bracket": {tid: brackets.index(b) for tid, b in asha._trial_info.items()},
                "num_stopped": asha._num_stopped,
            }
        return out

    def _save(self) -> None:
        if self.state_path:
            atomic_write_text(self.state_path, json.dumps(self.rung_state()))

    def _load(self) -> None:
        if not self.state_path or not Path(self.state_path).exists():
            return
        state = json.loads(Path(self.state_path).read_text())
        self.folds = {}
        for fold, saved in state.items():
            asha = self._asha(int(fold))
            for bracket, rungs in zip(asha._brackets, saved["rungs"]):
                bracket._rungs = [(milestone, dict(recorded)) for milestone, recorded in rungs]
            asha._trial_info = {tid: asha._brackets[i] for tid, i in saved["trial_bracket"].items()}
            asha._num_stopped = saved["num_stopped"]
        logger.info("restored ASHA rungs of folds %s from %s", sorted(self.folds), self.state_path)


def build_scheduler(metric: str, mode: str, max_t: int, asha: dict, state_path: str | None = None,
                    planned: int | None = None) -> FIFOScheduler:
    """The scheduler of ``search.asha`` (a mapping): :class:`PerFoldPromotion` with ``promotion: true``
    (``planned``: trials per fold, None if unknown), else :class:`PerFoldASHA`."""
    settings = {k: v for k, v in asha.items() if k != "promotion"}
    if asha.get("promotion"):
        return PerFoldPromotion(metric, mode, max_t, planned=planned, state_path=state_path, **settings)
    return PerFoldASHA(metric, mode, max_t, state_path=state_path, **settings)
