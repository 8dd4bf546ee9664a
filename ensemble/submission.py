"""``submission.csv`` in this tool's format or in a competition's, read from its sample file.

Without a sample: ``image_id,class,rle,height,width``, one row per image and class (multiclass:
background left out when the rule falls back to it), in prediction order.

With ``--sample-submission sample_submission.csv`` the file copies the sample's conventions:

* the columns and their order (the first column is the id; the RLE column is the one named like
  ``rle``/``EncodedPixels``/``segmentation``/``predicted``/``mask``, else the last; a column
  named like ``class``/``label``/``category`` holds the class);
* image x class rows either as a class column (UW-Madison: ``id,class,segmentation``) or in the
  id (Severstal: ``ImageId_ClassId`` = ``0002cc93b.jpg_1``), a class written as its name or its
  index (an index one past the last class is read as 1-based, e.g. 1..4 for four classes
  without background); one row per image (SIIM, Carvana) when the ids carry no class, for a
  bundle with one foreground class;
* the id with or without the image's extension, exactly as the sample writes it;
* the row order of the sample (every id in it must have been predicted);
* the empty-mask value (``""``, or ``-1`` as SIIM writes it); other columns keep the sample's
  values, ``height``/``width`` are filled in.

The RLE flattening (``--rle-order column | row``) cannot be read from a sample whose masks are
placeholders: it is given on the command line (column-major, the Kaggle default).
"""
from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ensemble.rle import submission_rows
from trainables.data import IMAGE_SUFFIXES
from trainables.errors import InputError
from trainables.io import atomic_write_text

logger = logging.getLogger(__name__)

DEFAULT_COLUMNS = ["image_id", "class", "rle", "height", "width"]
RLE_NAMES = re.compile(r"rle|encoded|pixels|segmentation|predict|mask", re.I)
CLASS_NAMES = re.compile(r"class|label|category", re.I)


def image_key(name: str) -> str:
    """File name without its image extension (and folders): how predictions and sample ids meet."""
    name = Path(name).name
    return name[: -len(Path(name).suffix)] if Path(name).suffix.lower() in IMAGE_SUFFIXES else name


@dataclass
class SampleFormat:
    columns: list[str]
    id_column: str
    rle_column: str
    class_column: str | None = None
    class_in_id: bool = False  # "<image>_<class>" ids
    class_offset: int | None = None  # class index = token - offset; None: tokens are class names
    empty: str = ""
    rows: list[dict] = field(default_factory=list)  # the sample's rows, in order

    def class_of(self, token: str, class_names: list[str], path: Path) -> int:
        if self.class_offset is None:
            return class_names.index(token)
        return int(token) - self.class_offset

    def target(self, row: dict, class_names: list[str], path: Path) -> tuple[str, int | None]:
        """(image key, class index or None for one row per image) of a sample row."""
        ident = row[self.id_column]
        if self.class_column:
            return image_key(ident), self.class_of(row[self.class_column], class_names, path)
        if self.class_in_id:
            image, token = ident.rsplit("_", 1)
            return image_key(image), self.class_of(token, class_names, path)
        return image_key(ident), None


def _class_tokens(tokens: list[str], class_names: list[str]) -> int | None | bool:
    """How class tokens name classes: None (names), an index offset (0 or 1), False (not classes)."""
    if tokens and all(t in class_names for t in tokens):
        return None
    if tokens and all(t.isdigit() for t in tokens):
        values = [int(t) for t in tokens]
        if max(values) < len(class_names):
            return 0
        if min(values) >= 1 and max(values) == len(class_names):
            return 1
    return False


def read_sample(path: Path, class_names: list[str]) -> SampleFormat:
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except FileNotFoundError:
        raise InputError(path, "sample submission not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"cannot read sample submission ({exc})") from None
    if len(columns) < 2 or not rows:
        raise InputError(path, "a sample submission needs a header with an id and a mask column, and rows")
    id_col = columns[0]
    rle_col = next((c for c in columns[1:] if RLE_NAMES.search(c)), columns[-1])
    class_col = next((c for c in columns[1:] if c != rle_col and CLASS_NAMES.search(c)), None)
    fmt = SampleFormat(columns, id_col, rle_col, class_col, rows=rows,
                       empty="-1" if any(r[rle_col].strip() == "-1" for r in rows) else "")
    if class_col:
        offset = _class_tokens([r[class_col] for r in rows], class_names)
        if offset is False:
            raise InputError(path, f"column {class_col!r} holds classes that are not the bundle's {class_names}")
        fmt.class_offset = offset
    else:
        ids = [r[id_col] for r in rows]
        if all("_" in i for i in ids):
            images, tokens = zip(*(i.rsplit("_", 1) for i in ids))
            offset = _class_tokens(list(tokens), class_names)
            if offset is not False and (offset is None or len(set(images)) < len(ids)):
                fmt.class_in_id, fmt.class_offset = True, offset
    for row in rows[:1]:  # a class index out of range says the sample is of another label set
        _, c = fmt.target(row, class_names, path)
        if c is not None and not 0 <= c < len(class_names):
            raise InputError(path, f"class {c} of row {row} is not one of the bundle's {len(class_names)} classes")
    return fmt


class Submission:
    """Collects each image's decision; :meth:`write` emits the csv in the chosen format."""

    def __init__(self, class_names: list[str], task: str, skip: tuple | None = None, order: str = "column",
                 sample: Path | None = None):
        self.class_names, self.task, self.skip, self.order = class_names, task, skip, order
        self.sample_path = sample
        self.sample = read_sample(sample, class_names) if sample is not None else None
        self.rows: list[dict] = []
        self.by_key: dict[tuple[str, int], dict] = {}

    def add(self, image_id: str, decision: np.ndarray) -> None:
        """``decision``: labels (H, W) for multiclass, booleans (C, H, W) for multilabel."""
        self.add_rows(image_id, self.rows_of(image_id, decision))

    def rows_of(self, image_id: str, decision: np.ndarray) -> list[dict]:
        """The rows :meth:`add` keeps for one image (computed where the decision is, e.g. on a Ray actor)."""
        kind = {"labels": decision} if self.task == "multiclass" else {"binary": decision}
        skip = () if self.sample is not None else self.skip
        return submission_rows(image_id, class_names=self.class_names, skip_classes=skip, order=self.order, **kind)

    def add_rows(self, image_id: str, rows: list[dict]) -> None:
        if self.sample is None:
            self.rows += rows
            return
        for c, row in enumerate(rows):  # every class: the sample says which rows it wants
            self.by_key[(image_key(image_id), c)] = row

    def _single_class(self) -> int:
        names = self.class_names
        if self.task == "multilabel" and len(names) == 1:
            return 0
        if self.task == "multiclass" and len(names) == 2:
            return 1
        raise InputError(self.sample_path, f"one row per image, but the bundle has {len(names)} classes {names}: "
                                           "which one is the mask?")

    def check(self, image_ids: list[str], inputs: Path | str = "the inputs") -> None:
        """Before any prediction: every row of the sample names a class of the bundle (one row per
        image only for a bundle with one foreground class) and an image among ``image_ids``."""
        if self.sample is None:
            return
        fmt = self.sample
        keys = {image_key(i) for i in image_ids}
        for row in fmt.rows:
            key, c = fmt.target(row, self.class_names, self.sample_path)
            c = self._single_class() if c is None else c
            if not 0 <= c < len(self.class_names):
                raise InputError(self.sample_path, f"class {c} of row {row[fmt.id_column]!r} is not one of the "
                                                   f"bundle's {len(self.class_names)} classes")
            if key not in keys:
                raise InputError(self.sample_path, f"{row[fmt.id_column]!r} is in the sample submission but no image "
                                                   f"of {inputs} is named {key!r}")

    def text(self) -> str:
        buf = io.StringIO()
        if self.sample is None:
            writer = csv.DictWriter(buf, fieldnames=DEFAULT_COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
            return buf.getvalue()
        fmt = self.sample
        writer = csv.DictWriter(buf, fieldnames=fmt.columns, lineterminator="\n")
        writer.writeheader()
        wanted = set()
        for sample_row in fmt.rows:
            key, c = fmt.target(sample_row, self.class_names, self.sample_path)
            c = self._single_class() if c is None else c
            wanted.add(key)
            pred = self.by_key.get((key, c))
            if pred is None:
                raise InputError(self.sample_path, f"{sample_row[fmt.id_column]!r} is in the sample submission but "
                                                   "its image was not predicted")
            out = dict(sample_row)
            out[fmt.rle_column] = pred["rle"] or fmt.empty
            for col in fmt.columns:
                if col.lower() in ("height", "width"):
                    out[col] = pred[col.lower()]
            writer.writerow(out)
        extra = {k for k, _ in self.by_key} - wanted
        if extra:
            logger.warning("%d predicted images are not in the sample submission (left out), e.g. %s", len(extra),
                           sorted(extra)[0])
        return buf.getvalue()

    def write(self, path: Path) -> None:
        atomic_write_text(path, self.text())
