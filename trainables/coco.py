"""COCO json -> cached class-index (multiclass) or per-class binary (multilabel) masks."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from PIL import Image
from tqdm import tqdm

from trainables.segdata import (
    IGNORE_INDEX,
    SegData,
    file_digest,
    fingerprint,
    load_stats,
    save_stats,
    write_mask,
)
from trainables.errors import InputError

logger = logging.getLogger(__name__)


def read_coco(path: Path) -> dict:
    """Parse and check the structure of a COCO file; every problem names the file."""
    try:
        coco = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "annotation file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read annotation file ({exc})") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(coco, dict):
        raise InputError(path, "COCO file must be a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise InputError(path, f"COCO file has no '{key}' list")
    if not coco["images"]:
        raise InputError(path, "COCO file lists no images")
    if not coco["categories"]:
        raise InputError(path, "COCO file lists no categories")
    image_ids = {img["id"] for img in coco["images"]}
    cat_ids = {cat["id"] for cat in coco["categories"]}
    for ann in coco["annotations"]:
        if ann.get("image_id") not in image_ids:
            raise InputError(path, f"annotation {ann.get('id')} points to unknown image_id {ann.get('image_id')!r}")
        if ann.get("category_id") not in cat_ids:
            raise InputError(path, f"annotation {ann.get('id')} has unknown category_id {ann.get('category_id')!r}")
    return coco


def polygon_problem(poly) -> str | None:
    """Why a COCO polygon cannot be drawn: pycocotools silently drops the last number of an odd
    list (and clipping such a list fails), so an odd count is skipped like a two-point polygon."""
    if not isinstance(poly, list) or not all(isinstance(v, (int, float)) for v in poly):
        return "is not a list of numbers"
    if len(poly) % 2:
        return f"has an odd number of coordinates ({len(poly)})"
    if len(poly) < 6:
        return "has fewer than 3 points"
    return None


def has_odd_polygon(anns: list[dict]) -> bool:
    return any(isinstance(a.get("segmentation"), list)
               and any(isinstance(p, list) and len(p) % 2 for p in a["segmentation"]) for a in anns)


def annotation_mask(ann: dict, height: int, width: int, source: Path) -> np.ndarray | None:
    """Binary mask of one annotation (polygons, RLE or uncompressed RLE); None if unusable."""
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        polys = []
        for p in seg:
            problem = polygon_problem(p)
            if problem:
                logger.warning("%s: annotation %s has a polygon that %s; skipped", source, ann.get("id"), problem)
            else:
                polys.append(p)
        if not polys:
            return None
        coords = np.concatenate([np.asarray(p, dtype=float) for p in polys])
        if coords.min() < 0 or coords[0::2].max() > width or coords[1::2].max() > height:
            logger.warning("%s: annotation %s has polygon points outside the image; clipped",
                           source, ann.get("id"))
            polys = [np.clip(np.asarray(p, dtype=float), 0, [width, height] * (len(p) // 2)).tolist() for p in polys]
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(seg, dict) and "counts" in seg:
        if list(seg.get("size", [])) != [height, width]:
            raise InputError(source, f"annotation {ann.get('id')}: RLE size {seg.get('size')} differs from "
                                     f"its image {height}x{width}")
        rle = mask_utils.frPyObjects(seg, height, width) if isinstance(seg["counts"], list) else seg
    else:
        logger.warning("%s: annotation %s has no usable segmentation; skipped", source, ann.get("id"))
        return None
    return mask_utils.decode(rle).astype(bool)


def rasterise(anns: list[dict], height: int, width: int, cat_index: dict[int, int], task: str,
              unannotated: str, num_classes: int, source: Path, crowd: str = "ignore") -> np.ndarray:
    """Label image (multiclass) or class channels + an "ignored" channel (multilabel).

    ``crowd="ignore"`` follows COCO: an ``iscrowd: 1`` region (a group of objects not outlined one
    by one) is not ground truth for its class. Multiclass paints it as ignored in the same
    larger-area-first order, so objects annotated inside it stay on top; multilabel ignores the
    whole pixel. ``crowd="class"`` paints it as its class like any annotation."""
    decoded = [(a, annotation_mask(a, height, width, source)) for a in anns]
    decoded = [(a, m) for a, m in decoded if m is not None]
    ignored_crowd = crowd == "ignore"
    if task == "multiclass":
        fill = 0 if unannotated == "background" else IGNORE_INDEX
        mask = np.full((height, width), fill, dtype=np.uint8)
        # larger areas first, so that small objects painted later stay on top
        for ann, m in sorted(decoded, key=lambda am: -int(am[1].sum())):
            mask[m] = IGNORE_INDEX if ignored_crowd and ann.get("iscrowd") else cat_index[ann["category_id"]]
        return mask
    mask = np.zeros((height, width, num_classes + 1), dtype=bool)
    annotated = np.zeros((height, width), dtype=bool)
    for ann, m in decoded:
        if ignored_crowd and ann.get("iscrowd"):
            mask[..., num_classes] |= m
            continue
        mask[..., cat_index[ann["category_id"]]] |= m
        annotated |= m
    if unannotated == "ignore":
        mask[..., num_classes] |= ~annotated
    return mask


def load_coco(path: Path, images: Path | str | None, task: str, unannotated: str, cache_root: Path,
              crowd: str = "ignore") -> SegData:
    coco = read_coco(path)
    image_root = Path(images) if images else path.parent / "images"
    if not image_root.is_dir():
        raise InputError(image_root, "image folder not found (set data.images)")
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    offset = 1 if (task == "multiclass" and unannotated == "background") else 0
    cat_index = {c["id"]: i + offset for i, c in enumerate(cats)}
    class_names = (["background"] if offset else []) + [c["name"] for c in cats]
    num_classes = len(class_names)
    if task == "multiclass" and num_classes > IGNORE_INDEX:
        raise InputError(path, f"{len(cats)} categories give class indices 0..{num_classes - 1}, but {IGNORE_INDEX} "
                               f"marks ignored pixels in multiclass masks: at most {IGNORE_INDEX} classes (merge "
                               f"categories, or use data.task=multilabel)")
    imgs = sorted(coco["images"], key=lambda im: im["file_name"])
    for img in imgs:
        if not (image_root / img["file_name"]).exists():
            raise InputError(image_root / img["file_name"], f"image listed in {path.name} not found")
    # rules added later enter the fingerprint only where they change this file's masks, so that
    # the experiments and caches of datasets they leave unchanged stay valid
    rules = (["crowd=ignore"] if crowd == "ignore" and any(a.get("iscrowd") for a in coco["annotations"]) else []) \
        + (["odd polygons skipped"] if has_odd_polygon(coco["annotations"]) else [])
    fp = fingerprint("coco", file_digest(path), image_root.resolve(), task, unannotated,
                     [(im["file_name"], im["height"], im["width"]) for im in imgs], *rules)
    cache = cache_root / fp
    ext = ".png" if task == "multiclass" else ".npy"
    mask_paths = [cache / f"{im['id']}{ext}" for im in imgs]
    stats = load_stats(cache / "stats.json")
    if stats is None or not all(p.exists() for p in mask_paths):
        stats = _build_cache(coco, imgs, mask_paths, cat_index, task, unannotated, num_classes, path, image_root,
                             crowd)
        save_stats(cache / "stats.json", np.asarray(stats["presence"]), np.asarray(stats["pixel_counts"]),
                   stats["skipped"], np.asarray(stats["image_pixel_counts"]))
    presence = np.asarray(stats["presence"], dtype=bool)
    pixel_counts = np.asarray(stats["pixel_counts"], dtype=np.int64)
    per_image = np.asarray(stats["image_pixel_counts"], dtype=np.int64).reshape(len(imgs), num_classes)
    skipped = stats.get("skipped", {})
    for name, problem in skipped.items():
        logger.warning("%s: skipped, %s", image_root / name, problem)
    keep = [i for i, im in enumerate(imgs) if im["file_name"] not in skipped]
    if not keep:
        raise InputError(path, "no readable image left")
    for name, count in zip(class_names, pixel_counts):
        if count == 0:
            logger.warning("%s: class %r occurs in no image", path, name)
    kept_ids = {imgs[i]["id"] for i in keep}
    return SegData(
        has_annotations=any(a["image_id"] in kept_ids for a in coco["annotations"]),
        source=path, task=task, class_names=class_names, ids=[imgs[i]["file_name"] for i in keep],
        image_paths=[image_root / imgs[i]["file_name"] for i in keep], mask_paths=[mask_paths[i] for i in keep],
        sizes=[(imgs[i]["height"], imgs[i]["width"]) for i in keep], presence=presence[keep],
        pixel_counts=pixel_counts, fingerprint=fp, has_background=bool(offset), meta={"cache": str(cache)},
        image_pixel_counts=per_image[keep],
    )


def image_problem(path: Path, height: int, width: int) -> str | None:
    """Decode the image fully once: a corrupt file is skipped (returned problem), a size that
    differs from the annotation file is fatal (the masks would not line up)."""
    try:
        with Image.open(path) as im:
            im.load()
            size = im.size
    except (OSError, SyntaxError, ValueError) as exc:
        return f"unreadable image ({type(exc).__name__}: {exc})"
    if size != (width, height):
        raise InputError(path, f"image is {size[0]}x{size[1]} but the annotation file says {width}x{height}")
    return None


def _build_cache(coco, imgs, mask_paths, cat_index, task, unannotated, num_classes, source, image_root,
                 crowd) -> dict:
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    presence, counts, skipped, per_image = [], np.zeros(num_classes, dtype=np.int64), {}, []
    for img, mask_path in zip(tqdm(imgs, desc=f"rasterising {source.name}", leave=False, disable=None), mask_paths):
        problem = image_problem(image_root / img["file_name"], img["height"], img["width"])
        if problem:
            skipped[img["file_name"]] = problem
        mask = rasterise(by_image.get(img["id"], []), img["height"], img["width"], cat_index, task,
                         unannotated, num_classes, source, crowd)
        if task == "multiclass":
            per_class = np.bincount(mask[mask != IGNORE_INDEX].ravel(), minlength=num_classes)[:num_classes]
        else:
            per_class = mask[..., :num_classes].sum((0, 1))
        presence.append(per_class > 0)
        per_image.append(per_class)
        if not problem:
            counts += per_class
        write_mask(mask_path, mask, task)
    return {"presence": np.stack(presence).astype(int).tolist(), "pixel_counts": counts.tolist(), "skipped": skipped,
            "image_pixel_counts": np.stack(per_image).astype(np.int64).tolist()}
