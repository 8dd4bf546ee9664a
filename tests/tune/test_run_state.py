"""What a run inherits: searched epochs, the two-stage retrain plan, earlier state in the run directory,
and the settings a ``--resume`` may change.

The searcher and the trials table are driven with recorded results (no Ray); the command-line
refusals happen before Ray starts, so those run ``tune/run.py`` for real and check that nothing
was written.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from tests.tune.test_tune import (ROOT, TINY, assert_user_error, by_tune_id, clean_up_ray, cli, epochs, load,
                             private_ray_dir, read_rows, snapshot)
from trainables.errors import ConfigError, InputError
from tune.searcher import FoldedOptunaSearch
from tune.space import load_space, with_overrides

SAMPLE = ROOT / "data" / "camvid-sample" / "train" / "annotations.json"
NUM_CLASSES = 12

optuna.logging.set_verbosity(optuna.logging.WARNING)


def space_file(tmp_path: Path, asha: str, name: str = "ep.yaml") -> Path:
    """tiny.yaml with train.epochs searched (and so not fixed) and the given ``asha`` line."""
    text = (TINY.read_text().replace("train: {epochs: 2, ", "train: {")
            .replace("asha: {grace_period: 1, reduction_factor: 3, brackets: 1}", f"asha: {asha}")
            + "  train.epochs: {choice: [1, 3]}\n")
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- 2. searched epochs


def test_searching_epochs_with_asha_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_space(str(space_file(tmp_path, "{grace_period: 1}")), ROOT / "search_spaces")
    assert err.value.key == "space.train.epochs"
    assert "ASHA" in err.value.problem and "fixed" in err.value.problem and "asha: null" in err.value.problem
    assert "\n" not in str(err.value)
    spec = load_space(str(space_file(tmp_path, "null", "plain.yaml")), ROOT / "search_spaces")  # no ASHA: fine
    assert "train.epochs" in spec.space and spec.search["asha"] is None


def test_searched_epochs_without_asha_complete_at_their_own_planned_epochs(tmp_path):
    """The base train.epochs (the default 20 here) is nobody's plan: a trial that trained its
    sampled 1 or 3 epochs completed, in its study and in trials.csv."""
    from tune.experiment import TrialsTable

    spec = load_space(str(space_file(tmp_path, "null")), ROOT / "search_spaces")
    base_epochs = int(spec.base_config()["train"]["epochs"])
    searcher = FoldedOptunaSearch(spec, num_folds=2, num_classes=NUM_CLASSES, storage=f"sqlite:///{tmp_path}/s.db",
                                  experiment="t", max_epochs=base_epochs)
    configs = {tid: searcher.suggest(tid) for tid in ("a", "b", "c", "d")}
    planned = {tid: c["train.epochs"] for tid, c in configs.items()}
    assert set(planned.values()) <= {1, 3} and all(p < base_epochs for p in planned.values())
    trials = []
    for tid, config in configs.items():
        last = epochs(searcher, tid, [0.1 * (i + 1) for i in range(planned[tid])], stopped=False)
        searcher.on_trial_complete(tid, last)  # trained every epoch it planned
        trials.append(SimpleNamespace(trial_id=tid, status="TERMINATED", config=config, last_result=last,
                                      checkpoint=None, error_msg=None))
    states = {**by_tune_id(load(tmp_path, 0)), **by_tune_id(load(tmp_path, 1))}
    assert {tid: t.state for tid, t in states.items()} == {tid: TrialState.COMPLETE for tid in configs}

    table = TrialsTable(tmp_path / "trials.csv", "val_miou", max_epochs=base_epochs)
    table.on_experiment_end(trials)
    assert [r["status"] for r in read_rows(tmp_path / "trials.csv")] == ["completed"] * 4

    # a trial that ended before its own plan is still not complete (a searched 3 that ran 1)
    three = next((tid for tid in configs if planned[tid] == 3), None)
    if three is not None:
        short = SimpleNamespace(**{**vars(trials[list(configs).index(three)]), "last_result": {"epoch": 1}})
        from tune.experiment import trial_status

        assert trial_status(short, base_epochs) == "stopped"


def test_two_stage_retrains_the_best_of_each_search_fold(tmp_path):
    """Folds differ in difficulty: ranking both search folds together retrained fold 0's configs only."""
    spec = with_overrides(load_space(str(TINY), ROOT / "search_spaces"),
                          search={"num_samples": 2, "search_folds": [0, 1], "retrain_top": 1})
    searcher = FoldedOptunaSearch(spec, num_folds=3, num_classes=NUM_CLASSES, storage=f"sqlite:///{tmp_path}/s.db",
                                  experiment="t", max_epochs=2)
    assert searcher.total_trials == 2 * 2 + 2 * 1  # one config from each search fold, retrained on fold 2
    configs = {tid: searcher.suggest(tid) for tid in ("a", "b", "c", "d")}
    assert [c["fold"] for c in configs.values()] == [0, 1, 0, 1]
    scores = {"a": [0.8, 0.9], "c": [0.7, 0.6], "b": [0.3, 0.2], "d": [0.1, 0.25]}  # fold 1 is hard
    for tid in ("a", "b", "c", "d"):
        searcher.on_trial_complete(tid, epochs(searcher, tid, scores[tid], stopped=False))
    plan = [searcher.suggest(t) for t in ("r1", "r2")]
    strip = lambda c: {k: v for k, v in c.items() if k not in ("fold", "retrain")}  # noqa: E731
    assert [strip(c) for c in plan] == [strip(configs["a"]), strip(configs["b"])]
    assert [(c["fold"], c["retrain"]["epochs"]) for c in plan] == [(2, 2), (2, 1)]  # each its best epoch
    assert searcher.suggest("r3") == searcher.FINISHED


# ---------------------------------------------------------------- 3. earlier state in the run directory


STATE = {"experiment.json": "{}", "folds.json": "{}", "trials.csv": "trial_id\n", "studies.db": "",
         "asha_state.json": '{"0": {"rungs": [[[1, {"old": 0.9}]]], "trial_bracket": {}, "num_stopped": 0}}',
         "tune": None}


@pytest.mark.parametrize("entry", list(STATE))
def test_earlier_state_is_found_whatever_is_left(tmp_path, entry):
    from tune.rundir import earlier_state

    run_dir = tmp_path / "x"
    run_dir.mkdir()
    (run_dir / "report").mkdir()  # not state: a new run may write there
    assert earlier_state(run_dir) == []
    (run_dir / entry).mkdir() if STATE[entry] is None else (run_dir / entry).write_text(STATE[entry])
    assert earlier_state(run_dir) == [entry]


def run_args(storage: Path, *extra: str) -> list[str]:
    return ["--space", str(TINY), "--data", str(SAMPLE), "--storage", str(storage), "--name", "x",
            "--wandb", "disabled", "--num-samples", "1", "--max-epochs", "1", *extra]


@pytest.mark.slow
@pytest.mark.ray
def test_new_run_over_leftover_state_is_refused_and_writes_nothing(tmp_path):
    """A leftover asha_state.json (tune/ deleted by hand) was loaded by the new run's scheduler."""
    run_dir = tmp_path / "x"
    run_dir.mkdir()
    (run_dir / "asha_state.json").write_text(STATE["asha_state.json"])
    (run_dir / "studies.db").write_bytes(b"")
    before = snapshot(tmp_path)
    ray_dir = private_ray_dir()
    try:
        proc = cli(*run_args(tmp_path), ray_dir=ray_dir)
    finally:
        clean_up_ray(ray_dir)
    error = assert_user_error(proc, str(run_dir), "asha_state.json", "studies.db", "--resume", "--overwrite")
    assert "--name" in error
    assert snapshot(tmp_path) == before


def test_overwrite_clears_the_earlier_run_and_refuses_resume(tmp_path):
    from tune.rundir import clear_earlier_run, earlier_state

    run_dir = tmp_path / "x"
    run_dir.mkdir()
    for entry, text in STATE.items():
        (run_dir / entry).mkdir() if text is None else (run_dir / entry).write_text(text)
    (run_dir / "tune" / "tuner.pkl").write_bytes(b"")
    shared = tmp_path / "shared" / "x"  # the experiment in a --trial-storage directory
    shared.mkdir(parents=True)
    (shared / "tuner.pkl").write_bytes(b"")
    clear_earlier_run(run_dir, str(shared))
    assert earlier_state(run_dir) == [] and not shared.exists()
    assert (tmp_path / "shared").is_dir()  # only this experiment goes

    before = snapshot(tmp_path)
    assert_user_error(cli(*run_args(tmp_path, "--resume", "--overwrite")), "--overwrite", "--resume")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- 3. what a --resume may change


def recorded(spec, **extra) -> dict:
    """experiment.json's settings, as the driver writes them for ``spec``."""
    from tune.rundir import run_settings
    from tune.search import absolute_data_paths

    return json.loads(json.dumps(run_settings(spec, absolute_data_paths(spec.base_config()), **extra)))


def tiny(**search):
    return with_overrides(load_space(str(TINY), ROOT / "search_spaces"), search=search)


def test_resume_settings_diff_names_every_change_and_allows_the_budgets(tmp_path):
    from tune.rundir import settings_changes

    saved = recorded(tiny(num_samples=2))
    same = tiny(num_samples=4)  # more trials: allowed
    same = with_overrides(same, fixed={"train.preview_images": 0},  # W&B off
                          resources={"cpus_per_trial": 2, "gpus_per_trial": 0.5, "max_concurrent": 4})
    assert settings_changes(saved, recorded(same, trial_storage="/elsewhere")) == []

    changed = with_overrides(tiny(num_samples=1, seed=3, metric="val_dice"), fixed={"train.batch_size": 4})
    diff = settings_changes(saved, recorded(changed))
    assert "train.batch_size 8 -> 4" in diff
    assert "search.seed 0 -> 3" in diff and "search.metric val_miou -> val_dice" in diff
    assert any(d.startswith("search.num_samples 2 -> 1") for d in diff)  # fewer: refused

    wider = tmp_path / "wider.yaml"
    wider.write_text(TINY.read_text().replace("[1.0e-4, 1.0e-2]", "[1.0e-4, 1.0e-1]")
                     + "  loss.label_smoothing: {uniform: [0.0, 0.1]}\n")
    diff = settings_changes(saved, recorded(load_space(str(wider), ROOT / "search_spaces")))
    assert [d.split(" ")[0] for d in diff] == ["space.loss.label_smoothing", "space.optimizer.lr"], diff
    assert "0.01" in diff[1] and "0.1" in diff[1]


def test_an_older_record_without_asha_recheck_had_it_off():
    """search.asha.recheck came after experiment.json recorded search.asha: a run recorded without it
    ran without recheck, so resuming it with ``recheck: false`` written out is no change, and with
    ``recheck: true`` is one."""
    from tune.rundir import settings_changes

    saved = recorded(tiny())
    assert "recheck" not in saved["search"]["asha"]  # off unless set
    assert settings_changes(saved, recorded(tiny(asha={"recheck": False}))) == []
    diff = settings_changes(saved, recorded(tiny(asha={"recheck": True})))
    assert len(diff) == 1 and diff[0].startswith("search.asha ") and '"recheck": false' in diff[0] \
        and '"recheck": true' in diff[0], diff


def test_an_older_record_without_asha_promotion_had_it_off():
    """search.asha.promotion (default false) came later too: a record without it resumes with it off."""
    from tune.rundir import settings_changes

    saved = recorded(tiny())
    assert saved["search"]["asha"].pop("promotion") is False  # what an older experiment.json lacks
    assert settings_changes(saved, recorded(tiny())) == []
    diff = settings_changes(saved, recorded(tiny(asha={"promotion": True})))
    assert len(diff) == 1 and '"promotion": false' in diff[0] and '"promotion": true' in diff[0], diff


@pytest.mark.slow
@pytest.mark.ray
def test_resume_with_changed_settings_is_refused_in_one_line(tmp_path):
    from trainables.runfiles import write_experiment_json

    run_dir = tmp_path / "x"
    spec = with_overrides(tiny(num_samples=1), fixed={"data.path": str(SAMPLE), "train.epochs": 1,
                                                      "train.preview_images": 0})
    write_experiment_json(run_dir, recorded(spec), {"fingerprint": "f", "source": str(SAMPLE)})
    (run_dir / "tune").mkdir()
    (run_dir / "tune" / "tuner.pkl").write_bytes(b"")
    before = snapshot(tmp_path)
    ray_dir = private_ray_dir()
    try:
        proc = cli(*run_args(tmp_path, "--resume", "--set", "optimizer.encoder_lr_mult=0.5", "--num-samples", "3",
                             "--cpus-per-trial", "2", "--max-failures", "2"), ray_dir=ray_dir)
    finally:
        clean_up_ray(ray_dir)
    error = assert_user_error(proc, f"{run_dir / 'experiment.json'}: --resume with changed settings: "
                                    "optimizer.encoder_lr_mult 0.1 -> 0.5; start a new run with --name")
    assert "num_samples" not in error and "cpus" not in error
    assert snapshot(tmp_path) == before


def test_resume_with_more_samples_raises_the_saved_trial_counts(tmp_path):
    """Tune restores the trial count and the searcher from their saved states: a larger
    --num-samples on --resume was ignored (the search ended at the old count)."""
    import ray.cloudpickle as cloudpickle

    from tests.tune.test_storage import snapshot as save_snapshot
    from tests.tune.test_tune import make_searcher
    from tune.resume import grow_samples

    tune_dir = tmp_path / "tune"
    tune_dir.mkdir()
    searcher = make_searcher(tmp_path, num_samples=1)
    for tid in ("a", "b"):
        searcher.suggest(tid)
        searcher.on_trial_complete(tid, epochs(searcher, tid, [0.3, 0.4, 0.5]))
    assert searcher.suggest("c") == searcher.FINISHED
    save_snapshot(tune_dir, searcher, counter=2, live=set(), total=2)

    assert grow_samples(str(tune_dir), None, 3, 6) == ["3 trials per fold: 2 -> 6 trials in all"]
    generator = cloudpickle.loads((tune_dir / "search_gen_state-s.json").read_bytes())
    assert generator["total_samples"] == 6 and generator["finished"] is False
    restored = make_searcher(tmp_path, num_samples=1)  # as pickled when the search began
    restored.restore(str(tune_dir / "searcher-state-s.pkl"))
    assert [restored.suggest(t)["fold"] for t in ("c", "d", "e", "f")] == [0, 1, 0, 1]
    assert restored.suggest("g") == restored.FINISHED
    assert grow_samples(str(tune_dir), None, 3, 6) == []  # nothing more to raise


def saved_run_states(tune_dir: Path, max_failures: int, reuse_actors: bool, max_pending: int) -> None:
    """Tune's saved states of a search (tests/spaces/tiny.yaml, its limiter at 1): trial a finished, b
    running. The trial and controller fields are the ones Tune restores on resume (Trial.__setstate__,
    TuneController.__setstate__): each trial's retries, reuse_actors and the pending-trial limit."""
    import ray.cloudpickle as cloudpickle
    from ray.tune.experiment import Experiment

    from tests.tune.test_storage import snapshot
    from tests.tune.test_tune import make_searcher

    searcher = make_searcher(tune_dir.parent, num_samples=2)
    a = searcher.suggest("a")
    searcher.on_trial_complete("a", epochs(searcher, "a", [0.3, 0.4, 0.5]))
    b = searcher.suggest("b")
    snapshot(tune_dir, searcher, counter=2, live={"b"})
    path = tune_dir / "search_gen_state-s.json"
    generator = cloudpickle.loads(path.read_bytes())
    # the experiment Tune makes the next trials from (SearchGenerator.create_trial_if_possible)
    generator["experiment"] = Experiment("tune", run=lambda config: None, max_failures=max_failures,
                                         storage_path=str(tune_dir.parent))
    path.write_bytes(cloudpickle.dumps(generator))
    trials = [json.dumps({"trial_id": tid, "status": status, "config": config, "max_failures": max_failures})
              for tid, status, config in (("a", "TERMINATED", a), ("b", "RUNNING", b))]
    (tune_dir / "experiment_state-s.json").write_text(json.dumps({
        "trial_data": [[t, "{}"] for t in trials],
        "runner_data": {"_reuse_actors": reuse_actors, "_max_pending_trials": max_pending}}))


def test_resume_applies_retries_concurrency_callbacks_and_verbosity_given_again(tmp_path):
    """Tune.restore brings back the run config of the search's start and Tune the saved states: a
    --max-failures, --max-concurrent, --wandb or -v given with --resume was silently ignored."""
    import ray.cloudpickle as cloudpickle
    from ray.tune import Callback
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.search_generator import SearchGenerator

    from tests.tune.test_tune import make_searcher
    from tune.experiment import TrialsTable
    from tune.progress import FoldProgress
    from tune.search import build_tuner, prepare

    spec = with_overrides(load_space(str(TINY), ROOT / "search_spaces"), {"data.path": str(SAMPLE)},
                          resources={"max_concurrent": 1})
    run_dir = tmp_path / "run"
    base, data, folds = prepare(spec, run_dir)
    build_tuner(spec, base, folds=folds, data=data, run_dir=run_dir, max_failures=0,
                resume=False)  # what the first run pickled
    tune_dir = run_dir / "tune"
    saved_run_states(tune_dir, max_failures=0, reuse_actors=True, max_pending=1)

    class WandbLike(Callback):
        pass

    resumed = with_overrides(spec, resources={"max_concurrent": 3, "reuse_actors": False})
    callback = WandbLike()
    tuner = build_tuner(resumed, base, folds=folds, data=data, run_dir=run_dir, max_failures=2, resume=True,
                        callbacks=[callback], verbose=True)
    internal = tuner._local_tuner
    args = internal._get_tune_run_arguments(internal.converted_trainable)  # what Tuner.fit gives tune.run
    assert args["max_failures"] == 2
    assert args["max_concurrent_trials"] == 3 and args["reuse_actors"] is False
    assert isinstance(args["callbacks"][0], TrialsTable) and args["callbacks"][1:] == [callback]
    assert not isinstance(args["progress_reporter"], FoldProgress)  # -v: Tune's own trial table

    state = json.loads((tune_dir / "experiment_state-s.json").read_text())
    assert [json.loads(t)["max_failures"] for t, _ in state["trial_data"]] == [2, 2]
    assert state["runner_data"] == {"_reuse_actors": False, "_max_pending_trials": 3}
    generator = SearchGenerator(ConcurrencyLimiter(make_searcher(tmp_path, num_samples=2), max_concurrent=3))
    generator.restore_from_dir(str(tune_dir))  # as Tune restores it
    assert generator.searcher.max_concurrent == 3 and generator.searcher.live_trials == {"b"}
    assert generator.create_trial_if_possible(generator._experiment.spec).max_failures == 2  # a new trial's

    # the first run's settings again: its progress view, retries and limit
    tuner = build_tuner(spec, base, folds=folds, data=data, run_dir=run_dir, max_failures=0, resume=True)
    args = tuner._local_tuner._get_tune_run_arguments(tuner._local_tuner.converted_trainable)
    assert isinstance(args["progress_reporter"], FoldProgress) and args["max_failures"] == 0
    assert cloudpickle.loads((tune_dir / "search_gen_state-s.json").read_bytes())[
        "name:ConcurrencyLimiter"]["max_concurrent"] == 1


def test_resume_with_a_limit_where_the_run_had_none_keeps_the_running_trials_told(tmp_path):
    """A limiter passes a trial's end on to the searcher only for the trials it holds: one added on
    --resume must hold the unfinished trials, or their results would never reach the studies."""
    import ray.cloudpickle as cloudpickle
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.search_generator import SearchGenerator

    from tests.tune.test_tune import make_searcher
    from tune.resume import apply_run_settings

    tune_dir = tmp_path / "tune"
    tune_dir.mkdir()
    saved_run_states(tune_dir, max_failures=0, reuse_actors=True, max_pending=1)
    path = tune_dir / "search_gen_state-s.json"
    generator = cloudpickle.loads(path.read_bytes())
    del generator["name:ConcurrencyLimiter"]  # the run began without --max-concurrent
    path.write_bytes(cloudpickle.dumps(generator))

    assert apply_run_settings(str(tune_dir), None, 0, 2, True, "val_miou", "max") == [
        "trials at a time: no limit -> 2"]
    restored = SearchGenerator(ConcurrencyLimiter(make_searcher(tmp_path, num_samples=2), max_concurrent=2))
    restored.restore_from_dir(str(tune_dir))
    limiter = restored.searcher
    assert limiter.max_concurrent == 2 and limiter.live_trials == {"b"}
    limiter.on_trial_complete("b", epochs(limiter.searcher, "b", [0.3, 0.4, 0.5]))
    assert "b" not in limiter.searcher.live  # told the searcher
    assert apply_run_settings(str(tune_dir), None, 0, 2, True, "val_miou", "max") == []  # nothing left to change
