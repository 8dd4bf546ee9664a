"""Loading datasets: COCO (polygons, RLE, category mapping, overlaps, cache), mask folders, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from tests.conftest import SAMPLE_DIR, write_image
from trainables import coco as coco_module
from trainables.data import IGNORE_INDEX, load_dataset, read_image
from trainables.dataset import SegDataset, build_transforms
from trainables.errors import InputError

H, W = 8, 10
CATS = [{"id": 42, "name": "cat42"}, {"id": 3, "name": "cat3"}, {"id": 7, "name": "cat7"}]  # unsorted, gaps


def rect_polygon(x0, y0, x1, y1) -> list[list[float]]:
    """Rectangle polygon whose pixels are columns x0..x1-1 and rows y0..y1-1."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def box(y0, y1, x0, x1, value=1) -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    m[y0:y1, x0:x1] = value
    return m


def uncompressed_rle(m: np.ndarray) -> dict:
    """COCO's uncompressed RLE written by hand: column-major run lengths, starting with zeros."""
    flat = m.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": [m.shape[0], m.shape[1]], "counts": [int(c) for c in counts]}


def compressed_rle(m: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def img(i, name=None, h=H, w=W) -> dict:
    return {"id": i, "file_name": name or f"img{i}.png", "height": h, "width": w}


@pytest.fixture
def three_forms(coco_factory):
    """Image 1: polygon (cat 3) + compressed RLE (cat 42) + uncompressed RLE (cat 7); image 2: nothing."""
    anns = [
        {"image_id": 1, "category_id": 3, "segmentation": rect_polygon(2, 1, 6, 5)},  # rows 1-4, cols 2-5
        {"image_id": 1, "category_id": 42, "segmentation": compressed_rle(box(6, 8, 0, 3))},
        {"image_id": 1, "category_id": 7, "segmentation": uncompressed_rle(box(5, 8, 7, 10))},
    ]
    return coco_factory([img(1), img(2)], anns, CATS)


def expected_three_forms(fill: int, offset: int) -> np.ndarray:
    m = np.full((H, W), fill, dtype=np.uint8)
    m[1:5, 2:6] = 0 + offset  # cat 3 -> first class after background
    m[5:8, 7:10] = 1 + offset  # cat 7
    m[6:8, 0:3] = 2 + offset  # cat 42
    return m


# ---------------------------------------------------------------- COCO, multiclass


def test_coco_polygon_rle_and_uncompressed_rle_with_background(three_forms, cache_dir):
    data = load_dataset(three_forms, cache_dir=cache_dir)
    assert data.class_names == ["background", "cat3", "cat7", "cat42"]  # ids 3, 7, 42 -> 1, 2, 3
    assert data.has_background and data.num_classes == 4 and len(data) == 2
    assert data.ids == ["img1.png", "img2.png"]
    assert data.sizes == [(H, W), (H, W)]
    mask = data.read_mask(0)
    assert mask.dtype == np.uint8 and mask.shape == (H, W)
    np.testing.assert_array_equal(mask, expected_three_forms(fill=0, offset=1))
    # the image without annotations is all background
    np.testing.assert_array_equal(data.read_mask(1), np.zeros((H, W), np.uint8))
    assert data.pixel_counts.tolist() == [80 - 16 - 9 - 6 + 80, 16, 9, 6]
    assert data.presence.tolist() == [[True, True, True, True], [True, False, False, False]]


def test_coco_unannotated_ignore_gives_classes_from_zero(three_forms, cache_dir):
    data = load_dataset(three_forms, unannotated="ignore", cache_dir=cache_dir)
    assert data.class_names == ["cat3", "cat7", "cat42"]
    assert not data.has_background and data.num_classes == 3
    np.testing.assert_array_equal(data.read_mask(0), expected_three_forms(fill=IGNORE_INDEX, offset=0))
    np.testing.assert_array_equal(data.read_mask(1), np.full((H, W), IGNORE_INDEX, np.uint8))
    assert data.pixel_counts.tolist() == [16, 9, 6]  # ignored pixels are counted nowhere
    assert data.presence.tolist() == [[True, True, True], [False, False, False]]


@pytest.mark.parametrize("small_first", [True, False])
def test_coco_small_annotation_stays_on_top(coco_factory, cache_dir, small_first):
    big = {"image_id": 1, "category_id": 3, "segmentation": rect_polygon(0, 0, W, H)}
    small = {"image_id": 1, "category_id": 7, "segmentation": rect_polygon(4, 3, 6, 5)}
    anns = [small, big] if small_first else [big, small]
    path = coco_factory([img(1)], anns, CATS)
    mask = load_dataset(path, cache_dir=cache_dir).read_mask(0)
    expected = np.full((H, W), 1, np.uint8)
    expected[3:5, 4:6] = 2
    np.testing.assert_array_equal(mask, expected)


def test_coco_images_relative_to_image_root(tmp_path, cache_dir):
    from tests.conftest import write_coco

    root = tmp_path / "pictures"
    images = [img(1, "seqA/frame1.png"), img(2, "seqB/frame1.png")]
    anns = [{"image_id": 2, "category_id": 3, "segmentation": rect_polygon(0, 0, 2, 2)}]
    path = write_coco(tmp_path / "labels" / "coco.json", images, anns, CATS, image_root=root)
    with pytest.raises(InputError, match="image folder not found"):  # default root <json dir>/images
        load_dataset(path, cache_dir=cache_dir)
    data = load_dataset(path, images=root, cache_dir=cache_dir)
    assert data.ids == ["seqA/frame1.png", "seqB/frame1.png"]
    assert data.image_paths == [root / "seqA" / "frame1.png", root / "seqB" / "frame1.png"]
    assert data.read_image(1).shape == (H, W, 3)
    assert int((data.read_mask(1) == 1).sum()) == 4


def test_coco_missing_image_file_names_it(coco_factory, cache_dir):
    path = coco_factory([img(1)], [], CATS)
    (path.parent / "images" / "img1.png").unlink()
    with pytest.raises(InputError) as err:
        load_dataset(path, cache_dir=cache_dir)
    assert "img1.png" in str(err.value)


# ---------------------------------------------------------------- the mask cache


def test_mask_cache_is_reused_without_rasterising(three_forms, cache_dir, monkeypatch):
    first = load_dataset(three_forms, cache_dir=cache_dir)
    assert all(p.exists() and p.is_relative_to(cache_dir) for p in first.mask_paths)

    def no_rasterise(*args, **kwargs):
        raise AssertionError("masks rasterised again although the cache is valid")

    monkeypatch.setattr(coco_module, "rasterise", no_rasterise)
    second = load_dataset(three_forms, cache_dir=cache_dir)
    assert second.fingerprint == first.fingerprint
    assert second.mask_paths == first.mask_paths
    np.testing.assert_array_equal(second.read_mask(0), first.read_mask(0))
    np.testing.assert_array_equal(second.pixel_counts, first.pixel_counts)
    np.testing.assert_array_equal(second.presence, first.presence)


def test_mask_cache_is_keyed_by_a_fingerprint(three_forms, cache_dir, monkeypatch):
    first = load_dataset(three_forms, cache_dir=cache_dir)
    assert len(first.fingerprint) == 16
    # other options, other cache
    assert load_dataset(three_forms, unannotated="ignore", cache_dir=cache_dir).fingerprint != first.fingerprint
    # a changed annotation file: new fingerprint, and the masks are rasterised again
    coco = json.loads(three_forms.read_text())
    coco["annotations"][0]["segmentation"] = rect_polygon(0, 0, 2, 2)
    three_forms.write_text(json.dumps(coco))
    calls = []
    original = coco_module.rasterise
    monkeypatch.setattr(coco_module, "rasterise", lambda *a, **k: calls.append(1) or original(*a, **k))
    changed = load_dataset(three_forms, cache_dir=cache_dir)
    assert changed.fingerprint != first.fingerprint
    assert len(calls) == 2  # both images
    assert changed.read_mask(0)[0:2, 0:2].tolist() == [[1, 1], [1, 1]]
    assert changed.read_mask(0)[1:5, 2:6].max() == 0  # the old rectangle is gone (background)


# ---------------------------------------------------------------- COCO, multilabel


def test_coco_multilabel_overlaps_set_both_channels(coco_factory, cache_dir):
    anns = [
        {"image_id": 1, "category_id": 3, "segmentation": rect_polygon(0, 0, 6, 4)},  # rows 0-3, cols 0-5
        {"image_id": 1, "category_id": 42, "segmentation": rect_polygon(4, 2, 8, 6)},  # rows 2-5, cols 4-7
    ]
    path = coco_factory([img(1), img(2)], anns, CATS)
    data = load_dataset(path, task="multilabel", cache_dir=cache_dir)
    assert data.class_names == ["cat3", "cat7", "cat42"]
    assert not data.has_background and data.task == "multilabel"
    mask = data.read_mask(0)
    assert mask.shape == (H, W, 3) and mask.dtype == np.uint8
    assert mask[2, 4].tolist() == [1, 0, 1]  # the overlap has both labels
    assert mask[0, 0].tolist() == [1, 0, 0]
    assert mask[5, 7].tolist() == [0, 0, 1]
    assert mask[7, 9].tolist() == [0, 0, 0]  # unannotated: no label (not ignored)
    assert mask[..., 0].sum() == 24 and mask[..., 1].sum() == 0 and mask[..., 2].sum() == 16
    assert data.pixel_counts.tolist() == [24, 0, 16]
    assert data.presence.tolist() == [[True, False, True], [False, False, False]]
    np.testing.assert_array_equal(data.read_mask(1), np.zeros((H, W, 3), np.uint8))

    ignored = load_dataset(path, task="multilabel", unannotated="ignore", cache_dir=cache_dir)
    assert ignored.fingerprint != data.fingerprint
    m = ignored.read_mask(0)
    assert m[7, 9].tolist() == [IGNORE_INDEX] * 3 and m[2, 4].tolist() == [1, 0, 1]
    assert int((m == IGNORE_INDEX).all(-1).sum()) == H * W - (24 + 16 - 4)
    assert (ignored.read_mask(1) == IGNORE_INDEX).all()


# ---------------------------------------------------------------- image/mask folders


@pytest.fixture
def folder(tmp_path):
    """images/ (RGB png, grayscale png, RGBA png) + masks/ class-index PNGs + classes.txt (3 classes)."""
    root = tmp_path / "folder"
    write_image(root / "images" / "a.png", H, W, "RGB", seed=1)
    write_image(root / "images" / "b.png", H, W, "L", seed=2)
    write_image(root / "images" / "c.png", H, W, "RGBA", seed=3)
    masks = {"a": box(0, 4, 0, W, 1), "b": box(0, 2, 0, 2, 2), "c": np.zeros((H, W), np.uint8)}
    masks["b"][7, :] = IGNORE_INDEX  # a row of ignored pixels
    (root / "masks").mkdir()
    for stem, m in masks.items():
        Image.fromarray(m).save(root / "masks" / f"{stem}.png")
    (root / "classes.txt").write_text("ground\nsky\n\ntree\n")
    return root


def test_folder_dataset(folder, cache_dir):
    data = load_dataset(folder, cache_dir=cache_dir)
    assert data.class_names == ["ground", "sky", "tree"]
    assert data.ids == ["a.png", "b.png", "c.png"] and data.task == "multiclass"
    assert not data.has_background
    assert data.sizes == [(H, W)] * 3
    assert data.pixel_counts.tolist() == [40 + (70 - 4) + 80, 40, 4]  # 10 ignored pixels of b uncounted
    assert data.presence.tolist() == [[True, True, False], [True, False, True], [True, False, False]]
    assert data.read_mask(1)[7].tolist() == [IGNORE_INDEX] * W
    # the stats are cached too: a second load gives the same
    again = load_dataset(folder, cache_dir=cache_dir)
    assert again.fingerprint == data.fingerprint
    np.testing.assert_array_equal(again.presence, data.presence)


def test_folder_images_become_three_channels(folder, cache_dir):
    data = load_dataset(folder, cache_dir=cache_dir)
    gray = np.asarray(Image.open(folder / "images" / "b.png"))
    rgba = np.asarray(Image.open(folder / "images" / "c.png"))
    assert gray.ndim == 2 and rgba.shape[-1] == 4
    b, c = read_image(data.image_paths[1]), data.read_image(2)
    assert b.shape == (H, W, 3) and c.shape == (H, W, 3) and b.dtype == np.uint8
    np.testing.assert_array_equal(b, np.repeat(gray[..., None], 3, axis=-1))
    np.testing.assert_array_equal(c, rgba[..., :3])
    dataset = SegDataset(data, [0, 1, 2], build_transforms({}, (H, W), train=False))
    for k in range(3):
        image, target = dataset[k]
        assert image.shape == (3, H, W) and image.dtype.is_floating_point
        assert target.shape == (H, W) and target.dtype == torch.int64
    assert dataset[1][1][7].tolist() == [IGNORE_INDEX] * W


def test_folder_unmatched_names(folder, cache_dir):
    write_image(folder / "images" / "d.png", H, W)
    with pytest.raises(InputError) as err:
        load_dataset(folder, cache_dir=cache_dir)
    assert str(folder) in str(err.value) and "'d'" in str(err.value)


def test_folder_class_index_above_classes_txt(folder, cache_dir):
    Image.fromarray(box(0, 1, 0, 1, 3)).save(folder / "masks" / "c.png")  # class 3 of 0..2
    with pytest.raises(InputError) as err:
        load_dataset(folder, cache_dir=cache_dir)
    assert str(folder / "masks" / "c.png") in str(err.value) and "3 classes" in str(err.value)


def test_folder_without_classes_txt_names_classes(folder, cache_dir):
    (folder / "classes.txt").unlink()
    data = load_dataset(folder, cache_dir=cache_dir)
    assert data.class_names == ["background", "class_1", "class_2"] and data.has_background  # data.background=0
    data = load_dataset(folder, cache_dir=cache_dir, background="none")
    assert data.class_names == ["class_0", "class_1", "class_2"] and not data.has_background


# ---------------------------------------------------------------- bad input names the file


def test_missing_file(tmp_path, cache_dir):
    path = tmp_path / "nope.json"
    with pytest.raises(InputError) as err:
        load_dataset(path, cache_dir=cache_dir)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content, problem", [
    ("{not json", "invalid JSON"),
    (json.dumps({"annotations": [], "categories": [{"id": 1, "name": "a"}]}), "no 'images'"),
    (json.dumps({"images": [img(1)], "categories": [{"id": 1, "name": "a"}],
                 "annotations": [{"id": 5, "image_id": 99, "category_id": 1, "segmentation": []}]}),
     "unknown image_id 99"),
    (json.dumps({"images": [img(1)], "categories": [{"id": 1, "name": "a"}],
                 "annotations": [{"id": 5, "image_id": 1, "category_id": 2, "segmentation": []}]}),
     "unknown category_id 2"),
    ("[]", "JSON object"),
])
def test_bad_coco_names_the_file(tmp_path, cache_dir, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    (tmp_path / "images").mkdir()
    with pytest.raises(InputError) as err:
        load_dataset(path, cache_dir=cache_dir)
    assert str(err.value).startswith(f"{path}: ")
    assert problem in str(err.value)


def test_rle_size_mismatch_names_the_file(coco_factory, cache_dir):
    rle = compressed_rle(np.ones((4, 4), np.uint8))
    path = coco_factory([img(1)], [{"image_id": 1, "category_id": 3, "segmentation": rle}], CATS)
    with pytest.raises(InputError, match="RLE size") as err:
        load_dataset(path, cache_dir=cache_dir)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------- the shipped sample


def test_shipped_sample(sample):
    assert sample.source == SAMPLE_DIR / "annotations.json"
    assert len(sample) == 72 and sample.num_classes == 12
    assert sample.class_names[0] == "background" and sample.has_background
    assert sample.class_names[1:4] == ["Sky", "Building", "Pole"]
    assert sample.sizes[0] == (120, 160)
    assert sample.read_mask(0).shape == (120, 160) and sample.read_mask(0).max() < 12
    assert sample.read_image(0).shape == (120, 160, 3)
    assert sample.presence.shape == (72, 12) and sample.presence.any(0).all()
    assert int(sample.pixel_counts.sum()) == 72 * 120 * 160  # every pixel is background or a class


def test_shipped_sample_multilabel(tmp_path):
    data = load_dataset(SAMPLE_DIR / "annotations-multilabel.json", task="multilabel", cache_dir=tmp_path)
    assert len(data) == 72 and data.num_classes == 14
    assert data.class_names[-3:] == ["Vehicle", "Dynamic", "Flat"]
    mask = data.read_mask(0)
    assert mask.shape == (120, 160, 14)
    assert (mask.sum(-1) > 1).any()  # the group categories overlap their members
