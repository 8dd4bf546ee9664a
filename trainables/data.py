"""Datasets on disk -> a list of images with masks rasterised once and cached.

Two input forms:

* **COCO json** (pycocotools): polygons and RLE (compressed or not); category ids need not be
  contiguous (sorted and mapped to 1..C); pixels without annotation become background class 0
  (``unannotated="background"``) or ``IGNORE_INDEX`` (``"ignore"``, then classes are 0..C-1);
  overlapping annotations are painted larger area first, so small objects stay on top;
  ``iscrowd: 1`` regions are ignored (``crowd="ignore"``, COCO's meaning) or painted as their class
  (``"class"``); polygons with an odd number of coordinates or fewer than 3 points are skipped
  with a warning. Multiclass masks hold at most 255 classes (255 is the ignore label).
* **image/mask folders**: ``images/`` and ``masks/`` with class-index PNGs matched by file stem,
  optional ``classes.txt`` (one name per line, line i is class i); value 255 is ignored. Without
  ``classes.txt``, class 0 is background (``background=0``) or a real class (``"none"``).

Tasks: ``multiclass`` (one label per pixel) and ``multilabel`` (COCO only: one binary channel
per category, overlaps allowed). Masks are rasterised once per dataset into a cache directory
keyed by a fingerprint of the annotation file, the image list and the options, so every trial
and epoch reads small PNG/NPY files instead of decoding polygons again.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from trainables.coco import load_coco
from trainables.config import check_setting
from trainables.errors import InputError
# the dataset record and image reading, offered here too: one import for a dataset's loaders and what they return
from trainables.segdata import (IGNORE_INDEX, IMAGE_SUFFIXES, SegData, file_digest, fingerprint,  # noqa: F401
                                 load_stats, read_image, save_stats)

logger = logging.getLogger(__name__)

BACKGROUND_NAMES = ("background", "_background_", "bg")
SAMPLE_DATA = Path(__file__).resolve().parents[1] / "data" / "camvid-sample" / "train" / "annotations.json"


def load_dataset(
    path: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    task: str = "multiclass",
    unannotated: str = "background",
    cache_dir: str | os.PathLike | None = None,
    crowd: str = "ignore",
    background: int | str | None = 0,
) -> SegData:
    """Load a COCO json or an image/mask folder; rasterise and cache masks once.

    ``crowd``: COCO ``iscrowd`` regions, ``ignore`` or ``class``. ``background``: for mask folders,
    whether class 0 is background (``0``) or a real class (``"none"``)."""
    check_setting("data.crowd", crowd)
    background = background_setting(background)
    path = Path(path) if path else SAMPLE_DATA
    if not path.exists():
        raise InputError(path, "dataset not found (give a COCO json or a folder with images/ and masks/)")
    cache_root = Path(cache_dir or os.environ.get("SEGHPO_CACHE") or Path.home() / ".cache" / "seghpo")
    if path.is_dir():
        if (path / "masks").is_dir():
            if task != "multiclass":
                raise InputError(path, "mask folders hold class-index PNGs: only task multiclass")
            return _load_folder(path, cache_root, background)
        candidates = sorted(path.glob("*.json"))
        if not candidates:
            raise InputError(path, "folder has neither masks/ nor a COCO *.json annotation file")
        path = path / "annotations.json" if (path / "annotations.json").exists() else candidates[0]
    return load_coco(path, images, task, unannotated, cache_root, crowd)


def load_data(d: dict) -> SegData:
    """The dataset of a trial config's ``data`` section: :func:`load_dataset`, then ``subset``
    (that many images, evenly spaced over the file order) when it is set."""
    data = load_dataset(d["path"], d["images"], d["task"], d["unannotated"], d["cache_dir"], **dataset_options(d))
    n = d.get("subset")
    if not n or n >= len(data):
        return data
    return data.subset(np.linspace(0, len(data) - 1, int(n)).round().astype(int).tolist())


def dataset_options(d: dict) -> dict:
    """The keyword options of :func:`load_dataset` in a ``data`` section (configs saved before
    they existed get the defaults)."""
    return {"crowd": d.get("crowd", "ignore"), "background": d.get("background", 0)}


def background_setting(value) -> int | None:
    """``data.background``: 0 (class 0 is background) or None (``none``/null: no background)."""
    check_setting("data.background", value)
    return None if value is None or str(value).lower() == "none" else 0


def _load_folder(root: Path, cache_root: Path, background: int | None = 0) -> SegData:
    image_dir, mask_dir = root / "images", root / "masks"
    if not image_dir.is_dir():
        raise InputError(root, "mask folder dataset needs an images/ folder beside masks/")
    images = {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    masks = {p.stem: p for p in sorted(mask_dir.iterdir()) if p.suffix.lower() == ".png"}
    unmatched = sorted(set(images) ^ set(masks))
    if unmatched:
        raise InputError(root, f"{len(unmatched)} images/masks without a partner, e.g. {unmatched[:3]}")
    if not images:
        raise InputError(root, "no images found in images/")
    stems = sorted(images)
    classes_file = root / "classes.txt"
    names = [n.strip() for n in classes_file.read_text().splitlines() if n.strip()] if classes_file.exists() else None
    stat_key = [(s, p.stat().st_size, p.stat().st_mtime_ns) for s in stems for p in (images[s], masks[s])]
    # data.background enters the fingerprint only when not the default, so earlier runs keep theirs
    fp = fingerprint("folder", root.resolve(), stat_key, names, *([] if background == 0 else ["background=none"]))
    stats_path = cache_root / fp / "stats.json"
    stats = load_stats(stats_path)
    if stats is None:
        stats = _folder_stats(stems, images, masks, names)
        save_stats(stats_path, np.asarray(stats["presence"]), np.asarray(stats["pixel_counts"]), stats["skipped"],
                   np.asarray(stats["image_pixel_counts"]), sizes=stats["sizes"])
    for stem, problem in stats["skipped"].items():
        logger.warning("%s: skipped, %s", images[stem], problem)
    keep = [i for i, stem in enumerate(stems) if stem not in stats["skipped"]]
    if not keep:
        raise InputError(root, "no readable image left")
    stems = [stems[i] for i in keep]
    presence = np.asarray(stats["presence"], dtype=bool)[keep]
    pixel_counts = np.asarray(stats["pixel_counts"], dtype=np.int64)
    per_image = np.asarray(stats["image_pixel_counts"], dtype=np.int64)[keep]
    sizes = [tuple(stats["sizes"][i]) for i in keep]
    names, has_background = folder_classes(root, names, presence.shape[1], background)
    return SegData(
        source=root, task="multiclass", class_names=names, ids=[images[s].name for s in stems],
        image_paths=[images[s] for s in stems], mask_paths=[masks[s] for s in stems], sizes=sizes,
        presence=presence, pixel_counts=pixel_counts, fingerprint=fp, has_background=has_background,
        image_pixel_counts=per_image,
    )


def folder_classes(root: Path, names: list[str] | None, num_classes: int,
                   background: int | None) -> tuple[list[str], bool]:
    """Class names and whether class 0 is background, said once as the dataset loads.

    ``classes.txt`` names decide (class 0 is background when named background, _background_ or
    bg); without it, ``data.background`` does: 0 (the default: most mask datasets paint the
    background 0) or None (every index is a real class)."""
    if names is not None:
        has_background = background == 0 and names[0].lower() in BACKGROUND_NAMES
        logger.info("%s: %d classes from classes.txt; %s", root, len(names),
                    f"class 0 {names[0]!r} is background" if has_background else
                    "every class index is a real class (no background)")
        return names, has_background
    if background == 0:
        logger.info("%s: no classes.txt; class 0 is background and 1..%d are class_1..class_%d "
                    "(data.background=0; set data.background=none if every index is a real class)",
                    root, num_classes - 1, num_classes - 1)
        return ["background"] + [f"class_{i}" for i in range(1, num_classes)], True
    logger.info("%s: no classes.txt; every class index is a real class, class_0..class_%d (data.background=none)",
                root, num_classes - 1)
    return [f"class_{i}" for i in range(num_classes)], False


def _folder_stats(stems: list[str], images: dict[str, Path], masks: dict[str, Path], names: list[str] | None) -> dict:
    """Per-image class presence and sizes of a mask folder; unreadable images are skipped."""
    counts: list[np.ndarray] = []
    sizes, skipped = [], {}
    for stem in stems:
        try:
            with Image.open(masks[stem]) as im:
                mask = np.asarray(im)
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(masks[stem], f"cannot read mask ({exc})") from None
        if mask.ndim != 2:
            raise InputError(masks[stem], f"mask must be single-channel class indices, got shape {mask.shape}")
        if mask.dtype != np.uint8 and mask.size and mask.max() > IGNORE_INDEX:
            raise InputError(masks[stem], f"class index {int(mask.max())}: multiclass masks hold classes "
                                          f"0..{IGNORE_INDEX - 1} ({IGNORE_INDEX} marks ignored pixels)")
        try:
            with Image.open(images[stem]) as im:
                im.load()
                size = im.size
        except (OSError, SyntaxError, ValueError) as exc:
            skipped[stem] = f"unreadable image ({type(exc).__name__}: {exc})"
            size = (mask.shape[1], mask.shape[0])
        if size != (mask.shape[1], mask.shape[0]):
            raise InputError(masks[stem], f"mask size {mask.shape[1]}x{mask.shape[0]} differs from "
                                          f"its image {size[0]}x{size[1]}")
        sizes.append((size[1], size[0]))
        counts.append(np.bincount(mask[mask != IGNORE_INDEX].ravel(), minlength=1))
    num_classes = len(names) if names else max(len(c) for c in counts)
    if num_classes > IGNORE_INDEX:
        raise InputError(masks[stems[0]].parent.parent / "classes.txt", f"{num_classes} classes, but {IGNORE_INDEX} "
                                                                        f"marks ignored pixels: at most {IGNORE_INDEX}")
    too_high = [stems[i] for i, c in enumerate(counts) if len(c) > num_classes]
    if too_high:
        raise InputError(masks[too_high[0]], f"class index {len(counts[stems.index(too_high[0])]) - 1} is above the "
                                             f"{num_classes} classes of classes.txt")
    per_image = np.stack([np.pad(c, (0, num_classes - len(c))) for c in counts])
    ok = np.array([stem not in skipped for stem in stems])
    return {"presence": (per_image > 0).astype(int).tolist(), "pixel_counts": per_image[ok].sum(0).tolist(),
            "image_pixel_counts": per_image.tolist(), "sizes": sizes, "skipped": skipped}
