"""Successive halving with promotion (tune/promotion.py, ``search.asha.promotion``).

The scheduler is driven without Ray running trials: :class:`Loop` plays Tune's part (trials with a
status, Tune's own ``ConcurrencyLimiter`` around a searcher that hands out a fixed number of trials
per fold, one epoch of one running trial per step, a paused trial resumed from the epoch it paused
at) and the promotions are checked against hand computations. One real Ray search at the end
checks that a paused trial resumes from its checkpoint and the search ends.
"""
from __future__ import annotations

import json
import math
import pickle
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from tune.promotion import PerFoldPromotion, keep, pause_epochs
from tune.scheduler import PerFoldASHA, build_scheduler

PENDING, RUNNING, PAUSED, TERMINATED = "PENDING", "RUNNING", "PAUSED", "TERMINATED"


class FoldSearcher(Searcher):
    """``per_fold`` trials for each fold, folds in turn; ``stall_after``: then None forever (a searcher
    that waits, as the budget's does while trials are live) instead of FINISHED."""

    def __init__(self, folds: int, per_fold: int, stall_after: int | None = None):
        super().__init__(metric="val_miou", mode="max")
        self.order = [f for _ in range(per_fold) for f in range(folds)]
        self.stall_after, self.given = stall_after, 0
        self.completed: dict[str, dict | None] = {}

    def suggest(self, trial_id):
        if self.stall_after is not None and self.given >= self.stall_after:
            return None
        if not self.order:
            return Searcher.FINISHED
        self.given += 1
        return {"fold": self.order.pop(0)}

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id in self.completed:  # Tune's stop_trial of a paused trial tells it again, without the result
            assert result is None, f"{trial_id} told twice"  # (FoldedOptunaSearch ignores that call)
            return
        self.completed[trial_id] = result


class SearchAlg:
    """What Tune's SearchGenerator offers a scheduler: ``searcher``, ``is_finished``, ``on_trial_complete``."""

    def __init__(self, searcher):
        self.searcher, self.finished = searcher, False

    def is_finished(self) -> bool:
        return self.finished

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.searcher.on_trial_complete(trial_id, result=result, error=error)


class Loop:
    """Tune's loop around ``scheduler``: ``score(trial number, fold, epoch)`` is what a trial reports."""

    def __init__(self, scheduler, score, folds: int = 1, per_fold: int = 9, max_t: int = 6,
                 max_concurrent: int | None = 1, stall_after: int | None = None, slow_pause: bool = False,
                 cpus: int | None = None):
        self.scheduler, self.score, self.max_t = scheduler, score, max_t
        self.inner = FoldSearcher(folds, per_fold, stall_after)
        searcher = ConcurrencyLimiter(self.inner, max_concurrent) if max_concurrent else self.inner
        self.search_alg = SearchAlg(searcher)
        self.max_concurrent = max_concurrent
        self.trials: list[SimpleNamespace] = []
        self.epochs: dict[str, int] = {}  # trained epochs of each trial
        self.paused_at: dict[str, list[int]] = {}  # epochs at which each trial was paused
        self.resumed: list[str] = []
        self.most_running = 0
        self.cpus = cpus  # trials that fit at once (None: any number)
        self.started: list[str] = []  # trial ids in the order they started or resumed
        self.slow_pause = slow_pause  # a pause takes 3 steps to save: the trial stays RUNNING meanwhile
        self.pausing: dict[str, int] = {}
        self.cut_while_pausing = 0

    # the part of Tune's controller a scheduler may use
    def get_trials(self):
        return list(self.trials)

    def stop_trial(self, trial):
        assert trial.status in (PAUSED, PENDING)
        self.scheduler.on_trial_remove(self, trial)
        self.search_alg.on_trial_complete(trial.trial_id)
        trial.status = TERMINATED

    def _suggest(self) -> None:
        if self.search_alg.finished:
            return
        while self.max_concurrent or not any(t.status == PENDING for t in self.trials):  # Tune: 1 pending
            # without a ConcurrencyLimiter (max_pending_trials 1 for a custom searcher)
            tid = f"t{len(self.trials):02d}"
            config = self.search_alg.searcher.suggest(tid)
            if config is Searcher.FINISHED:
                self.search_alg.finished = True
                return
            if config is None:
                return
            trial = SimpleNamespace(trial_id=tid, config=config, status=PENDING, last_result={},
                                    number=len(self.trials))
            self.trials.append(trial)
            self.scheduler.on_trial_add(self, trial)

    def _end(self, trial, result) -> None:
        self.scheduler.on_trial_complete(self, trial, result)
        self.search_alg.on_trial_complete(trial.trial_id, result=result)
        trial.status = TERMINATED

    def step(self) -> bool:
        """One step of Tune's loop; False when nothing happened."""
        for trial in self.trials:
            if trial.trial_id in self.pausing:
                self.pausing[trial.trial_id] -= 1
                if self.pausing[trial.trial_id] == 0:
                    del self.pausing[trial.trial_id]
                    trial.status = PAUSED
                    self.cut_while_pausing += any(trial.trial_id in c for c in
                                                  self.scheduler.folds[trial.config["fold"]].cut)
        self._suggest()
        chosen = self.scheduler.choose_trial_to_run(self)
        if chosen is not None and chosen.status == PAUSED:
            chosen.status = PENDING
            self.resumed.append(chosen.trial_id)
        for trial in ([chosen] if chosen is not None else []) + self.trials:  # the chosen one first
            fits = self.cpus is None or sum(t.status == RUNNING for t in self.trials) < self.cpus
            if trial.status == PENDING and fits:
                trial.status = RUNNING
                self.started.append(trial.trial_id)
        running = [t for t in self.trials if t.status == RUNNING]
        self.most_running = max(self.most_running, len(running))
        running = [t for t in running if t.trial_id not in self.pausing]
        if not running:
            return chosen is not None or bool(self.pausing)
        trial = min(running, key=lambda t: (self.epochs.get(t.trial_id, 0), t.number))
        epoch = self.epochs.get(trial.trial_id, 0) + 1  # a resumed trial continues from its checkpoint
        self.epochs[trial.trial_id] = epoch
        result = {"epoch": epoch, "training_iteration": epoch, "val_miou": self.score(trial.number, trial.config["fold"],
                                                                                        epoch)}
        trial.last_result = result
        if epoch >= self.max_t:
            self._end(trial, result)
            return True
        decision = self.scheduler.on_trial_result(self, trial, result)
        if decision == TrialScheduler.STOP:
            self._end(trial, result)
        elif decision == TrialScheduler.PAUSE:
            if self.slow_pause:
                self.pausing[trial.trial_id] = 3
            else:
                trial.status = PAUSED
            self.paused_at.setdefault(trial.trial_id, []).append(epoch)
        return True

    def run(self, max_steps: int = 10_000) -> "Loop":
        idle = 0
        for _ in range(max_steps):
            if self.search_alg.finished and all(t.status == TERMINATED for t in self.trials):
                return self
            idle = 0 if self.step() else idle + 1
            assert idle < 5, f"deadlock: {[(t.trial_id, t.status) for t in self.trials if t.status != TERMINATED]}"
        raise AssertionError("the search did not end")

    def by_fold(self, fold: int) -> list[SimpleNamespace]:
        return [t for t in self.trials if t.config["fold"] == fold]


def promotion(planned: int | None, **kw) -> PerFoldPromotion:
    return PerFoldPromotion("val_miou", "max", max_t=6, grace_period=2, reduction_factor=3, planned=planned, **kw)


# 9 trials of one fold arrive at the rung (epoch 2) in this order with these scores; later epochs add 0.01
RUNG = [0.30, 0.10, 0.50, 0.20, 0.90, 0.40, 0.80, 0.60, 0.70]
TOP3 = {4, 6, 8}  # by hand: 0.90, 0.80, 0.70


def hand_score(number: int, fold: int, epoch: int) -> float:
    return RUNG[number] + 0.01 * (epoch - 2)


@pytest.mark.parametrize("planned", [9, None])
def test_nine_trials_one_at_a_time_promote_exactly_the_top_three(planned):
    """rf 3, rungs at epoch 2 (pause) and 6 (max_t): the top 3 of the 9 rung-2 scores go on, each resumed
    once from epoch 2; the other 6 stop at epoch 2; 9 x 2 + 3 x 4 = 30 epochs, as ideal successive halving."""
    loop = Loop(promotion(planned), hand_score, per_fold=9, max_concurrent=1).run()
    epochs = {t.number: loop.epochs[t.trial_id] for t in loop.trials}
    assert {n for n, e in epochs.items() if e == 6} == TOP3
    assert {n: e for n, e in epochs.items() if n not in TOP3} == {n: 2 for n in range(9) if n not in TOP3}
    assert sum(epochs.values()) == 9 * 2 + 3 * 4 == 30
    assert loop.most_running == 1
    # a promoted trial paused at most once (at epoch 2) and resumed once; none of the others was resumed
    assert all(at == [2] for at in loop.paused_at.values())
    assert {loop.trials[n].trial_id for n in TOP3} >= set(loop.resumed) and len(set(loop.resumed)) == len(loop.resumed)
    # the searcher is told every trial's end with its last result (Optuna: PRUNED at epoch 2, not FAIL)
    told = loop.inner.completed
    assert set(told) == {t.trial_id for t in loop.trials}
    assert all(r is not None and r["epoch"] == epochs[int(tid[1:])] for tid, r in told.items())


def test_early_decisions_with_the_planned_count():
    """With 9 planned trials at most keep(9) = 3 go on: when the 4th trial arrives, 0.10 ranks 4th and is
    stopped at once; the 9th (0.70, 3rd of 9) is promoted on arrival, without a pause. Without the count,
    nothing is decided before the searcher has finished: the first four all wait."""
    known, unknown = Loop(promotion(9), hand_score), Loop(promotion(None), hand_score)
    for loop in (known, unknown):
        while loop.epochs.get("t03") != 2:
            loop.step()
    assert [t.status for t in known.trials] == [PAUSED, TERMINATED, PAUSED, PAUSED]
    assert known.inner.completed == {"t01": {"epoch": 2, "training_iteration": 2, "val_miou": 0.10}}
    assert [t.status for t in unknown.trials] == [PAUSED] * 4 and not unknown.inner.completed
    known.run()
    assert "t08" not in known.paused_at and {"t04", "t06"} <= set(known.paused_at)


def test_two_rungs_rank_again_at_the_second():
    """8 trials, 8 epochs, rungs at 2 and 6: keep(8) = 2 go on from epoch 2 (0.8 and 0.7), keep(2) = 1 from
    epoch 6, where the order has turned (0.85 over 0.75): 8 x 2 + 2 x 4 + 1 x 2 = 26 epochs."""
    at2 = [0.3, 0.8, 0.1, 0.7, 0.2, 0.5, 0.4, 0.6]
    later = {1: 0.75, 3: 0.85}
    scheduler = PerFoldPromotion("val_miou", "max", max_t=8, grace_period=2, reduction_factor=3, planned=8)
    assert scheduler.rungs == [2, 6]
    loop = Loop(scheduler, lambda n, f, e: at2[n] if e <= 2 else later[n], per_fold=8, max_t=8).run()
    epochs = {t.number: loop.epochs[t.trial_id] for t in loop.trials}
    assert epochs == {0: 2, 1: 6, 2: 2, 3: 8, 4: 2, 5: 2, 6: 2, 7: 2} and sum(epochs.values()) == 26
    assert loop.paused_at[loop.trials[1].trial_id] == [2, 6]  # waited at both rungs; stopped at the second


def test_per_fold_asha_lets_first_arrivals_through():
    """The control: Ray's ASHA, one trial at a time, passes the first arrivals at the rung (0.30 is the 7th of
    the 9), so its epochs exceed successive halving's 30."""
    loop = Loop(PerFoldASHA("val_miou", "max", 6, grace_period=2, reduction_factor=3), hand_score).run()
    epochs = {t.number: loop.epochs[t.trial_id] for t in loop.trials}
    assert epochs[0] == 6 and sum(epochs.values()) > 30


@pytest.mark.parametrize("folds, slow_pause", [(2, False), (1, True)])
def test_twenty_trials_a_fold_two_at_a_time_never_deadlock(folds, slow_pause):
    """20 trials a fold, max_concurrent 2, rungs at 2 and 6 = max_t. Tune's ConcurrencyLimiter counts a
    trial as live until it ends; paused trials give their place up, so all 20 reach epoch 2, keep(20) = 6 of
    each fold (the best 6 rung scores) go on, and never more than 2 run. ``slow_pause``: a trial's pause is
    saved 3 steps later, so another trial of its fold can arrive and cut it while it is still RUNNING; it is
    stopped once PAUSED (seed 13 has two such cuts)."""
    rng = random.Random(13 if slow_pause else 0)
    table = {(f, n): rng.random() for f in (0, 1) for n in range(40)}
    loop = Loop(promotion(20), lambda n, f, e: table[(f, n)] + 0.01 * e, folds=folds, per_fold=20, max_concurrent=2,
                slow_pause=slow_pause)
    loop.run()
    assert loop.most_running <= 2
    assert (loop.cut_while_pausing > 0) == slow_pause
    assert keep(20, 3) == 6
    for fold in range(folds):
        trials = loop.by_fold(fold)
        assert len(trials) == 20
        best6 = sorted(trials, key=lambda t: -table[(fold, t.number)])[:6]
        assert {t.trial_id for t in trials if loop.epochs[t.trial_id] == 6} == {t.trial_id for t in best6}
        assert all(loop.epochs[t.trial_id] == 2 for t in trials if t not in best6)
        assert sum(loop.epochs[t.trial_id] for t in trials) == 20 * 2 + 6 * 4
    assert loop.scheduler.debug_string().count("20 reached, 6 promoted, 14 stopped") == folds


def test_without_max_concurrent_a_promoted_trial_runs_before_new_ones():
    """No ConcurrencyLimiter, one CPU, and Tune keeps one new trial PENDING: the promoted trial is chosen
    first, so 0.90 (promoted once the 7th trial arrived) resumes before the 8th trial starts."""
    loop = Loop(promotion(9), hand_score, max_concurrent=None, cpus=1).run()
    assert loop.most_running == 1
    assert loop.started.index("t04", loop.started.index("t04") + 1) < loop.started.index("t07")
    assert sum(loop.epochs.values()) == 30


def test_a_searcher_that_stops_suggesting_does_not_deadlock():
    """A searcher that waits forever after 5 trials (the budget's, while trials are live) with an unknown
    count: when nothing runs, the rung is decided with the 5 that reached it (keep(5) = 1)."""
    loop = Loop(promotion(None), hand_score, per_fold=9, stall_after=5, max_concurrent=2)
    for _ in range(200):
        loop.step()
        if all(t.status == TERMINATED for t in loop.trials) and len(loop.trials) == 5:
            break
    epochs = {t.number: loop.epochs[t.trial_id] for t in loop.trials}
    assert epochs == {0: 2, 1: 2, 2: 2, 3: 2, 4: 6}  # 0.90 is the best of the first five


def test_state_survives_reload_and_a_restored_waiting_trial_stays_paused(tmp_path):
    path = tmp_path / "asha_state.json"
    loop = Loop(promotion(9, state_path=str(path)), hand_score)
    while len(loop.paused_at) < 3:
        loop.step()
    waiting = [t for t in loop.trials if t.status == PAUSED]
    saved = json.loads(path.read_text())
    assert saved["promotion"] and saved["rungs"] == [2]
    assert set(saved["folds"]["0"]["waiting"]) == {t.trial_id for t in waiting}

    # what Tuner.restore does: the scheduler pickled at the start comes back and reads the file
    restored = pickle.loads(pickle.dumps(promotion(9, state_path=str(tmp_path / "later.json"))))
    assert not restored.folds
    path.rename(tmp_path / "later.json")
    restored = pickle.loads(pickle.dumps(promotion(9, state_path=str(tmp_path / "later.json"))))
    assert restored.rung_state() == saved
    # Tune requeues unfinished trials as PENDING: one waiting at its rung is kept paused
    again = SimpleNamespace(trial_id=waiting[0].trial_id, config={"fold": 0}, status=PENDING,
                            set_status=lambda s: setattr(again, "status", s))
    restored.on_trial_add(None, again)
    assert again.status == PAUSED


def test_a_waiting_trial_stopped_by_tune_reaches_the_searcher_with_its_result():
    loop = Loop(promotion(9), hand_score, max_concurrent=2)
    while loop.epochs.get("t00") != 2:
        loop.step()
    loop.step()  # Tune paused it: its place is given up
    waiting = loop.trials[0]
    assert waiting.status == PAUSED and "t00" not in loop.search_alg.searcher.live_trials
    loop.stop_trial(waiting)  # e.g. the user's stopper
    assert loop.inner.completed["t00"]["epoch"] == 2
    assert "t00" not in loop.scheduler.folds[0].waiting and "t00" in loop.scheduler.folds[0].ended


def test_retrain_trials_are_never_paused():
    scheduler = promotion(9)
    retrain = SimpleNamespace(trial_id="r", config={"fold": 1, "retrain": {"epochs": 6}}, status=RUNNING)
    scheduler.on_trial_add(None, retrain)
    assert scheduler.on_trial_result(None, retrain, {"epoch": 2, "val_miou": 0.0}) == TrialScheduler.CONTINUE
    assert not scheduler.folds


def test_build_scheduler_and_the_pause_epochs_follow_the_setting():
    asha = {"grace_period": 2, "reduction_factor": 3, "brackets": 1, "promotion": False}
    assert type(build_scheduler("val_miou", "max", 6, asha)) is PerFoldASHA
    chosen = build_scheduler("val_miou", "max", 18, {**asha, "promotion": True}, planned=20)
    assert type(chosen) is PerFoldPromotion and chosen.rungs == [2, 6] and chosen.planned == 20
    assert pause_epochs(asha, 6) == [] and pause_epochs({**asha, "promotion": True}, 6) == [2]
    assert pause_epochs(None, 6) == []
    with pytest.raises(ValueError, match="promotion"):
        PerFoldASHA("val_miou", "max", 6, promotion=True)


def test_the_setting_is_parsed_and_checked():
    """As load_space reads ``search:`` (its model checks, which import torch, left out)."""
    from trainables.errors import ConfigError
    from tune.space import SEARCH_DEFAULTS, _merge_search, _parse_search

    def asha(raw: dict) -> dict:
        return _merge_search(SEARCH_DEFAULTS, _parse_search("s.yaml", "search.", {"asha": raw}))["asha"]

    assert asha({"promotion": True})["promotion"] is True
    assert asha({"grace_period": 1}) == {"grace_period": 1, "reduction_factor": 3, "brackets": 1, "promotion": False}
    with pytest.raises(ConfigError, match="search.asha.promotion"):
        asha({"promotion": 1})


# ---------------------------------------------------------------- the trainable's checkpoints


@pytest.mark.slow
def test_a_trial_checkpoints_at_its_pause_epochs_and_resumes_there(tmp_path, monkeypatch):
    """A trial checkpoints at an improved epoch and, with promotion, at the epochs it may be paused at even
    without an improvement; that checkpoint's state.pt holds the current weights (model.pt keeps the best
    epoch's), so the trial resumes at the next epoch from where it paused, not from its best epoch."""
    import contextlib
    import shutil

    import torch

    from trainables.checkpoint import load_checkpoint
    from trainables.loop import FoldTrainer
    from tune import trainable
    from tune.search import prepare
    from tune.space import load_space, with_overrides

    root = Path(__file__).resolve().parents[2]
    monkeypatch.setenv("SEGHPO_CACHE", str(tmp_path / "cache"))
    spec = with_overrides(load_space(str(root / "tests" / "spaces" / "tiny.yaml"), root / "search_spaces"),
                          {"data.path": str(SAMPLE), "train.epochs": 3, "train.max_train_batches": 1,
                           "train.preview_images": 0, "data.subset": 24})
    base, _, folds = prepare(spec, tmp_path / "run")
    config = {"fold": 0, "optimizer.lr": 3e-3, "loss.name": "ce"}
    monkeypatch.setattr(FoldTrainer, "_improved", lambda self, score: self.epoch == 1)  # epoch 1 stays the best

    def run(pause: tuple, restore: Path | None = None) -> list[tuple[int, Path | None]]:
        reports = []

        def report(record, checkpoint=None):
            kept = None
            if checkpoint is not None:
                kept = tmp_path / f"{pause}-{restore is not None}-{record['epoch']}"
                shutil.copytree(checkpoint, kept)
            reports.append((record["epoch"], kept))

        checkpoint = SimpleNamespace(as_directory=lambda: contextlib.nullcontext(str(restore))) if restore else None
        fake = SimpleNamespace(report=report, get_checkpoint=lambda: checkpoint,
                               Checkpoint=SimpleNamespace(from_directory=Path))
        monkeypatch.setattr(trainable, "tune", fake)
        trainable.train_trial(config, base, folds, cpus=1, pause_epochs=pause)
        return reports

    assert [(e, c is not None) for e, c in run(())] == [(1, True), (2, False), (3, False)]  # improved only
    paused = run((2,))
    assert [(e, c is not None) for e, c in paused] == [(1, True), (2, True), (3, False)]
    at_best, at_pause = paused[0][1], paused[1][1]
    assert "model" not in torch.load(at_best / trainable.STATE_FILE, weights_only=True)  # kept once, in model.pt
    state = torch.load(at_pause / trainable.STATE_FILE, weights_only=True)
    best = load_checkpoint(at_pause)["state_dict"]
    assert state["epoch"] == 2 and state["best_epoch"] == 1
    assert any(not torch.equal(state["model"][k], best[k]) for k in best)  # epoch 2's weights, not the best's

    resumed, _ = trainable.build_trainer(config, base, folds)
    trainable.load_trial_state(resumed, at_pause)
    assert resumed.epoch == 2 and all(torch.equal(v, state["model"][k]) for k, v in resumed.model.state_dict().items())
    assert [e for e, _ in run((2,), restore=at_pause)] == [3]  # continues at the next epoch


# ---------------------------------------------------------------- a real search


SAMPLE = Path(__file__).resolve().parents[2] / "data" / "camvid-sample" / "train" / "annotations.json"
SPACE = """
name: promo
fixed:
  data: {task: multiclass, unannotated: background, max_size: 64}
  folds: {strategy: kfold, k: 2, seed: 0}
  model: {arch: Unet, encoder: resnet18, weights: null, kwargs: {encoder_depth: 3, decoder_channels: [32, 16, 8]}}
  train: {epochs: 3, batch_size: 8, image_size: [48, 64], max_train_batches: 2, preview_images: 0}
search:
  num_samples: 3
  n_startup_trials: 1
  asha: {grace_period: 1, reduction_factor: 3, promotion: true}
resources: {cpus_per_trial: 1, gpus_per_trial: 0, max_concurrent: 2}
space:
  optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}
"""


@pytest.mark.ray
@pytest.mark.slow
def test_a_real_search_resumes_promoted_trials_from_their_rung_checkpoint():
    """2 folds x 3 trials, rungs at epoch 1 (pause) and 3 (max_t): in each fold keep(3) = 1 trial trains 3 epochs,
    the other two stop at epoch 1, and the search ends. Every trial's results count 1, 2, 3 (no epoch twice);
    a fold's winner that reached epoch 1 before the fold's last trial did was paused there (the rung was
    undecided), so it ran again from the checkpoint it paused with: Tune restored it (its iterations since
    the restore start again) and the trainer continued at epoch 2. (The last arrival decides the rung and
    goes on without a pause; with seed 0 here fold 1's winner arrives earlier.)"""
    from tests.tune.test_tune import cli, clean_up_ray, private_ray_dir, read_rows, scratch_dir, tail

    base, ray_dir = scratch_dir("promo"), private_ray_dir()
    try:
        (base / "promo.yaml").write_text(SPACE)
        proc = cli("--space", str(base / "promo.yaml"), "--data", str(SAMPLE), "--storage", str(base / "runs"),
                   "--name", "promo", "--wandb", "disabled", ray_dir=ray_dir, cache=base / "cache", timeout=600)
        assert proc.returncode == 0, tail(proc.stdout + proc.stderr)
        run_dir = base / "runs" / "promo"
        rows = {r["trial_id"]: r for r in read_rows(run_dir / "trials.csv")}
        state = json.loads((run_dir / "asha_state.json").read_text())
        assert state["promotion"] and state["rungs"] == [1]
        restored = []
        for fold in ("0", "1"):
            assert sorted(int(r["epochs"]) for r in rows.values() if r["fold"] == fold) == [1, 1, 3], rows
            arrivals, (winner,) = list(state["folds"][fold]["scores"][0]), state["folds"][fold]["promoted"][0]
            assert int(rows[winner]["epochs"]) == 3 and rows[winner]["checkpoint"]
            for tid in arrivals:
                lines = (run_dir / "tune" / f"fold{fold}_{tid}" / "result.json").read_text().splitlines()
                results = [json.loads(line) for line in lines]
                assert [r["epoch"] for r in results] == list(range(1, int(rows[tid]["epochs"]) + 1)), results
                assert [r["training_iteration"] for r in results] == [r["epoch"] for r in results]
                if tid == winner and arrivals[-1] != winner:  # paused at epoch 1, promoted later
                    assert [r["iterations_since_restore"] for r in results] == [1, 1, 2], results
                    restored.append(tid)
        assert restored, "no winner was paused: the run did not exercise a resume"
    finally:
        clean_up_ray(ray_dir)
        import shutil

        shutil.rmtree(base, ignore_errors=True)
