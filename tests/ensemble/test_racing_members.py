"""Ensemble members of a racing run (tune/racing.py): the configurations that completed every fold, one
member per fold each, ranked by their mean over the folds (ensemble/members.py)."""
from __future__ import annotations

from ensemble.members import race_top_k, top_k
from tests.tune.test_racing import race_rows


def ids(members):
    return {f: [r["trial_id"] for r in rows] for f, rows in members.items()}


def test_a_racing_run_takes_the_configurations_that_ran_every_fold(tmp_path):
    rows = race_rows(tmp_path)
    # only configuration 1 (trials b, d, g) completed all 3 folds; 0 was stopped on fold 2
    assert ids(top_k(rows, "val_miou", "max", 3, num_folds=3)) == {0: ["b"], 1: ["d"], 2: ["g"]}
    assert ids(top_k(rows, "val_miou", "max", 3)) == {0: ["b"], 1: ["d"], 2: ["g"]}  # folds from trials.csv
    # configuration 0 completes fold 2 too: both, the better mean first (0: 0.50, 0.62, 0.60 -> 0.5733 > 0.55)
    for r in rows:
        if r["trial_id"] == "h":
            r.update(status="completed", best_val_miou="0.60")
    assert ids(top_k(rows, "val_miou", "max", 3)) == {0: ["a", "b"], 1: ["f", "d"], 2: ["h", "g"]}
    assert ids(top_k(rows, "val_miou", "max", 1)) == {0: ["a"], 1: ["f"], 2: ["h"]}


def test_without_a_configuration_on_every_fold_members_are_chosen_per_fold(tmp_path):
    rows = race_rows(tmp_path)
    assert race_top_k(rows, "val_miou", "max", 2, num_folds=4) is None  # nobody reached fold 3
    # per fold as without racing: completed trials only where a fold has one
    assert ids(top_k(rows, "val_miou", "max", 2, num_folds=4)) == {0: ["b", "a"], 1: ["f", "d"], 2: ["g"]}
    plain = [{k: v for k, v in r.items() if k != "config_id"} for r in rows]
    assert race_top_k(plain, "val_miou", "max", 2) is None
