"""``data.extra_train`` may not hold a labelled image that a fold validates on or the holdout keeps
(pseudo-labels made of the training images, say): refused by file content, naming the file."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_image
from tests.ensemble.test_ensemble import _env, _one_error_line
from trainables.errors import InputError
from trainables.extra import check_extra_train, with_extra_train
from trainables.folds import make_split, train_val_indices

ROOT = Path(__file__).resolve().parents[2]


def extra_folder(root: Path, class_names: list[str], copies: dict[str, Path], fresh: int = 2) -> Path:
    """A mask folder of extra training data: ``copies`` (name -> an image file copied byte for byte)
    and ``fresh`` new images, each with a small mask of class indices."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("".join(f"{n}\n" for n in class_names))
    for name, src in copies.items():
        shutil.copyfile(src, root / "images" / name)
    for k in range(fresh):
        write_image(root / "images" / f"new{k}.png", 120, 160, seed=100 + k)
    for p in (root / "images").iterdir():
        with Image.open(p) as im:
            w, h = im.size
        mask = np.random.default_rng(len(p.name)).integers(0, len(class_names), (h, w)).astype(np.uint8)
        Image.fromarray(mask).save(root / "masks" / f"{p.stem}.png")
    return root


@pytest.fixture(scope="module")
def split(sample):
    folds, held = make_split("kfold", 3, 0, sample.ids, sample.presence, holdout=0.1)
    assert held
    return folds, held


def _d(sample, sample_cache, extra) -> dict:
    return {"task": "multiclass", "unannotated": "background", "cache_dir": str(sample_cache),
            "extra_train": [str(extra)]}


def test_a_copied_validation_image_is_refused(sample, sample_cache, split, tmp_path):
    folds, _ = split
    val_id = folds[0][0]
    src = sample.image_paths[sample.ids.index(val_id)]
    extra = extra_folder(tmp_path / "pseudo", sample.class_names, {"pseudo_copy.jpg": src})
    d = _d(sample, sample_cache, extra)
    copy = extra / "images" / "pseudo_copy.jpg"
    # up front, before any trial: the image is a validation image of fold 0
    with pytest.raises(InputError) as err:
        check_extra_train(d, sample, folds)
    assert str(err.value).startswith(f"{copy}:") and val_id in str(err.value) and "fold 0" in str(err.value)
    assert "\n" not in str(err.value)
    # in the trial of fold 0 as well
    train0, _ = train_val_indices(folds, 0, sample.ids)
    with pytest.raises(InputError, match=f"^{copy}: .*{val_id}"):
        with_extra_train(sample, train0, d, 0)
    # for fold 1 the same image is a training image: a repeat, not a leak
    train1, _ = train_val_indices(folds, 1, sample.ids)
    combined, train_plus = with_extra_train(sample, train1, d, 1)
    assert len(train_plus) == len(train1) + 3


def test_a_copied_holdout_image_is_refused(sample, sample_cache, split, tmp_path):
    folds, held = split
    src = sample.image_paths[sample.ids.index(held[0])]
    extra = extra_folder(tmp_path / "pseudo", sample.class_names, {"h.jpg": src})
    with pytest.raises(InputError, match=f"^{extra / 'images' / 'h.jpg'}: .*{held[0]}.*holdout"):
        check_extra_train(_d(sample, sample_cache, extra), sample, folds)
    for fold in range(3):  # never a training image of any fold
        with pytest.raises(InputError, match="h.jpg"):
            with_extra_train(sample, train_val_indices(folds, fold, sample.ids)[0], _d(sample, sample_cache, extra),
                             fold)


def test_per_fold_sets_are_checked_against_their_own_fold(sample, sample_cache, split, tmp_path):
    """``{fold}`` entries: fold f's set may repeat fold f's training images, never its validation ones."""
    folds, _ = split
    train0, _ = train_val_indices(folds, 0, sample.ids)
    own_train = sample.image_paths[train0[0]]  # in fold 1 or 2, so a training image of fold 0
    for f in range(3):
        extra_folder(tmp_path / "pseudo" / f"fold{f}", sample.class_names, {"t.jpg": own_train} if f == 0 else {})
    d = _d(sample, sample_cache, tmp_path / "pseudo" / "fold{fold}")
    check_extra_train(d, sample, folds)  # accepted
    # the same file in fold 1's set, where it is a validation image (or fold 2's)
    other = next(f for f in (1, 2) if sample.ids[train0[0]] in folds[f])
    shutil.copyfile(own_train, tmp_path / "pseudo" / f"fold{other}" / "images" / "new0.png")
    with pytest.raises(InputError, match=f"fold{other}/images/new0.png: .*fold {other}"):
        check_extra_train(d, sample, folds)


@pytest.mark.slow
def test_plain_cli_refuses_in_one_line(sample, sample_cache, tmp_path):
    from trainables.config import resolve

    f = resolve({})["folds"]  # the CLI's own split of the sample: a validation image of its fold 0
    folds, _ = make_split(f["strategy"], f["k"], f["seed"], sample.ids, sample.presence, f["group_regex"])
    val_id = folds[0][1]
    extra = extra_folder(tmp_path / "pseudo", sample.class_names,
                         {"c.jpg": sample.image_paths[sample.ids.index(val_id)]}, fresh=1)
    proc = subprocess.run(
        [sys.executable, "trainables/train.py", "--fold", "0", "--out", str(tmp_path / "out"), "--set",
         f"data.extra_train=['{extra}']", "train.device=cpu", "model.weights=null", "model.encoder=resnet18",
         "data.max_size=96", "train.image_size=[64,96]", "train.epochs=1", "train.max_train_batches=1",
         "model.kwargs={encoder_depth: 3, decoder_channels: [32, 16, 8]}"],
        cwd=ROOT, env=_env(sample_cache), capture_output=True, text=True, timeout=300)
    line = _one_error_line(proc)
    assert line.startswith(f"error: {extra / 'images' / 'c.jpg'}:") and val_id in line, line
    assert not (tmp_path / "out" / "fold0").exists()
