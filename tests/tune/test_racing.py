"""Fold racing (``search.racing``, tune/racing.py), without Ray: the promotion rule against hand-made
numbers, a race over 3 folds driven through suggest / on_trial_result / on_trial_complete against a hand
computation (who reaches fold 1 and fold 2, the order trials are handed out, when the search ends), a
pruned trial leaving the race, and a save/restore mid-race that asks no configuration twice."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.search import Searcher

from trainables.errors import ConfigError
from tune.racing import RacingSearch, level_means, promotable
from tune.searcher import study_name
from tune.space import load_space, with_overrides

from tests.tune.searcher_driver import run_epochs, stored

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "spaces" / "tiny.yaml"
K = 3  # folds


def make_searcher(tmp_path: Path, **search) -> RacingSearch:
    """Random proposals (the race does not depend on them; TPE's are slower to draw)."""
    search = {"n_startup_trials": 100, **search}
    spec = with_overrides(load_space(str(TINY), ROOT / "search_spaces"), fixed={"folds.k": K}, search=search)
    return RacingSearch(spec, num_folds=K, num_classes=11, storage=f"sqlite:///{tmp_path}/s.db",
                        experiment="t", max_epochs=3)


def complete(searcher, trial_id: str, best: float) -> None:
    """Trains its 3 planned epochs (COMPLETE), best score ``best``."""
    run_epochs(searcher, trial_id, [best - 0.2, best, best - 0.1])


def pruned(searcher, trial_id: str) -> None:
    """Stopped by ASHA after 2 of 3 epochs (PRUNED)."""
    run_epochs(searcher, trial_id, [0.9, 0.95])


def handed(config: dict) -> tuple[int, int]:
    return config["config_id"], config["fold"]


# -- the promotion rule ---------------------------------------------------------------------


def test_promotion_rule_against_hand_made_numbers():
    # a lone first arrival passes
    assert promotable(0.1, [0.1], 3, "max")
    # k = max(1, n // eta): with eta 3, the best of up to 5, the best 2 of 6..8
    level = [0.50, 0.70, 0.60, 0.40, 0.65]
    assert promotable(0.70, level, 3, "max") and not promotable(0.65, level, 3, "max")
    level6 = level + [0.30]  # 6 // 3 = 2: the 2nd best (0.65) and better pass; ties pass
    assert promotable(0.65, level6, 3, "max") and not promotable(0.60, level6, 3, "max")
    # eta 2 over 4: the best 2
    assert [promotable(v, [0.2, 0.4, 0.3, 0.1], 2, "max") for v in (0.2, 0.4, 0.3, 0.1)] == [False, True, True, False]
    # minimised (a loss): the smallest
    assert promotable(0.2, [0.2, 0.5, 0.3], 3, "min") and not promotable(0.3, [0.2, 0.5, 0.3], 3, "min")
    with pytest.raises(ValueError):
        promotable(0.5, [], 3, "max")


def test_level_means_use_the_first_n_folds_of_every_config_that_reached_them():
    race = {"0": {"scores": [0.6, 0.5, 0.55]}, "1": {"scores": [0.4]}, "2": {"scores": []},
            "3": {"scores": [0.7, 0.3]}}
    assert level_means(race, 1) == pytest.approx([0.6, 0.4, 0.7])
    assert level_means(race, 2) == pytest.approx([0.55, 0.5])
    assert level_means(race, 3) == pytest.approx([0.55])


def test_racing_setting_is_checked():
    spec = load_space(str(TINY), ROOT / "search_spaces")
    assert spec.search["racing"] is None  # default: no racing
    assert with_overrides(spec, search={"racing": {}}).search["racing"] == {"eta": 3}
    assert with_overrides(spec, search={"racing": {"eta": 2}}).search["racing"] == {"eta": 2}
    assert with_overrides(spec, search={"racing": {"eta": 1}}).search["racing"] == {"eta": 1}  # every fold
    for bad, key in (({"eta": 0}, "search.racing.eta"), ({"rate": 2}, "search.racing.rate"), (3, "search.racing")):
        with pytest.raises(ConfigError) as err:
            with_overrides(spec, search={"racing": bad})
        assert err.value.key == key
    with pytest.raises(ConfigError, match="two-stage"):
        with_overrides(spec, search={"racing": {"eta": 2}, "search_folds": [0]})
    with pytest.raises(ConfigError, match="asha.promotion"):
        with_overrides(spec, search={"racing": {"eta": 2}, "asha": {"promotion": True}})


# -- a race over three folds ----------------------------------------------------------------

# eta 2, 5 new configurations, 3 folds. By hand (config ids are fold 0's Optuna numbers: a=0, b=1,
# c=2, e=3, h=4; "level n" = means over the first n folds of the configs that completed n folds):
#   a, b, c asked on fold 0
#   b completes 0.60     level 1 [0.60]: lone first arrival, promoted           queue [b]
#   a completes 0.40     level 1 [0.60, 0.40]: k = 1, needs 0.60: eliminated
#   d = b on fold 1      (a promotion before a new configuration)
#   c pruned             out of the race (never at level 1)
#   e asked on fold 0    (no promotion queued)
#   e completes 0.70     level 1 [0.60, 0.40, 0.70]: k = 1, 0.70 is the best: promoted   queue [e]
#   d completes 0.50     b's mean 0.55, level 2 [0.55]: promoted                       queue [e, b]
#   f = e on fold 1, g = b on fold 2, h new on fold 0 (the 5th and last), then None: f and h may still earn a fold
#   h completes 0.65     level 1 [.6 .4 .7 .65]: k = 2, needs 0.65 (a tie passes): promoted   queue [h]
#   f completes 0.30     e's mean 0.50, level 2 [0.55, 0.50]: k = 1, needs 0.55: eliminated
#   g completes 0.55     b raced every fold (0.60, 0.50, 0.55)
#   j = h on fold 1, then None (j may earn fold 2)
#   j completes 0.62     h's mean 0.635, level 2 [0.55, 0.50, 0.635]: k = 1, best: promoted
#   l = h on fold 2, then FINISHED (l is on the last fold: it can earn nothing)
EXPECTED_ORDER = [(0, 0), (1, 0), (2, 0), (1, 1), (3, 0), (3, 1), (1, 2), (4, 0), (4, 1), (4, 2)]


def test_a_race_over_three_folds_against_a_hand_computation(tmp_path):
    s = make_searcher(tmp_path, num_samples=5, racing={"eta": 2})
    assert s.total_trials == 15  # Tune's upper bound: every configuration on every fold
    order = []

    def ask(tid):
        config = s.suggest(tid)
        order.append(handed(config))
        return config

    configs = {t: ask(t) for t in "abc"}
    complete(s, "b", 0.60)
    assert s.queue == ["1"]
    complete(s, "a", 0.40)
    assert s.race["0"]["status"] == "eliminated"
    configs["d"] = ask("d")
    pruned(s, "c")
    assert s.race["2"]["status"] == "pruned"
    configs["e"] = ask("e")
    complete(s, "e", 0.70)
    complete(s, "d", 0.50)
    assert s.queue == ["3", "1"]
    for t in "fgh":
        configs[t] = ask(t)
    assert s.suggest("i") is None  # h (fold 0) and f (fold 1) may still earn a fold
    complete(s, "h", 0.65)
    complete(s, "f", 0.30)
    complete(s, "g", 0.55)
    configs["j"] = ask("j")
    assert s.suggest("k") is None
    complete(s, "j", 0.62)
    configs["l"] = ask("l")
    assert s.suggest("m") == Searcher.FINISHED  # only l runs, on the last fold
    complete(s, "l", 0.60)
    assert s.suggest("n") == Searcher.FINISHED

    assert order == EXPECTED_ORDER
    assert {c: e["status"] for c, e in s.race.items()} == {"0": "eliminated", "1": "raced", "2": "pruned",
                                                            "3": "eliminated", "4": "raced"}
    assert s.race["1"]["scores"] == pytest.approx([0.60, 0.50, 0.55])
    assert s.race["4"]["scores"] == pytest.approx([0.65, 0.62, 0.60])
    # a promoted trial's config is its fold-0 config on another fold
    params = {t: {k: v for k, v in c.items() if k != "fold"} for t, c in configs.items()}
    assert params["d"] == params["g"] == params["b"] and params["f"] == params["e"]
    assert params["j"] == params["l"] == params["h"]
    # every trial is in its fold's study, with its config id and its state
    got = {f: [(t.user_attrs["config_id"], t.user_attrs["tune_trial_id"], t.state) for t in stored(tmp_path, f)]
           for f in range(K)}
    C, P = TrialState.COMPLETE, TrialState.PRUNED
    assert got == {0: [(0, "a", C), (1, "b", C), (2, "c", P), (3, "e", C), (4, "h", C)],
                   1: [(1, "d", C), (3, "f", C), (4, "j", C)],
                   2: [(1, "g", C), (4, "l", C)]}
    fold0 = {t.user_attrs["config_id"]: t for t in stored(tmp_path, 0)}
    for fold in (1, 2):
        for t in stored(tmp_path, fold):
            assert t.params == fold0[t.user_attrs["config_id"]].params and t.user_attrs["proposed_by"] == "race"


def test_a_pruned_or_failed_configuration_leaves_the_race(tmp_path):
    s = make_searcher(tmp_path, num_samples=3, racing={"eta": 3})
    assert [handed(s.suggest(t)) for t in "abc"] == [(0, 0), (1, 0), (2, 0)]
    pruned(s, "a")  # stopped by fold 0's ASHA
    s.on_trial_complete("b", None, error=True)  # failed
    assert s.queue == [] and s.suggest("x") is None  # c runs on fold 0
    complete(s, "c", 0.10)  # the only one at level 1: the pruned and the failed one do not count
    assert handed(s.suggest("d")) == (2, 1)
    pruned(s, "d")  # out on fold 1 too
    assert s.suggest("e") == Searcher.FINISHED
    assert {c: e["status"] for c, e in s.race.items()} == {"0": "pruned", "1": "failed", "2": "pruned"}
    assert [t.state for t in stored(tmp_path, 0)] == [TrialState.PRUNED, TrialState.FAIL, TrialState.COMPLETE]


def test_eta_1_runs_every_configuration_on_every_fold(tmp_path):
    """The k-fold evaluation: whatever the scores, each configuration earns every fold."""
    s = make_searcher(tmp_path, num_samples=3, racing={"eta": 1})
    assert [handed(s.suggest(t)) for t in "abc"] == [(0, 0), (1, 0), (2, 0)]
    for tid, best in zip("abc", (0.5, 0.1, 0.3)):
        complete(s, tid, best)
    order = []
    for i in range(6):
        config = s.suggest(f"p{i}")
        order.append(handed(config))
        complete(s, f"p{i}", 0.2)
    assert order == [(0, 1), (1, 1), (2, 1), (0, 2), (1, 2), (2, 2)]
    assert s.suggest("z") == Searcher.FINISHED
    assert {c: len(e["scores"]) for c, e in s.race.items()} == {"0": K, "1": K, "2": K}


def test_the_search_waits_while_a_running_trial_may_earn_a_fold(tmp_path):
    s = make_searcher(tmp_path, num_samples=1, racing={"eta": 2})
    assert handed(s.suggest("a")) == (0, 0)
    assert s.suggest("b") is None
    complete(s, "a", 0.5)
    assert handed(s.suggest("b")) == (0, 1)


def test_a_restored_race_continues_without_asking_a_configuration_twice(tmp_path):
    """The race of the hand computation above, saved mid-race (f = e on fold 1 running, b queued for fold
    2); a trial asked after the save (g = b on fold 2) is never run by Tune: the orphan is failed and b is
    handed out on fold 2 once more, then the race finishes as without the restore."""
    first = make_searcher(tmp_path, num_samples=5, racing={"eta": 2})
    for t in "abc":
        first.suggest(t)
    complete(first, "b", 0.60)
    complete(first, "a", 0.40)
    first.suggest("d")
    pruned(first, "c")
    first.suggest("e")
    complete(first, "e", 0.70)
    complete(first, "d", 0.50)
    f_config = first.suggest("f")
    ckpt = tmp_path / "searcher.json"
    first.save(str(ckpt))
    assert handed(first.suggest("g")) == (1, 2)  # asked after the last save: the driver dies

    second = make_searcher(tmp_path, num_samples=5, racing={"eta": 2})
    second.restore(str(ckpt))
    assert second.suggest("f") == f_config  # the restored running trial: the same config, no new trial
    order = [handed(second.suggest(t)) for t in ("g2", "h")]
    assert order == [(1, 2), (4, 0)] and second.suggest("i") is None
    complete(second, "h", 0.65)
    complete(second, "f", 0.30)
    complete(second, "g2", 0.55)
    assert handed(second.suggest("j")) == (4, 1)
    complete(second, "j", 0.62)
    assert handed(second.suggest("l")) == (4, 2) and second.suggest("m") == Searcher.FINISHED
    complete(second, "l", 0.60)

    by_fold = {f: [(t.user_attrs["config_id"], t.user_attrs["tune_trial_id"], t.state) for t in stored(tmp_path, f)]
               for f in range(K)}
    assert by_fold[2] == [(1, "g", TrialState.FAIL), (1, "g2", TrialState.COMPLETE), (4, "l", TrialState.COMPLETE)]
    ran = [(c, f) for f, trials in by_fold.items() for c, _, state in trials if state != TrialState.FAIL]
    assert sorted(ran) == sorted(EXPECTED_ORDER)  # each (config, fold) trained once, as without the restore
    assert {c: e["status"] for c, e in second.race.items()} == {"0": "eliminated", "1": "raced", "2": "pruned",
                                                                 "3": "eliminated", "4": "raced"}


def test_a_trial_that_resume_reconcile_adds_is_taken_off_the_queue(tmp_path):
    """tune/resume.py recomputes the live trials from Tune's experiment state, which may be a snapshot newer
    than this state: a promotion the saved state still queues but Tune already runs is not handed out again,
    and one that ended after the save is judged from its study."""
    first = make_searcher(tmp_path, num_samples=2, racing={"eta": 2})
    first.suggest("a")
    complete(first, "a", 0.5)  # queued for fold 1
    state = first.get_state()  # saved here
    config = first.suggest("b")  # a on fold 1: in Tune's newer experiment state
    (number,) = [t.number for t in stored(tmp_path, 1)]
    state["live"] = {"b": {"fold": 1, "number": number, "config": config}}  # what reconcile writes
    state["suggested"] = {"0": 1, "1": 1, "2": 0}

    second = make_searcher(tmp_path, num_samples=2, racing={"eta": 2})
    second.set_state(state)
    assert second.queue == [] and second.race["0"]["status"] == "running"
    assert handed(second.suggest("c")) == (1, 0)  # the second new configuration, not a again
    complete(second, "b", 0.4)
    assert handed(second.suggest("d")) == (0, 2)


# -- the report's racing table --------------------------------------------------------------


def race_rows(tmp_path: Path | None = None) -> list[dict]:
    """trials.csv rows of a racing run over 3 folds (config id, fold, status, best score)."""
    spec = [("a", "0", 0, "completed", 0.50), ("b", "1", 0, "completed", 0.60), ("c", "2", 0, "stopped", 0.70),
            ("e", "3", 0, "completed", 0.40), ("d", "1", 1, "completed", 0.50), ("f", "0", 1, "completed", 0.62),
            ("g", "1", 2, "completed", 0.55), ("h", "0", 2, "stopped", 0.30), ("x", "4", 0, "error", "")]
    rows = []
    for tid, cid, fold, status, score in spec:
        ckpt = ""
        if tmp_path is not None and status != "error":
            ckpt = tmp_path / tid / "model.pt"
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            ckpt.write_text("weights")
        rows.append({"trial_id": tid, "fold": str(fold), "status": status, "retrain": "False", "config_id": cid,
                     "epochs": "3" if status == "completed" else "2", "best_val_miou": str(score),
                     "checkpoint": str(ckpt), "param:loss.name": "ce" if cid in "02" else "dice"})
    return rows


def test_race_configs_join_a_configurations_folds():
    from trainables.runfiles import race_configs

    got = [(c["config_id"], sorted(c["rows"]), c["scores"], round(c["mean"], 6) if c["scores"] else None)
           for c in race_configs(race_rows(), "val_miou", "max")]
    # by hand: 1 completed 3 folds (0.60, 0.50, 0.55: mean 0.55); 0 completed 2 (0.50, 0.62: 0.56) and was
    # stopped on fold 2; 3 completed 1 (0.40); 2 was stopped on fold 0; 4 errored (not finished)
    assert got == [("1", [0, 1, 2], {0: 0.60, 1: 0.50, 2: 0.55}, 0.55), ("0", [0, 1, 2], {0: 0.50, 1: 0.62}, 0.56),
                   ("3", [0], {0: 0.40}, 0.40), ("2", [0], {}, None)]
    assert race_configs([{k: v for k, v in r.items() if k != "config_id"} for r in race_rows()],
                        "val_miou", "max") == []


def test_the_report_shows_each_configurations_folds_and_mean():
    from tune.report_crossfold import crossfold_html, race_table_rows

    header, body = race_table_rows(race_rows(), "val_miou", "max")
    assert header == ["rank", "config", "fold 0", "fold 1", "fold 2", "folds", "mean val_miou", "loss.name"]
    assert [[("nan" if math.isnan(c) else round(c, 6)) if isinstance(c, float) else c for c in row] for row in body] == [
        [1, "1", 0.60, 0.50, 0.55, 3, 0.55, "dice"],
        [2, "0", 0.50, 0.62, "stopped 0.3", 2, 0.56, "ce"],
        [3, "3", 0.40, "", "", 1, 0.40, "dice"],
        [4, "2", "stopped 0.7", "", "", 0, "nan", "ce"]]
    assert "Racing: configurations across folds" in crossfold_html(race_rows(), "val_miou", "max")
    plain = [{k: v for k, v in r.items() if k != "config_id"} for r in race_rows()]
    assert "Racing" not in crossfold_html(plain, "val_miou", "max")


@pytest.mark.filterwarnings("ignore:The reported value is ignored")  # the re-run's epochs, already reported
def test_a_judged_trial_that_tune_runs_again_keeps_its_promotion(tmp_path):
    """The saved state is newer than Tune's: a fold-0 trial already judged (and promoted) is restored by Tune
    as running (reconcile puts it back among the live trials); its promotion stands and it is not judged again."""
    first = make_searcher(tmp_path, num_samples=1, racing={"eta": 2})
    config = first.suggest("a")
    complete(first, "a", 0.5)
    state = first.get_state()
    state["live"] = {"a": {"fold": 0, "number": 0, "config": config}}  # what reconcile writes
    second = make_searcher(tmp_path, num_samples=1, racing={"eta": 2})
    second.set_state(state)
    assert second.queue == ["0"] and second.race["0"]["status"] == "queued"
    assert second.suggest("a") == config
    assert handed(second.suggest("b")) == (0, 1)
    complete(second, "a", 0.1)  # run again: the study keeps its first result, the race its judgement
    assert second.race["0"]["scores"] == [0.5] and [t.value for t in stored(tmp_path, 0)] == [0.5]
    complete(second, "b", 0.4)
    assert handed(second.suggest("c")) == (0, 2)


# -- a Ray run of tune/run.py ---------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_a_racing_run_end_to_end(tmp_path):
    """tune/run.py with racing on CamVid (2 folds, 2 configurations, 2 epochs): Tune ends when the race
    does, trials.csv joins each fold-1 trial to a configuration that completed fold 0, with its parameters."""
    from tests.tune.test_tune import (
        TRAIN_JSON,
        clean_up_ray,
        cli,
        private_ray_dir,
        read_rows,
        run_args,
        scratch_dir,
        tail,
    )

    if not TRAIN_JSON.exists():
        pytest.skip(f"CamVid not found at {TRAIN_JSON}")
    space = tmp_path / "race.yaml"
    space.write_text(TINY.read_text().replace("search:\n", "search:\n  racing: {eta: 2}\n", 1))
    base = scratch_dir("race")
    ray_dir = private_ray_dir()
    try:
        proc = cli(*run_args(base / "runs", "race", "--num-samples", "2", "--max-epochs", "2", "--space", space),
                   ray_dir=ray_dir, cache=base / "cache", timeout=900)
    finally:
        clean_up_ray(ray_dir)
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr)
    run_dir = base / "runs" / "race"
    rows = read_rows(run_dir / "trials.csv")
    fold0 = {r["config_id"]: r for r in rows if r["fold"] == "0"}
    later = [r for r in rows if r["fold"] == "1"]
    assert len(fold0) == 2 and len(rows) <= 4 and later  # the first configuration to complete fold 0 passes
    params = lambda r: {k: v for k, v in r.items() if k.startswith("param:")}
    for r in later:
        assert fold0[r["config_id"]]["status"] == "completed" and params(r) == params(fold0[r["config_id"]])
    storage = f"sqlite:///{run_dir / 'studies.db'}"
    for fold in (0, 1):
        trials = optuna.load_study(study_name=study_name("tiny", fold), storage=storage).trials
        assert {str(t.user_attrs["config_id"]) for t in trials} == {r["config_id"] for r in rows
                                                                  if r["fold"] == str(fold)}
    shutil.rmtree(base, ignore_errors=True)
