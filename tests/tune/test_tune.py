"""The search driver: per-fold ASHA, the folded Optuna searcher, and tune/run.py end to end.

The scheduler and searcher tests drive the objects directly (no Ray). The two ``slow`` tests run
``tune/run.py`` as a subprocess on the real CamVid training split (a tiny Unet, 4 batches an
epoch; see tests/spaces/tiny.yaml): one plain run, and one that is killed with SIGKILL and resumed.
They run by default; ``-m "not slow"`` leaves them out.

Each Ray run gets its own RAY_TMPDIR, so it starts a private local cluster (never joins another one
on this machine), and the clean-up kills exactly the processes of that cluster: the processes
carry the directory in their command line or environment. ``ray stop --force`` is deliberately not
used: it kills every Ray process of the machine, including other people's runs.
"""
from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher

from tune.localray import ray_processes, stop_ray
from tune.scheduler import PerFoldASHA
from tune.searcher import FoldedOptunaSearch, study_name
from tune.space import load_space, with_overrides

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "tune" / "run.py"
TINY = ROOT / "tests" / "spaces" / "tiny.yaml"
CAMVID = Path(__file__).resolve().parents[3] / "shared" / "data" / "camvid"
TRAIN_JSON = CAMVID / "train" / "annotations.json"
NUM_CLASSES = 12  # CamVid's 11 classes + background (unannotated pixels)

needs_camvid = pytest.mark.skipif(not TRAIN_JSON.exists(), reason=f"CamVid not found at {TRAIN_JSON}: the "
                                  "end-to-end runs need the shared dataset (/work/shared/data/camvid)")

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---------------------------------------------------------------- 1. per-fold ASHA, no Ray


def fake_trial(trial_id: str, fold: int, **extra) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"fold": fold, **extra})


def report(scheduler, trial, score: float, iteration: int = 1) -> str:
    return scheduler.on_trial_result(None, trial, {"training_iteration": iteration, "val_miou": score})


FOLD0 = [("a", 0.80), ("b", 0.85), ("c", 0.90)]  # fold 0 is easy: high (and rising) scores
WEAK_FOLD1 = ("x", 0.10)  # a fold-1 trial that is weak only in comparison with fold 0


def feed(scheduler, trials: list[tuple[str, int, float]]) -> dict[str, str]:
    decisions = {}
    for trial_id, fold, score in trials:
        trial = fake_trial(trial_id, fold)
        scheduler.on_trial_add(None, trial)
        decisions[trial_id] = report(scheduler, trial, score)
    return decisions


def asha_args() -> dict:
    return dict(metric="val_miou", mode="max", max_t=4, grace_period=1, reduction_factor=2)


def test_shared_asha_stops_a_weak_fold1_trial_that_per_fold_asha_keeps(tmp_path):
    sequence = [(t, 0, s) for t, s in FOLD0] + [(WEAK_FOLD1[0], 1, WEAK_FOLD1[1])]

    shared = ASHAScheduler(**asha_args())  # the control: one bracket set for every fold
    assert feed(shared, sequence)["x"] == TrialScheduler.STOP

    per_fold = PerFoldASHA(**asha_args(), state_path=str(tmp_path / "asha_state.json"))
    decisions = feed(per_fold, sequence)
    assert decisions == {"a": "CONTINUE", "b": "CONTINUE", "c": "CONTINUE", "x": "CONTINUE"}
    # each fold still stops its own weak trials, against its own rung only
    assert feed(per_fold, [("d", 0, 0.50), ("y", 1, 0.05), ("z", 1, 0.20)]) == {
        "d": TrialScheduler.STOP,  # below fold 0's median (0.85)
        "y": TrialScheduler.STOP,  # below fold 1's only entry (0.10)
        "z": TrialScheduler.CONTINUE,  # above fold 1's median (0.075), far below fold 0's
    }
    rungs = {fold: dict(per_fold.folds[fold]._brackets[0]._rungs)[1] for fold in (0, 1)}
    assert set(rungs[0]) == {"a", "b", "c", "d"} and set(rungs[1]) == {"x", "y", "z"}

    # retrain trials of the two-stage mode are never stopped and never enter a rung
    retrain = fake_trial("r", 1, retrain={"epochs": 2})
    per_fold.on_trial_add(None, retrain)
    assert report(per_fold, retrain, 0.0) == TrialScheduler.CONTINUE
    assert "r" not in per_fold.folds[1]._trial_info


def test_recheck_stops_an_early_arrival_that_later_arrivals_outrank(tmp_path):
    """ASHA passes the first trial at a rung unconditionally; with recheck it is cut at its next epoch once
    the rung's later arrivals put it below the top 1/reduction_factor, and the best one is never cut."""
    args = dict(metric="val_miou", mode="max", max_t=9, grace_period=1, reduction_factor=3)
    plain, rechecked = PerFoldASHA(**args), PerFoldASHA(**args, recheck=True)
    for scheduler in (plain, rechecked):
        # "a" reaches epoch 1 first (nothing recorded: passes), "b" and "c" arrive with higher scores
        assert feed(scheduler, [("a", 0, 0.20), ("b", 0, 0.50), ("c", 0, 0.35)]) == {
            "a": "CONTINUE", "b": "CONTINUE", "c": "STOP"}  # c: below the 2/3 quantile of {a, b}
    a, b = fake_trial("a", 0), fake_trial("b", 0)
    assert report(plain, a, 0.30, iteration=2) == TrialScheduler.CONTINUE  # ASHA never looks back
    assert report(rechecked, a, 0.30, iteration=2) == TrialScheduler.STOP  # 0.20 < 0.40, the quantile of {0.2, 0.5, 0.35}
    assert report(rechecked, b, 0.55, iteration=2) == TrialScheduler.CONTINUE  # the rung's best stays
    assert rechecked.folds[0]._num_stopped == plain.folds[0]._num_stopped + 1


def test_per_fold_asha_state_survives_reload_and_pickle(tmp_path):
    path = tmp_path / "asha_state.json"
    first = PerFoldASHA(**asha_args(), state_path=str(path))
    feed(first, [(t, 0, s) for t, s in FOLD0] + [("x", 1, 0.10), ("y", 1, 0.30)])
    state = first.rung_state()
    assert json.loads(path.read_text()) == state  # written after every decision
    assert state["0"]["rungs"][0][-1] == [1, {"a": 0.80, "b": 0.85, "c": 0.90}]  # milestone 1
    assert state["1"]["rungs"][0][-1] == [1, {"x": 0.10, "y": 0.30}]

    reloaded = PerFoldASHA(**asha_args(), state_path=str(path))
    unpickled = pickle.loads(pickle.dumps(PerFoldASHA(**asha_args(), state_path=str(path))))
    # what Tuner.restore does: the scheduler pickled at the start comes back, the file has moved on
    stale = pickle.dumps(PerFoldASHA(**asha_args(), state_path=str(tmp_path / "later.json")))
    shutil.copy(path, tmp_path / "later.json")
    restored = pickle.loads(stale)
    for other in (reloaded, unpickled, restored):
        assert other.rung_state() == state
        assert set(other.folds) == {0, 1}

    # the same next results get the same decisions from every copy
    probes = [("p", 0, 0.84, 1), ("q", 1, 0.15, 1), ("a", 0, 0.95, 2), ("y", 1, 0.20, 2)]
    expected = ["STOP", "STOP", "CONTINUE", "CONTINUE"]
    for scheduler in (first, reloaded, unpickled, restored):
        decisions = []
        for trial_id, fold, score, iteration in probes:
            trial = fake_trial(trial_id, fold)
            scheduler.on_trial_add(None, trial)  # known trials keep their bracket
            decisions.append(report(scheduler, trial, score, iteration))
        assert decisions == expected
    assert reloaded.rung_state() == first.rung_state() == restored.rung_state()


# ---------------------------------------------------------------- 2. the folded Optuna searcher, no Ray


def tiny_spec(**search):
    return with_overrides(load_space(str(TINY), ROOT / "search_spaces"), search=search)


def make_searcher(tmp_path: Path, **search) -> FoldedOptunaSearch:
    return FoldedOptunaSearch(tiny_spec(**search), num_folds=2, num_classes=NUM_CLASSES,
                              storage=f"sqlite:///{tmp_path}/s.db", experiment="t", max_epochs=3)


def load(tmp_path: Path, fold: int) -> optuna.Study:
    return optuna.load_study(study_name=study_name("t", fold), storage=f"sqlite:///{tmp_path}/s.db")


def by_tune_id(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    return {t.user_attrs["tune_trial_id"]: t for t in study.get_trials(deepcopy=False)}


def epochs(searcher: Searcher, trial_id: str, scores: list[float], stopped: bool = True) -> dict:
    """Results of one epoch each, passed on as Tune does; returns the last one (for on_trial_complete).

    ``stopped``: the scheduler stopped the trial on its last result (ASHA at a rung or at max_t);
    Tune then gives that result to the searcher's on_trial_complete only, not to on_trial_result.
    """
    best_score, best_epoch = None, 0
    for epoch, score in enumerate(scores, 1):
        if best_score is None or score > best_score:
            best_score, best_epoch = score, epoch
        result = {"epoch": epoch, "training_iteration": epoch, "val_miou": score, "best_score": best_score,
                  "best_epoch": best_epoch}
        if not (stopped and epoch == len(scores)):
            searcher.on_trial_result(trial_id, result)
    return result


def test_searcher_one_study_per_fold_and_multi_fidelity_states(tmp_path):
    searcher = make_searcher(tmp_path, num_samples=2)
    assert searcher.total_trials == 4
    configs = {tid: searcher.suggest(tid) for tid in ("t0", "t1", "t2", "t3")}
    assert [c["fold"] for c in configs.values()] == [0, 1, 0, 1]  # folds alternate
    for config in configs.values():
        assert set(config) == {"fold", "optimizer.lr", "loss.name"}
        assert 1e-4 <= config["optimizer.lr"] <= 1e-2 and config["loss.name"] in ("ce", "dice")
    assert searcher.suggest("t4") == Searcher.FINISHED  # num_samples per fold handed out
    assert searcher.suggested == {0: 2, 1: 2}

    searcher.on_trial_complete("t0", epochs(searcher, "t0", [0.30, 0.40]))  # stopped by ASHA after 2/3
    searcher.on_trial_complete("t1", epochs(searcher, "t1", [0.20, 0.50, 0.45], stopped=False))  # to the end
    epochs(searcher, "t2", [0.1], stopped=False)
    searcher.on_trial_complete("t2", None, error=True)
    epochs(searcher, "t3", [0.05], stopped=False)  # still running

    assert sorted(optuna.get_all_study_names(f"sqlite:///{tmp_path}/s.db")) == ["t-fold0", "t-fold1"]
    fold0, fold1 = by_tune_id(load(tmp_path, 0)), by_tune_id(load(tmp_path, 1))
    assert set(fold0) == {"t0", "t2"} and set(fold1) == {"t1", "t3"}  # fold 0 never in fold 1's study

    pruned = fold0["t0"]
    assert pruned.state == TrialState.PRUNED
    assert pruned.value == 0.40  # Optuna gives a pruned trial its last intermediate value
    assert pruned.intermediate_values == {1: 0.30, 2: 0.40}  # epoch 2 came with on_trial_complete only
    assert pruned.params["optimizer.lr"] == configs["t0"]["optimizer.lr"]

    complete = fold1["t1"]
    assert complete.state == TrialState.COMPLETE
    assert complete.value == 0.50  # the best score, not the last one
    assert complete.intermediate_values == {1: 0.20, 2: 0.50, 3: 0.45}
    assert complete.user_attrs["best_epoch"] == 2
    assert complete.user_attrs["config"] == {k: v for k, v in configs["t1"].items() if k != "fold"}

    assert fold0["t2"].state == TrialState.FAIL
    assert fold1["t3"].state == TrialState.RUNNING and fold1["t3"].intermediate_values == {1: 0.05}

    # a finished trial reported again (e.g. after a restore) changes nothing
    searcher.on_trial_complete("t0", {"epoch": 3, "best_score": 0.9, "best_epoch": 3})
    assert load(tmp_path, 0).trials[pruned.number].state == TrialState.PRUNED


def test_searcher_save_restore_continues_and_fails_orphans(tmp_path):
    first = make_searcher(tmp_path, num_samples=2)
    configs = {tid: first.suggest(tid) for tid in ("a", "b", "c")}  # folds 0, 1, 0
    first.on_trial_complete("a", epochs(first, "a", [0.3, 0.4, 0.5]))
    epochs(first, "b", [0.2], stopped=False)
    ckpt = tmp_path / "searcher.json"
    first.save(str(ckpt))
    orphan = first.suggest("d")  # fold 1, asked after the last save: then the driver dies
    assert orphan["fold"] == 1

    pickled = pickle.dumps(make_searcher(tmp_path, num_samples=2))  # Tuner.restore unpickles the searcher ...
    second = pickle.loads(pickled)
    second.restore(str(ckpt))  # ... and restores its saved state
    assert second.suggested == {0: 2, 1: 1}
    assert set(second.live) == {"b", "c"}
    fold0, fold1 = by_tune_id(load(tmp_path, 0)), by_tune_id(load(tmp_path, 1))
    assert fold1["d"].state == TrialState.FAIL  # the orphan: Tune never ran it
    assert fold1["b"].state == TrialState.RUNNING and fold0["c"].state == TrialState.RUNNING
    assert fold0["a"].state == TrialState.COMPLETE

    assert second.suggest("b") == configs["b"]  # a restored trial asking again: no new Optuna trial
    assert len(load(tmp_path, 1).trials) == 2
    e = second.suggest("e")  # the one fold-1 sample still to hand out
    assert e["fold"] == 1
    assert second.suggest("f") == Searcher.FINISHED

    second.on_trial_result("b", {"epoch": 2, "val_miou": 0.3})  # b resumed from its epoch-1 checkpoint
    second.on_trial_complete("b", {"epoch": 2, "val_miou": 0.3, "best_score": 0.3, "best_epoch": 2})
    second.on_trial_complete("c", epochs(second, "c", [0.6, 0.7, 0.8]))
    second.on_trial_complete("e", epochs(second, "e", [0.1]))
    fold0, fold1 = by_tune_id(load(tmp_path, 0)), by_tune_id(load(tmp_path, 1))
    assert fold1["b"].intermediate_values == {1: 0.2, 2: 0.3} and fold1["b"].state == TrialState.PRUNED
    assert {t: s.state for t, s in fold0.items()} == {"a": TrialState.COMPLETE, "c": TrialState.COMPLETE}
    assert {t: s.state for t, s in fold1.items()} == {"b": TrialState.PRUNED, "d": TrialState.FAIL,
                                                      "e": TrialState.PRUNED}
    assert fold1["e"].intermediate_values == {1: 0.1} and fold1["e"].value == 0.1  # stopped at the first rung
    assert second.live == {}


def test_searcher_two_stage_retrains_top_config_on_other_folds(tmp_path):
    searcher = make_searcher(tmp_path, num_samples=2, search_folds=[0], retrain_top=1)
    assert searcher.total_trials == 2 + 1
    a, b = searcher.suggest("a"), searcher.suggest("b")
    assert a["fold"] == b["fold"] == 0
    assert searcher.suggest("c") is None  # wait: fold-0 trials still running
    searcher.on_trial_complete("a", epochs(searcher, "a", [0.3, 0.6, 0.5]))  # complete, best at epoch 2
    assert searcher.suggest("c") is None
    searcher.on_trial_complete("b", epochs(searcher, "b", [0.7]))  # higher, but pruned: not ranked

    retrain = searcher.suggest("c")
    assert retrain == {**{k: v for k, v in a.items() if k != "fold"}, "fold": 1, "retrain": {"epochs": 2}}
    assert searcher.suggest("d") == Searcher.FINISHED
    searcher.on_trial_result("c", {"epoch": 1, "val_miou": 0.4})  # retrain trials are not searched
    searcher.on_trial_complete("c", {"epoch": 2, "val_miou": 0.5, "best_score": 0.5, "best_epoch": 2})
    assert optuna.get_all_study_names(f"sqlite:///{tmp_path}/s.db") == ["t-fold0"]
    assert {t.user_attrs["tune_trial_id"]: t.state for t in load(tmp_path, 0).trials} == {
        "a": TrialState.COMPLETE, "b": TrialState.PRUNED}


def test_searcher_ignores_results_of_trials_told_before_a_crash(tmp_path):
    """Tune snapshots its experiment every ~10 s: a trial that ended just before the driver died comes
    back RUNNING and reports again, though its Optuna trial was already told."""
    first = make_searcher(tmp_path, num_samples=2)
    first.suggest("a")
    epochs(first, "a", [0.3], stopped=False)
    ckpt = tmp_path / "searcher.json"
    first.save(str(ckpt))  # the last snapshot before the crash: "a" still live
    first.on_trial_complete("a", {"epoch": 1, "val_miou": 0.3, "best_score": 0.3, "best_epoch": 1})

    second = make_searcher(tmp_path, num_samples=2)
    second.restore(str(ckpt))
    assert set(second.live) == {"a"}
    second.on_trial_result("a", {"epoch": 2, "val_miou": 0.9})  # used to raise UpdateFinishedTrialError
    second.on_trial_complete("a", {"epoch": 3, "val_miou": 0.9, "best_score": 0.9, "best_epoch": 3})
    (told,) = load(tmp_path, 0).trials
    assert told.state == TrialState.PRUNED and told.intermediate_values == {1: 0.3}


def test_trials_csv_shows_the_ending_trial_as_finished(tmp_path):
    """Tune calls the callbacks' on_trial_complete while the trial is still RUNNING."""
    from tune.experiment import TrialsTable

    def trial(trial_id, status, epoch, fold=0):
        return SimpleNamespace(trial_id=trial_id, status=status, config={"fold": fold, "optimizer.lr": 1e-3},
                               last_result={"epoch": epoch, "best_epoch": epoch, "best_score": 0.5, "node": "n"},
                               checkpoint=None, error_msg=None)

    done, stopped, running = trial("done", "RUNNING", 3), trial("stopped", "RUNNING", 1), trial("run", "RUNNING", 1)
    trials = [done, stopped, running]
    table = TrialsTable(tmp_path / "trials.csv", "val_miou", max_epochs=3)
    table.on_trial_complete(0, trials, done)  # trained to the end
    assert [r["status"] for r in read_rows(tmp_path / "trials.csv")] == ["completed", "running", "running"]
    done.status = "TERMINATED"  # what Tune does after the callbacks
    table.on_trial_complete(1, trials, stopped)  # stopped by ASHA after 1 of 3 epochs
    assert [r["status"] for r in read_rows(tmp_path / "trials.csv")] == ["completed", "stopped", "running"]
    stopped.status = running.status = "TERMINATED"
    running.last_result["epoch"] = 3
    table.on_experiment_end(trials)
    assert [r["status"] for r in read_rows(tmp_path / "trials.csv")] == ["completed", "stopped", "completed"]


# ---------------------------------------------------------------- Ray runs of tune/run.py


def private_ray_dir() -> Path:
    # short: Ray's unix sockets live below it and socket paths are limited to 107 characters
    return Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))


def cli_env(ray_dir: Path | None = None, cache: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_ID", "RAY_JOB_SUBMISSION_ID")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    if ray_dir is not None:
        env["RAY_TMPDIR"] = str(ray_dir)
    if cache is not None:
        env["SEGHPO_CACHE"] = str(cache)
    return env


def cli(*args: str, ray_dir: Path | None = None, cache: Path | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUN), *map(str, args)], cwd=ROOT, env=cli_env(ray_dir, cache),
                          capture_output=True, text=True, timeout=timeout)


def clean_up_ray(ray_dir: Path) -> None:
    stop_ray(ray_dir, grace=5.0)
    shutil.rmtree(ray_dir, ignore_errors=True)


def scratch_dir(prefix: str) -> Path:
    """A directory of our own for a Ray run (minutes long): concurrent pytest sessions prune each
    other's numbered basetemp directories (only the last 3 are kept), even while they are in use."""
    return Path(tempfile.mkdtemp(prefix=f"seghpo-{prefix}-"))


@pytest.fixture
def scratch(request):
    """Kept (and named in the teardown output) when the test fails."""
    path, failed_before = scratch_dir(request.node.name[5:25]), request.session.testsfailed
    yield path
    if request.session.testsfailed > failed_before:
        print(f"kept for inspection: {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def camvid_cache():
    """The CamVid masks, rasterised once for this module's runs (never ~/.cache/seghpo)."""
    path = scratch_dir("cache")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_args(storage: Path, name: str, *extra: str) -> list[str]:
    # W&B (on by default, offline without an API key) has its own tests; here it would only add a
    # logging actor per trial to the 2 cores
    return ["--space", str(TINY), "--data", str(TRAIN_JSON), "--storage", str(storage), "--name", name,
            "--folds", "2", "--wandb", "disabled", *extra]


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def tail(text: str, n: int = 4000) -> str:
    return text[-n:]


def studies(run_dir: Path) -> dict[int, optuna.Study]:
    storage = f"sqlite:///{run_dir / 'studies.db'}"
    return {f: optuna.load_study(study_name=study_name("tiny", f), storage=storage) for f in (0, 1)}


@pytest.fixture(scope="module")
def e2e(camvid_cache):
    """One finished run: 2 folds x 2 trials x 2 epochs on CamVid (about 2 minutes on 2 cores)."""
    if not TRAIN_JSON.exists():
        pytest.skip(f"CamVid not found at {TRAIN_JSON}: the end-to-end runs need the shared dataset")
    base = scratch_dir("e2e")
    storage = base / "runs"
    ray_dir = private_ray_dir()
    args = run_args(storage, "e2e", "--num-samples", "2", "--max-epochs", "2")
    try:
        # generous: a busy machine is several times slower
        proc = cli(*args, ray_dir=ray_dir, cache=camvid_cache, timeout=900)
    finally:
        clean_up_ray(ray_dir)
    yield SimpleNamespace(run_dir=storage / "e2e", args=args, proc=proc)
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
@needs_camvid
def test_end_to_end_run_on_camvid(e2e, camvid_cache):
    import torch

    from trainables.checkpoint import load_checkpoint, model_from_checkpoint

    proc, run_dir = e2e.proc, e2e.run_dir
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr)
    rows = read_rows(run_dir / "trials.csv")
    assert len(rows) == 4, rows
    assert sorted(r["fold"] for r in rows) == ["0", "0", "1", "1"]
    assert len({r["trial_id"] for r in rows}) == 4
    assert all(r["status"] for r in rows)
    finished = [r for r in rows if r["status"] in ("completed", "stopped")]
    assert finished, [(r["trial_id"], r["status"], r["error"]) for r in rows]

    study = studies(run_dir)
    assert sorted(optuna.get_all_study_names(f"sqlite:///{run_dir / 'studies.db'}")) == ["tiny-fold0", "tiny-fold1"]
    state_of = {"completed": TrialState.COMPLETE, "stopped": TrialState.PRUNED, "error": TrialState.FAIL}
    for row in rows:
        optuna_trials = by_tune_id(study[int(row["fold"])])
        assert optuna_trials[row["trial_id"]].state == state_of[row["status"]], row
    for row in finished:
        assert row["checkpoint"], row
        # W&B is off: no example predictions written with the checkpoint, only what resuming needs
        written = {p.name for p in Path(row["checkpoint"]).parent.iterdir()}
        assert {"model.pt", "state.pt"} <= written and "preview.npz" not in written, (row, written)
        ckpt = load_checkpoint(row["checkpoint"])
        assert ckpt["fold"] == int(row["fold"]) and ckpt["epoch"] == int(row["best_epoch"])
        assert abs(ckpt["score"] - float(row["best_val_miou"])) < 1e-9
        assert ckpt["config"]["optimizer"]["lr"] == pytest.approx(float(row["param:optimizer.lr"]))
        model = model_from_checkpoint(ckpt).eval()
        with torch.no_grad():
            assert model(torch.zeros(1, 3, 64, 96)).shape == (1, NUM_CLASSES, 64, 96)

    experiment = json.loads((run_dir / "experiment.json").read_text())
    from trainables.data import load_dataset

    assert experiment["dataset"]["fingerprint"] == load_dataset(str(TRAIN_JSON), cache_dir=camvid_cache).fingerprint
    assert experiment["dataset"]["images"] == 367 and len(experiment["dataset"]["class_names"]) == NUM_CLASSES
    for package in ("python", "torch", "ray", "optuna", "segmentation-models-pytorch"):
        assert experiment["versions"][package] not in ("", None, "not installed"), package
    assert (run_dir / "folds.json").is_file()
    folds = json.loads((run_dir / "folds.json").read_text())
    assert folds["meta"]["dataset"] == experiment["dataset"]["fingerprint"] and len(folds["folds"]) == 2


@pytest.mark.slow
@needs_camvid
def test_a_finished_trials_worker_runs_the_next_trial(e2e):
    """resources.reuse_actors (on by default): the 4 trials, 2 at a time, run in fewer than 4 worker
    processes (before, each trial started one and imported torch, smp and Ray's trainable again), and
    each trial's results come from one process."""
    assert e2e.proc.returncode == 0, tail(e2e.proc.stdout + e2e.proc.stderr)
    pids = {trial_id: {json.loads(line)["pid"] for line in (d / "result.json").read_text().splitlines()}
            for trial_id, d in trial_dirs(e2e.run_dir).items()}
    assert len(pids) == 4 and all(len(p) == 1 for p in pids.values()), pids
    assert len(set.union(*pids.values())) < 4, pids


def trial_dirs(run_dir: Path) -> dict[str, Path]:
    return {p.name.partition("_")[2]: p for p in (run_dir / "tune").glob("fold*_*") if p.is_dir()}


def reported_epochs(trial_dir: Path) -> list[int]:
    path = trial_dir / "result.json"
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()] if path.exists() else []


def finished_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "trials.csv"
    return [r for r in read_rows(path) if r["status"] in ("completed", "stopped")] if path.exists() else []


def rung_entries(state: dict, trial_ids: set[str]) -> dict[tuple[str, float, str], float]:
    """(fold, milestone, trial id) -> recorded score of the given trials in asha_state.json."""
    out = {}
    for fold, saved in state.items():
        for bracket in saved["rungs"]:
            for milestone, recorded in bracket:
                out.update({(fold, milestone, t): v for t, v in recorded.items() if t in trial_ids})
    return out


@pytest.mark.ray
@pytest.mark.slow
@needs_camvid
def test_resume_after_killing_the_driver(scratch, camvid_cache):
    """SIGKILL the driver (and its Ray) while a trial trains, after another has finished; --resume.

    The kill waits until the running trial has reported its first epoch, plus 1 s: that epoch's
    checkpoint makes Tune snapshot the experiment, so the snapshot knows every trial asked so far.
    A kill at any moment can find Tune's snapshot up to ~10 s old; what the searcher does then
    (orphan Optuna trials FAIL, trials told before the crash ignore repeated results) is tested
    above without Ray, where the timing is exact. A kill during Tune's copy of the snapshot to
    storage once left a 0-byte ``search_gen_state`` and a quiet restart; storage writes are now
    whole-file (tune/storage.py, tests/tune/test_storage.py).
    """
    storage, name = scratch / "runs", "resume"
    run_dir = storage / name
    cpus = str(min(2, os.cpu_count() or 1))  # one trial at a time: let it use both cores
    args = run_args(storage, name, "--num-samples", "3", "--max-epochs", "3", "--max-concurrent", "1",
                    "--cpus-per-trial", cpus)
    ray_dir = private_ray_dir()
    log = scratch / "first.log"
    try:
        with open(log, "w") as out:
            first = subprocess.Popen([sys.executable, str(RUN), *args], cwd=ROOT, env=cli_env(ray_dir, camvid_cache),
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            running: list[str] = []
            while not running:
                assert first.poll() is None, f"the run ended before it was killed:\n{tail(log.read_text())}"
                assert time.monotonic() < deadline, f"no trial finished in time:\n{tail(log.read_text())}"
                time.sleep(0.5)
                done = {r["trial_id"] for r in finished_rows(run_dir)}
                running = [t for t, d in trial_dirs(run_dir).items() if done and t not in done and reported_epochs(d)]
            time.sleep(1.0)
            done_rows = finished_rows(run_dir)
            (resumed,) = running
            assert resumed not in {r["trial_id"] for r in done_rows}, "the running trial ended before the kill"
            before = {r["trial_id"]: (r, reported_epochs(trial_dirs(run_dir)[r["trial_id"]])) for r in done_rows}
            asha_before = rung_entries(json.loads((run_dir / "asha_state.json").read_text()), set(before))
        finally:
            os.killpg(first.pid, signal.SIGKILL)  # the driver and every process of its group
            first.wait(timeout=30)
        stop_ray(ray_dir, grace=5.0)  # anything of that Ray cluster outside the group
        assert ray_processes(ray_dir) == []
        assert asha_before, "the trials finished before the kill left no rung entries"

        # settings a resume may change apply (Tune restores them from its saved states otherwise)
        second = cli(*args, "--resume", "--max-concurrent", "2", "--max-failures", "1", ray_dir=ray_dir,
                     cache=camvid_cache, timeout=900)
        assert second.returncode == 0, tail(second.stdout + second.stderr)
        assert "--resume: trials at a time 1 -> 2" in second.stdout, tail(second.stdout)
        assert "--resume: retries of a failing trial 0 -> 1" in second.stdout, tail(second.stdout)
        stop_ray(ray_dir)
    finally:
        clean_up_ray(ray_dir)
    state = json.loads(max((run_dir / "tune").glob("experiment_state-*.json")).read_text())
    assert {json.loads(trial)["max_failures"] for trial, _ in state["trial_data"]} == {1}  # restored and new ones

    rows = read_rows(run_dir / "trials.csv")
    assert len(rows) == 6 and len({r["trial_id"] for r in rows}) == 6, [(r["trial_id"], r["fold"]) for r in rows]
    assert sorted(r["fold"] for r in rows) == ["0"] * 3 + ["1"] * 3
    assert all(r["status"] in ("completed", "stopped") for r in rows), [(r["trial_id"], r["status"], r["error"])
                                                                       for r in rows]
    now = {r["trial_id"]: r for r in rows}
    for trial_id, (row, epochs_before) in before.items():
        assert trial_id in now, f"trial {trial_id}, finished before the kill, is gone"
        kept = {k: now[trial_id][k] for k in ("fold", "status", "epochs", "best_epoch", "best_val_miou", "checkpoint")}
        assert kept == {k: row[k] for k in kept}, f"trial {trial_id} changed after the resume"
        assert reported_epochs(trial_dirs(run_dir)[trial_id]) == epochs_before, f"trial {trial_id} was trained again"
    # the trial killed mid-training went on under its own id from its checkpoint (the best epoch so
    # far, so an epoch after it may be trained twice), not from scratch
    assert resumed in now
    continued = reported_epochs(trial_dirs(run_dir)[resumed])
    assert continued.count(1) == 1 and continued == sorted(continued), continued
    assert sorted(set(continued)) == list(range(1, int(now[resumed]["epochs"]) + 1)), continued

    for fold, study in studies(run_dir).items():
        trials = study.get_trials(deepcopy=False)
        assert len(trials) == 3, [(t.number, t.state, t.user_attrs.get("tune_trial_id")) for t in trials]
        assert not [t for t in trials if t.state == TrialState.RUNNING]
        assert {t.user_attrs["tune_trial_id"] for t in trials} == {r["trial_id"] for r in rows
                                                                 if r["fold"] == str(fold)}
        for t in trials:
            row = now[t.user_attrs["tune_trial_id"]]
            assert t.state == (TrialState.COMPLETE if row["status"] == "completed" else TrialState.PRUNED), row
            assert sorted(t.intermediate_values) == list(range(1, int(row["epochs"]) + 1)), row
    asha_after = rung_entries(json.loads((run_dir / "asha_state.json").read_text()), set(before))
    assert asha_after == asha_before


# ---------------------------------------------------------------- 5. command-line validation


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.stat().st_size) for p in path.rglob("*")} \
        if path.exists() else {}


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, tail(proc.stdout + proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    return errors[0]


@pytest.mark.slow
def test_cli_unknown_space_lists_available_ones(tmp_path):
    error = assert_user_error(cli("--space", "nosuch.yaml", "--storage", tmp_path, "--name", "x"), "--space")
    for shipped in ("segformer", "smp", "mixed"):
        assert shipped in error
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.slow
def test_cli_rejects_one_fold(tmp_path):
    assert_user_error(cli("--space", "segformer.yaml", "--folds", "1", "--storage", tmp_path, "--name", "x"),
                      "folds.k", "at least 2")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_resume_needs_an_experiment(tmp_path):
    assert_user_error(cli("--space", str(TINY), "--data", TRAIN_JSON, "--resume", "--storage", tmp_path,
                          "--name", "nothing"),
                      "--resume", "no experiment")
    assert not (tmp_path / "nothing" / "tune").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.ray
@pytest.mark.slow
@needs_camvid
def test_cli_same_name_twice_needs_resume(e2e):
    assert e2e.proc.returncode == 0, tail(e2e.proc.stdout + e2e.proc.stderr)
    before = snapshot(e2e.run_dir)
    ray_dir = private_ray_dir()
    try:
        again = cli(*e2e.args, ray_dir=ray_dir)
    finally:
        clean_up_ray(ray_dir)
    assert_user_error(again, "--name", "already holds an experiment", "--resume")
    assert snapshot(e2e.run_dir) == before  # nothing written: not even experiment.json


@pytest.mark.parametrize("num_samples,startup", [(8, 10), (8, 8), (16, 10), (16, 4)])
def test_random_start_warning_says_what_tpe_proposes(num_samples, startup):
    """Held against Optuna itself: a fold's study run one trial at a time, counting the trials whose
    parameter TPE drew at random (its start-up sampler) rather than proposed."""
    from tune.searcher import random_start_warning

    from tests.tune.searcher_driver import tpe_proposals

    proposed = tpe_proposals(num_samples, startup)
    warning = random_start_warning({"num_samples": num_samples, "n_startup_trials": startup})
    if proposed == 0:
        assert "TPE never proposes one" in warning
    elif 2 * proposed < num_samples:
        assert f"TPE proposes at most {proposed} trials per fold" in warning
    else:
        assert warning is None
