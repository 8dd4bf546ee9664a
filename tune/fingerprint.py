"""A dataset's fingerprint: what the planner (``tune/plan.py``) decides the fixed settings from.

Read from the loaded dataset (``trainables.data``: sizes, class pixel counts and presence come
from the mask cache) plus a bounded sample of files: image channels (PIL mode, or RGB files whose
three channels are equal), object sizes per class (connected-component areas on up to
``MAX_MASKS`` masks, native pixels), ignored pixels and COCO crowd regions, and file names that look
like frames of a video or slices of a patient (a common prefix and a running number: a group fold
strategy keeps them together, ``folds.group_regex``).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from trainables.data import IGNORE_INDEX, SegData

MAX_MASKS = 64  # masks read for object sizes (evenly spaced over the dataset)
MAX_IMAGES = 8  # images opened for their channels
SPECKLE = 10  # components below this many pixels are label noise (rasterised polygon edges), not objects
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "P;gray"}
# a prefix (the group), a separator or a word such as frame/slice, then a running number and the suffix;
# the first capture group is the group key, as folds.group_regex reads it (trainables/folds.py)
GROUP_REGEX = r"^(.+?)(?:[_\-. ]+(?:frame|slice|img|f)?|frame|slice)\d+\.\w+$"


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _spread(indices: int, n: int) -> list[int]:
    return sorted(set(np.linspace(0, n - 1, min(n, indices)).round().astype(int).tolist())) if n else []


def channels(data: SegData, sample: int = MAX_IMAGES) -> dict[str, Any]:
    """``{"channels": 1 | 3, "modes": {PIL mode: count}}`` of a few images; an RGB file whose three
    channels are equal counts as grayscale (X-rays are often saved as RGB)."""
    modes: Counter = Counter()
    gray = 0
    picked = _spread(sample, len(data))
    for i in picked:
        with Image.open(data.image_paths[i]) as im:
            modes[im.mode] += 1
            if im.mode in GRAY_MODES:
                gray += 1
            elif im.mode in ("RGB", "RGBA"):
                small = np.asarray(im.convert("RGB").reduce(4) if min(im.size) >= 64 else im.convert("RGB"))
                if np.array_equal(small[..., 0], small[..., 1]) and np.array_equal(small[..., 1], small[..., 2]):
                    gray += 1
    return {"channels": 1 if picked and gray == len(picked) else 3, "modes": dict(modes)}


def object_sizes(data: SegData, sample: int = MAX_MASKS) -> dict[str, Any]:
    """Per class: the connected-component areas (8-connected, native pixels) of up to ``sample`` masks,
    speckles under ``SPECKLE`` pixels left out: count, median and 5th percentile; plus the share of
    ignored pixels in those masks."""
    areas: list[list[int]] = [[] for _ in range(data.num_classes)]
    ignored = total = 0
    structure = np.ones((3, 3), bool)
    first = 1 if data.task == "multiclass" and data.has_background else 0
    for i in _spread(sample, len(data)):
        mask = data.read_mask(i)
        if data.task == "multiclass":
            ignored += int((mask == IGNORE_INDEX).sum())
            total += mask.size
            planes = ((c, mask == c) for c in range(first, data.num_classes))
        else:
            ignored += int((mask[..., 0] == IGNORE_INDEX).sum())
            total += mask.shape[0] * mask.shape[1]
            planes = ((c, mask[..., c] == 1) for c in range(data.num_classes))
        for c, plane in planes:
            if not plane.any():
                continue
            labels, n = ndimage.label(plane, structure)
            found = np.bincount(labels.ravel(), minlength=n + 1)[1:]
            areas[c] += found[found >= SPECKLE].tolist()
    per_class = {}
    for c, name in enumerate(data.class_names):
        if c < first:
            continue
        per_class[name] = {"components": len(areas[c]), "median_area": _percentile(areas[c], 50),
                           "p5_area": _percentile(areas[c], 5)}
    return {"objects": per_class, "ignored_share": ignored / total if total else 0.0,
            "masks_sampled": len(_spread(sample, len(data)))}


def crowd_regions(data: SegData) -> int:
    """COCO annotations with ``iscrowd: 1`` (0 for mask folders)."""
    if Path(data.source).suffix.lower() != ".json":
        return 0
    coco = json.loads(Path(data.source).read_text())
    return sum(1 for a in coco.get("annotations", []) if a.get("iscrowd"))


def name_groups(ids: list[str], regex: str = GROUP_REGEX) -> dict[str, Any] | None:
    """Groups of file names that look like frames or slices (a prefix and a running number), or
    None: every name must match, with at least two groups and a median of three names per group."""
    pattern = re.compile(regex)
    keys = []
    for name in ids:
        match = pattern.search(Path(name).name)
        if match is None:
            return None
        keys.append(match.group(1))
    sizes = Counter(keys)
    if len(sizes) < 2 or float(np.median(list(sizes.values()))) < 3:
        return None
    return {"regex": regex, "groups": len(sizes), "largest": max(sizes.values()),
            "examples": sorted(sizes)[:5]}


def fingerprint(data: SegData) -> dict[str, Any]:
    """The whole fingerprint as a JSON-able dict (sizes are [height, width])."""
    sizes = np.asarray(data.sizes, dtype=float).reshape(-1, 2)
    pixels = data.pixel_counts.astype(float)
    share = pixels / pixels.sum() if pixels.sum() else pixels
    presence = data.presence.mean(0) if len(data) else np.zeros(data.num_classes)
    classes_per_image = data.presence[:, (1 if data.task == "multiclass" and data.has_background else 0):].sum(1)
    return {
        "source": str(data.source), "task": data.task, "images": len(data), "classes": list(data.class_names),
        "has_background": bool(data.has_background),
        "size": {"median": np.median(sizes, 0).round().astype(int).tolist(), "min": sizes.min(0).astype(int).tolist(),
                 "max": sizes.max(0).astype(int).tolist(),
                 "median_aspect": float(np.median(sizes[:, 1] / sizes[:, 0]))},
        **channels(data),
        "pixel_share": {name: round(float(s), 6) for name, s in zip(data.class_names, share)},
        "presence": {name: round(float(p), 4) for name, p in zip(data.class_names, presence)},
        "classes_per_image": float(np.mean(classes_per_image)) if len(data) else 0.0,
        **object_sizes(data),
        "crowd_regions": crowd_regions(data),
        "groups": name_groups(data.ids),
    }


def smallest_objects(fp: dict[str, Any]) -> tuple[str, float] | None:
    """The class with the smallest 5th-percentile object area, and that area (native pixels)."""
    found = [(name, o["p5_area"]) for name, o in fp["objects"].items() if o["p5_area"] is not None]
    return min(found, key=lambda item: item[1]) if found else None
