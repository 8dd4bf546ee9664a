"""One TPE model across the folds (``search.share_folds``, tune/searcher.py), without Ray: the per-fold
normalisation against a hand computation, start-up trials counted over the folds, the proposal being
TPE's over exactly the normalised history, and a save/restore that re-runs no trial."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from ray.tune.search import Searcher

from tune.searcher import FoldedOptunaSearch, fold_offset, random_start_warning, shared_history
from tune.space import load_space, with_overrides

from tests.tune.searcher_driver import run_epochs, stored, tpe_proposals

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "spaces" / "tiny.yaml"
LR = FloatDistribution(1e-4, 1e-2, log=True)
LOSS = CategoricalDistribution(["ce", "dice"])


def trial(state, lr, values: dict, value=None):
    return create_trial(state=state, value=value, params={"optimizer.lr": lr, "loss.name": "ce"},
                        distributions={"optimizer.lr": LR, "loss.name": LOSS},
                        intermediate_values=values if state != TrialState.RUNNING or values else None)


def make_searcher(tmp_path: Path, **search) -> FoldedOptunaSearch:
    spec = with_overrides(load_space(str(TINY), ROOT / "search_spaces"), search=search)
    return FoldedOptunaSearch(spec, num_folds=2, num_classes=11, storage=f"sqlite:///{tmp_path}/s.db",
                              experiment="t", max_epochs=3)


def test_fold_offset_and_shared_history_against_a_hand_computation():
    fold0 = [trial(TrialState.PRUNED, 1e-3, {1: 0.20, 2: 0.30}, 0.30),
             trial(TrialState.PRUNED, 2e-3, {1: 0.25, 2: 0.40}, 0.40),
             trial(TrialState.COMPLETE, 3e-3, {1: 0.3, 2: 0.50, 3: 0.60}, 0.60),
             trial(TrialState.FAIL, 4e-3, {1: 0.9})]
    fold1 = [trial(TrialState.PRUNED, 5e-3, {1: 0.05, 2: 0.10}, 0.10),
             trial(TrialState.COMPLETE, 6e-3, {1: 0.1, 2: 0.20, 3: 0.35}, 0.35),
             trial(TrialState.RUNNING, 7e-3, {1: 0.1, 2: 0.15})]
    fold2 = [trial(TrialState.RUNNING, 8e-3, {1: 0.7})]  # no score at the rung yet
    # by hand: the median at epoch 2 (running trials' reports count, a failed trial's do not)
    assert fold_offset(fold0, 2) == pytest.approx(0.40)
    assert fold_offset(fold1, 2) == pytest.approx(0.15)  # median of 0.10, 0.20, 0.15
    assert fold_offset(fold2, 2) is None
    assert fold_offset(fold0, None) == pytest.approx(0.60) and fold_offset(fold1, None) == pytest.approx(0.35)

    history = shared_history({0: fold0, 1: fold1, 2: fold2}, 2)
    got = [(t.state, t.params["optimizer.lr"], None if t.value is None else round(t.value, 6),
            {s: round(v, 6) for s, v in t.intermediate_values.items()}) for t in history]
    assert got == [
        (TrialState.PRUNED, 1e-3, -0.10, {1: -0.20, 2: -0.10}),
        (TrialState.PRUNED, 2e-3, 0.0, {1: -0.15, 2: 0.0}),
        (TrialState.COMPLETE, 3e-3, 0.20, {1: -0.10, 2: 0.10, 3: 0.20}),
        (TrialState.PRUNED, 5e-3, -0.05, {1: -0.10, 2: -0.05}),
        (TrialState.COMPLETE, 6e-3, 0.20, {1: -0.05, 2: 0.05, 3: 0.20}),
        (TrialState.RUNNING, 7e-3, None, {}),  # the liar's: parameters only
        (TrialState.RUNNING, 8e-3, None, {}),
    ]


def test_start_up_trials_count_over_the_folds_when_shared(tmp_path):
    """Two start-up trials: shared, the third trial (fold 0's second) is TPE's; per fold it is random
    until each fold has two finished trials of its own."""
    for share, expected in ((True, ["random", "random", "tpe", "tpe"]), (False, ["random"] * 4)):
        (tmp_path / str(share)).mkdir()
        searcher = make_searcher(tmp_path / str(share), num_samples=3, n_startup_trials=2, share_folds=share)
        got = []
        for i, scores in enumerate(([0.3, 0.4], [0.1, 0.2], [0.5], [0.3])):
            config = searcher.suggest(f"t{i}")
            assert config["fold"] == i % 2  # the searcher assigns the fold, round robin
            run_epochs(searcher, f"t{i}", scores)
        for fold in (0, 1):
            for t in stored(tmp_path / str(share), fold):
                got.append((t.number * 2 + fold, t.user_attrs["proposed_by"]))
        assert [p for _, p in sorted(got)] == expected, share


def test_the_shared_proposal_is_tpe_over_the_normalised_history(tmp_path):
    """The proposal equals a TPE sampler's given the hand-normalised trials of both folds, and the fold's
    study records exactly the proposed parameters."""
    searcher = make_searcher(tmp_path, num_samples=4, n_startup_trials=2, share_folds=True)
    runs = {"a": [0.30, 0.40], "b": [0.10, 0.12], "c": [0.50, 0.60, 0.65], "d": [0.08, 0.20, 0.30]}
    configs = {}
    for tid, scores in runs.items():
        configs[tid] = searcher.suggest(tid)
        run_epochs(searcher, tid, scores)
    # fold 0 (a, c): epoch-1 scores 0.30, 0.50, median 0.40; fold 1 (b, d): 0.10, 0.08, median 0.09
    # (the tiny space's first rung is epoch 1)
    offsets = {"a": 0.40, "c": 0.40, "b": 0.09, "d": 0.09}
    reference = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(
        seed=int(np.random.SeedSequence([0, 4]).generate_state(1)[0]), n_startup_trials=2, constant_liar=True))
    for tid in ("a", "c", "b", "d"):  # fold 0's trials, then fold 1's, as the searcher reads the studies
        scores, off = runs[tid], offsets[tid]
        complete = len(scores) == 3  # max_epochs 3
        reference.add_trial(create_trial(
            state=TrialState.COMPLETE if complete else TrialState.PRUNED,
            value=(max(scores) if complete else scores[-1]) - off,
            params={k: v for k, v in configs[tid].items() if k != "fold"},
            distributions={"optimizer.lr": LR, "loss.name": LOSS},
            intermediate_values={e: s - off for e, s in enumerate(scores, 1)}))
    expected = reference.ask()
    expected_params = {"optimizer.lr": expected.suggest_float("optimizer.lr", 1e-4, 1e-2, log=True),
                       "loss.name": expected.suggest_categorical("loss.name", ["ce", "dice"])}
    proposed = searcher.suggest("e")
    assert proposed["fold"] == 0
    assert {k: v for k, v in proposed.items() if k != "fold"} == expected_params
    (record,) = [t for t in stored(tmp_path, 0) if t.user_attrs.get("tune_trial_id") == "e"]
    assert record.params == expected_params and record.user_attrs["proposed_by"] == "tpe"


def test_a_restored_shared_search_continues_without_running_a_trial_again(tmp_path):
    first = make_searcher(tmp_path, num_samples=3, n_startup_trials=2, share_folds=True)
    configs = {tid: first.suggest(tid) for tid in ("a", "b", "c")}  # folds 0, 1, 0
    run_epochs(first, "a", [0.3, 0.4])
    run_epochs(first, "b", [0.1, 0.2, 0.3])
    ckpt = tmp_path / "searcher.json"
    first.save(str(ckpt))
    assert first.suggest("d")["fold"] == 1  # asked after the last save: the driver dies

    second = make_searcher(tmp_path, num_samples=3, n_startup_trials=2, share_folds=True)
    second.restore(str(ckpt))
    assert second.suggest("c") == configs["c"]  # the restored running trial: the same config, no new trial
    new = [second.suggest(t) for t in ("e", "f", "g")]
    assert [c["fold"] for c in new] == [1, 0, 1] and second.suggest("h") == Searcher.FINISHED
    by_id = {t.user_attrs["tune_trial_id"]: t for f in (0, 1) for t in stored(tmp_path, f)}
    assert by_id["d"].state == TrialState.FAIL  # the orphan Tune never ran
    assert sorted(by_id) == ["a", "b", "c", "d", "e", "f", "g"]  # each asked once
    assert all(by_id[t].user_attrs["proposed_by"] == "tpe" for t in ("e", "f", "g"))  # a and b count over folds
    for tid in ("c", "e", "f", "g"):
        run_epochs(second, tid, [0.2, 0.3])
    assert second.live == {}
    assert {t.state for f in (0, 1) for t in stored(tmp_path, f)} == {TrialState.PRUNED, TrialState.COMPLETE,
                                                                      TrialState.FAIL}


@pytest.mark.parametrize("num_samples,startup,folds", [(8, 10, 2), (8, 10, 5), (4, 10, 2), (16, 10, 5)])
def test_shared_start_up_warning_counts_every_fold(num_samples, startup, folds):
    """Held against Optuna: one study fed ``num_samples * folds`` trials one at a time, counting the trials
    its start-up sampler drew."""
    total = num_samples * folds
    proposed = tpe_proposals(total, startup)
    warning = random_start_warning({"num_samples": num_samples, "n_startup_trials": startup, "share_folds": True},
                                   folds)
    if proposed == 0:
        assert "TPE never proposes one" in warning
    elif 2 * proposed < total:
        assert f"TPE proposes at most {proposed} trials over the {folds} folds together" in warning
    else:
        assert warning is None


def test_racing_start_up_warning_counts_the_new_configurations():
    """Racing: TPE proposes only the num_samples new configurations (promotions repeat them)."""
    never = random_start_warning({"num_samples": 8, "n_startup_trials": 10, "share_folds": True, "racing": {"eta": 3}},
                                 5)
    assert "TPE never proposes one" in never and "configurations, racing" in never
    assert random_start_warning({"num_samples": 40, "n_startup_trials": 10, "racing": {"eta": 3}}, 5) is None


def test_a_searcher_pickled_before_share_folds_resumes_with_per_fold_studies(tmp_path):
    """Tuner.restore unpickles the searcher the run began with: one from before share_folds existed has
    neither attribute and goes on as it began."""
    searcher = make_searcher(tmp_path, num_samples=2, share_folds=True)
    del searcher.__dict__["share_folds"], searcher.__dict__["reference_step"]
    config = searcher.suggest("a")
    assert config["fold"] == 0 and not searcher.share_folds
    (record,) = stored(tmp_path, 0)
    assert record.user_attrs["proposed_by"] == "random" and not record.system_attrs.get("fixed_params")
