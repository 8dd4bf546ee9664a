"""The search's progress view (tune/progress.py), driven with recorded trial states: one table of
trials per fold, the best so far, elapsed time and an upper bound of the time left; short lines
into a file, a table redrawn in place on a terminal; the random-init notice once per search."""
from __future__ import annotations

import io
import time
from types import SimpleNamespace

from trainables.models import RANDOM_INIT
from tune.progress import FoldProgress

MAX_EPOCHS = 6


def trial(tid, fold, status, epoch=None, score=None, weights="imagenet", **config):
    result = None if epoch is None else {"epoch": epoch, "val_miou": score, "best_score": score, "weights": weights}
    return SimpleNamespace(trial_id=tid, status=status, config={"fold": fold, "loss.name": "ce", **config},
                           last_result=result, path=f"/runs/x/tune/fold{fold}_{tid}")


def trials():
    return [trial("done0", 0, "TERMINATED", 6, 0.30), trial("stop0", 0, "TERMINATED", 2, 0.12345678),
            trial("run0", 0, "RUNNING", 3, 0.25), trial("run1", 1, "RUNNING", 1, 0.05), trial("new1", 1, "PENDING")]


def reporter(live: bool, weights="imagenet", elapsed: float = 100.0) -> tuple[FoldProgress, io.StringIO]:
    out = io.StringIO()
    rep = FoldProgress("val_miou", "max", MAX_EPOCHS, total_trials=7, weights=weights, stream=out, live=live)
    rep._start_time = time.time() - elapsed  # what Tune's setup sets when the experiment starts
    return rep, out


def test_each_fold_shows_its_trials_statuses_and_best_so_far():
    table, short = reporter(live=True)[0].summary(trials())
    text = "\n".join(table)
    assert "fold 0  1 done, 1 running, 1 stopped  best val_miou 0.3 (done0)" in text
    assert "fold 1  1 pending, 1 running  best val_miou 0.05 (run1)" in text
    row = next(line for line in table if line.lstrip().startswith("stop0")).split()
    assert row[:5] == ["stop0", "stopped", "2/6", "0.1235", "0.1235"] and row[5] == "ce"
    assert next(line for line in table if line.lstrip().startswith("run0")).split()[1:3] == ["running", "3/6"]
    assert short[0] == "fold 0: 1 done, 1 running, 1 stopped; best val_miou 0.3 (done0); run0 epoch 3/6"


def test_time_left_is_every_planned_epoch_at_the_pace_so_far():
    rep, _ = reporter(live=False, elapsed=100.0)
    line = rep.clock_line(trials(), done=False)
    # ran 6 + 2 + 3 + 1 = 12 epochs; planned: 6 + 2 (finished) + 6 + 6 + 6 (unfinished) + 2 trials not yet
    # created x 6 = 38; 100 s / 12 epochs x 26 epochs to go = 216.7 s
    assert "trials 2/7 finished; epochs 12 of at most 38" in line
    assert line.endswith("at most 03:36 left at this pace")


def test_into_a_file_short_lines_then_the_whole_table_at_the_end():
    rep, out = reporter(live=False)
    rep.report(trials(), False)
    lines = out.getvalue().splitlines()
    assert len([line for line in lines if line]) == 3 and "\x1b" not in out.getvalue()  # one per fold + clock
    rep.report(trials(), True)
    final = out.getvalue().splitlines()[len(lines):]
    assert all(any(line.lstrip().startswith(t.trial_id) for line in final) for t in trials())
    assert "left at this pace" not in final[-1]


def test_on_a_terminal_the_view_is_redrawn_in_place():
    rep, out = reporter(live=True)
    rep.report(trials(), False)
    first = out.getvalue()
    rep.report(trials(), False)
    second = out.getvalue()[len(first):]
    assert second.startswith(f"\x1b[{len(first.splitlines())}F\x1b[J")


def test_random_init_is_noted_once_per_search():
    rep, out = reporter(live=False)
    fresh = [trial("a", 0, "RUNNING", 1, 0.1, weights=RANDOM_INIT), trial("b", 1, "RUNNING", 1, 0.1,
                                                                          weights=RANDOM_INIT)]
    rep.report(fresh, False)
    rep.report(fresh, False)
    assert out.getvalue().count("RANDOM INIT") == 1 and "/runs/x/tune/fold0_a/stderr" in out.getvalue()
    quiet, out = reporter(live=False, weights=None)  # random init asked for: nothing to note
    quiet.report(fresh, False)
    assert "RANDOM INIT" not in out.getvalue()


def test_a_failed_trial_says_where_its_error_is():
    failed = trial("bad0", 0, "ERROR", 1, 0.1)
    failed.error_file = "/runs/x/tune/fold0_bad0/error.txt"
    table, _ = reporter(live=False)[0].summary([failed, *trials()], done=True)
    assert "  bad0 failed: /runs/x/tune/fold0_bad0/error.txt" in table
    assert table[0].startswith("fold 0  1 done, 1 failed, 1 running, 1 stopped")


def test_into_a_file_an_unchanged_view_is_not_printed_again():
    rep, out = reporter(live=False)
    rep.report(trials(), False)
    printed = out.getvalue()
    rep.report(trials(), False)  # nothing happened but time passing
    assert out.getvalue() == printed
    moved = trials()
    moved[2].last_result = {**moved[2].last_result, "epoch": 4}
    rep.report(moved, False)
    assert "run0 epoch 4/6" in out.getvalue()[len(printed):]
