"""Hostile input, failing trials, reproducibility and durability, as a user meets them."""
from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainables.data import load_dataset
from tune import run as tune_run

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "camvid-sample" / "train" / "annotations.json"
TINY = ROOT / "tests" / "spaces" / "tiny.yaml"


def write_coco(root: Path, images=2, anns=None, drop=None, size=(16, 24), categories=None) -> Path:
    """A small COCO dataset under ``root``: images/ with PNGs and annotations.json."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    h, w = size
    imgs = []
    for i in range(1, images + 1):
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(root / "images" / f"im{i}.png")
        imgs.append({"id": i, "file_name": f"im{i}.png", "height": h, "width": w})
    cats = categories or [{"id": 1, "name": "thing"}, {"id": 2, "name": "stuff"}]
    if anns is None:
        anns = [{"id": i, "image_id": i, "category_id": 1 + i % 2, "iscrowd": 0,
                 "segmentation": [[2, 2, 10, 2, 10, 10, 2, 10]]} for i in range(1, images + 1)]
    coco = {"images": imgs, "annotations": anns, "categories": cats}
    for key in drop or ():
        coco.pop(key)
    path = root / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def write_mask_folder(root: Path, masks: dict[str, np.ndarray], extra_images=(), classes=None) -> Path:
    """An image/mask folder dataset: 8x8 RGB images for every mask stem (and ``extra_images``)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem in [*masks, *extra_images]:
        Image.new("RGB", (8, 8)).save(root / "images" / f"{stem}.png")
    for stem, mask in masks.items():
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        tune_run.main(argv)
    return exit_info.value.code, capsys.readouterr().err


def hostile(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra CLI args, text the one error line must contain)."""
    cases = {}
    cases["missing annotation file"] = (["--data", str(tmp_path / "nope.json")], "not found")
    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / "annotations.json").write_text("{not json")
    (bad / "images").mkdir()
    cases["invalid JSON"] = (["--data", str(bad / "annotations.json")], "invalid JSON at line 1")
    cases["COCO without images"] = (["--data", str(write_coco(tmp_path / "noimages", drop=["images"]))],
                                    "no 'images' list")
    cases["COCO without categories"] = (["--data", str(write_coco(tmp_path / "nocats", drop=["categories"]))],
                                        "no 'categories' list")
    unknown_image = [{"id": 7, "image_id": 99, "category_id": 1, "segmentation": [[0, 0, 5, 0, 5, 5]]}]
    cases["annotation of an unknown image"] = (
        ["--data", str(write_coco(tmp_path / "unkimg", anns=unknown_image))], "unknown image_id 99")
    unknown_cat = [{"id": 7, "image_id": 1, "category_id": 5, "segmentation": [[0, 0, 5, 0, 5, 5]]}]
    cases["annotation of an unknown category"] = (
        ["--data", str(write_coco(tmp_path / "unkcat", anns=unknown_cat))], "unknown category_id 5")
    missing_image = write_coco(tmp_path / "missingimg")
    (missing_image.parent / "images" / "im2.png").unlink()
    cases["image file missing"] = (["--data", str(missing_image)], "not found")
    resized = write_coco(tmp_path / "resized")
    Image.new("RGB", (30, 30)).save(resized.parent / "images" / "im1.png")
    cases["image size differs from the json"] = (["--data", str(resized)], "annotation file says 24x16")
    folder = write_mask_folder(tmp_path / "folder", {"a": np.zeros((8, 8), np.uint8)}, extra_images=["b"])
    cases["image/mask folder with unmatched names"] = (["--data", str(folder)], "without a partner")
    sized = write_mask_folder(tmp_path / "sized", {"a": np.zeros((6, 8), np.uint8)})
    cases["mask size differs from its image"] = (["--data", str(sized)], "differs from its image")
    high = write_mask_folder(tmp_path / "high", {"a": np.full((8, 8), 5, np.uint8)}, classes=["background", "thing"])
    cases["class index above the class count"] = (["--data", str(high)], "class index 5 is above the 2 classes")
    cases["more folds than images"] = (["--data", str(write_coco(tmp_path / "few", images=2)), "--folds", "3"],
                                       "3 folds but the dataset has only 2 images")
    cases["class weights of the wrong length"] = (["--data", str(SAMPLE), "--set", "loss.class_weights=[1,2]"],
                                                  "the data has 12 classes, got 2 weights")
    cases["unknown encoder"] = (["--data", str(SAMPLE), "--set", "model.encoder=resnet9000"],
                                "smp does not know encoder 'resnet9000'")
    # a trial larger than the local Ray would wait forever (the local Ray is made 2 CPUs, no GPU, below)
    cases["more GPUs a trial than the local Ray has"] = (["--data", str(SAMPLE), "--gpus-per-trial", "0.5"],
                                                        "a trial asks for 0.5 GPU but the local Ray has 0")
    cases["more CPUs a trial than the local Ray has"] = (["--data", str(SAMPLE), "--cpus-per-trial", "4"],
                                                        "a trial asks for 4 CPUs but the local Ray has 2")
    return cases


@pytest.mark.parametrize("case", [
    "missing annotation file", "invalid JSON", "COCO without images", "COCO without categories",
    "annotation of an unknown image", "annotation of an unknown category", "image file missing",
    "image size differs from the json", "image/mask folder with unmatched names", "mask size differs from its image",
    "class index above the class count", "more folds than images", "class weights of the wrong length",
    "unknown encoder", "more GPUs a trial than the local Ray has", "more CPUs a trial than the local Ray has"])
def test_hostile_input_is_one_line_exit_2_nothing_written(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SEGHPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("tune.cluster.local_resources", lambda: (2.0, 0.0))
    monkeypatch.setattr("tune.cluster.starts_local_ray", lambda address: address is None)
    args, expected = hostile(tmp_path)[case]
    storage = tmp_path / "runs"
    code, err = run_cli(["--space", str(TINY), "--storage", str(storage), "--name", "x", *args], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert not (storage / "x" / "tune").exists() and not (storage / "x" / "trials.csv").exists()


def test_warnings_not_fatal_corrupt_images_bad_polygons_absent_class(tmp_path, caplog):
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 10, 2]]},  # 2 points
            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 40, 2, 40, 40, 2, 40]]},  # outside
            {"id": 3, "image_id": 2, "category_id": 1, "segmentation": [[0, 0, 6, 0, 6, 6, 0, 6]]}]
    path = write_coco(tmp_path / "d", images=4, anns=anns)
    (path.parent / "images" / "im3.png").write_bytes(b"")  # zero bytes
    data = (path.parent / "images" / "im4.png").read_bytes()
    (path.parent / "images" / "im4.png").write_bytes(data[: len(data) // 2])  # truncated
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(path, cache_dir=tmp_path / "cache")
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert ds.ids == ["im1.png", "im2.png"]  # the corrupt images are skipped
    assert "im3.png: skipped, unreadable image" in messages and "im4.png: skipped" in messages
    assert "fewer than 3 points" in messages and "outside the image; clipped" in messages
    assert "class 'stuff' occurs in no image" in messages
    mask = ds.read_mask(0)
    assert mask.shape == (16, 24) and mask[15, 23] == 1  # the clipped polygon still paints up to the border


def _trials(run_dir: Path) -> list[dict]:
    with open(run_dir / "trials.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.ray
@pytest.mark.slow
def test_failing_trials_are_recorded_retried_and_all_failing_exits_nonzero(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "SEGHPO_CACHE": str(tmp_path / "cache")}
    space = tmp_path / "exploding.yaml"
    doc = (TINY.read_text().replace("optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}", "optimizer.lr: {choice: [1.0e+30]}")
           .replace("num_samples: 2", "num_samples: 1"))
    space.write_text(doc)
    proc = subprocess.run([sys.executable, "tune/run.py", "--space", str(space), "--data", str(SAMPLE),
                           "--storage", str(tmp_path), "--name", "boom", "--max-failures", "1", "--wandb", "disabled"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "every trial failed (2)" in proc.stderr and "DivergedError" in proc.stderr
    rows = _trials(tmp_path / "boom")
    assert len(rows) == 2 and all(r["status"] == "error" for r in rows)
    assert all("training loss became nan" in r["error"] for r in rows)
    # --max-failures 1: each trial ran twice (Tune's retry), visible as two error files in its directory
    for row in rows:
        [trial_dir] = (tmp_path / "boom" / "tune").glob(f"fold*_{row['trial_id']}")
        assert (trial_dir / "error.txt").exists()
        assert (trial_dir / "error.txt").read_text().count("DivergedError") >= 2


def test_same_seed_same_folds_configs_and_cpu_metrics(tmp_path):
    from trainables.config import resolve
    from trainables.folds import make_folds, train_val_indices
    from trainables.loop import FoldTrainer
    from tune.searcher import FoldedOptunaSearch
    from tune.space import load_space

    data = load_dataset(SAMPLE, cache_dir=tmp_path / "cache")
    assert make_folds("multilabel", 3, 7, data.ids, data.presence) == make_folds("multilabel", 3, 7, data.ids,
                                                                                 data.presence)
    spec = load_space(str(TINY), ROOT / "search_spaces")
    configs = []
    for run in range(2):
        searcher = FoldedOptunaSearch(spec, 2, data.num_classes, f"sqlite:///{tmp_path}/s{run}.db", "r", 2)
        configs.append([searcher.suggest(f"t{i}") for i in range(4)])
    assert configs[0] == configs[1]
    losses = []
    for _ in range(2):
        cfg = resolve(spec.fixed, {"train.max_train_batches": 2, "train.epochs": 1, "data.max_size": 64})
        train_idx, val_idx = train_val_indices([data.ids[:24], data.ids[24:]], 0, data.ids)
        record = next(FoldTrainer(cfg, data, train_idx, val_idx[:8], fold=0).epochs())
        losses.append((record["train_loss"], record["val_miou"]))
    assert losses[0] == losses[1]


def test_resume_on_a_changed_dataset_says_so(tmp_path, capsys, monkeypatch):
    from trainables.runfiles import write_experiment_json

    monkeypatch.setenv("SEGHPO_CACHE", str(tmp_path / "cache"))
    path = write_coco(tmp_path / "d", images=4)
    run_dir = tmp_path / "runs" / "x"
    write_experiment_json(run_dir, {}, {"fingerprint": "0000", "source": str(path)})
    (run_dir / "tune").mkdir()
    (run_dir / "tune" / "tuner.pkl").write_bytes(b"")
    code, err = run_cli(["--space", str(TINY), "--data", str(path), "--storage", str(tmp_path / "runs"),
                         "--name", "x", "--resume", "--folds", "2"], capsys)
    assert code == 2 and "the dataset changed since this experiment started" in err


def test_security_defaults():
    """Checkpoints load with weights_only, YAML with safe_load, the dashboard binds to 127.0.0.1."""
    sources = {p: p.read_text() for p in ROOT.glob("*/*.py") if p.parts[-2] in ("trainables", "tune", "ensemble")}
    calls = 0
    for path, text in sources.items():
        for call in text.split("torch.load(")[1:]:
            calls += 1
            assert "weights_only=True" in call[:250], f"{path}: torch.load({call[:80]}"
        for line in text.splitlines():
            assert "yaml.load(" not in line or "Loader=_ValueLoader" in line, f"{path}: {line.strip()}"
    assert calls >= 2
    assert 'dashboard_host="127.0.0.1"' in sources[ROOT / "tune" / "cluster.py"]


def test_no_api_key_in_experiment_json(tmp_path, monkeypatch):
    from trainables.runfiles import redact, write_experiment_json

    monkeypatch.setattr(sys, "argv", ["tune/run.py", "--wandb-api-key", "SECRET123", "--space", "x"])
    write_experiment_json(tmp_path, {"space": "x"}, {"fingerprint": "f"})
    text = (tmp_path / "experiment.json").read_text()
    assert "SECRET123" not in text and "***" in text
    assert redact(["--token", "abc", "--name", "n"]) == ["--token", "***", "--name", "n"]
