"""data_path: does the input pipeline keep up with training?

On CamVid train (367 images, 360x480; fold 0 of 2: 183 training images), downscaled on load to 240 px
(``data.max_size``) and fed at 160x224, batch 8, with an augmenting pipeline (hflip 0.5, scale/rotate
0.5, colour jitter 0.5), the tiny Unet (resnet18, depth 3, decoder [32, 16, 8]) on one torch thread:

* **loader images/s**: iterating ``FoldTrainer.train_loader`` alone (cached masks + augmentation +
  normalisation + collation), ``num_workers`` 0 and 1; epoch 1 also decodes the JPEGs/PNGs into
  the dataset's memory store, later epochs only augment;
* **model images/s**: the training step of ``FoldTrainer.train_one_epoch`` (forward, float32 loss,
  backward, clip, optimiser step) on one pre-made batch, no loader;
* **mask cache**: ``load_dataset`` with a fresh ``cache_dir`` (rasterising every polygon/RLE into
  class-index PNGs) against a warm one (reading the cache index);
* **data_wait_frac**: ``FoldTrainer.epochs()`` records of epochs 2.. (time blocked in the loader /
  training time of the epoch), ``num_workers`` 0 (the default) and 1; the trainer validates on 8
  images only (validation is not measured here and would only lengthen the run).

Loader, model and loop measurements alternate. Target: data_wait_frac < 0.10 in later epochs.
A rule of thumb to read the first rows: with ``num_workers`` 0 the wait fraction is about
model_ips / (loader_ips + model_ips), so the loader must be ~9x faster than the model.
"""
from __future__ import annotations

import time
from pathlib import Path

from bench import common  # noqa: E402

NAME = "data_path"
TARGET = "later epochs: data_wait_frac < 0.10"
WAIT_TARGET = 0.10


def config(cache_dir: Path, workers: int, epochs: int, max_batches: int | None) -> dict:
    from trainables.config import resolve

    return resolve(common.tiny_overrides(**{
        "data.path": str(common.CAMVID), "data.cache_dir": str(cache_dir), "data.max_size": 240,
        "train.image_size": [160, 224], "train.batch_size": 8, "train.num_workers": workers,
        "train.epochs": epochs, "train.max_train_batches": max_batches,
        "augment.hflip": 0.5, "augment.scale_rotate": 0.5, "augment.color": 0.5}))


def time_load(cache_dir: Path) -> float:
    start = time.perf_counter()
    common.load_data(common.CAMVID, cache_dir)
    return time.perf_counter() - start


def loader_epochs(trainer, epochs: int) -> list[float]:
    """Images/s of each pass over the training loader (no model)."""
    out = []
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for images, _ in trainer.train_loader:
            n += images.shape[0]
        out.append(n / (time.perf_counter() - start))
    return out


def model_ips(trainer, batch, steps: int) -> float:
    """The per-batch work of ``train_one_epoch`` on one pre-made batch, repeated ``steps`` times."""
    trainer.model.train()
    images, target = trainer._to_device(*batch)

    def step():
        trainer.train_step(images, target)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * images.shape[0] / (time.perf_counter() - start)


def run(quick: bool) -> dict:
    if not common.CAMVID.exists():
        return common.skipped(NAME, TARGET, f"CamVid not found at {common.CAMVID_REL}")
    from trainables.folds import make_folds, train_val_indices
    from trainables.loop import FoldTrainer

    common.set_threads()
    reps = 1 if quick else 2
    loop_epochs = 2 if quick else 3
    max_batches = 8 if quick else None
    cold, warm = [], []
    loader = {0: {"first": [], "later": []}, 1: {"first": [], "later": []}}
    model: list[float] = []
    wait = {0: [], 1: []}
    records = {0: [], 1: []}
    with common.scratch("data") as tmp:
        for rep in range(reps):  # cold and warm cache loads, alternating
            cold.append(time_load(tmp / f"cold{rep}"))
            warm.append(time_load(tmp / f"cold{rep}"))
            common.log(f"{NAME}: load_dataset cold {cold[-1]:.1f}s, warm {warm[-1]:.2f}s")
        cache = tmp / "cold0"
        data = common.load_data(common.CAMVID, cache)
        folds = make_folds("kfold", 2, 0, data.ids, data.presence)
        train_idx, val_idx = train_val_indices(folds, 0, data.ids)
        val_idx = val_idx[:8]  # validation is not what this benchmark measures: one batch keeps epochs short
        for rep in range(reps):
            for workers in ((0, 1) if rep % 2 == 0 else (1, 0)):
                cfg = config(cache, workers, loop_epochs, max_batches)
                trainer = FoldTrainer(cfg, data, train_idx, val_idx, fold=0)
                ips = loader_epochs(trainer, 3 if quick else 4)
                loader[workers]["first"].append(ips[0])
                loader[workers]["later"] += ips[1:]
                batch = next(iter(trainer.train_loader))
                model.append(model_ips(trainer, batch, 6 if quick else 12))
                common.log(f"  workers {workers}: loader img/s {[round(v) for v in ips]}, model img/s {model[-1]:.1f}")
                del trainer
                trainer = FoldTrainer(cfg, data, train_idx, val_idx, fold=0)  # fresh: epoch 1 decodes again
                for record in trainer.epochs():
                    keep = {k: record[k] for k in ("epoch", "train_images_per_s", "data_wait_frac", "epoch_time_s",
                                                   "val_miou")}
                    records[workers].append({"rep": rep, **keep})
                    if record["epoch"] >= 2:
                        wait[workers].append(record["data_wait_frac"])
                common.log(f"  workers {workers}: FoldTrainer epochs "
                           f"{[(r['epoch'], round(r['data_wait_frac'], 3), round(r['train_images_per_s'], 1)) for r in records[workers] if r['rep'] == rep]}")
                del trainer
    rows = []
    for workers in (0, 1):
        later = loader[workers]["later"]
        rows.append(common.row(f"images/s, workers {workers}: loader (later epochs) vs model step",
                               common.side("loader", later, "img/s"), common.side("model", model, "img/s"),
                               common.safe_ratio(common.median(later), common.median(model)), "info (>= 9 for <10%)"))
    for workers in (0, 1):
        rows.append(common.row(f"loader images/s, workers {workers}: epoch 1 vs later",
                               common.side("epoch 1", loader[workers]["first"], "img/s"),
                               common.side("later", loader[workers]["later"], "img/s"),
                               common.safe_ratio(common.median(loader[workers]["first"]),
                                                 common.median(loader[workers]["later"])), "info"))
    rows.append(common.row("load_dataset (367 images): cold vs warm cache", common.side("cold", cold, "s"),
                           common.side("warm", warm, "s"), common.safe_ratio(common.median(cold), common.median(warm)),
                           "info"))
    for workers in (0, 1):
        w = common.median(wait[workers])
        rows.append(common.row(f"data_wait_frac, epochs 2.., workers {workers}",
                               common.side("FoldTrainer", wait[workers]), None, w, f"< {WAIT_TARGET}",
                               w is not None and w < WAIT_TARGET))
    details = {"quick": quick, "threads": common.THREADS, "image_size": [160, 224], "max_size": 240,
               "batch_size": 8, "train_images": len(train_idx), "loop_epochs": loop_epochs,
               "max_train_batches": max_batches, "records": records, "loader": loader, "model_ips": model,
               "cold_s": cold, "warm_s": warm}
    return common.result(NAME, TARGET, rows, details)


if __name__ == "__main__":
    common.bench_main(NAME, TARGET, run)
