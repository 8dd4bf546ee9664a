"""reuse_actors: a search of short trials with each trial in a new worker process against reused workers.

The search of ``bench/spaces/search.yaml`` on the shipped CamVid sample (2 folds of 36 images),
6 trials per fold of 3 epochs with 4 batches each, ASHA with grace period 1, 2 trials at a time,
one CPU each, runs with ``resources.reuse_actors`` false (Tune starts a process per trial, which
imports torch, smp and Ray's trainable again) and true (a finished trial's worker runs the next
trial), alternating (off, on, off, on: 2 repetitions; ``--quick``: 1, with 3 trials per fold).

Rows: wall seconds of the whole search (``run_search``: trials, Tune's bookkeeping) per trained
epoch, since ASHA's stops depend on when trials report and so differ between the runs, and the
searches' wall times. Target: reused workers take <= 0.8x the seconds per epoch.
"""
from __future__ import annotations

import contextlib
import io
import os
import time

os.environ.setdefault("RAY_worker_niceness", "0")  # before Ray starts, as bench/search_efficiency.py

from bench import common  # noqa: E402

NAME = "reuse_actors"
TARGET = "seconds per trained epoch of a search with reused workers <= 0.8x with a process per trial"
RATIO = 0.8


def spec_for(cache_dir, quick: bool, reuse: bool):
    from tune.space import load_space, with_overrides

    spec = load_space(str(common.BENCH / "spaces" / "search.yaml"), common.ROOT / "search_spaces")
    return with_overrides(spec, fixed={"data.path": str(common.SAMPLE), "data.cache_dir": str(cache_dir),
                                       "train.epochs": 3, "train.max_train_batches": 4},
                          search={"num_samples": 3 if quick else 6, "asha": {"grace_period": 1}},
                          resources={"reuse_actors": reuse})


def run(quick: bool) -> dict:
    from tune.search import run_search

    reps = 1 if quick else 2
    walls: dict[bool, list[float]] = {False: [], True: []}
    per_epoch: dict[bool, list[float]] = {False: [], True: []}
    epochs: dict[bool, list[int]] = {False: [], True: []}
    with common.scratch("reuse") as tmp, common.private_ray() as info:
        common.load_data(common.SAMPLE, tmp / "cache")  # rasterise the masks before the first search
        for rep in range(reps):
            for reuse in (False, True):
                run_dir = tmp / f"run-{rep}-{int(reuse)}"
                start = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    rows = run_search(spec_for(tmp / "cache", quick, reuse), run_dir)
                wall = time.perf_counter() - start
                trained = sum(int(float(r["epochs"] or 0)) for r in rows)
                walls[reuse].append(wall)
                epochs[reuse].append(trained)
                per_epoch[reuse].append(wall / max(trained, 1))
                common.log(f"  reuse_actors {reuse}, repetition {rep}: {wall:.1f}s, {trained} epochs, "
                           f"{len(rows)} trials {sorted({r['status'] for r in rows})}")
    ratio = common.safe_ratio(common.median(per_epoch[True]), common.median(per_epoch[False]))
    rows = [
        common.row("search seconds per trained epoch", common.side("reused", per_epoch[True], "s"),
                   common.side("process per trial", per_epoch[False], "s"), ratio, f"<= {RATIO}",
                   ratio is not None and ratio <= RATIO),
        common.row("search wall time", common.side("reused", walls[True], "s"),
                   common.side("process per trial", walls[False], "s"),
                   common.safe_ratio(common.median(walls[True]), common.median(walls[False])), "info"),
    ]
    return common.result(NAME, TARGET, rows, {"quick": quick, "ray_init_s": info["init_s"], "epochs": {
        "reused": epochs[True], "process_per_trial": epochs[False]}})


if __name__ == "__main__":
    common.bench_main(NAME, TARGET, run)
