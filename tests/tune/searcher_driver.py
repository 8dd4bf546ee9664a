"""Driving a Tune searcher without Ray, as Tune does (tests/tune/test_shared_search.py, test_racing.py)."""
from __future__ import annotations

from pathlib import Path

import optuna

from tune.searcher import study_name


def run_epochs(searcher, trial_id: str, scores: list[float]) -> dict:
    """One result per epoch as Tune passes them; the last (the one a scheduler stopped on) only to
    on_trial_complete."""
    best = None
    for epoch, score in enumerate(scores, 1):
        best = score if best is None else max(best, score)
        result = {"epoch": epoch, "val_miou": score, "best_score": best, "best_epoch": scores.index(best) + 1}
        if epoch < len(scores):
            searcher.on_trial_result(trial_id, result)
    searcher.on_trial_complete(trial_id, result)
    return result


def stored(tmp_path: Path, fold: int, experiment: str = "t") -> list[optuna.trial.FrozenTrial]:
    """The trials of ``fold``'s study in ``tmp_path/s.db``."""
    return optuna.load_study(study_name=study_name(experiment, fold), storage=f"sqlite:///{tmp_path}/s.db").trials


def tpe_proposals(trials: int, startup: int) -> int:
    """How many of ``trials`` Optuna's TPE proposes (rather than its start-up sampler drawing them at
    random) in one study run one trial at a time with ``n_startup_trials=startup``: counted, not computed."""
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=startup, constant_liar=True)
    drawn = set()
    at_random = sampler._random_sampler.sample_independent

    def counted(study, trial, name, dist):
        drawn.add(trial.number)
        return at_random(study, trial, name, dist)

    sampler._random_sampler.sample_independent = counted
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1) - 0.3) ** 2, n_trials=trials)
    return trials - len(drawn)
