"""``--debug``: every command checks a dataset/space end to end on a handful of images.

The search runs through Ray on the shipped sample with the real demo space (SegFormer MiT-B0),
then the ensemble step and the plain trainer run with ``--debug`` too.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.tune.test_tune import clean_up_ray, cli_env, private_ray_dir, read_rows, scratch_dir, tail
from trainables.cli import DEBUG_SETTINGS
from trainables.config import resolve
from trainables.data import load_data
from trainables.folds import make_folds

ROOT = Path(__file__).resolve().parents[2]


def test_subset_takes_evenly_spaced_images_and_names_itself(sample, sample_cache):
    d = resolve({"data.cache_dir": str(sample_cache), "data.subset": 16})["data"]
    sub = load_data(d)
    assert len(sub) == 16 and len(sample) == 72
    picked = [sample.ids.index(i) for i in sub.ids]
    assert picked[0] == 0 and picked[-1] == 71 and np.all(np.diff(picked) >= 4)  # spread over all three sequences
    assert np.array_equal(sub.presence, sample.presence[picked])
    assert sub.sizes == [sample.sizes[i] for i in picked] and sub.mask_paths[3] == sample.mask_paths[picked[3]]
    assert sub.fingerprint != sample.fingerprint
    assert (sub.pixel_counts <= sample.pixel_counts).all() and sub.pixel_counts.sum() > 0
    assert load_data({**d, "subset": None}).fingerprint == sample.fingerprint
    assert load_data({**d, "subset": 500}).fingerprint == sample.fingerprint  # more than there are: all
    folds = make_folds("kfold", 2, 0, sub.ids, sub.presence)
    assert sorted(i for f in folds for i in f) == sorted(sub.ids)


def test_asha_grace_above_the_epoch_budget_is_clamped():
    from tune.scheduler import PerFoldASHA

    asha = PerFoldASHA("val_miou", "max", max_t=1, grace_period=2)
    fold0 = asha._asha(0)  # no AssertionError: the one rung is the last epoch
    assert fold0._max_t == 1 and [milestone for milestone, _ in fold0._brackets[0]._rungs] == [1]


def test_train_debug_runs_one_short_epoch(tmp_path, sample_cache, capsys):
    from trainables.train import main

    main(["--debug", "--out", str(tmp_path), "--set", f"data.cache_dir={sample_cache}", "model.weights=null",
          "model.arch=Unet", "model.encoder=resnet18", "model.kwargs={encoder_depth: 3, decoder_channels: [32,16,8]}"])
    out = capsys.readouterr().out
    assert re.search(r"16 images, 12 classes; fold 0: 8 train .*/ 8 val", out), out
    assert "epoch   1" in out and "epoch   2" not in out
    assert (tmp_path / "fold0" / "model.pt").is_file()
    assert len(json.loads((tmp_path / "folds.json").read_text())["folds"]) == DEBUG_SETTINGS["folds.k"]


@pytest.mark.ray
@pytest.mark.slow
def test_search_and_ensemble_debug_on_the_shipped_sample(sample_cache):
    storage, ray_dir = scratch_dir("debug"), private_ray_dir()
    env = cli_env(ray_dir, sample_cache)
    search = [sys.executable, "tune/run.py", "--space", "segformer.yaml", "--debug", "--storage", str(storage),
              "--wandb", "disabled"]
    try:
        first = subprocess.run(search, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert first.returncode == 0, tail(first.stdout + first.stderr)
        run_dir = storage / "segformer-demo-debug"
        rows = read_rows(run_dir / "trials.csv")
        assert sorted(r["fold"] for r in rows) == ["0", "1"] and all(r["status"] == "completed" for r in rows), rows
        assert all(r["best_epoch"] == "1" for r in rows)
        experiment = json.loads((run_dir / "experiment.json").read_text())
        assert experiment["dataset"]["images"] == DEBUG_SETTINGS["data.subset"]
        fixed = experiment["settings"]["fixed"]
        assert fixed["train"]["image_size"] == [64, 64] and fixed["train"]["max_train_batches"] == 2

        ens = subprocess.run([sys.executable, "ensemble/run.py", "--experiment", str(run_dir), "--debug",
                              "--wandb", "disabled"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert ens.returncode == 0, tail(ens.stdout + ens.stderr)
        report = json.loads((run_dir / "ensemble-debug" / "oof_metrics.json").read_text())
        assert report["oof_images"] == 8  # 4 per fold
        members = json.loads((run_dir / "ensemble-debug" / "members.json").read_text())
        assert members["tta"] == "none" and all(len(m) == 1 for m in members["members"].values())

        again = subprocess.run(search, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0 and "replacing the earlier debug run" in again.stdout, tail(again.stdout + again.stderr)
        assert len(read_rows(run_dir / "trials.csv")) == 2
    finally:
        clean_up_ray(ray_dir)
        shutil.rmtree(storage, ignore_errors=True)


@pytest.mark.parametrize("space", ["smp.yaml", "mixed.yaml", "segformer.yaml"])
def test_debug_leaves_searched_settings_to_the_search(space):
    """smp.yaml searches train.batch_size: --debug must not fix it too (that is a one-line config error)."""
    from tune.run import overrides, parse_args
    from tune.space import load_space, with_overrides

    spec = load_space(space, ROOT / "search_spaces")
    args = parse_args(["--space", space, "--data", "x.json", "--debug"])
    fixed, search, resources = overrides(args, spec.space)
    debug = with_overrides(spec, fixed, search, resources)  # raised "is also searched in space" for smp.yaml
    assert set(fixed) == ({"data.path"} | set(DEBUG_SETTINGS)) - set(spec.space)
    assert debug.base_config()["train"]["epochs"] == 1 and debug.search["num_samples"] == 1
    assert "train.batch_size" in debug.space or debug.base_config()["train"]["batch_size"] == 4
    explicit = parse_args(["--space", space, "--data", "x.json", "--debug", "--max-epochs", "2"])
    assert overrides(explicit, spec.space)[0]["train.epochs"] == 2  # explicit flags still win


def test_debug_fits_trials_to_the_local_machine(monkeypatch, capsys):
    """smp.yaml asks 4 CPUs and half a GPU a trial: on a 2-CPU machine without GPU, --debug runs its two
    trials side by side on one CPU each, instead of waiting forever for a GPU; joining a cluster keeps them."""
    from tune.run import debug_resources
    from tune.space import load_space

    monkeypatch.setattr("tune.cluster.local_resources", lambda: (2.0, 0.0))
    monkeypatch.setattr("tune.cluster.starts_local_ray", lambda address: address is None)
    spec = load_space("smp.yaml", ROOT / "search_spaces")
    assert spec.resources["gpus_per_trial"] > 0 and spec.resources["cpus_per_trial"] > 2
    assert debug_resources(spec.resources, None) == {"cpus_per_trial": 1.0, "gpus_per_trial": 0.0}
    assert "a trial takes 1 CPU and 0 GPU on this machine" in capsys.readouterr().out
    assert debug_resources(spec.resources, "auto") == {}
    monkeypatch.setattr("tune.cluster.local_resources", lambda: (16.0, 1.0))
    assert debug_resources(spec.resources, None) == {"cpus_per_trial": 4.0, "gpus_per_trial": 0.5}
