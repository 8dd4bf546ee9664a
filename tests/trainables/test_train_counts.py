"""Class-weight pixel counts come from a fold's training images only, exactly: the sum of their
masks' per-class pixels, never validation or holdout pixels, checked against counting the masks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import tiny_config, write_image
from trainables.data import IGNORE_INDEX, load_dataset
from trainables.extra import concat
from trainables.folds import make_split, train_val_indices
from trainables.loop import FoldTrainer


def brute_counts(data, indices) -> np.ndarray:
    """Per-class labelled pixels of ``indices``, counted on the masks themselves."""
    total = np.zeros(data.num_classes, np.int64)
    for i in indices:
        mask = data.read_mask(i)
        if data.task == "multiclass":
            total += np.bincount(mask[mask != IGNORE_INDEX].ravel(), minlength=data.num_classes)[:data.num_classes]
        else:
            total += (mask == 1).sum((0, 1))
    return total


def trainer_counts(data, train_idx, val_idx) -> np.ndarray:
    trainer = FoldTrainer(tiny_config(), data, train_idx, val_idx, fold=0)
    return trainer._train_pixel_counts(train_idx)


def mask_folder(root: Path, n: int = 6, broken: int | None = None) -> Path:
    """images/ + masks/ of ``n`` small images, classes 0..3 and some ignored pixels; image ``broken``
    is not a readable image (the loader skips it)."""
    rng = np.random.default_rng(1)
    (root / "masks").mkdir(parents=True)
    for k in range(n):
        h, w = 20 + k, 30
        if k == broken:
            (root / "images").mkdir(exist_ok=True)
            (root / "images" / f"im{k}.png").write_bytes(b"not a png")
        else:
            write_image(root / "images" / f"im{k}.png", h, w, seed=k)
        mask = rng.choice([0, 1, 2, 3, IGNORE_INDEX], size=(h, w), p=[0.5, 0.2, 0.15 if k % 2 else 0.0,
                                                                         0.1 if k % 2 else 0.25, 0.05]).astype(np.uint8)
        Image.fromarray(mask).save(root / "masks" / f"im{k}.png")
    (root / "classes.txt").write_text("background\na\nb\nc\n")
    return root


def test_sample_fold_counts_are_the_training_masks_only(sample):
    folds, held = make_split("kfold", 3, 0, sample.ids, sample.presence, holdout=0.1)
    assert held
    for fold in range(3):
        train_idx, val_idx = train_val_indices(folds, fold, sample.ids)
        got = trainer_counts(sample, train_idx, val_idx[:2])
        np.testing.assert_array_equal(got, brute_counts(sample, train_idx))
        assert got.dtype.kind == "i"
    # and the dataset's own counts are the sum over every image
    np.testing.assert_array_equal(sample.pixel_counts, brute_counts(sample, range(len(sample))))


def test_mask_folder_subset_and_extra_train_counts(tmp_path, cache_dir):
    data = load_dataset(mask_folder(tmp_path / "d", broken=2), cache_dir=cache_dir)
    assert len(data) == 5  # the unreadable image is skipped, and its mask with it
    np.testing.assert_array_equal(data.pixel_counts, brute_counts(data, range(len(data))))
    train_idx, val_idx = [0, 2, 3], [1, 4]
    np.testing.assert_array_equal(trainer_counts(data, train_idx, val_idx), brute_counts(data, train_idx))
    # a subset (data.subset / --debug): its counts are its images', exactly
    sub = data.subset([1, 3, 4])
    np.testing.assert_array_equal(sub.pixel_counts, brute_counts(sub, range(3)))
    np.testing.assert_array_equal(trainer_counts(sub, [0, 2], [1]), brute_counts(sub, [0, 2]))
    # extra training images appended (data.extra_train): theirs count, the validation images' never
    extra = load_dataset(mask_folder(tmp_path / "x", n=3), cache_dir=cache_dir)
    combined = concat(data, [extra])
    train_plus = train_idx + list(range(len(data), len(combined)))
    np.testing.assert_array_equal(trainer_counts(combined, train_plus, val_idx), brute_counts(combined, train_plus))


def test_multilabel_coco_counts(coco_factory, cache_dir):
    images = [{"id": k + 1, "file_name": f"i{k}.png", "height": 16, "width": 20} for k in range(4)]
    anns = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 8], "area": 80, "iscrowd": 0,
             "segmentation": [[0, 0, 10, 0, 10, 8, 0, 8]]},
            {"image_id": 1, "category_id": 2, "bbox": [5, 4, 10, 8], "area": 80, "iscrowd": 0,
             "segmentation": [[5, 4, 15, 4, 15, 12, 5, 12]]},
            {"image_id": 2, "category_id": 2, "bbox": [0, 0, 20, 16], "area": 320, "iscrowd": 0,
             "segmentation": [[0, 0, 20, 0, 20, 16, 0, 16]]},
            {"image_id": 3, "category_id": 1, "bbox": [2, 2, 4, 4], "area": 16, "iscrowd": 0,
             "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]}]
    path = coco_factory(images, anns, [{"id": 1, "name": "p"}, {"id": 2, "name": "q"}])
    data = load_dataset(path, task="multilabel", cache_dir=cache_dir)
    np.testing.assert_array_equal(trainer_counts(data, [1, 2], [0, 3]), brute_counts(data, [1, 2]))
    np.testing.assert_array_equal(trainer_counts(data, [0, 3], [1, 2]), brute_counts(data, [0, 3]))


@pytest.mark.parametrize("kind", ["folder", "coco"])
def test_caches_written_before_per_image_counts_still_give_exact_counts(kind, tmp_path, cache_dir, coco_factory):
    """A stats.json of an older version (no per-image counts) is rebuilt, not trusted for counts."""
    if kind == "folder":
        source = mask_folder(tmp_path / "d")
    else:
        images = [{"id": k + 1, "file_name": f"i{k}.png", "height": 16, "width": 20} for k in range(3)]
        anns = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 8], "area": 80, "iscrowd": 0,
                 "segmentation": [[0, 0, 10, 0, 10, 8, 0, 8]]},
                {"image_id": 3, "category_id": 1, "bbox": [0, 0, 4, 4], "area": 16, "iscrowd": 0,
                 "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]}]
        source = coco_factory(images, anns, [{"id": 1, "name": "p"}])
    first = load_dataset(source, cache_dir=cache_dir)
    stats_files = list(cache_dir.rglob("stats.json"))
    assert len(stats_files) == 1
    stats = json.loads(stats_files[0].read_text())
    old = {k: v for k, v in stats.items() if k != "image_pixel_counts"}  # as older versions wrote it
    stats_files[0].write_text(json.dumps(old))
    again = load_dataset(source, cache_dir=cache_dir)
    assert again.fingerprint == first.fingerprint  # folds and experiments made on it stay valid
    train_idx, val_idx = [0, 2], [1]
    np.testing.assert_array_equal(trainer_counts(again, train_idx, val_idx), brute_counts(again, train_idx))
    np.testing.assert_array_equal(again.pixel_counts, first.pixel_counts)
    assert "image_pixel_counts" in json.loads(stats_files[0].read_text())  # rebuilt, once
