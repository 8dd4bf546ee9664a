"""Build the small CamVid sample shipped in data/camvid-sample from the full COCO CamVid.

    python data/make_camvid_sample.py --src ../shared/data/camvid --out data/camvid-sample

Takes every n-th image of each driving sequence (so the three train sequences stay usable for
group k-fold), downscales images by ``--factor`` and rewrites the annotations at that scale:
polygons are scaled, RLE masks are decoded, downsampled (nearest) and re-encoded, so the sample
keeps both of the source's encodings, the multilabel variant included.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from trainables.io import atomic_write_text  # noqa: E402


def pick_images(images: list[dict], per_sequence: int) -> list[dict]:
    by_seq: dict[str, list[dict]] = defaultdict(list)
    for img in sorted(images, key=lambda i: i["file_name"]):
        by_seq[img["file_name"].split("_")[0]].append(img)
    picked = []
    for seq in sorted(by_seq):
        items = by_seq[seq]
        idx = np.linspace(0, len(items) - 1, min(per_sequence, len(items))).round().astype(int)
        picked.extend(items[i] for i in sorted(set(idx)))
    return picked


def scale_segmentation(seg, h: int, w: int, nh: int, nw: int):
    if isinstance(seg, list):  # polygons
        sx, sy = nw / w, nh / h
        out = []
        for poly in seg:
            pts = np.asarray(poly, dtype=float).reshape(-1, 2) * [sx, sy]
            out.append([round(float(v), 1) for v in pts.reshape(-1)])
        return out
    rle = seg if isinstance(seg["counts"], (bytes, str)) else mask_utils.frPyObjects(seg, h, w)
    full = mask_utils.decode(rle)
    small = np.asarray(Image.fromarray(full * 255).resize((nw, nh), Image.NEAREST)) > 127
    if not small.any():
        return None
    enc = mask_utils.encode(np.asfortranarray(small.astype(np.uint8)))
    return {"size": [nh, nw], "counts": enc["counts"].decode("ascii")}


def convert_split(src: Path, out: Path, per_sequence: int, factor: int) -> None:
    coco = json.loads((src / "annotations.json").read_text())
    picked = pick_images(coco["images"], per_sequence)
    (out / "images").mkdir(parents=True, exist_ok=True)
    new_images, id_map = [], {}
    for new_id, img in enumerate(picked, start=1):
        h, w = img["height"], img["width"]
        nh, nw = h // factor, w // factor
        Image.open(src / "images" / img["file_name"]).convert("RGB").resize((nw, nh), Image.BILINEAR).save(
            out / "images" / img["file_name"], quality=90
        )
        id_map[img["id"]] = (new_id, h, w, nh, nw)
        new_images.append({"id": new_id, "file_name": img["file_name"], "height": nh, "width": nw})
    for name in ("annotations.json", "annotations-multilabel.json"):
        data = json.loads((src / name).read_text())
        anns = []
        for ann in data["annotations"]:
            if ann["image_id"] not in id_map:
                continue
            new_id, h, w, nh, nw = id_map[ann["image_id"]]
            seg = scale_segmentation(ann["segmentation"], h, w, nh, nw)
            if seg is None:
                continue
            bbox = [round(v / factor, 2) for v in ann["bbox"]]
            anns.append({**ann, "id": len(anns) + 1, "image_id": new_id, "segmentation": seg,
                         "area": float(ann["area"]) / factor**2, "bbox": bbox})
        info = {"description": f"{data['info']['description']}; every n-th image per sequence, "
                               f"downscaled {factor}x for the shipped sample"}
        coco_out = {"info": info, "images": new_images, "annotations": anns, "categories": data["categories"]}
        atomic_write_text(out / name, json.dumps(coco_out, separators=(",", ":")))
    print(f"{out}: {len(new_images)} images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=Path("../shared/data/camvid"))
    parser.add_argument("--out", type=Path, default=Path("data/camvid-sample"))
    parser.add_argument("--per-sequence", type=int, default=24)
    parser.add_argument("--val-per-sequence", type=int, default=24)
    parser.add_argument("--factor", type=int, default=3)
    args = parser.parse_args()
    convert_split(args.src / "train", args.out / "train", args.per_sequence, args.factor)
    convert_split(args.src / "val", args.out / "val", args.val_per_sequence, args.factor)


if __name__ == "__main__":
    main()
