"""Search budgets (tune/budget.py): the accounting driven with recorded results (no Ray), the searcher
refusing trials, then one real search stopped by ``--epoch-budget`` and extended by ``--resume``.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from ray.tune.search import Searcher

from tests.tune.test_tune import (ROOT, TINY, clean_up_ray, cli, epochs, make_searcher, needs_camvid, private_ray_dir,
                             read_rows, run_args, scratch, tail, camvid_cache)  # noqa: F401 (fixtures)
from ensemble.members import top_k
from trainables.cli import parse_duration
from trainables.errors import ConfigError
from tune.budget import (NOT_RUN, Budget, BudgetStopper, fold_report, mark_budget, milestones,
                         planned_per_fold, record_limits)
from tune.space import load_space, with_overrides

ASHA = {"grace_period": 1, "reduction_factor": 3}
MARKS = milestones(9, ASHA, 9)  # [1, 3, 9]


class Clock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- 1. the budget core


@pytest.mark.parametrize("planned, asha, max_t, expected", [
    (9, ASHA, 9, [1, 3, 9]),
    (8, {"grace_period": 2, "reduction_factor": 3}, 8, [2, 6, 8]),
    (3, ASHA, 3, [1, 3]),
    (4, {"grace_period": 1, "reduction_factor": 2}, 4, [1, 2, 4]),
    (5, None, 9, [5]),  # no ASHA (or a retrain trial): only the planned epochs
    (2, ASHA, 9, [1, 2]),  # a trial planned shorter than max_t: rungs below its planned epochs
])
def test_milestones_are_ashas_rungs_and_the_planned_epochs(planned, asha, max_t, expected):
    assert milestones(planned, asha, max_t) == expected


def test_reservations_refuse_a_trial_that_would_not_fit_its_first_rung():
    budget = Budget(epochs=5)
    for tid in "abcde":  # each reserves its first rung (1 epoch): 5 reserved
        assert budget.may_start(MARKS[0])
        budget.start(tid, MARKS)
    assert budget.committed() == 5 and budget.epochs_spent == 0
    assert not budget.may_start(MARKS[0])  # nothing spent yet, but all 5 epochs are reserved
    # a reaches rung 1 and ASHA would promote it: the next rung (3) needs 2 more epochs, which do not fit
    assert budget.must_stop("a", 1) is True
    assert budget.budget_stopped == ["a"]
    budget.end("a")
    for tid in "bcde":
        assert budget.must_stop(tid, 1) is True
        budget.end(tid)
    assert budget.epochs_spent == 5 and budget.committed() == 5 and budget.running() == []


def test_a_promoted_trial_reserves_its_next_rung_and_an_early_stop_frees_nothing_spent():
    budget = Budget(epochs=6)
    budget.start("a", MARKS)
    budget.start("b", MARKS)
    assert budget.must_stop("a", 1) is False  # promoted: reserves up to epoch 3
    assert budget.trials["a"]["reserved_to"] == 3 and budget.committed() == 4  # a: 3, b: 1
    assert budget.may_start(1) and budget.may_start(2) and not budget.may_start(3)
    assert budget.must_stop("b", 1) is False  # 4 - 1 + 3 = 6 fits exactly
    assert budget.committed() == 6 and not budget.may_start(1)
    budget.end("b")  # ASHA stopped b at rung 1 after all: its reservation beyond epoch 1 is freed
    assert budget.committed() == 4 and budget.may_start(2) and not budget.may_start(3)
    assert budget.must_stop("a", 2) is False  # between rungs: no decision
    assert budget.must_stop("a", 3) is True  # rung 3 -> 9 needs 6 more, 2 are left
    budget.end("a")
    assert budget.epochs_spent == 4 and budget.budget_stopped == ["a"]


def test_a_trial_planned_past_what_is_left_is_cut_where_the_budget_ends():
    budget = Budget(epochs=4)
    budget.start("a", [1, 3])
    assert budget.must_stop("a", 1) is False
    budget.start("b", [5])  # a searched train.epochs of 5 (no ASHA): only 1 epoch is left for it
    assert budget.trials["b"]["reserved_to"] == 1
    assert budget.must_stop("b", 1) is True
    assert budget.committed() == 4


def test_time_budget_uses_the_mean_epoch_time_seen():
    clock = Clock(0.0)
    budget = Budget(seconds=100, clock=clock)
    assert budget.may_start(1)  # no epoch timed yet: only the time spent counts
    budget.start("a", MARKS)
    clock.now = 30
    assert budget.must_stop("a", 1, epoch_seconds=30.0) is False  # 30 + 2 x 30 = 90 <= 100: on to rung 3
    assert budget.may_start(1)  # 30 + 30 <= 100
    clock.now = 75
    assert not budget.may_start(1)  # 75 + 30 > 100
    assert budget.must_stop("a", 2, epoch_seconds=40.0) is False  # between rungs, time left
    assert budget.mean_epoch_seconds() == pytest.approx(35.0)
    clock.now = 101
    assert budget.must_stop("a", 3, epoch_seconds=30.0) is True  # the time is spent
    assert budget.elapsed() == pytest.approx(101)


def test_budget_json_survives_pickle_and_resume_extends_it(tmp_path):
    clock = Clock(1000.0)
    budget = Budget(epochs=3, path=tmp_path / "budget.json", clock=clock)
    budget.start("a", MARKS)
    budget.start("b", MARKS)
    budget.must_stop("a", 1)
    budget.end("a")
    budget.must_stop("b", 1)  # b still running when the driver dies
    clock.now = 1040.0
    budget.save()
    saved = json.loads((tmp_path / "budget.json").read_text())
    assert saved["epochs_spent"] == 2 and saved["seconds_spent"] == pytest.approx(40.0)

    # Tune unpickles the budget of when the experiment began; it reloads budget.json
    fresh = Budget(epochs=3, path=tmp_path / "other.json")
    restored = pickle.loads(pickle.dumps(fresh))
    restored.path = str(tmp_path / "budget.json")
    restored.__setstate__(restored.__getstate__())
    assert restored.epochs_spent == 2 and set(restored.trials) == {"a", "b"}

    # --resume --epoch-budget 10: the spent epochs and time stay, the limit grows
    resumed = record_limits(tmp_path, 10, None, resume=True, started=5000.0)
    resumed.clock = Clock(5010.0)
    assert resumed.epochs == 10 and resumed.epochs_spent == 2
    assert resumed.elapsed() == pytest.approx(50.0)  # 40 s before + 10 s now
    resumed.keep_running(set())  # Tune restores no trial as unfinished: b's reservation goes
    assert resumed.running() == [] and resumed.committed() == 2
    assert resumed.may_start(8) and not resumed.may_start(9)
    # a resume that gives no budget keeps the recorded one; a new run forgets it
    assert record_limits(tmp_path, None, None, resume=True).epochs == 10
    assert not record_limits(tmp_path, None, None, resume=False).limited


def test_stopper_reads_epoch_and_time_from_tunes_results():
    budget = Budget(epochs=2)
    stopper = BudgetStopper(budget)
    budget.start("a", [1, 3])
    assert stopper("a", {"epoch": 1, "training_iteration": 1, "time_this_iter_s": 2.0}) is True
    assert budget.epochs_spent == 1 and budget.mean_epoch_seconds() == 2.0


def test_a_stopper_tune_unpickled_on_resume_uses_the_searchers_budget(tmp_path):
    """On --resume Tune runs an unpickled copy of the stopper (not the one attach_budget gave it): its
    budget, read back from budget.json, missed the searcher's reservations and the searcher missed its
    epochs, and the resumed search trained 10 epochs of a budget of 9. Both must be the run's one budget."""
    budget = record_limits(tmp_path, 3, None, resume=False)
    copy = pickle.loads(pickle.dumps(BudgetStopper(budget)))
    budget.start("a", [1, 3])  # the searcher starts two trials: 2 of 3 epochs reserved
    budget.start("b", [1, 3])
    # a reaches rung 1; going on to epoch 3 needs 2 more, and only 1 is free: stopped
    assert copy("a", {"epoch": 1, "training_iteration": 1, "time_this_iter_s": 1.0}) is True
    assert budget.epochs_spent == 1 and budget.trials["a"]["epochs"] == 1  # the searcher's budget saw it
    assert json.loads((tmp_path / "budget.json").read_text())["epochs_spent"] == 1


@pytest.mark.parametrize("text, seconds", [("2h", 7200), ("90m", 5400), ("3600s", 3600), ("1h30m", 5400),
                                           ("45", 45), (600, 600), ("1.5h", 5400)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["abc", "2x", "0s", "", "h", "2h x"])
def test_parse_duration_rejects(text):
    with pytest.raises(ConfigError, match="--time-budget"):
        parse_duration(text)


def test_space_validates_budgets():
    spec = load_space(str(TINY), ROOT / "search_spaces")
    ok = with_overrides(spec, search={"epoch_budget": 12, "time_budget": "90m"})
    assert ok.search["epoch_budget"] == 12 and ok.search["time_budget"] == "90m"
    assert spec.search["epoch_budget"] is None and spec.search["time_budget"] is None
    with pytest.raises(ConfigError, match="search.epoch_budget"):
        with_overrides(spec, search={"epoch_budget": 0})
    with pytest.raises(ConfigError, match="search.time_budget"):
        with_overrides(spec, search={"time_budget": "2 weeks"})


# ---------------------------------------------------------------- 2. the searcher under a budget


def test_searcher_waits_while_trials_run_and_finishes_when_nothing_fits(tmp_path):
    budget = Budget(epochs=4)
    searcher = make_searcher(tmp_path, num_samples=4)  # tiny: max 3 epochs, rungs [1, 3]
    searcher.budget = budget
    for tid in ("t0", "t1", "t2", "t3"):
        assert isinstance(searcher.suggest(tid), dict)
    assert searcher.suggest("t4") is None  # 4 epochs reserved, trials running: wait
    assert searcher.suggested == {0: 2, 1: 2}
    searcher.on_trial_complete("t0", epochs(searcher, "t0", [0.3]))  # ASHA stops t0 at rung 1
    assert searcher.suggest("t4") is None  # t0 spent its epoch: still nothing left
    for tid in ("t1", "t2", "t3"):
        assert budget.must_stop(tid, 1) is True  # promoted to rung 3, but 2 more epochs do not fit
        searcher.on_trial_complete(tid, epochs(searcher, tid, [0.4]))
    assert searcher.suggest("t4") == Searcher.FINISHED
    assert budget.epochs_spent == 4


def test_trials_csv_marks_what_the_budget_left_out(tmp_path):
    budget = Budget(epochs=4)
    budget.budget_stopped = ["a"]
    rows = [{"trial_id": "a", "fold": "0", "status": "stopped", "epochs": "1", "checkpoint": "x/model.pt"},
            {"trial_id": "b", "fold": "0", "status": "completed", "epochs": "3", "checkpoint": "y/model.pt"}]
    search = {"num_samples": 3, "search_folds": None, "retrain_top": 3, "metric": "val_miou"}
    assert planned_per_fold(search, 2) == {0: 3, 1: 3}
    assert planned_per_fold({**search, "search_folds": [0], "retrain_top": 2}, 3) == {0: 3, 1: 2, 2: 2}
    out = mark_budget(rows, budget, search, 2, tmp_path / "trials.csv")
    assert [(r["fold"], r["status"], r["budget"]) for r in out] == [
        ("0", "stopped", "stopped"), ("0", "completed", ""), (0, NOT_RUN, "not run"),
        (1, NOT_RUN, "not run"), (1, NOT_RUN, "not run"), (1, NOT_RUN, "not run")]
    again = mark_budget(read_rows(tmp_path / "trials.csv"), budget, search, 2, tmp_path / "trials.csv")
    assert len(again) == 6  # marking twice (a resumed search) adds no rows
    report = fold_report(again, budget)
    assert "fold 0: 2 trials run, 2 finished, 1 not run" in report[1]
    assert "fold 1: 0 trials run, 0 finished, 3 not run" in report[2] and "no finished trial" in report[2]
    # the ensemble's member selection takes what finished and nothing the budget left out
    for row in again[:2]:
        row["best_val_miou"], row["checkpoint"] = "0.5", str(tmp_path / f"{row['trial_id']}.pt")
        Path(row["checkpoint"]).write_bytes(b"weights")
    assert {f: [r["trial_id"] for r in v] for f, v in top_k(again, "val_miou", "max", 5).items()} == {0: ["b"]}


# ---------------------------------------------------------------- 3. a real search under a budget


def total_epochs(rows: list[dict]) -> int:
    return sum(int(r["epochs"] or 0) for r in rows)


@pytest.mark.ray
@pytest.mark.slow
@needs_camvid
def test_epoch_budget_stops_the_search_and_resume_extends_it(scratch, camvid_cache):  # noqa: F811
    storage, name = scratch / "runs", "budget"
    run_dir = storage / name
    # 2 folds x 3 trials x up to 3 epochs (rungs 1, 3) would train 6..18 epochs; 4 stop it early
    args = run_args(storage, name, "--num-samples", "3", "--max-epochs", "3", "--max-concurrent", "2")
    ray_dir = private_ray_dir()
    try:
        first = cli(*args, "--epoch-budget", "4", ray_dir=ray_dir, cache=camvid_cache, timeout=900)
        assert first.returncode == 0, tail(first.stdout + first.stderr)
        rows = read_rows(run_dir / "trials.csv")
        ran = [r for r in rows if r["status"] != NOT_RUN]
        assert total_epochs(rows) <= 4, rows
        assert len(rows) == 6 and len(ran) < 6 and all(r["epochs"] == "0" for r in rows if r["status"] == NOT_RUN)
        assert all(r["status"] in ("completed", "stopped") and r["checkpoint"] for r in ran), ran
        saved = json.loads((run_dir / "budget.json").read_text())
        assert saved["epochs_spent"] == total_epochs(rows) and saved["limits"]["epochs"] == 4
        assert "budget: " in first.stdout and "not run" in first.stdout

        second = cli(*args, "--resume", "--epoch-budget", "9", ray_dir=ray_dir, cache=camvid_cache, timeout=900)
        assert second.returncode == 0, tail(second.stdout + second.stderr)
    finally:
        clean_up_ray(ray_dir)
    after = read_rows(run_dir / "trials.csv")
    kept = {r["trial_id"]: r["epochs"] for r in ran}
    assert {r["trial_id"]: r["epochs"] for r in after if r["trial_id"] in kept} == kept  # not trained again
    assert total_epochs(rows) < total_epochs(after) <= 9, after
    assert len([r for r in after if r["status"] != NOT_RUN]) > len(ran)
    assert json.loads((run_dir / "budget.json").read_text())["epochs_spent"] == total_epochs(after)
