"""COCO and mask-folder edge cases: crowd regions, malformed polygons, files without annotations,
class indices that would collide with the ignore label, mask folders without classes.txt, and
dataset fingerprints that stay those of earlier runs."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from tests.conftest import write_image
from tests.trainables.test_data import uncompressed_rle
from trainables.data import IGNORE_INDEX, file_digest, fingerprint, load_data, load_dataset
from trainables.errors import ConfigError, InputError

H, W = 12, 14
CATS = [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}]


def rect(x0, y0, x1, y1) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def crowd_rle(y0, y1, x0, x1) -> dict:
    """An uncompressed RLE (the form COCO's crowd annotations take) of a box."""
    m = np.zeros((H, W), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return uncompressed_rle(m)


def image(i=1) -> dict:
    return {"id": i, "file_name": f"img{i}.png", "height": H, "width": W}


@pytest.fixture
def crowd_coco(coco_factory):
    """A large car, a crowd of persons over part of it, and one annotated person inside the crowd."""
    anns = [
        {"image_id": 1, "category_id": 2, "iscrowd": 0, "segmentation": [rect(0, 0, 14, 8)]},
        {"image_id": 1, "category_id": 1, "iscrowd": 1, "segmentation": crowd_rle(2, 10, 3, 11)},
        {"image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [rect(5, 4, 8, 7)]},
    ]
    return coco_factory([image()], anns, CATS)


def painted_with_pycocotools(path, cat_index: dict[int, int], crowd_value=None) -> np.ndarray:
    """The expected label image from pycocotools' own decoding: background 0, larger areas first,
    crowd annotations as ``crowd_value`` (None: their class)."""
    coco = COCO(str(path))
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[1], iscrowd=None))
    masks = [(a, coco.annToMask(a).astype(bool)) for a in anns]
    out = np.zeros((H, W), dtype=np.uint8)
    for a, m in sorted(masks, key=lambda am: -int(am[1].sum())):
        out[m] = crowd_value if (a["iscrowd"] and crowd_value is not None) else cat_index[a["category_id"]]
    return out


def test_crowd_regions_are_ignored_by_default(crowd_coco, cache_dir):
    data = load_dataset(crowd_coco, cache_dir=cache_dir)
    expected = painted_with_pycocotools(crowd_coco, {1: 1, 2: 2}, crowd_value=IGNORE_INDEX)
    np.testing.assert_array_equal(data.read_mask(0), expected)
    mask = data.read_mask(0)
    assert (mask == IGNORE_INDEX).sum() == 8 * 8 - 9  # the crowd box less the annotated person in it
    assert mask[5, 6] == 1 and mask[0, 0] == 2  # the person inside the crowd stays on top; car kept outside it
    counts = np.bincount(expected[expected != IGNORE_INDEX].ravel(), minlength=3)
    assert data.pixel_counts.tolist() == counts.tolist()


def test_crowd_class_paints_crowd_regions_as_their_class(crowd_coco, cache_dir):
    data = load_dataset(crowd_coco, cache_dir=cache_dir, crowd="class")
    expected = painted_with_pycocotools(crowd_coco, {1: 1, 2: 2})
    np.testing.assert_array_equal(data.read_mask(0), expected)
    assert (data.read_mask(0) == IGNORE_INDEX).sum() == 0


def test_crowd_regions_are_ignored_in_multilabel_masks(crowd_coco, cache_dir):
    data = load_dataset(crowd_coco, task="multilabel", cache_dir=cache_dir)
    crowd = COCO(str(crowd_coco)).annToMask(json.loads(crowd_coco.read_text())["annotations"][1]).astype(bool)
    mask = data.read_mask(0)
    assert (mask[crowd] == IGNORE_INDEX).all()
    assert (mask[~crowd] != IGNORE_INDEX).all()
    assert mask[0, 0].tolist() == [0, 1]  # car, outside the crowd


def test_unknown_crowd_setting_is_refused(crowd_coco, cache_dir):
    with pytest.raises(ConfigError, match="data.crowd"):
        load_dataset(crowd_coco, cache_dir=cache_dir, crowd="drop")


@pytest.mark.parametrize("bad, problem", [
    (rect(2, 2, 6, 6) + [3], "odd number of coordinates"),  # inside the image
    (rect(-2, 2, 20, 6) + [3], "odd number of coordinates"),  # and points outside it
    ([1, 1, 5, 5], "fewer than 3 points"),
])
def test_malformed_polygons_are_skipped_with_a_warning(coco_factory, cache_dir, caplog, bad, problem):
    """The other polygon of the same annotation is still painted, as pycocotools decodes it."""
    good = rect(8, 6, 12, 10)
    anns = [{"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [bad, good]}]
    path = coco_factory([image()], anns, CATS)
    with caplog.at_level(logging.WARNING, logger="trainables.coco"):
        data = load_dataset(path, cache_dir=cache_dir)
    assert problem in caplog.text and "annotation 7" in caplog.text and str(path) in caplog.text
    expected = COCO(str(path)).annToMask({**anns[0], "segmentation": [good]}).astype(bool)
    np.testing.assert_array_equal(data.read_mask(0) == 1, expected)


def test_a_coco_file_without_annotations_is_unannotated(coco_factory, cache_dir, crowd_coco):
    """Prediction then writes no test metrics: background pixels alone are no ground truth."""
    from ensemble.infer import list_inputs

    empty = coco_factory([image()], [], CATS, name="empty.json")
    data = load_dataset(empty, cache_dir=cache_dir)
    assert data.pixel_counts.sum() > 0  # every pixel is background...
    assert not data.has_annotations  # ...but nothing was annotated
    assert load_dataset(crowd_coco, cache_dir=cache_dir).has_annotations
    paths, ids, scored = list_inputs(empty, "multiclass", "background", cache_dir)
    assert ids == ["img1.png"] and scored is None
    assert list_inputs(crowd_coco, "multiclass", "background", cache_dir)[2] is not None


def many_categories(n: int) -> list[dict]:
    return [{"id": i + 1, "name": f"c{i}"} for i in range(n)]


def test_class_index_255_is_refused_in_multiclass(coco_factory, cache_dir):
    """With background, 255 categories give class 255: today it silently became 'ignored'."""
    anns = [{"image_id": 1, "category_id": 255, "iscrowd": 0, "segmentation": [rect(0, 0, 4, 4)]}]
    path = coco_factory([image()], anns, many_categories(255))
    with pytest.raises(InputError) as err:
        load_dataset(path, cache_dir=cache_dir)
    assert str(path) in str(err.value) and "255" in str(err.value)


def test_class_index_254_is_the_highest_that_fits(coco_factory, cache_dir):
    anns = [{"image_id": 1, "category_id": 254, "iscrowd": 0, "segmentation": [rect(0, 0, 4, 4)]}]
    data = load_dataset(coco_factory([image()], anns, many_categories(254)), cache_dir=cache_dir)
    assert data.num_classes == 255 and data.read_mask(0)[0, 0] == 254 and data.pixel_counts[254] == 16


def test_many_categories_fit_in_multilabel_masks(coco_factory, cache_dir):
    anns = [{"image_id": 1, "category_id": 300, "iscrowd": 0, "segmentation": [rect(0, 0, 4, 4)]}]
    data = load_dataset(coco_factory([image()], anns, many_categories(300)), task="multilabel", cache_dir=cache_dir)
    mask = data.read_mask(0)
    assert mask.shape == (H, W, 300) and mask[0, 0, 299] == 1 and mask[..., :299].sum() == 0


def old_coco_fingerprint(path, task="multiclass", unannotated="background") -> str:
    """How fingerprints of COCO datasets were computed before the crowd and polygon rules."""
    coco = json.loads(path.read_text())
    imgs = sorted(coco["images"], key=lambda im: im["file_name"])
    return fingerprint("coco", file_digest(path), (path.parent / "images").resolve(), task, unannotated,
                       [(im["file_name"], im["height"], im["width"]) for im in imgs])


def test_fingerprints_of_earlier_runs_are_kept(coco_factory, crowd_coco, cache_dir):
    """A dataset whose masks the new rules leave unchanged keeps its fingerprint (experiments and
    caches of earlier runs stay valid); one whose crowd regions are now ignored gets a new one."""
    plain = coco_factory([image()], [{"image_id": 1, "category_id": 1, "segmentation": [rect(0, 0, 4, 4)]}], CATS,
                         name="plain.json")
    assert load_dataset(plain, cache_dir=cache_dir).fingerprint == old_coco_fingerprint(plain)
    assert load_dataset(plain, cache_dir=cache_dir, crowd="class").fingerprint == old_coco_fingerprint(plain)
    assert load_dataset(crowd_coco, cache_dir=cache_dir, crowd="class").fingerprint == old_coco_fingerprint(crowd_coco)
    assert load_dataset(crowd_coco, cache_dir=cache_dir).fingerprint != old_coco_fingerprint(crowd_coco)


# ---------------------------------------------------------------- mask folders without classes.txt


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "folder"
    for k, stem in enumerate("ab"):
        write_image(root / "images" / f"{stem}.png", H, W, seed=k)
    (root / "masks").mkdir()
    a = np.zeros((H, W), np.uint8)
    a[:4] = 1
    b = np.zeros((H, W), np.uint8)
    b[:2, :2] = 2
    Image.fromarray(a).save(root / "masks" / "a.png")
    Image.fromarray(b).save(root / "masks" / "b.png")
    return root


def test_mask_folder_without_classes_txt_has_background_0_by_default(folder, cache_dir, caplog):
    from ensemble.oof import make_tuner

    with caplog.at_level(logging.INFO, logger="trainables.data"):
        data = load_data({"path": str(folder), "images": None, "task": "multiclass", "unannotated": "background",
                          "cache_dir": str(cache_dir)})
    assert data.class_names == ["background", "class_1", "class_2"]
    assert data.has_background
    assert make_tuner(data, False, 10).fallback == 0  # thresholds fall back to it; the submission leaves it out
    said = [r.getMessage() for r in caplog.records if r.name == "trainables.data"]
    assert len(said) == 1 and "class 0 is background" in said[0] and "data.background" in said[0]


def test_mask_folder_background_none_makes_every_index_a_class(folder, cache_dir, caplog):
    from ensemble.oof import make_tuner

    default = load_dataset(folder, cache_dir=cache_dir)
    with caplog.at_level(logging.INFO, logger="trainables.data"):
        data = load_dataset(folder, cache_dir=cache_dir, background="none")
    assert data.class_names == ["class_0", "class_1", "class_2"] and not data.has_background
    assert make_tuner(data, False, 10).fallback is None
    assert "every class index is a real class" in caplog.text
    assert data.fingerprint != default.fingerprint  # folds and experiments of the two are not mixed


def test_mask_folder_default_keeps_its_fingerprint(folder, cache_dir):
    stems = ["a", "b"]
    stat_key = [(s, p.stat().st_size, p.stat().st_mtime_ns)
                for s in stems for p in (folder / "images" / f"{s}.png", folder / "masks" / f"{s}.png")]
    assert load_dataset(folder, cache_dir=cache_dir).fingerprint == fingerprint("folder", folder.resolve(), stat_key,
                                                                                None)


def test_mask_folder_classes_txt_still_decides(folder, cache_dir):
    (folder / "classes.txt").write_text("ground\nsky\ntree\n")
    data = load_dataset(folder, cache_dir=cache_dir)
    assert data.class_names == ["ground", "sky", "tree"] and not data.has_background
    (folder / "classes.txt").write_text("background\nsky\ntree\n")
    assert load_dataset(folder, cache_dir=cache_dir).has_background
    assert not load_dataset(folder, cache_dir=cache_dir, background="none").has_background


def test_unknown_background_setting_is_refused(folder, cache_dir):
    with pytest.raises(ConfigError, match="data.background"):
        load_dataset(folder, cache_dir=cache_dir, background=3)
