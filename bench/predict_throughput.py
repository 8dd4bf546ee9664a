"""predict_throughput: does the bundle's predictor cost only its members' forwards? Images/s of
``load_bundle(...).ensemble().predict_batch`` against a bare loop a user would write over the
same members.

Members: the 4 untrained tiny Unets of bench/ensemble_inference.py (96x128 input), written into
a bundle with ``ensemble.bundle.write_bundle`` and loaded back with ``load_bundle``. Images: the
24 validation images of the shipped sample (120x160), batches of 8, CPU, one torch thread, no
TTA. The bare loop, per batch: normalise, then for each member resize to its input, ``model(x)``,
resize the logits back, softmax, add; divide by the number of members: the same arithmetic with
none of the predictor's bookkeeping. ``predict_folder`` (masks, submission.csv; PNG encoding and
RLE included) is shown for context. Repetitions alternate the sides.

Target: bundle predictor images/s >= 0.9 x the bare loop.
"""
from __future__ import annotations

import time

from bench import common  # noqa: E402
from bench.ensemble_inference import VAL_IMAGES, cpu_members, images_per_s, val_images

NAME = "predict_throughput"
TARGET = "bundle predictor images/s >= 0.9 x bare model loop"
RATIO = 0.9


def bare_loop(models: list, sizes: list, images: list, batch: int) -> float:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from trainables.dataset import normalise

    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = normalise(np.stack(images[i:i + batch]))
            out = x.shape[-2:]
            acc = torch.zeros((x.shape[0], 12, *out))
            for model, size in zip(models, sizes):
                logits = model(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
                acc += torch.softmax(F.interpolate(logits, size=out, mode="bilinear", align_corners=False), 1)
            (acc / len(models)).numpy()
    return len(images) / (time.perf_counter() - start)


def run(quick: bool) -> dict:
    from ensemble.bundle import load_bundle, write_bundle
    from ensemble.infer import PredictOptions, predict_folder

    common.set_threads()
    reps = 3 if quick else 7
    batch = 8
    images = val_images()
    with common.scratch("predict") as tmp:
        members = cpu_members(tmp)
        bundle = load_bundle(write_bundle(tmp / "bundle", members, tta="none", voting="soft", rule={"thresholds": None},
                                          metric="val_miou", mode="max"))
        ens = bundle.ensemble("cpu")
        models = [m.model for m in bundle.members]
        sizes = [m.image_size for m in bundle.members]
        images_per_s(ens, images[:batch], batch)  # warm-up both
        bare_loop(models, sizes, images[:batch], batch)
        ours, bare, folder = [], [], []
        for rep in range(reps):
            for side in (("bare", "bundle") if rep % 2 == 0 else ("bundle", "bare")):
                if side == "bare":
                    bare.append(bare_loop(models, sizes, images, batch))
                else:
                    ours.append(images_per_s(ens, images, batch))
            start = time.perf_counter()
            predict_folder(ens, None, PredictOptions(VAL_IMAGES, tmp / "out", task="multiclass",
                                                     unannotated="background", class_names=bundle.class_names,
                                                     batch_size=batch))
            folder.append(len(images) / (time.perf_counter() - start))
            common.log(f"  rep {rep}: bundle {ours[-1]:.2f} img/s, bare loop {bare[-1]:.2f} img/s, "
                       f"predict_folder {folder[-1]:.2f} img/s")
    ratio = common.safe_ratio(common.median(ours), common.median(bare))
    rows = [
        common.row(f"images/s, {len(members)} members", common.side("bundle predictor", ours, "img/s"),
                   common.side("bare loop", bare, "img/s"), ratio, f">= {RATIO}", ratio is not None and ratio >= RATIO),
        common.row("images/s per member forward", common.side("bundle x members", [v * len(members) for v in ours],
                                                             "fwd/s"),
                   common.side("bare x members", [v * len(members) for v in bare], "fwd/s"), ratio, "info"),
        common.row("predict_folder (masks + submission) vs predictor", common.side("predict_folder", folder, "img/s"),
                   common.side("bundle predictor", ours, "img/s"),
                   common.safe_ratio(common.median(folder), common.median(ours)), "info"),
    ]
    details = {"members": len(members), "images": len(images), "batch": batch, "threads": common.THREADS,
               "bundle_ips": ours, "bare_ips": bare, "predict_folder_ips": folder}
    return common.result(NAME, TARGET, rows, details)


if __name__ == "__main__":
    common.bench_main(NAME, TARGET, run)
