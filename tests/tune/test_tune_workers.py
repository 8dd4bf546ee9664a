"""Trials larger than one process: ``resources.workers_per_trial`` runs each trial as a Ray Train run.

The checks of the setting run without Ray; the ``slow`` test runs ``tune/run.py`` with two gloo
workers per trial on the shipped sample (2 folds x 1 trial, 2 epochs of 2 batches) and loads the
checkpoints ``trials.csv`` names the way the ensemble does.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.tune.test_tune import TINY, clean_up_ray, cli, private_ray_dir, scratch  # noqa: F401 (a fixture)
from trainables.errors import ConfigError
from tune.cluster import local_resources
from tune.search import check_trial_fits
from tune.space import load_space, with_overrides
from tune.train_adapter import TRAIN_DIR, check_workers, concurrent_trials, trial_demand

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_JSON = ROOT / "data" / "camvid-sample" / "train" / "annotations.json"


def resources(**kw) -> dict:
    return with_overrides(load_space(TINY, ROOT / "search_spaces"), resources=kw).resources


def test_workers_per_trial_is_validated_and_defaults_to_one():
    assert load_space(TINY, ROOT / "search_spaces").resources["workers_per_trial"] == 1
    assert resources(workers_per_trial=4)["workers_per_trial"] == 4
    for bad in (0, 1.5, "2"):
        with pytest.raises(ConfigError, match="workers_per_trial"):
            resources(workers_per_trial=bad)


def test_a_trial_counts_all_its_workers():
    res = resources(workers_per_trial=4, cpus_per_trial=2, gpus_per_trial=1)
    assert trial_demand(res) == (8.0, 4.0)
    assert concurrent_trials(res, {"CPU": 16.0, "GPU": 8.0}) == 2  # GPUs: 8 // 4
    assert concurrent_trials(res, {"CPU": 12.0, "GPU": 8.0}) == 1  # CPUs: 12 // 8
    assert concurrent_trials(res, {"CPU": 4.0}) == 1  # an autoscaling cluster before its GPU nodes start
    assert concurrent_trials(resources(workers_per_trial=2), {"CPU": 7.0}) == 3  # no GPU asked


def test_workers_of_a_trial_do_not_share_a_gpu():
    check_workers(resources(workers_per_trial=1, gpus_per_trial=0.5), "x.yaml")  # packing one-process trials
    check_workers(resources(workers_per_trial=2, gpus_per_trial=1), "x.yaml")
    with pytest.raises(ConfigError, match="per worker and must be whole"):
        check_workers(resources(workers_per_trial=2, gpus_per_trial=0.5), "x.yaml")


def test_local_fit_check_counts_the_workers():
    cpus, _ = local_resources()
    n = int(cpus) + 1  # one worker more than this machine has CPUs
    check_trial_fits(resources(workers_per_trial=1, cpus_per_trial=1), "x.yaml")
    with pytest.raises(ConfigError, match=f"a trial of {n} workers asks for {n} CPUs"):
        check_trial_fits(resources(workers_per_trial=n, cpus_per_trial=1), "x.yaml")


@pytest.mark.ray
@pytest.mark.slow
def test_two_worker_search_completes_and_its_checkpoints_load(scratch):  # noqa: F811
    import torch

    from ensemble.members import local_checkpoint, top_k
    from trainables.checkpoint import load_checkpoint, model_from_checkpoint

    base, ray_dir = scratch, private_ray_dir()
    run_dir = base / "runs" / "w2"
    args = ["--space", str(TINY), "--data", str(SAMPLE_JSON), "--storage", str(base / "runs"), "--name", "w2",
            "--folds", "2", "--num-samples", "1", "--max-epochs", "2", "--workers-per-trial", "2",
            "--cpus-per-trial", "1", "--max-concurrent", "1", "--wandb", "disabled",
            "--set", "train.max_train_batches=2"]
    try:
        proc = cli(*args, ray_dir=ray_dir, cache=base / "cache", timeout=1200)
    finally:
        clean_up_ray(ray_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    with open(run_dir / "trials.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["fold"] for r in rows) == ["0", "1"] and all(r["status"] == "completed" for r in rows), rows
    for row in rows:
        # the weights are in the trial's own Ray Train run, not a Tune checkpoint
        assert f"/tune/{TRAIN_DIR}/fold{row['fold']}_{row['trial_id']}/checkpoint_epoch" in row["checkpoint"], row
        assert {"model.pt", "state.pt"} <= {p.name for p in Path(row["checkpoint"]).parent.iterdir()}
    members = top_k(rows, "val_miou", "max", 1)  # the ensemble's member choice checks the files exist
    for fold, (row,) in members.items():
        ckpt = load_checkpoint(local_checkpoint(row["checkpoint"], base / "cache-ckpt"))
        assert ckpt["fold"] == fold and ckpt["epoch"] == int(row["best_epoch"])
        assert ckpt["score"] == pytest.approx(float(row["best_val_miou"]), abs=1e-9)
        model = model_from_checkpoint(ckpt).eval()
        with torch.no_grad():
            assert model(torch.zeros(1, 3, 64, 96)).shape[1] == len(ckpt["class_names"])
        # every epoch reported rank 0's metrics, with where the best weights are
        results = [json.loads(line) for line in
                   (run_dir / "tune" / f"fold{fold}_{row['trial_id']}" / "result.json").read_text().splitlines()]
        assert [r["epoch"] for r in results] == [1, 2] and all(r["best_checkpoint"] for r in results)


@pytest.mark.ray
@pytest.mark.slow
def test_killed_two_worker_search_resumes_from_the_train_checkpoint(scratch):  # noqa: F811
    """SIGKILL the driver once the first trial has reported an epoch (its checkpoints are in its
    Train run, Tune holds none), then --resume: the trial goes on under its id from its best epoch
    so far, never training epoch 1 again, which only Train's own checkpoint can give it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.tune.test_tune import RUN, ROOT as REPO, cli_env, read_rows, reported_epochs, trial_dirs
    from tune.localray import stop_ray

    storage, name = scratch / "runs", "w2resume"
    run_dir = storage / name
    args = ["--space", str(TINY), "--data", str(SAMPLE_JSON), "--storage", str(storage), "--name", name,
            "--folds", "2", "--num-samples", "1", "--max-epochs", "4", "--workers-per-trial", "2",
            "--cpus-per-trial", "1", "--max-concurrent", "1", "--wandb", "disabled",
            "--set", "train.max_train_batches=2"]
    ray_dir = private_ray_dir()
    env = {**cli_env(ray_dir, scratch / "cache"), "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # Tune's snapshot: at most 1 s old
    try:
        with open(scratch / "first.log", "w") as out:
            first = subprocess.Popen([sys.executable, str(RUN), *args], cwd=REPO, env=env, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 900
            while not [d for d in trial_dirs(run_dir).values() if reported_epochs(d)]:
                assert first.poll() is None, (scratch / "first.log").read_text()[-4000:]
                assert time.monotonic() < deadline, "no epoch reported in time"
                time.sleep(0.5)
            ((killed, trial_dir),) = [(t, d) for t, d in trial_dirs(run_dir).items() if reported_epochs(d)]
            before = reported_epochs(trial_dir)
            assert max(before) < 4, "the trial finished before the kill"
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        before = reported_epochs(trial_dir)  # again: epochs may have been reported between the look and the kill
        stop_ray(ray_dir, grace=5.0)
        second = cli(*args, "--resume", ray_dir=ray_dir, cache=scratch / "cache", timeout=1200)
        assert second.returncode == 0, (second.stdout + second.stderr)[-6000:]
    finally:
        clean_up_ray(ray_dir)
    rows = {r["trial_id"]: r for r in read_rows(run_dir / "trials.csv")}
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows.values()), rows
    assert killed in rows
    # Tune restarts the trial afresh (its result.json begins again), but the Train run restored its
    # latest checkpoint: epoch 1 is not trained again. Rank 0 checkpoints an epoch just before it is
    # reported, so the kill may fall between the two: at most one epoch beyond the last reported one.
    continued = reported_epochs(trial_dirs(run_dir)[killed])
    assert 1 < continued[0] <= max(before) + 2 and continued == list(range(continued[0], 5)), (before, continued)
    assert Path(rows[killed]["checkpoint"]).is_file() and f"/{TRAIN_DIR}/" in rows[killed]["checkpoint"]
