"""Submission files in a competition's format, read back with hand-written decoders of each
convention (pixel numbering, id formats, class rows, empty masks, row order)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from ensemble.submission import Submission, read_sample
from trainables.errors import InputError

NAMES = ["background", "scratch", "dent", "rust", "hole"]


def decode_by_hand(rle: str, height: int, width: int, order: str, empty: str = "") -> np.ndarray:
    """Pixel k (1-based) is (row, col) = ((k-1) % H, (k-1) // H) in column order,
    ((k-1) // W, (k-1) % W) in row order."""
    mask = np.zeros((height, width), dtype=bool)
    if rle.strip() in ("", empty):
        return mask
    values = [int(v) for v in rle.split()]
    for start, length in zip(values[::2], values[1::2]):
        for k in range(start, start + length):
            if order == "column":
                mask[(k - 1) % height, (k - 1) // height] = True
            else:
                mask[(k - 1) // width, (k - 1) % width] = True
    return mask


def labels(seed: int, shape=(7, 5), classes: int = 5) -> np.ndarray:
    lab = np.random.default_rng(seed).integers(0, classes, shape).astype(np.uint8)
    lab[:, -1] = 0  # a column of background, and class 4 absent from image 0: empty masks too
    if seed == 0:
        lab[lab == 4] = 1
    return lab


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def read_rows(text: str) -> tuple[list[str], list[dict]]:
    reader = csv.DictReader(text.splitlines())
    return list(reader.fieldnames), list(reader)


@pytest.mark.parametrize("order", ["column", "row"])
def test_default_format_both_orders(order):
    sub = Submission(NAMES, "multiclass", None, order)
    lab = {f"img{i}.png": labels(i) for i in range(2)}
    for name, lab_i in lab.items():
        sub.add(name, lab_i)
    header, rows = read_rows(sub.text())
    assert header == ["image_id", "class", "rle", "height", "width"]
    assert len(rows) == 2 * 4  # background left out
    for r in rows:
        truth = lab[r["image_id"]] == NAMES.index(r["class"])
        got = decode_by_hand(r["rle"], int(r["height"]), int(r["width"]), order)
        np.testing.assert_array_equal(got, truth)
    other = "row" if order == "column" else "column"
    assert any(not np.array_equal(decode_by_hand(r["rle"], 7, 5, other), lab[r["image_id"]] == NAMES.index(r["class"]))
               for r in rows)  # the two orders really differ on these masks


def test_class_in_id_with_extension_and_indices(tmp_path):
    """Severstal: ImageId_ClassId = '<name>.jpg_<class index>', sample order kept (not sorted)."""
    ids = ["b.jpg", "a.jpg"]
    sample = write_csv(tmp_path / "sample.csv", ["ImageId_ClassId", "EncodedPixels"],
                       [[f"{i}_{c}", "1 1"] for i in ids for c in (3, 1, 2, 4)])
    fmt = read_sample(sample, NAMES)
    assert fmt.class_in_id and fmt.class_offset == 0 and fmt.rle_column == "EncodedPixels"
    sub = Submission(NAMES, "multiclass", None, "column", sample)
    lab = {"a": labels(0), "b": labels(1)}
    for stem, lab_i in lab.items():
        sub.add(f"{stem}.jpg", lab_i)
    header, rows = read_rows(sub.text())
    assert header == ["ImageId_ClassId", "EncodedPixels"]
    assert [r["ImageId_ClassId"] for r in rows] == [f"{i}_{c}" for i in ids for c in (3, 1, 2, 4)]
    for r in rows:
        image, c = r["ImageId_ClassId"].rsplit("_", 1)
        truth = lab[Path(image).stem] == int(c)
        np.testing.assert_array_equal(decode_by_hand(r["EncodedPixels"], 7, 5, "column"), truth)
    assert any(r["EncodedPixels"] == "" for r in rows)  # class 4 absent from image a


def test_class_column_names_without_extension_row_order(tmp_path):
    """UW-Madison: id,class,segmentation with class names and ids without extension."""
    sample = write_csv(tmp_path / "sample.csv", ["id", "class", "segmentation"],
                       [["case7", n, ""] for n in ("dent", "scratch")] + [["case3", n, ""] for n in ("rust", "dent")])
    fmt = read_sample(sample, NAMES)
    assert fmt.class_column == "class" and fmt.class_offset is None and not fmt.class_in_id
    sub = Submission(NAMES, "multiclass", None, "row", sample)
    lab = {"case3": labels(2), "case7": labels(3)}
    for stem, lab_i in lab.items():
        sub.add(f"{stem}.png", lab_i)
    _, rows = read_rows(sub.text())
    assert [(r["id"], r["class"]) for r in rows] == [("case7", "dent"), ("case7", "scratch"), ("case3", "rust"),
                                                     ("case3", "dent")]
    for r in rows:
        truth = lab[r["id"]] == NAMES.index(r["class"])
        np.testing.assert_array_equal(decode_by_hand(r["segmentation"], 7, 5, "row"), truth)


def test_one_row_per_image_minus_one_empty_and_extra_columns(tmp_path):
    """SIIM: ImageId,EncodedPixels with -1 for an empty mask; a binary (2-class) bundle; height/width filled."""
    names = ["background", "pneumothorax"]
    sample = write_csv(tmp_path / "sample.csv", ["ImageId", "EncodedPixels", "height", "width", "note"],
                       [["p2", "-1", 0, 0, "x"], ["p1", "1 2", 0, 0, "y"]])
    sub = Submission(names, "multiclass", None, "column", sample)
    full = np.zeros((6, 4), np.uint8)
    full[1:3, 2] = 1
    sub.add("p1.dcm.png", full)  # not an image extension inside: the key is "p1.dcm"
    sub.add("p1.png", full)
    sub.add("p2.png", np.zeros((6, 4), np.uint8))
    _, rows = read_rows(sub.text())
    assert [r["ImageId"] for r in rows] == ["p2", "p1"]
    assert rows[0]["EncodedPixels"] == "-1" and rows[0]["note"] == "x"
    assert (rows[1]["height"], rows[1]["width"]) == ("6", "4")
    np.testing.assert_array_equal(decode_by_hand(rows[1]["EncodedPixels"], 6, 4, "column"), full == 1)
    assert rows[1]["EncodedPixels"] == "14 2"  # column 2 starts after 2 x 6 pixels; rows 1 and 2


def test_ids_with_underscores_and_extension_are_images_not_classes(tmp_path):
    """Carvana: img,rle_mask with '<car>_01.jpg' ids: one row per image although ids have '_'."""
    names = ["background", "car"]
    sample = write_csv(tmp_path / "sample.csv", ["img", "rle_mask"], [["c0_02.jpg", "1 1"], ["c0_01.jpg", "1 1"]])
    fmt = read_sample(sample, names)
    assert not fmt.class_in_id and fmt.class_column is None
    sub = Submission(names, "multiclass", None, "row", sample)
    masks = {"c0_01": labels(4, classes=2), "c0_02": labels(5, classes=2)}
    for stem, m in masks.items():
        sub.add(f"{stem}.jpg", m)
    _, rows = read_rows(sub.text())
    assert [r["img"] for r in rows] == ["c0_02.jpg", "c0_01.jpg"]
    for r in rows:
        np.testing.assert_array_equal(decode_by_hand(r["rle_mask"], 7, 5, "row"), masks[Path(r["img"]).stem] == 1)


def test_multilabel_one_based_class_indices(tmp_path):
    """Four classes without background, numbered 1..4 in the ids (Severstal read as multilabel)."""
    names = ["c1", "c2", "c3", "c4"]
    sample = write_csv(tmp_path / "sample.csv", ["ImageId_ClassId", "EncodedPixels"],
                       [[f"x.jpg_{c}", ""] for c in (1, 2, 3, 4)])
    assert read_sample(sample, names).class_offset == 1
    binary = np.random.default_rng(0).random((4, 7, 5)) > 0.5
    sub = Submission(names, "multilabel", None, "column", sample)
    sub.add("x.jpg", binary)
    _, rows = read_rows(sub.text())
    for r in rows:
        c = int(r["ImageId_ClassId"].rsplit("_", 1)[1]) - 1
        np.testing.assert_array_equal(decode_by_hand(r["EncodedPixels"], 7, 5, "column"), binary[c])


def test_bad_samples_are_refused_in_one_line(tmp_path):
    sample = write_csv(tmp_path / "sample.csv", ["ImageId_ClassId", "EncodedPixels"],
                       [["a.jpg_1", ""], ["a.jpg_2", ""], ["zzz.jpg_1", ""], ["zzz.jpg_2", ""]])
    sub = Submission(NAMES, "multiclass", None, "column", sample)
    sub.add("a.jpg", labels(0))
    with pytest.raises(InputError, match="zzz.jpg_1.*not predicted"):
        sub.text()
    with pytest.raises(InputError, match="not found"):
        read_sample(tmp_path / "nope.csv", NAMES)
    other = write_csv(tmp_path / "other.csv", ["id", "class", "rle"], [["a", "cat", ""]])
    with pytest.raises(InputError, match="not the bundle's"):
        read_sample(other, NAMES)
    single = write_csv(tmp_path / "single.csv", ["ImageId", "EncodedPixels"], [["a", ""]])
    sub = Submission(NAMES, "multiclass", None, "column", single)
    sub.add("a.png", labels(0))
    with pytest.raises(InputError, match="which one is the mask"):
        sub.text()
