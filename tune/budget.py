"""A search's budget: total training epochs (``--epoch-budget``) and wall-clock time (``--time-budget``).

The budget is the experiment's, across every trial and fold and every ``--resume``. One
:class:`Budget` lives in the driver, shared by the searcher (tune/searcher.py asks
:meth:`Budget.may_start` before it suggests a trial) and by :class:`BudgetStopper` (Tune's stopper,
which sees every result before the scheduler and asks :meth:`Budget.must_stop`). Its state is
written atomically to ``budget.json`` in the run directory after every change and read back when
Tune unpickles the searcher and stopper on ``--resume``, where new limits replace the recorded ones.
The run's budget is registered by its ``budget.json`` (:func:`record_limits`); an unpickled copy
(Tune runs its own copy of the stopper on ``--resume``) acts on the registered one, so the searcher
and the stopper never keep two diverging counts.

Epochs: every trial holds a reservation up to its next milestone (its next ASHA rung, or its
planned epochs). A trial starts only if its first milestone fits beside what is spent and what the
running trials have reserved; a trial that reaches a milestone and goes on (ASHA promoted it) must
fit its next milestone, else it is stopped there, cleanly: it keeps its best checkpoint and is a
``stopped`` trial like one ASHA stopped. Epochs spent are each trial's highest epoch (an epoch
retrained after a resume from the best checkpoint is not counted twice), so the sum of the
``epochs`` column of trials.csv never exceeds the budget.

Time: a trial starts only while the time spent plus its first milestone at the mean epoch time seen
so far fits; a running trial is stopped after the epoch during which the time ran out, or at a
milestone whose next one would not finish in time. The time spent is recorded with every result,
so a driver killed between two results loses at most that stretch from the count.
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Callable

from ray.tune import Stopper

from trainables.errors import ConfigError
from trainables.io import atomic_write_json
from trainables.runfiles import write_trials_csv

logger = logging.getLogger(__name__)

FILENAME = "budget.json"
NOT_RUN = "not_run_budget"  # trials.csv status of a planned trial the budget left out
def milestones(planned: int, asha: dict | None, max_t: int) -> list[int]:
    """The epochs at which a trial of ``planned`` epochs may be cut: ASHA's rungs (grace period times
    powers of the reduction factor, below the planned epochs) and the planned epochs themselves."""
    out = set()
    if asha:
        grace, rf = min(int(asha.get("grace_period", 1)), max_t), float(asha.get("reduction_factor", 3))
        rung = float(grace)
        while rung < max_t:
            out.add(math.ceil(rung))
            rung *= rf
    return sorted(m for m in out | {int(planned)} if 0 < m <= int(planned))


class Budget:
    """``epochs``/``seconds``: the limits (None: none). ``path``: budget.json, or None (in memory).
    ``clock``: wall-clock seconds (``time.time``), replaceable in tests."""

    def __init__(self, epochs: int | None = None, seconds: float | None = None, path: str | Path | None = None,
                 clock: Callable[[], float] = time.time):
        self.epochs, self.seconds = epochs, seconds
        self.path = str(path) if path else None
        self.clock = clock
        self.seconds_before = 0.0  # spent in the earlier runs of this experiment
        self.started = clock()
        # trial id -> {"epochs": the highest reported, "reserved_to": n, "running": bool, "marks": its milestones}
        self.trials: dict[str, dict] = {}
        self.epoch_seconds: list[float] = []  # [sum, count] of the epochs' wall times
        self.budget_stopped: list[str] = []
        self._load()

    @property
    def limited(self) -> bool:
        return self.epochs is not None or self.seconds is not None

    # -- accounting ------------------------------------------------------------------------
    @property
    def epochs_spent(self) -> int:
        return sum(t["epochs"] for t in self.trials.values())

    def committed(self) -> int:
        """Epochs spent plus those the running trials have reserved (up to their next milestone)."""
        return sum(max(t["epochs"], t["reserved_to"]) if t["running"] else t["epochs"] for t in self.trials.values())

    def elapsed(self) -> float:
        return self.seconds_before + max(0.0, self.clock() - self.started)

    def mean_epoch_seconds(self) -> float | None:
        return self.epoch_seconds[0] / self.epoch_seconds[1] if self.epoch_seconds else None

    def running(self) -> list[str]:
        return [tid for tid, t in self.trials.items() if t["running"]]

    def _fits(self, extra_epochs: int, exclude_reservation_of: str | None = None) -> bool:
        if self.epochs is not None:
            committed = self.committed()
            if exclude_reservation_of is not None:
                t = self.trials[exclude_reservation_of]
                committed -= max(0, t["reserved_to"] - t["epochs"])
            if committed + extra_epochs > self.epochs:
                return False
        if self.seconds is not None:
            elapsed, per_epoch = self.elapsed(), self.mean_epoch_seconds()
            if elapsed >= self.seconds or (per_epoch is not None and elapsed + extra_epochs * per_epoch > self.seconds):
                return False
        return True

    # -- decisions -------------------------------------------------------------------------
    def may_start(self, first_milestone: int) -> bool:
        """Whether a new trial that trains at least ``first_milestone`` epochs fits."""
        return self._fits(int(first_milestone))

    def start(self, trial_id: str, marks: list[int]) -> None:
        """A trial starts; ``marks``: its milestones (:func:`milestones`). It reserves its first one, or
        what is left of the epochs when that is less (a trial whose sampled epochs exceed the rest)."""
        first = int(marks[0])
        if self.epochs is not None:
            first = max(1, min(first, self.epochs - self.committed()))
        self.trials[trial_id] = {"epochs": 0, "reserved_to": first, "running": True, "marks": list(map(int, marks))}
        self.save()

    def must_stop(self, trial_id: str, epoch: int, epoch_seconds: float | None = None) -> bool:
        """Record that ``trial_id`` finished ``epoch`` (in ``epoch_seconds``); whether it must stop now."""
        t = self.trials.setdefault(trial_id, {"epochs": 0, "reserved_to": int(epoch), "running": True, "marks": []})
        t["running"] = True  # a trial Tune restored from an older snapshot than budget.json's
        later = [m for m in t.get("marks", []) if m > epoch]
        next_milestone = later[0] if later else None
        t["epochs"] = max(t["epochs"], int(epoch))
        if epoch_seconds is not None and math.isfinite(epoch_seconds):
            total, n = self.epoch_seconds or [0.0, 0]
            self.epoch_seconds = [total + float(epoch_seconds), n + 1]
        stop = False
        if self.seconds is not None and self.elapsed() >= self.seconds:
            stop = next_milestone is not None
        elif next_milestone is not None and epoch >= t["reserved_to"]:
            if self._fits(int(next_milestone) - int(epoch), exclude_reservation_of=trial_id):
                t["reserved_to"] = int(next_milestone)
            else:
                stop = True
        if stop and trial_id not in self.budget_stopped:
            self.budget_stopped.append(trial_id)
        self.save()
        return stop

    def end(self, trial_id: str, epoch: int | None = None) -> None:
        """The trial ended (completed, stopped or failed) after ``epoch`` (its last result, if known):
        its reservation beyond the epochs it trained is freed."""
        if trial_id in self.trials:
            t = self.trials[trial_id]
            t["epochs"] = max(t["epochs"], int(epoch or 0))
            t["running"], t["reserved_to"] = False, t["epochs"]
        self.save()

    def keep_running(self, unfinished: set[str]) -> None:
        """``--resume``: only the trials Tune restores as unfinished are running."""
        for tid, t in self.trials.items():
            if t["running"] and tid not in unfinished:
                t["running"], t["reserved_to"] = False, t["epochs"]
        self.save()

    def spent_text(self) -> str:
        parts = []
        if self.epochs is not None:
            parts.append(f"{self.epochs_spent} of {self.epochs} epochs")
        if self.seconds is not None:
            parts.append(f"{self.elapsed():.0f} of {self.seconds:.0f} s")
        return ", ".join(parts)

    # -- budget.json -----------------------------------------------------------------------
    def state(self) -> dict:
        return {"limits": {"epochs": self.epochs, "seconds": self.seconds}, "epochs_spent": self.epochs_spent,
                "seconds_spent": round(self.elapsed(), 3), "trials": self.trials,
                "epoch_seconds": self.epoch_seconds, "budget_stopped": self.budget_stopped}

    def save(self) -> None:
        if self.path:
            atomic_write_json(self.path, self.state())

    def _load(self) -> None:
        if not self.path or not Path(self.path).exists():
            return
        saved = json.loads(Path(self.path).read_text())
        self.epochs, self.seconds = saved["limits"]["epochs"], saved["limits"]["seconds"]
        self.seconds_before, self.started = float(saved.get("seconds_spent", 0.0)), self.clock()
        self.trials = saved.get("trials", {})
        self.epoch_seconds = saved.get("epoch_seconds") or []
        self.budget_stopped = saved.get("budget_stopped", [])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("clock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        """``Tuner.restore`` unpickles the budget of when the experiment began: reload budget.json."""
        self.__dict__.update(state)
        self.clock = time.time
        self._load()


_LIVE: dict[str, Budget] = {}  # budget.json path -> the budget of the run this driver runs


def live(budget: Budget) -> Budget:
    """The run's one budget for ``budget`` (itself unless it is a copy of a registered one)."""
    return _LIVE.get(budget.path, budget) if budget.path else budget


def record_limits(run_dir: Path, epochs: int | None, seconds: float | None, resume: bool,
                  started: float | None = None) -> Budget:
    """Write the limits of this run to ``run_dir/budget.json``; on ``--resume`` the spent epochs and
    time stay, and limits not given again stay as recorded. ``started``: when this run began (the
    time budget counts from it). Returns the budget as this run starts."""
    path = Path(run_dir) / FILENAME
    if not resume and path.exists():
        path.unlink()
    budget = Budget(path=path)
    if started is not None:
        budget.started = started
    if resume and path.exists():
        epochs = epochs if epochs is not None else budget.epochs
        seconds = seconds if seconds is not None else budget.seconds
    budget.epochs, budget.seconds = epochs, seconds
    if budget.limited:
        budget.save()
    _LIVE[budget.path] = budget
    return budget


def attach_budget(tuner, budget: Budget):
    """``--resume``: give the restored searcher and a new stopper this run's budget. Tune restores
    both from the experiment's ``tuner.pkl``, which an experiment begun without a budget lacks
    (the private attributes are Ray 2.60's, which requirements.txt pins)."""
    internal = tuner._local_tuner
    internal._tune_config.search_alg.budget = budget
    internal._run_config.stop = BudgetStopper(budget)
    return tuner


class BudgetStopper(Stopper):
    """Tune's stopper: a trial stops when the budget says so (:meth:`Budget.must_stop`)."""

    def __init__(self, budget: Budget):
        self.budget = budget

    def __call__(self, trial_id: str, result: dict) -> bool:
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        return live(self.budget).must_stop(trial_id, epoch, result.get("time_this_iter_s"))

    def stop_all(self) -> bool:
        return False


def not_run_rows(rows: list[dict], planned_per_fold: dict[int, int], metric: str) -> list[dict]:
    """trials.csv rows for the planned trials of each fold that never started (status ``not_run_budget``)."""
    started: dict[int, int] = {}
    for row in rows:
        if row.get("status") != NOT_RUN and row.get("fold") not in (None, ""):
            started[int(row["fold"])] = started.get(int(row["fold"]), 0) + 1
    out = []
    for fold, planned in sorted(planned_per_fold.items()):
        for i in range(started.get(fold, 0), planned):
            out.append({"trial_id": f"not_run_fold{fold}_{i}", "fold": fold, "status": NOT_RUN, "retrain": False,
                        "epochs": 0, "best_epoch": "", f"best_{metric}": "", "checkpoint": ""})
    return out


def planned_per_fold(search: dict, num_folds: int) -> dict[int, int]:
    """Trials planned per fold: ``num_samples`` on each searched fold; in two-stage mode up to
    ``retrain_top`` per searched fold on each other fold. With racing (tune/racing.py) ``num_samples`` new
    configurations on fold 0; what later folds would have run depends on the race, so none is counted."""
    if search.get("racing"):
        return {f: int(search["num_samples"]) if f == 0 else 0 for f in range(num_folds)}
    searched = list(search["search_folds"]) if search.get("search_folds") is not None else list(range(num_folds))
    retrain = int(search.get("retrain_top") or 0) * len(searched)
    return {f: int(search["num_samples"]) if f in searched else retrain for f in range(num_folds)}


def mark_budget(rows: list[dict], budget: Budget, search: dict, num_folds: int, path: Path) -> list[dict]:
    """trials.csv after a budgeted search: a ``budget`` column (``stopped``: the budget stopped the
    trial) and a ``not_run_budget`` row for every planned trial that never started; rewritten atomically."""
    rows = [r for r in rows if r.get("status") != NOT_RUN]
    for row in rows:
        row["budget"] = "stopped" if row["trial_id"] in budget.budget_stopped and row["status"] == "stopped" else ""
    rows += [{**r, "budget": "not run"} for r in not_run_rows(rows, planned_per_fold(search, num_folds),
                                                                search["metric"])]
    write_trials_csv(path, rows)
    return rows


def fold_report(rows: list[dict], budget: Budget) -> list[str]:
    """Per fold: trials run and not run; the folds the budget left without a finished trial."""
    lines = [f"budget: {budget.spent_text()} spent"]
    folds = sorted({int(r["fold"]) for r in rows if r.get("fold") not in (None, "")})
    for fold in folds:
        mine = [r for r in rows if int(r["fold"]) == fold]
        finished = [r for r in mine if r["status"] in ("completed", "stopped") and r.get("checkpoint")]
        missing = sum(r["status"] == NOT_RUN for r in mine)
        lines.append(f"  fold {fold}: {len(mine) - missing} trials run, {len(finished)} finished, {missing} not run"
                     + ("  <- no finished trial: the budget was spent before this fold had one" if not finished
                        else ""))
    return lines
