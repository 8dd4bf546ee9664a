"""What a search prints: one progress view of the trials per fold, and quiet libraries.

By default the terminal shows what a person running a search asks: which trials run, how each is
doing, the best so far per fold, and how long is left. Everything else goes to files: each
trial's stdout/stderr to ``stdout``/``stderr`` in its trial directory (Tune's ``log_to_file``) and
not to the driver (``ray.init(log_to_driver=False)``, tune/search.py), W&B runs silent
(``WANDB_SILENT``), Optuna at warnings, Tune's "operation took 0.6 s" notices only past 10 s
(tune/run.py sets these before Ray is imported). ``-v`` (``verbose``) restores all of it and
Tune's own trial table.

On a terminal the view is redrawn in place every few seconds; into a file or a pipe it is a few
summary lines at most every 30 s, only when something changed (or 5 minutes passed), and the full
table at the end, so a log stays short.
"""
from __future__ import annotations

import logging
import math
import shutil
import sys
import time

from ray import tune
from trainables.models import RANDOM_INIT

logger = logging.getLogger(__name__)

PARAMS = {"model.arch": "arch", "model.encoder": "encoder", "loss.name": "loss", "optimizer.lr": "lr"}
PARAM_WIDTH = 24  # characters of a parameter value in the table
SHOWN_FINISHED = 3  # finished trials listed per fold on a terminal (the best ones), besides the running ones
HEARTBEAT_S = 300  # into a file, an unchanged view is printed again after this long


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class FoldProgress(tune.CLIReporter):
    """Tune's CLI reporter, drawn as one table of trials per fold: fold, trial, status, epoch of
    its budget, the metric now and its best, the fold's best so far, then elapsed time and an
    upper bound of the time left (every planned epoch still to run, at the pace so far: ASHA
    stopping trials early only shortens it)."""

    def __init__(self, metric: str, mode: str, max_epochs: int, total_trials: int, weights=None, stream=None,
                 live: bool | None = None):
        self._stream = stream  # None: sys.stdout when printing (Tune pickles its reporter with the run)
        self.live = (stream or sys.stdout).isatty() if live is None else live
        super().__init__(metric=metric, mode=mode, total_samples=total_trials,
                         max_report_frequency=5 if self.live else 30)
        self.target, self.sign = metric, (1.0 if mode == "max" else -1.0)
        self.max_epochs, self.total_trials = max_epochs, total_trials
        self.weights = weights  # what the trials were asked to load (model.weights): None is random init
        self._drawn_lines = 0
        self._warned_random_init = False
        self._last_short: tuple = ()  # into a file: what was printed last (without the clock), and when
        self._last_printed = 0.0

    # ------------------------------------------------------------------ per trial
    def _budget(self, trial) -> int:
        retrain = trial.config.get("retrain")
        return int(retrain["epochs"]) if isinstance(retrain, dict) and "epochs" in retrain else self.max_epochs

    def _status(self, trial) -> str:
        if trial.status == "TERMINATED":
            epoch = (trial.last_result or {}).get("epoch", 0)
            return "done" if epoch >= self._budget(trial) else "stopped"
        return {"PENDING": "pending", "RUNNING": "running", "ERROR": "failed", "PAUSED": "paused"}.get(
            trial.status, trial.status.lower())

    def _best(self, trial) -> float:
        value = (trial.last_result or {}).get("best_score")
        return float(value) if isinstance(value, (int, float)) else math.nan

    # ------------------------------------------------------------------ the view
    def summary(self, trials: list, done: bool = False) -> tuple[list[str], list[str]]:
        """(lines of the full table, short lines): the full table lists every fold's running
        trials and its best finished ones; the short form is one line per fold."""
        folds: dict[int, list] = {}
        for t in trials:
            folds.setdefault(int(t.config.get("fold", 0)), []).append(t)
        table, short = [], []
        params = [k for k in PARAMS if any(k in t.config for t in trials)]
        widths = {k: min(PARAM_WIDTH, max(len(PARAMS[k]), *(len(_fmt(t.config.get(k))) for t in trials))) + 2
                  for k in params}
        header = (f"  {'trial':<10}{'status':<9}{'epoch':>7}{self.target:>10}{'best':>9}  "
                  + "".join(f"{PARAMS[k]:<{widths[k]}}" for k in params)).rstrip()
        for fold, group in sorted(folds.items()):
            scored = [t for t in group if not math.isnan(self._best(t))]
            best = max(scored, key=lambda t: self.sign * self._best(t), default=None)
            counts: dict[str, int] = {}
            for t in group:
                counts[self._status(t)] = counts.get(self._status(t), 0) + 1
            state = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            best_text = f"best {self.target} {_fmt(self._best(best))} ({best.trial_id})" if best else "no result yet"
            short.append(f"fold {fold}: {state}; {best_text}" + "".join(
                f"; {t.trial_id} epoch {(t.last_result or {}).get('epoch', 0)}/{self._budget(t)}"
                for t in group if t.status == "RUNNING"))
            table.append(f"fold {fold}  {state}  {best_text}")
            table.append(header)
            running = [t for t in group if t.status in ("RUNNING", "PENDING", "PAUSED")]
            finished = sorted((t for t in group if t not in running), key=lambda t: -self.sign * self._best(t)
                              if not math.isnan(self._best(t)) else math.inf)
            shown = running + (finished if done or not self.live else finished[:SHOWN_FINISHED])
            for t in shown:
                r = t.last_result or {}
                table.append((f"  {t.trial_id:<10}{self._status(t):<9}"
                              f"{str(r.get('epoch', 0)) + '/' + str(self._budget(t)):>7}"
                              f"{_fmt(r.get(self.target)):>10}{_fmt(self._best(t)):>9}  "
                              + "".join(f"{_fmt(t.config.get(k))[:widths[k] - 2]:<{widths[k]}}"
                                        for k in params)).rstrip())
            if len(shown) < len(group):
                table.append(f"  (+{len(group) - len(shown)} more finished)")
            table += [f"  {t.trial_id} failed: {getattr(t, 'error_file', None) or t.path}" for t in group
                      if t.status == "ERROR"]
        table.append(self.clock_line(trials, done))
        short.append(self.clock_line(trials, done))
        return table, short

    def clock_line(self, trials: list, done: bool) -> str:
        elapsed = time.time() - self._start_time  # Tune sets it when the experiment starts
        ran = sum(int((t.last_result or {}).get("epoch", 0)) for t in trials)
        planned = sum(int((t.last_result or {}).get("epoch", 0)) if t.status in ("TERMINATED", "ERROR")
                      else self._budget(t) for t in trials)
        planned += max(self.total_trials - len(trials), 0) * self.max_epochs
        text = (f"elapsed {_clock(elapsed)}; trials {sum(t.status in ('TERMINATED', 'ERROR') for t in trials)}"
                f"/{self.total_trials} finished; epochs {ran} of at most {planned}")
        if not done and ran:
            text += f"; at most {_clock(elapsed / ran * (planned - ran))} left at this pace"
        return text

    def random_init_notice(self, trials: list) -> str | None:
        """Once per search: trials say (record ``weights``) that no pretrained weights were loaded."""
        if self._warned_random_init:
            return None
        fresh = [t for t in trials if (t.last_result or {}).get("weights") == RANDOM_INIT
                 and t.config.get("model.weights", self.weights) not in (None, RANDOM_INIT)]
        if not fresh:
            return None
        self._warned_random_init = True
        return (f"note: trial {fresh[0].trial_id} found no pretrained weights (offline, or not cached) and "
                f"trains from RANDOM INIT; its log says why: {getattr(fresh[0], 'path', '')}/stderr")

    def report(self, trials: list, done: bool, *sys_info: str) -> None:
        table, short = self.summary(trials, done)
        notice = self.random_init_notice(trials)
        if not (self.live or done or notice):  # into a file: only news, or a heartbeat every HEARTBEAT_S
            if tuple(short[:-1]) == self._last_short and time.time() - self._last_printed < HEARTBEAT_S:
                return
            self._last_short, self._last_printed = tuple(short[:-1]), time.time()
        out = self._stream or sys.stdout
        if self.live and self._drawn_lines:
            out.write(f"\x1b[{self._drawn_lines}F\x1b[J")  # back to the top of the last view, clear below
        if notice:
            out.write(notice + "\n")
        lines = table if (self.live or done) else short
        if self.live:  # a wrapped line would throw the redraw off by one
            width = shutil.get_terminal_size().columns
            lines = [line[:width] for line in lines]
        out.write("\n".join(lines) + "\n")
        if not self.live and not done:
            out.write("\n")
        out.flush()
        self._drawn_lines = len(lines) if self.live and not done else 0


def verbose_reporter(metric: str) -> tune.CLIReporter:
    """``-v``: Tune's own trial table with this project's columns."""
    return tune.CLIReporter(
        metric_columns={"epoch": "epoch", "train_loss": "loss", metric: metric, "best_score": "best"},
        parameter_columns={"fold": "fold", "model.arch": "arch", "model.encoder": "encoder", "loss.name": "loss",
                           "optimizer.lr": "lr"},
        max_report_frequency=30, sort_by_metric=False)
