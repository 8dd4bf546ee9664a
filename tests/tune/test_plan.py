"""The planner (tune/plan.py) on datasets that differ: each decision against a hand derivation from
the fingerprint and a fake measured memory curve; the real measurement on CPU; a planned space loads,
validates and passes ``--debug``."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.tune.test_tune import clean_up_ray, cli_env, private_ray_dir, read_rows, scratch_dir, tail
from trainables.data import load_dataset
from trainables.folds import group_keys, make_folds
from tune import plan as planner
from tune import plan_decisions
from tune.fingerprint import GROUP_REGEX, fingerprint
from tune.measure import Machine, Measurement
from tune.space import load_space

ROOT = Path(__file__).resolve().parents[2]
SPACES = ROOT / "search_spaces"
CAMVID_ML = Path(__file__).resolve().parents[3] / "shared" / "data" / "camvid" / "train" / "annotations-multilabel.json"
GIB = 2 ** 30
GPU = Machine("cuda", "Fake GPU", 16 * GIB, 8, 1, "bf16")
CPU = Machine("cpu", "cpu", 8 * GIB, 2, 0, "off")
LIMIT_GPU = 0.9 * 16 * GIB  # MARGIN of one GPU


def curve(bytes_per_pixel: float, seconds_per_pixel: float = 1e-8, calls: list | None = None):
    """A fake measurement: 1 GiB plus ``bytes_per_pixel`` per input pixel of the batch; time likewise."""
    def measure(size, batch):
        if calls is not None:
            calls.append((tuple(size), batch))
        pixels = size[0] * size[1] * batch
        return Measurement(int(GIB + bytes_per_pixel * pixels), seconds_per_pixel * pixels)
    return measure


def plan_for(fp, machine=GPU, measure=None, budget="8h", space="smp.yaml"):
    base = load_space(space, SPACES)
    plan = planner.plan_space(fp, base, machine, measure or curve(2048), planner.parse_duration(budget), budget,
                              ("Unet", "resnext101_32x4d"), log=lambda line: None)
    return {d.key: d.value for d in plan.decisions}, plan


def write_folder(root: Path, names: list[str], masks: list[np.ndarray], mode: str = "RGB") -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, masks[0].shape + ((3,) if mode == "RGB" else ()), dtype=np.uint8)
    for name, mask in zip(names, masks):
        noise = rng.integers(0, 4, base.shape, dtype=np.uint8)  # near-duplicates: one picture, a little noise
        Image.fromarray(base + noise, mode=mode).save(root / "images" / f"{name}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def big_gray(tmp_path_factory) -> Path:
    """20 grayscale 2048x2048 images; class 1: 4x4 objects (16 px) on a grid, class 2: 200x200 blocks."""
    masks = []
    for i in range(20):
        mask = np.zeros((2048, 2048), np.uint8)
        for y in range(64, 2000, 128):
            for x in range(64 + 8 * (i % 4), 2000, 128):
                mask[y:y + 4, x:x + 4] = 1
        mask[300 + 10 * i:500 + 10 * i, 900:1100] = 2
        masks.append(mask)
    return write_folder(tmp_path_factory.mktemp("gray2048"), [f"scan{i:03d}" for i in range(20)], masks, mode="L")


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    """8 sequences of 5 near-duplicate frames, 64x96: seqA_frame0000 ... seqH_frame0004."""
    names, masks = [], []
    for s in "ABCDEFGH":
        for f in range(5):
            mask = np.zeros((64, 96), np.uint8)
            mask[10:40, 10 + f:50 + f] = 1 + (ord(s) % 2)
            names.append(f"seq{s}_frame{f:04d}")
            masks.append(mask)
    return write_folder(tmp_path_factory.mktemp("frames"), names, masks)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """10 images of 64x64, one foreground class each."""
    masks = []
    for i in range(10):
        mask = np.zeros((64, 64), np.uint8)
        mask[8 + i:40 + i, 8:40] = 1
        masks.append(mask)
    return write_folder(tmp_path_factory.mktemp("tiny"), [f"cell{i}" for i in range(10)], masks)


def test_asha_expected_epochs_by_hand():
    # 40 epochs, grace 4, factor 3: rungs 4, 12, 36; all run 4, a third 8 more, a ninth 24 more, 1/27 4 more
    assert planner.asha_rungs(40, 4, 3) == [4, 12, 36]
    assert planner.expected_epochs(40, 4, 3) == pytest.approx(4 + 8 / 3 + 24 / 9 + 4 / 27)
    assert planner.candidate_sides(480) == [480, 384, 320, 256, 192, 160, 128, 96, 64]
    assert planner.input_size(480, 480 / 360) == (352, 480) and planner.input_size(64, 0.5) == (64, 32)


def test_sample_rgb_resize_on_a_gpu(sample):
    fp = fingerprint(sample)
    assert fp["images"] == 72 and fp["size"]["median"] == [120, 160] and fp["channels"] == 3
    assert fp["task"] == "multiclass" and fp["groups"]["groups"] == 3  # 0001TP, 0006R0, 0016E5: too few
    calls = []
    got, plan = plan_for(fp, measure=curve(2048, calls=calls))
    # the two smallest candidates (longer sides 64, 96) are measured, their line says the median's 160 fits
    # (128x160 at batch 2 = 1 GiB + 80 MiB of 14.4 GiB), which is measured: no downscale
    assert calls[:3] == [((64, 64), 2), ((64, 96), 2), ((128, 160), 2)] and got["train.image_size"] == [128, 160]
    assert got["data.max_size"] is None and got["augment.random_crop"] is False
    # 72 images, 9.4 classes an image: 5 folds (72 // 10 = 7, at most 5), iterative stratification
    assert got["folds.k"] == 5 and got["folds.strategy"] == "multilabel" and "folds.group_regex" not in got
    assert "only 3 sequences" in plan.reason("folds.strategy")
    # 58 training images: 5% is 2.9, so the batch is capped at 2 and no larger batch is measured
    assert got["train.batch_size"] == 2 and len(calls) == 3 and "5% cap" in plan.reason("train.batch_size")
    # 29 steps an epoch: 2000 / 29 = 69 epochs; 8 h hold thousands of trials: 64 a fold (the cap)
    assert got["train.epochs"] == 69 and got["search.num_samples"] == 64
    assert got["search.asha"] == {"grace_period": 4, "reduction_factor": 3, "brackets": 1}  # smp.yaml's
    assert got["search.n_startup_trials"] == 10 < got["search.num_samples"]
    assert got["search.search_folds"] is None and got["search.time_budget"] == "8h"
    assert got["resources.gpus_per_trial"] == 1 and got["resources.max_concurrent"] == 1
    assert got["resources.cpus_per_trial"] == 8 and got["train.num_workers"] == 7
    assert got["train.amp"] == "auto" and got["train.channels_last"] is True
    assert "augment.color" not in got  # RGB


def test_time_budget_sets_epochs_trials_and_folds_on_a_cpu(sample):
    fp = fingerprint(sample)
    slow = curve(2048, 5e-6)  # 128x160 at batch 2: 0.2048 s a step
    # one epoch: 0.2048 s x (58 + 14/3) / 2 images x 1.25 = 8.02 s; 2 trials at once (1.08 GiB fits 8 GiB)
    epoch_s = 0.2048 * (58 + 14 / 3) / 2 * 1.25
    got, _ = plan_for(fp, CPU, slow, "20m")
    assert got["resources.max_concurrent"] == 2 and got["resources.cpus_per_trial"] == 1
    assert got["train.amp"] == "off" and got["train.channels_last"] is False and got["train.num_workers"] == 0
    # 20 min hold 1200 x 2 / 8.02 = 299 trial-epochs. On 5 folds, 69 epochs (10.6 expected) give 5 trials a
    # fold; cut by a fifth at a time: 55, 44, 35, 28, 22 give 5-7; 17 (rungs 4, 12: 4 + 8/3 + 5/9 = 7.2) gives 8
    capacity = 1200 * 2 / epoch_s
    assert int(capacity // (5 * (4 + 8 / 3 + 5 / 9))) == 8 and int(capacity // (5 * (4 + 8 / 3 + 10 / 9))) == 7
    assert got["train.epochs"] == 17 and got["search.num_samples"] == 8 and got["search.search_folds"] is None
    # the 5 folds share one TPE model (search.share_folds), which sees 40 trials: smp.yaml's 10 random ones
    assert got["search.n_startup_trials"] == 10
    # 13 min: 194.5 trial-epochs. The grace period is at most a quarter of the epochs: 12 epochs have grace 3,
    # rungs 3, 9: 3 + 6/3 + 3/9 = 5.33 expected; 5 folds x 8 x 5.33 = 213 > 194.5 (7 trials a fold at best),
    # so search fold 0 and retrain 3 configs on 4 folds (12 x 12 epochs): (194.5 - 144) / 5.33 = 9 trials
    got, _ = plan_for(fp, CPU, slow, "13m")
    capacity = 780 * 2 / epoch_s
    assert int(capacity // (5 * (3 + 2 + 1 / 3))) == 7 and int((capacity - 12 * 12) // (3 + 2 + 1 / 3)) == 9
    assert got["search.search_folds"] == [0] and got["search.retrain_top"] == 3
    assert got["train.epochs"] == 12 and got["search.num_samples"] == 9 and got["search.n_startup_trials"] == 3
    assert got["search.asha"]["grace_period"] == 3


def test_startup_trials_count_the_trials_one_model_sees():
    base = load_space("smp.yaml", SPACES)  # n_startup_trials 10, share_folds true
    n, why = plan_decisions.startup_trials(base, 8, 5)  # one model over 5 x 8 = 40 trials: 10, under a third (13)
    assert n == 10 and "10 of the 40 trials of the 5 folds" in why and "other 30" in why
    assert plan_decisions.startup_trials(base, 8, 1)[0] == 2  # one searched fold (search_folds [0]): a third of 8
    assert plan_decisions.startup_trials(base, 5, 2)[0] == 3  # 10 trials: a third
    base.search["share_folds"] = False  # a study per fold: each fold's TPE starts after a third of its 8
    n, why = plan_decisions.startup_trials(base, 8, 5)
    assert n == 2 and "8 trials of a fold" in why
    base.search.update(share_folds=True, n_startup_trials=1)
    assert plan_decisions.startup_trials(base, 2, 1)[0] == 1  # never below one


@pytest.mark.slow
@pytest.mark.skipif(not CAMVID_ML.exists(), reason=f"CamVid not found at {CAMVID_ML}")
def test_camvid_multilabel_batch_from_the_memory_curve(tmp_path_factory):
    data = load_dataset(CAMVID_ML, task="multilabel", cache_dir=tmp_path_factory.mktemp("camvid-cache"))
    fp = fingerprint(data)
    assert fp["task"] == "multilabel" and fp["images"] == 367 and fp["size"]["median"] == [360, 480]
    assert len(fp["classes"]) == 14 and fp["crowd_regions"] == 0
    calls = []
    got, plan = plan_for(fp, measure=curve(16384, calls=calls))
    # 352x480 (168960 px) costs 2.58 GiB an image: 1 GiB + 5 x 2.58 = 13.9 GiB <= 14.4 GiB < 1 + 6 x 2.58
    per_image = 168960 * 16384
    assert GIB + 5 * per_image <= LIMIT_GPU < GIB + 6 * per_image
    assert got["train.image_size"] == [352, 480] and got["data.max_size"] is None
    # sizes: the two smallest, then 352x480 (the line says it fits); batches 2, 4, then the fit of the two, checked
    assert calls == [((64, 64), 2), ((64, 96), 2), ((352, 480), 2), ((352, 480), 4), ((352, 480), 5)]
    assert got["train.batch_size"] == 5  # under the cap: 5% of 294 training images is 14
    assert got["folds.strategy"] == "multilabel" and got["folds.k"] == 5
    assert plan.reason("folds.strategy").startswith("multilabel task")
    # the same curve, 2 KiB a pixel: the 5% cap binds first
    got, _ = plan_for(fp, measure=curve(2048))
    assert got["train.batch_size"] == 14


def test_gray_2048_with_small_objects_gets_crops(big_gray, tmp_path):
    data = load_dataset(big_gray, cache_dir=tmp_path / "cache")
    fp = fingerprint(data)
    assert fp["channels"] == 1 and fp["size"]["median"] == [2048, 2048]
    assert fp["objects"]["class_1"]["p5_area"] == 16 and fp["objects"]["class_2"]["p5_area"] == 40000
    calls = []
    got, plan = plan_for(fp, measure=curve(8192, calls=calls))
    # batch 2 fits 14.4 GiB when 1 GiB + 2 x 8 KiB x side^2 does: side <= 937, so 832 (of 2048, 1632, 1312,
    # 1056, 832, ...) is the largest that fits: the line through the two smallest (64, 96) proposes it, it is
    # measured, and so is the next larger (1056), which does not fit
    assert planner.candidate_sides(2048)[:5] == [2048, 1632, 1312, 1056, 832]
    assert [c[0][1] for c in calls[:4]] == [64, 96, 832, 1056]
    assert GIB + 2 * 8192 * 1056 ** 2 > LIMIT_GPU >= GIB + 2 * 8192 * 832 ** 2
    assert got["train.image_size"] == [832, 832]
    # x0.41 shrinks the 16 px objects to 2.6 px (< 4): crops; the working size keeps them at 4 px, x0.5
    assert 16 * (832 / 2048) ** 2 < 4
    assert got["augment.random_crop"] is True and got["data.max_size"] == 1024
    assert "class_1" in plan.reason("augment.random_crop")
    assert got["augment.color"] == 0.0  # grayscale
    # 20 images: 2 folds, 10 training images; one class an image; batch capped at 2
    assert got["folds.k"] == 2 and got["folds.strategy"] == "multilabel"  # classes 1 and 2 in every image
    assert got["train.batch_size"] == 2
    # validation runs sliding windows over the 1024x1024 working image: 832-pixel tiles at overlap 0.5 start
    # at 0 and 192 on each side, 4 network passes an image, which the epoch's cost counts
    assert plan_decisions.validation_windows(plan, fp) == 4 and "by 4 windows an image" in plan.reason("search.num_samples")
    # 100 epochs of 832x832 crops of 1024x1024 cover each working pixel 66 times: enough (MIN_PASSES)
    assert got["train.epochs"] == 100
    assert plan_decisions.crop_passes(plan, fp) == pytest.approx(100 * (832 / 1024) ** 2)
    assert 100 * (832 / 1024) ** 2 >= plan_decisions.MIN_PASSES
    assert plan.reason("augment.random_crop").endswith("100 epochs of 832x832 crops of the 1024x1024 working image "
                                                       "cover each pixel 66.0 times (at least 10)")


def test_short_budget_resizes_when_crops_would_cover_too_little(big_gray, tmp_path):
    """The same 832x832 crops of the 1024x1024 working image, but 1e-6 s a pixel and 30 minutes: the
    epochs the budget holds leave each working pixel covered under MIN_PASSES times, so the plan
    resizes whole images and plans the epochs again without sliding-window validation."""
    fp = fingerprint(load_dataset(big_gray, cache_dir=tmp_path / "cache"))
    slow = curve(8192, 1e-6)  # 832x832 at batch 2: 1.384 s a step
    step = 1e-6 * 832 * 832 * 2
    # crops: one epoch is 1.384 x (10 + 4 windows x 10 / 3) / 2 x 1.25 = 20.2 s; 1800 s hold 89.2 trial-epochs.
    # 2 folds x 8 trials: 16 epochs (rungs 4, 12: 4 + 8/3 + 4/9 = 7.11) need 113.8; 12 (grace 3, rungs 3, 9:
    # 3 + 6/3 + 3/9 = 5.33) need 85.3: 12 epochs, which cover each pixel 12 x (832 / 1024)^2 = 7.9 times
    crop_capacity = 1800 / (step * (10 + 4 * 10 / 3) / 2 * 1.25)
    assert 16 * (3 + 2 + 1 / 3) <= crop_capacity < 16 * (4 + 8 / 3 + 4 / 9)
    assert 12 * (832 / 1024) ** 2 < plan_decisions.MIN_PASSES
    # resized: (10 + 10 / 3) images an epoch, 11.5 s, 156 trial-epochs: 40 epochs (rungs 4, 12, 36:
    # 4 + 8/3 + 24/9 + 4/27 = 9.48) fit 8 trials on 2 folds, 51 (15 after the last rung: 9.89) do not
    capacity = 1800 / (step * (10 + 10 / 3) / 2 * 1.25)
    assert 16 * (4 + 8 / 3 + 24 / 9 + 4 / 27) <= capacity < 16 * (4 + 8 / 3 + 24 / 9 + 15 / 27)
    got, plan = plan_for(fp, measure=slow, budget="30m")
    assert got["train.image_size"] == [832, 832] and got["augment.random_crop"] is False
    assert got["data.max_size"] == 832 and got["train.epochs"] == 40 and got["search.num_samples"] == 8
    why = plan.reason("augment.random_crop")
    assert "class_1" in why and "2.6 px" in why and "7.9 times" in why and "12 epochs" in why
    assert "4 windows an image" in why and "windows an image" not in plan.reason("search.num_samples")
    assert plan_decisions.crop_passes(plan, fp) == 40
    keys = [d.key for d in plan.decisions]  # decided again in place: the plan prints in the order it decides
    assert keys.index("augment.random_crop") < keys.index("train.batch_size") < keys.index("train.epochs")
    # an hour at 1e-7 s a pixel holds 100 epochs of crops, 66 passes: crops stay
    got, plan = plan_for(fp, measure=curve(8192, 1e-7), budget="1h")
    assert got["augment.random_crop"] is True and got["train.epochs"] == 100
    assert plan_decisions.crop_passes(plan, fp) == pytest.approx(100 * (832 / 1024) ** 2)


def test_resize_replans_from_scratch_not_on_the_crops_plan(big_gray, tmp_path, monkeypatch):
    """On a CPU at 20 minutes the crops' plan searches fold 0 and retrains its best configs; the
    resized plan searches every fold: nothing of the crops' search (retrain_top, its notes) remains.
    The crops' plans are taken with MIN_PASSES 0 (crops always stay: the plan before the switch)."""
    fp = fingerprint(load_dataset(big_gray, cache_dir=tmp_path / "cache"))
    monkeypatch.setattr(plan_decisions, "MIN_PASSES", 0)  # crops always stay: the plan before the switch
    crops, crops_plan = plan_for(fp, CPU, curve(8192, 1e-6), "20m")
    monkeypatch.undo()
    got, plan = plan_for(fp, CPU, curve(8192, 1e-6), "20m")
    assert crops["augment.random_crop"] is True and crops["search.search_folds"] == [0]
    assert crops["search.retrain_top"] == 3 and crops["train.epochs"] == 12
    assert got["augment.random_crop"] is False and got["search.search_folds"] is None
    assert "search.retrain_top" not in got and got["train.epochs"] == 100
    assert [d.key for d in plan.decisions].count("train.epochs") == 1
    assert plan.notes == crops_plan.notes  # the size rejections only, once each
    # one GPU at 30 minutes and 2e-6 s a pixel: crops hold 3 trials a fold, which the plan notes as a
    # short search; resized, 8 trials fit, and the note goes with the crops
    monkeypatch.setattr(plan_decisions, "MIN_PASSES", 0)
    crops, crops_plan = plan_for(fp, GPU, curve(8192, 2e-6), "30m")
    monkeypatch.undo()
    got, plan = plan_for(fp, GPU, curve(8192, 2e-6), "30m")
    assert crops["augment.random_crop"] is True and crops["search.num_samples"] == 3
    assert any("fewer than 8 trials a fold" in n for n in crops_plan.notes)
    assert got["augment.random_crop"] is False and got["search.num_samples"] == 8
    assert not any("fewer than" in n for n in plan.notes)


def test_validation_windows_by_hand():
    """CamVid's plan of a 25-minute search: 96x128 crops of the 222x296 working image (max_size 296).
    Tiles at overlap 0.5 step at most half a tile: ceil((222 - 96) / 48) + 1 = 4 starts down and
    ceil((296 - 128) / 64) + 1 = 4 across: 16 passes,
    where a resized image costs one."""
    plan = plan_decisions.Plan()
    fp = {"size": {"median": [360, 480]}}
    plan.add("train.image_size", [96, 128], "")
    plan.add("augment.random_crop", True, "")
    plan.add("data.max_size", 296, "")
    assert plan_decisions.validation_windows(plan, fp) == 16
    plan.add("data.max_size", None, "")  # native 360x480: ceil(264 / 48) + 1 = 7 down, ceil(352 / 64) + 1 = 7 across
    assert plan_decisions.validation_windows(plan, fp) == 7 * 7
    plan.add("augment.random_crop", False, "")
    assert plan_decisions.validation_windows(plan, fp) == 1


def test_a_line_that_promises_too_much_is_corrected_by_measuring(big_gray, tmp_path):
    """Memory growing with the square of the pixels: the line through the two small probes proposes
    2048, which does not fit; lines through the failures find the largest that fits, 672."""
    fp = fingerprint(load_dataset(big_gray, cache_dir=tmp_path / "cache"))
    calls = []

    def square(size, batch):
        calls.append((tuple(size), batch))
        return Measurement(int(GIB + batch * 0.03 * (size[0] * size[1]) ** 2), 1e-8 * size[0] * size[1] * batch)

    got, _ = plan_for(fp, measure=square)
    assert GIB + 2 * 0.03 * (672 * 672) ** 2 <= LIMIT_GPU < GIB + 2 * 0.03 * (832 * 832) ** 2
    assert got["train.image_size"] == [672, 672]
    sides = [c[0][0] for c in calls]
    assert sides[:3] == [64, 96, 2048] and {672, 832} <= set(sides) and len(sides) <= 7


def test_frame_names_get_group_folds(frames, tmp_path):
    data = load_dataset(frames, cache_dir=tmp_path / "cache")
    fp = fingerprint(data)
    assert fp["groups"] == {"regex": GROUP_REGEX, "groups": 8, "largest": 5,
                            "examples": ["seqA", "seqB", "seqC", "seqD", "seqE"]}
    got, _ = plan_for(fp)
    assert got["folds.strategy"] == "group" and got["folds.k"] == 5 and got["folds.group_regex"] == GROUP_REGEX
    keys = group_keys(data.ids, got["folds.group_regex"])
    folds = make_folds("group", 5, 0, data.ids, data.presence, got["folds.group_regex"])
    for fold in folds:  # no sequence straddles two folds
        assert {keys[data.ids.index(i)] for i in fold}.isdisjoint(
            {keys[data.ids.index(i)] for f in folds if f is not fold for i in f})


def test_tiny_dataset_caps_the_batch(tiny, tmp_path):
    data = load_dataset(tiny, cache_dir=tmp_path / "cache")
    fp = fingerprint(data)
    assert fp["groups"] is None and fp["classes_per_image"] == 1.0
    calls = []
    got, _ = plan_for(fp, measure=curve(16, calls=calls))  # memory would hold hundreds of images
    assert got["folds.k"] == 2 and got["folds.strategy"] == "stratified"  # 10 images, one class each
    assert got["train.batch_size"] == 2 and calls == [((64, 64), 2)]  # 5 training images: capped at 2
    assert got["train.image_size"] == [64, 64] and got["data.max_size"] is None


def test_planned_space_loads_and_keeps_the_searched_half(tmp_path, capsys):
    out = tmp_path / "planned.yaml"
    args = planner.build_parser().parse_args(["--data", str(ROOT / "data" / "camvid-sample" / "train"),
                                              "--out", str(out), "--time-budget", "2h",
                                              "--cache-dir", str(tmp_path / "cache")])
    planner.make_plan(args, machine=GPU, measure=curve(2048), model=("Unet", "resnext101_32x4d"))
    spec = load_space(str(out), SPACES)
    base = load_space("smp.yaml", SPACES)
    assert set(spec.space) == set(base.space) - {"train.batch_size"}  # the plan fixes the batch
    cfg = spec.base_config()
    assert cfg["train"]["batch_size"] == 2 and cfg["train"]["image_size"] == [128, 160]
    assert cfg["data"]["path"] == str(ROOT / "data" / "camvid-sample" / "train")
    assert spec.search["time_budget"] == "2h" and spec.search["n_startup_trials"] < spec.search["num_samples"]
    text = out.read_text()
    assert "# 58 training images" not in text and re.search(r"# .*5% of the 58 training images", text)
    assert "fixed by the plan, no longer searched: train.batch_size" in text
    recorded = json.loads((tmp_path / "planned.fingerprint.json").read_text())
    assert recorded["fingerprint"]["images"] == 72 and recorded["measurements"][0]["batch"] == 2
    printed = capsys.readouterr().out
    assert "train.batch_size = 2:" in printed and f"next: seghpo tune --space {out}" in printed


def test_user_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        planner.main(["--data", str(tmp_path / "nothing.json"), "--out", str(tmp_path / "p.yaml")])
    assert exit_.value.code == 2 and "nothing.json: dataset not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        planner.main(["--data", str(ROOT / "data" / "camvid-sample" / "train"), "--time-budget", "soon"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--time-budget: expected a duration" in err and err.count("\n") == 1


def test_real_measurement_on_cpu():
    """Measured in a fresh process, as ``seghpo plan`` measures: inside the test session the process
    already holds earlier tests' memory, which hides what a larger input adds."""
    code = ("import json\n"
            "from tune.measure import Machine, StepMeter\n"
            "machine = Machine('cpu', 'cpu', 8 * 2 ** 30, 1, 0, 'off')\n"
            "meter = StepMeter('Unet', 'resnet18', 3, machine, kwargs={'encoder_depth': 3, "
            "'decoder_channels': [32, 16, 8]}, steps=2, threads=1)\n"
            "out = [meter((64, 64), 2), meter((128, 128), 4)]\n"
            "print(json.dumps([[m.fits, m.peak, m.step_s] for m in out]))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (small_fits, small_peak, small_s), (large_fits, large_peak, large_s) = json.loads(proc.stdout.splitlines()[-1])
    assert small_fits and large_fits and 0 < small_s < 30 and small_peak > 100 * 2 ** 20  # torch and the model
    assert large_peak > small_peak and large_s > small_s and not math.isinf(large_s)


@pytest.mark.ray
@pytest.mark.slow
def test_plan_then_debug_search_records_the_plan(sample_cache):
    """``tune/run.py --plan --debug``: the real planner (CPU measurements) writes a space from a small base,
    the search runs it end to end, and the run keeps the planned space and its fingerprint."""
    storage, ray_dir = scratch_dir("plan"), private_ray_dir()
    try:
        search = subprocess.run([sys.executable, "tune/run.py", "--space", "tests/spaces/tiny.yaml", "--data",
                                 "data/camvid-sample/train", "--plan", "--time-budget", "30m", "--debug",
                                 "--storage", str(storage), "--wandb", "disabled"], cwd=ROOT,
                                env=cli_env(ray_dir, sample_cache), capture_output=True, text=True, timeout=900)
        out = search.stdout + search.stderr
        assert search.returncode == 0, tail(out)
        assert "measured Unet/resnet18 at 64x64, batch 2" in out and "train.batch_size = 2:" in out
        planned = storage / "plans" / "tiny-train.yaml"
        spec = load_space(str(planned), SPACES)
        assert spec.name == "tiny-plan" and set(spec.space) == {"optimizer.lr", "loss.name"}
        run_dir = storage / "tiny-plan-debug"
        assert (run_dir / "plan.yaml").read_text() == planned.read_text()
        recorded = json.loads((run_dir / "plan.fingerprint.json").read_text())
        assert recorded["fingerprint"]["images"] == 72 and recorded["machine"]["kind"] in ("cpu", "cuda")
        rows = read_rows(run_dir / "trials.csv")
        assert rows and all(r["status"] == "completed" for r in rows), rows
    finally:
        clean_up_ray(ray_dir)
        shutil.rmtree(storage, ignore_errors=True)


def test_planned_yaml_is_valid_yaml_with_comments(tmp_path):
    text = planner.space_yaml(planner.Plan([planner.Decision("train.batch_size", 4, "a reason " * 30)]),
                              load_space("segformer.yaml", SPACES), yaml.safe_load((SPACES / "segformer.yaml")
                                                                                  .read_text()),
                              {"source": "x", "images": 3, "size": {"median": [1, 2]}, "channels": 3,
                               "task": "multiclass", "classes": ["a"]}, {"path": "x.json"}, GPU, "x.json")
    assert all(len(line) <= 100 for line in text.splitlines() if line.lstrip().startswith("#") and "a reason" in line)
    assert yaml.safe_load(text)["fixed"]["train.batch_size"] == 4
