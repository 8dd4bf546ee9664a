"""ensemble_inference: does an ensemble cost only its forwards? Images/s per model forward, k folds x
top-k members with hflip TTA against one model without TTA.

Members are the tiny Unet (resnet18, depth 3, decoder [32, 16, 8]) at 96x128, untrained: an
untrained ``FoldTrainer`` model per (fold, seed) is written with ``make_checkpoint`` /
``save_checkpoint`` and read back with ``ensemble.predictor.load_member`` (2 folds x 2 = 4
members). The 24 validation images of the shipped sample (120x160) go through
``Ensemble.predict_batch`` in batches of 8 (soft voting, probabilities at the original size), on
CPU with one torch thread:

* **ensemble**: 4 members x TTA hflip = 8 forwards per image;
* **single**: the first member, no TTA = 1 forward per image.

Throughput per forward = images/s x forwards per image. The bare ``model(x)`` forward rate at
96x128 is shown for context (what the predictor adds around a forward: resizing in and out,
softmax, accumulation). Repetitions alternate the two sides.

Target: ensemble throughput per forward >= 0.9 x single-model throughput.
"""
from __future__ import annotations

import time
from pathlib import Path

from bench import common  # noqa: E402

NAME = "ensemble_inference"
TARGET = "ensemble images/s per forward >= 0.9 x single model"
RATIO = 0.9
VAL_IMAGES = common.ROOT / "data" / "camvid-sample" / "val" / "images"
SIZE = [96, 128]


def make_members(tmp: Path, folds: int = 2, per_fold: int = 2) -> list[Path]:
    from trainables.checkpoint import make_checkpoint, save_checkpoint
    from trainables.config import resolve
    from trainables.folds import make_folds, train_val_indices
    from trainables.loop import FoldTrainer

    data = common.load_data(common.SAMPLE, tmp / "cache")
    split = make_folds("kfold", folds, 0, data.ids, data.presence)
    paths = []
    for fold in range(folds):
        train_idx, val_idx = train_val_indices(split, fold, data.ids)
        for j in range(per_fold):
            cfg = resolve(common.tiny_overrides(**{"train.image_size": SIZE, "train.seed": j, "train.epochs": 1}))
            trainer = FoldTrainer(cfg, data, train_idx, val_idx, fold=fold)  # untrained: no epoch is run
            ckpt = make_checkpoint(trainer.model.state_dict(), cfg, data.class_names, data.task, "val_miou",
                                   float("nan"), 0, fold)
            paths.append(save_checkpoint(ckpt, tmp / "members" / f"fold{fold}_m{j}"))
    return paths


def cpu_members(tmp: Path, folds: int = 2, per_fold: int = 2) -> list:
    """:func:`make_members`, loaded on the CPU as the predictor runs them."""
    import torch

    from ensemble.predictor import load_member

    return [load_member(p, p.parent.name, torch.device("cpu")) for p in make_members(tmp, folds, per_fold)]


def val_images() -> list:
    """The shipped sample's validation images (uint8 RGB)."""
    from trainables.data import read_image

    return [read_image(p) for p in sorted(VAL_IMAGES.iterdir())]


def images_per_s(ensemble, images: list, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        ensemble.predict_batch(images[i:i + batch])
    return len(images) / (time.perf_counter() - start)


def bare_forward_per_s(model, batch: int, reps: int) -> float:
    import torch

    x = torch.randn(batch, 3, *SIZE)
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        for _ in range(reps):
            model(x)
    return reps * batch / (time.perf_counter() - start)


def run(quick: bool) -> dict:
    from ensemble.predictor import TTA, Ensemble

    common.set_threads()
    reps = 3 if quick else 7
    batch = 8
    images = val_images()
    with common.scratch("ensemble") as tmp:
        members = cpu_members(tmp)
    ensemble = Ensemble(members, TTA(hflip=True), device="cpu")
    single = Ensemble(members[:1], TTA(), device="cpu")
    forwards = len(members) * len(ensemble.tta.views())
    common.log(f"{NAME}: {len(members)} members x {len(ensemble.tta.views())} views = {forwards} forwards/image, "
               f"{len(images)} images {images[0].shape[:2]}, batch {batch}")
    images_per_s(ensemble, images[:batch], batch)  # warm-up both
    images_per_s(single, images[:batch], batch)
    ens_ips, single_ips, bare = [], [], []
    for rep in range(reps):
        for side in (("single", "ensemble") if rep % 2 == 0 else ("ensemble", "single")):
            if side == "single":
                single_ips.append(images_per_s(single, images, batch))
            else:
                ens_ips.append(images_per_s(ensemble, images, batch))
        bare.append(bare_forward_per_s(members[0].model, batch, 3))
        common.log(f"  rep {rep}: single {single_ips[-1]:.1f} img/s, ensemble {ens_ips[-1]:.2f} img/s "
                   f"({ens_ips[-1] * forwards:.1f} forwards/s), bare forward {bare[-1]:.1f}/s")
    per_forward = [v * forwards for v in ens_ips]
    ratio = common.safe_ratio(common.median(per_forward), common.median(single_ips))
    rows = [
        common.row("image-forwards/s (ensemble: img/s x 8)", common.side("ensemble 4x2", per_forward, "fwd/s"),
                   common.side("single", single_ips, "fwd/s"), ratio, f">= {RATIO}", ratio is not None and ratio >= RATIO),
        common.row("images/s", common.side("ensemble 4x2", ens_ips, "img/s"), common.side("single", single_ips, "img/s"),
                   common.safe_ratio(common.median(ens_ips), common.median(single_ips)), "info (ideal 1/8)"),
        common.row("single model: predict_batch vs bare forward", common.side("predict", single_ips, "img/s"),
                   common.side("model(x)", bare, "img/s"),
                   common.safe_ratio(common.median(single_ips), common.median(bare)), "info"),
    ]
    details = {"members": len(members), "views": len(ensemble.tta.views()), "forwards_per_image": forwards,
               "images": len(images), "image_shape": list(images[0].shape[:2]), "input_size": SIZE, "batch": batch,
               "threads": common.THREADS, "ensemble_ips": ens_ips, "single_ips": single_ips, "bare_forward_ips": bare}
    return common.result(NAME, TARGET, rows, details)


if __name__ == "__main__":
    common.bench_main(NAME, TARGET, run)
