"""Successive halving with promotion, one set of rungs per fold (``search.asha.promotion: true``).

Ray's ASHA decides a trial's fate when it arrives at a rung, against the trials recorded there so
far, so the first arrivals pass unconditionally. Here a trial that reaches a rung (ASHA's epochs:
``grace_period`` times powers of ``reduction_factor``, below ``train.epochs``) is PAUSED, with the
checkpoint its trainable writes at that epoch (tune/trainable.py), and resumed from it (promoted)
once it ranks in the top ``k = max(1, floor(n / reduction_factor))`` of the ``n`` trials of its
fold that reached the rung; the others are stopped there. Ranking waits until no trial of the fold
can still arrive at the rung (every planned trial of the fold has been suggested and has reached
the rung or ended), or decides earlier what is already certain: with the fold's planned trial
count (``search.num_samples``) an upper bound on ``n`` is known, so a trial that ranks in the top
``k`` whatever the missing trials score is promoted at once (it does not even pause), and one that
ranks below ``k`` of the largest possible ``n`` is stopped at once. The epochs are those of ideal
successive halving: all ``n`` trials train to the first rung, ``k`` of them to the next, ...

Concurrency: Tune's ``max_concurrent_trials`` (a ``ConcurrencyLimiter`` around the searcher) counts
a trial as live until it ends, so two paused trials would hold both places of ``max_concurrent: 2``
and nothing could run. A paused trial is therefore taken out of the limiter's live trials once
Tune has paused it (the searcher suggests the next trial in its place) and put back when it is
promoted, before it runs again; a promoted trial runs before new ones once a place is free. Should
nothing be running or waiting to start all the same (a budget that refuses further trials, a
searcher that waits for paused ones), the undecided rungs are decided with the trials that reached
them: Tune always has something to run, or nothing left.

Not Ray's ``HyperBandScheduler``: it sizes its brackets by its own formula (``ceil(s_max / (s + 1)
* eta**s)`` trials, first rung at ``max_t / eta**s``), has no grace period, fills brackets from one
stream of trials rather than per fold and by the planned count, and its paused trials hold their
``ConcurrencyLimiter`` places the same way.

The state (per fold: trials, rungs and their scores, who waits and who was promoted) is written to
``asha_state.json`` after every change and read back when ``Tuner.restore`` unpickles the scheduler
(``--resume``), as :class:`tune.scheduler.PerFoldASHA` does; a restored trial that waits at a rung
stays paused. Retrain trials of the two-stage mode are never paused or stopped.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.utils import flatten_dict

from trainables.io import atomic_write_text
from tune.budget import milestones

logger = logging.getLogger(__name__)


def pause_epochs(asha: dict | None, max_t: int) -> list[int]:
    """The epochs at which a trial may be paused: the rungs below ``max_t`` with ``promotion``, else none
    (the trainable checkpoints at these epochs so that a paused trial resumes where it stopped)."""
    if not asha or not asha.get("promotion"):
        return []
    return [m for m in milestones(max_t, asha, max_t) if m < max_t]


def keep(n: int, reduction_factor: float) -> int:
    """How many of the ``n`` trials at a rung are promoted."""
    return max(1, math.floor(n / reduction_factor + 1e-9))


class _Fold:
    """One fold's rungs. ``scores[r]``: trial id -> score (higher is better) at rung ``r``, in arrival order."""

    def __init__(self, rungs: int):
        self.added: list[str] = []
        self.ended: set[str] = set()
        self.scores: list[dict[str, float]] = [{} for _ in range(rungs)]
        self.promoted: list[list[str]] = [[] for _ in range(rungs)]
        self.cut: list[list[str]] = [[] for _ in range(rungs)]
        self.cutoff: list[float | None] = [None] * rungs  # set once the rung is decided
        self.waiting: dict[str, int] = {}  # paused at rung r, undecided
        self.resume: dict[str, int] = {}  # promoted at rung r while paused: to run again

    def to_json(self) -> dict:
        return {"added": self.added, "ended": sorted(self.ended), "scores": self.scores, "promoted": self.promoted,
                "cut": self.cut, "cutoff": self.cutoff, "waiting": self.waiting, "resume": self.resume}

    @classmethod
    def from_json(cls, saved: dict) -> "_Fold":
        fold = cls(len(saved["scores"]))
        fold.added, fold.ended = list(saved["added"]), set(saved["ended"])
        fold.scores = [dict(s) for s in saved["scores"]]
        fold.promoted, fold.cut = [list(p) for p in saved["promoted"]], [list(c) for c in saved["cut"]]
        fold.cutoff, fold.waiting, fold.resume = list(saved["cutoff"]), dict(saved["waiting"]), dict(saved["resume"])
        return fold


class PerFoldPromotion(FIFOScheduler):
    """``planned``: trials per fold (``search.num_samples``), None when unknown (then a rung is decided
    once the searcher has finished, or when nothing else can run). ``time_attr``: the trainer's own
    epoch count, which a resumed trial continues (Tune's ``training_iteration`` restarts in a trial
    whose checkpoints Tune does not hold, a multi-worker one)."""

    def __init__(self, metric: str, mode: str, max_t: int, grace_period: int = 1, reduction_factor: float = 3,
                 planned: int | None = None, state_path: str | None = None, time_attr: str = "epoch",
                 brackets: int = 1, **ignored):
        super().__init__()
        self._metric, self._mode = metric, mode
        if brackets != 1:
            logger.warning("search.asha.promotion uses one bracket; brackets: %s is ignored", brackets)
        if ignored:
            logger.info("search.asha.promotion ignores %s", ", ".join(sorted(ignored)))
        self.max_t, self.reduction_factor = int(max_t), float(reduction_factor)
        self.rungs = pause_epochs({"grace_period": grace_period, "reduction_factor": reduction_factor,
                                   "promotion": True}, self.max_t)
        self.planned = int(planned) if planned else None
        self.time_attr, self.state_path = time_attr, state_path
        self.folds: dict[int, _Fold] = {}
        self._fold_of: dict[str, int] = {}
        self._idle = 0  # consecutive choose_trial_to_run calls that found nothing to run
        self._load()

    def __setstate__(self, state: dict) -> None:
        """On ``Tuner.restore`` the pickled (initial) scheduler comes back: reload the rungs."""
        self.__dict__.update(state)
        self._load()

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # fixed at construction

    # -- helpers ---------------------------------------------------------------------------
    def _fold(self, fold: int) -> _Fold:
        if fold not in self.folds:
            self.folds[fold] = _Fold(len(self.rungs))
        return self.folds[fold]

    @staticmethod
    def _skip(trial) -> bool:
        return bool(trial.config.get("retrain"))

    def _score(self, result: dict) -> float:
        value = result.get(self._metric)
        if value is None or not math.isfinite(value):
            return -math.inf
        return float(value) if self._mode == "max" else -float(value)

    def _epoch(self, result: dict) -> int:
        return int(result.get(self.time_attr, result.get("training_iteration", 0)) or 0)

    @staticmethod
    def _searcher_finished(tune_controller) -> bool:
        search_alg = getattr(tune_controller, "search_alg", None) if tune_controller is not None else None
        return bool(search_alg is not None and search_alg.is_finished())

    def _bounds(self, f: _Fold, r: int, tune_controller, force: bool) -> tuple[int, int | None]:
        """(trials recorded at rung ``r``, the most that can ever be recorded there; None: unknown)."""
        n_min = len(f.scores[r])
        if force:
            return n_min, n_min
        if self._searcher_finished(tune_controller):  # every trial there will be has been added
            total = len(f.added)
        elif self.planned is not None:
            total = max(self.planned, len(f.added))
        else:
            return n_min, None
        earlier_cut = {t for rung in f.cut[:r] for t in rung}
        never = {t for t in f.added if t not in f.scores[r] and (t in f.ended or t in earlier_cut)}
        return n_min, max(n_min, total - len(never))

    def _judge(self, f: _Fold, r: int, tune_controller, force: bool = False) -> tuple[list[str], list[str]]:
        """The trials at rung ``r`` that are certain to be promoted and certain to be cut (not yet so marked)."""
        n_min, n_max = self._bounds(f, r, tune_controller, force)
        ranked = sorted(f.scores[r], key=lambda t: -f.scores[r][t])  # stable: earlier arrival first on ties
        final = n_max is not None and n_max == n_min
        if final and f.cutoff[r] is None and ranked:
            f.cutoff[r] = f.scores[r][ranked[keep(n_min, self.reduction_factor) - 1]]
        if f.cutoff[r] is not None and not final:  # a late arrival at a decided rung (forced, or more trials)
            return ([t for t in ranked if f.scores[r][t] >= f.cutoff[r]],
                    [t for t in ranked if f.scores[r][t] < f.cutoff[r]])
        up, down = [], []
        for rank, tid in enumerate(ranked, start=1):
            if n_max is not None and rank + (n_max - n_min) <= keep(n_max, self.reduction_factor):
                up.append(tid)  # in the top k however the missing trials score (k grows slower than n)
            elif n_max is not None and rank > keep(n_max, self.reduction_factor):
                down.append(tid)  # below the largest possible k already
        return up, down

    def _settle(self, tune_controller, fold: int, current: str | None = None, force: bool = False) -> None:
        """Promote and cut what is certain at each rung of ``fold``; paused trials that are cut are stopped,
        promoted ones queued to run again. ``current``: the trial whose result is being decided (not paused)."""
        f = self._fold(fold)
        to_stop, before = [], (sum(map(len, f.promoted)), sum(map(len, f.cut)), list(f.cutoff))
        for r in range(len(self.rungs)):
            if force and not any(rung == r for rung in f.waiting.values()):
                continue
            up, down = self._judge(f, r, tune_controller, force)
            for tid in up:
                if tid in f.promoted[r] or tid in f.cut[r]:
                    continue
                f.promoted[r].append(tid)
                if f.waiting.get(tid) == r:
                    del f.waiting[tid]
                    if tid != current:
                        f.resume[tid] = r
                        self._limiter_take(tune_controller, tid)
            for tid in down:
                if tid in f.promoted[r] or tid in f.cut[r]:
                    continue
                f.cut[r].append(tid)
                if f.waiting.get(tid) == r:
                    del f.waiting[tid]
                    if tid != current:
                        f.ended.add(tid)
                        to_stop.append(tid)
            if force:
                break  # the lowest undecided rung first: its promoted trials may reach the next one
        if (sum(map(len, f.promoted)), sum(map(len, f.cut)), f.cutoff) != before:
            self._save()
        for tid in to_stop:
            self._stop_paused(tune_controller, tid)

    # -- Tune's ConcurrencyLimiter -----------------------------------------------------------
    @staticmethod
    def _limiter(tune_controller) -> ConcurrencyLimiter | None:
        node = getattr(tune_controller, "search_alg", None) if tune_controller is not None else None
        for _ in range(4):
            if node is None or isinstance(node, ConcurrencyLimiter):
                return node
            node = getattr(node, "searcher", None)
        return None

    def _limiter_release(self, tune_controller, tid: str) -> None:
        limiter = self._limiter(tune_controller)
        if limiter is not None and tid in limiter.live_trials:
            limiter.live_trials.discard(tid)
            limiter.num_unfinished_live_trials -= 1

    def _limiter_take(self, tune_controller, tid: str) -> None:
        limiter = self._limiter(tune_controller)
        if limiter is not None and tid not in limiter.live_trials:
            limiter.live_trials.add(tid)
            limiter.num_unfinished_live_trials += 1

    def _trial(self, tune_controller, tid: str):
        if tune_controller is None:
            return None
        return next((t for t in tune_controller.get_trials() if t.trial_id == tid), None)

    def _stop_paused(self, tune_controller, tid: str) -> None:
        """Stop a paused trial that was cut at its rung. Tune's ``stop_trial`` tells the searcher of a paused
        trial without its result (Optuna would record a failure): the searcher is told with it first."""
        trial = self._trial(tune_controller, tid)
        if trial is None or trial.status != Trial.PAUSED:
            return
        search_alg = getattr(tune_controller, "search_alg", None)
        if search_alg is not None:
            self._limiter_take(tune_controller, tid)  # the limiter passes on only its live trials' ends
            search_alg.on_trial_complete(tid, result=flatten_dict(trial.last_result or {}))
        tune_controller.stop_trial(trial)

    # -- Tune's scheduler API -------------------------------------------------------------------
    def on_trial_add(self, tune_controller, trial) -> None:
        if self._skip(trial):
            return
        fold = int(trial.config["fold"])
        f = self._fold(fold)
        self._fold_of[trial.trial_id] = fold
        if trial.trial_id not in f.added:
            f.added.append(trial.trial_id)
        elif trial.trial_id in f.waiting and trial.status == Trial.PENDING:
            # --resume: Tune requeues unfinished trials as PENDING; one waiting at a rung stays paused
            # (Tune files the trial by its status after this call)
            trial.set_status(Trial.PAUSED)
        self._settle(tune_controller, fold)
        self._save()

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self._skip(trial):
            return TrialScheduler.CONTINUE
        fold, tid = int(trial.config["fold"]), trial.trial_id
        f = self._fold(fold)
        if tid not in f.added:
            f.added.append(tid)
        f.resume.pop(tid, None)  # running again
        if any(tid in cut for cut in f.cut):
            return TrialScheduler.STOP
        epoch, score = self._epoch(result), self._score(result)
        for r, milestone in enumerate(self.rungs):
            if epoch < milestone or tid in f.promoted[r]:
                continue
            f.scores[r].setdefault(tid, score)
            f.waiting[tid] = r
            break
        self._settle(tune_controller, fold, current=tid)
        decision = TrialScheduler.CONTINUE
        if any(tid in cut for cut in f.cut):
            f.waiting.pop(tid, None)
            decision = TrialScheduler.STOP
        elif tid in f.waiting:  # its place is given up once it is PAUSED (choose_trial_to_run)
            decision = TrialScheduler.PAUSE
        self._save()
        return decision

    def _ended(self, tune_controller, trial) -> None:
        if self._skip(trial):
            return
        fold = int(trial.config["fold"])
        f = self._fold(fold)
        f.waiting.pop(trial.trial_id, None)
        f.resume.pop(trial.trial_id, None)
        if trial.trial_id in f.ended:
            self._save()
            return
        f.ended.add(trial.trial_id)
        self._settle(tune_controller, fold)
        self._save()

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._ended(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial) -> None:
        f = None if self._skip(trial) else self.folds.get(int(trial.config["fold"]))
        search_alg = getattr(tune_controller, "search_alg", None)
        if f is not None and trial.trial_id in f.waiting and trial.status == Trial.PAUSED and search_alg is not None:
            # Tune stops a trial that waits at its rung (not this scheduler): the searcher hears of it with its
            # result, through the limiter that no longer counts it (Tune tells it next, without the result)
            self._limiter_take(tune_controller, trial.trial_id)
            search_alg.on_trial_complete(trial.trial_id, result=flatten_dict(trial.last_result or {}))
        self._ended(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._ended(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        """A promoted paused trial while a place is free (before new trials, which Tune starts anyway), else a
        PENDING trial; never a paused trial that waits at its rung. When nothing runs or waits to start twice in a row (the
        searcher had its turn in between), the lowest undecided rung of each fold is decided as it stands."""
        for fold, f in sorted(self.folds.items()):
            if f.waiting:  # the searcher may have finished since the last decision
                self._settle(tune_controller, fold)
        waiting = {tid for f in self.folds.values() for tid in f.waiting}
        cut = {tid for f in self.folds.values() for rung in f.cut for tid in rung}
        for trial in tune_controller.get_trials():
            if trial.status != Trial.PAUSED:
                continue
            if trial.trial_id in waiting:  # a paused trial gives its place up (also after --resume)
                self._limiter_release(tune_controller, trial.trial_id)
            elif trial.trial_id in cut:  # cut while its pause was being saved (RUNNING then)
                self._stop_paused(tune_controller, trial.trial_id)
        trials = tune_controller.get_trials()
        active = sum(t.status in (Trial.RUNNING, Trial.PENDING) for t in trials)
        chosen = self._promoted_to_run(tune_controller, trials, active) or next(
            (t for t in trials if t.status == Trial.PENDING), None)
        if chosen is not None or active:
            self._idle = 0
            return chosen
        known = {tid for f in self.folds.values() for tid in f.added}
        if not any(f.waiting for f in self.folds.values()):
            # a paused trial this scheduler knows nothing of (its asha_state.json lost): run it, as FIFO would
            return next((t for t in trials if t.status == Trial.PAUSED and t.trial_id not in known
                         and not self._skip(t)), None)
        self._idle += 1
        if self._idle < 2:
            return None
        self._idle = 0
        for fold, f in sorted(self.folds.items()):
            if f.waiting:
                logger.info("fold %s: nothing else can run; deciding rung %s with the trials that reached it", fold,
                            self.rungs[min(f.waiting.values())])
                self._settle(tune_controller, fold, force=True)
        return self._promoted_to_run(tune_controller, tune_controller.get_trials(), 0)

    def _promoted_to_run(self, tune_controller, trials, active: int):
        limiter = self._limiter(tune_controller)
        if limiter is not None and active >= limiter.max_concurrent:
            return None
        queued = {tid for f in self.folds.values() for tid in f.resume}
        return next((t for t in trials if t.status == Trial.PAUSED and t.trial_id in queued), None)

    def debug_string(self) -> str:
        lines = []
        for fold, f in sorted(self.folds.items()):
            rungs = ", ".join(f"epoch {m}: {len(f.scores[r])} reached, {len(f.promoted[r])} promoted, "
                              f"{len(f.cut[r])} stopped" for r, m in enumerate(self.rungs))
            lines.append(f"fold {fold}: {rungs}; {len(f.waiting)} paused")
        return "\n".join(lines) or "Using per-fold successive halving with promotion."

    # -- state -------------------------------------------------------------------------------
    def rung_state(self) -> dict:
        return {"promotion": True, "rungs": self.rungs, "folds": {str(k): f.to_json() for k, f in self.folds.items()}}

    def _save(self) -> None:
        if self.state_path:
            atomic_write_text(self.state_path, json.dumps(self.rung_state()))

    def _load(self) -> None:
        if not self.state_path or not Path(self.state_path).exists():
            return
        state = json.loads(Path(self.state_path).read_text())
        if not state.get("promotion"):
            return  # an asha_state.json of PerFoldASHA: nothing of ours
        self.folds = {int(k): _Fold.from_json(v) for k, v in state["folds"].items()}
        self._fold_of = {tid: k for k, f in self.folds.items() for tid in f.added}
        logger.info("restored the promotion rungs of folds %s from %s", sorted(self.folds), self.state_path)
