"""Kaggle-style run-length encoding: known strings, column-major order, round trips."""
from __future__ import annotations

import numpy as np
import pytest

from ensemble.rle import rle_decode, rle_encode, submission_rows

# Column by column this reads 1 0 0 | 1 0 0 | 1 0 1.
SMALL = np.array([[1, 1, 1], [0, 0, 0], [0, 0, 1]], dtype=bool)


def test_hand_worked_example():
    assert rle_encode(SMALL) == "1 1 4 1 7 1 9 1"
    assert np.array_equal(rle_decode("1 1 4 1 7 1 9 1", (3, 3)), SMALL)


def test_column_major_order():
    # A full first row is three separate runs in column-major order, one run in row-major.
    row = np.zeros((2, 3), dtype=bool)
    row[0] = True
    assert rle_encode(row) == "1 1 3 1 5 1"
    column = np.zeros((2, 3), dtype=bool)
    column[:, 1] = True
    assert rle_encode(column) == "3 2"


def test_empty_and_full_masks():
    assert rle_encode(np.zeros((4, 5), dtype=bool)) == ""
    assert not rle_decode("", (4, 5)).any()
    assert rle_encode(np.ones((4, 5), dtype=bool)) == "1 20"
    assert rle_decode("1 20", (4, 5)).all()


@pytest.mark.parametrize("seed", range(5))
def test_random_round_trip(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(1, 60, 2))
    mask = rng.random(shape) < rng.random()
    decoded = rle_decode(rle_encode(mask), shape)
    assert decoded.dtype == bool and decoded.shape == shape
    assert np.array_equal(decoded, mask)


def test_decode_rejects_malformed_strings():
    with pytest.raises(ValueError):
        rle_decode("1 2 3", (3, 3))
    with pytest.raises(ValueError):
        rle_decode("8 3", (3, 3))


def test_submission_rows_multiclass():
    labels = np.array([[0, 1, 1], [2, 255, 1], [0, 2, 0]])
    rows = submission_rows("img7", labels=labels, class_names=["bg", "cat", "dog"])
    assert [r["class"] for r in rows] == ["cat", "dog"]
    assert rows[0] == {
        "image_id": "img7", "class": "cat", "rle": "4 1 7 2", "height": 3, "width": 3
    }
    for c, row in zip((1, 2), rows):
        assert np.array_equal(rle_decode(row["rle"], (row["height"], row["width"])), labels == c)
    with pytest.raises(ValueError):
        submission_rows("img7", labels=labels)


def test_submission_rows_multilabel():
    rng = np.random.default_rng(0)
    binary = rng.random((3, 5, 7)) < 0.3
    rows = submission_rows("a", binary=binary)
    assert [r["class"] for r in rows] == ["0", "1", "2"]
    for c, row in enumerate(rows):
        assert (row["height"], row["width"]) == (5, 7)
        assert np.array_equal(rle_decode(row["rle"], (5, 7)), binary[c])
    named = submission_rows("a", binary=binary, class_names=["x", "y", "z"], skip_classes=(1,))
    assert [r["class"] for r in named] == ["x", "z"]
