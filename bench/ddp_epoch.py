"""ddp_epoch: a training epoch of one trial on 2 data-parallel workers (gloo, CPU) against 1 worker.

The same ``FoldTrainer`` epoch (``train_one_epoch``: the same global batches, see
trainables/sampling.py) in one process, then in two processes joined by a gloo process group, as
the workers of a ``resources.workers_per_trial: 2`` trial run it (Ray Train sets the group up; here
``torch.multiprocessing`` does, so Ray's start-up is not in the numbers). Each process gets one
torch thread (a worker's ``cpus_per_trial: 1``). Data: CamVid train fold 0 of 2 (183 images;
the shipped sample when CamVid is absent) downscaled to 240 px, batch 8 at 160x224, the tiny Unet.

* **epoch s**: median over epochs 2.. (epoch 1 also decodes the images into memory);
* **all-reduce ms**: one gloo all-reduce of the model's gradients (a flat float32 tensor of all
  its parameters), median of 20, in the 2-worker run; x the epoch's steps = its share of the epoch.

The ratio is t(2 workers) / t(1 worker). On a machine with C free cores it is at best 1/2 (half
the batch per worker) plus the all-reduce; when the two workers share fewer than 2 free cores
(this machine: 2 cores shared with other jobs) it is about 1 or worse. No target: it is measured
so a user knows what a multi-worker trial buys on CPUs (on GPUs, with NCCL, the all-reduce is far
cheaper than the step).
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from bench import common  # noqa: E402

NAME = "ddp_epoch"
TARGET = "none: the ratio t(2 workers) / t(1 worker) of a training epoch, with its cause"


def config(data_path: Path, cache_dir: Path, max_batches: int | None, epochs: int) -> dict:
    from trainables.config import resolve

    return resolve(common.tiny_overrides(**{
        "data.path": str(data_path), "data.cache_dir": str(cache_dir), "data.max_size": 240,
        "train.image_size": [160, 224], "train.batch_size": 8, "train.epochs": epochs,
        "train.max_train_batches": max_batches}))


def _worker(rank: int, world: int, init_file: str, cfg: dict, out: str, epochs: int) -> None:
    import torch
    import torch.distributed as dist

    from trainables.data import load_data
    from trainables.folds import make_folds, train_val_indices
    from trainables.loop import FoldTrainer

    common.set_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    data = load_data(cfg["data"])
    folds = make_folds("kfold", 2, 0, data.ids, data.presence)
    train_idx, val_idx = train_val_indices(folds, 0, data.ids)
    trainer = FoldTrainer(cfg, data, train_idx, val_idx[:8], fold=0)
    times, ips = [], []
    for _ in range(epochs):
        start = time.perf_counter()
        record = trainer.train_one_epoch()
        trainer.epoch += 1
        times.append(time.perf_counter() - start)
        ips.append(record["train_images_per_s"])
    reduce_ms = []
    if world > 1:
        flat = torch.zeros(sum(p.numel() for p in trainer.model.parameters()))
        for _ in range(20):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(flat)
            reduce_ms.append(1000 * (time.perf_counter() - start))
        dist.destroy_process_group()
    if rank == 0:
        steps = min(trainer.train_batches, cfg["train"]["max_train_batches"] or trainer.train_batches)
        Path(out).write_text(json.dumps({"epoch_s": times, "images_per_s": ips, "allreduce_ms": reduce_ms,
                                         "steps": steps, "params": sum(p.numel() for p in trainer.model.parameters()),
                                         "rank_batch": trainer.train_loader.batch_size}))


def measure(world: int, cfg: dict, tmp: Path, epochs: int) -> dict:
    import torch.multiprocessing as mp

    out = tmp / f"world{world}.json"
    mp.spawn(_worker, args=(world, str(tmp / f"init{world}"), cfg, str(out), epochs), nprocs=world, join=True)
    return json.loads(out.read_text())


def run(quick: bool) -> dict:
    data_path = common.CAMVID if common.CAMVID.exists() else common.SAMPLE
    epochs = 2 if quick else 4
    with common.scratch("ddp") as tmp:
        common.log(f"data {data_path.name} ({data_path.parent.parent.name}); load average {os.getloadavg()[0]:.1f}")
        cfg = config(data_path, tmp / "cache", 8 if quick else None, epochs)
        common.load_data(data_path, tmp / "cache")  # rasterise the masks once, outside the timings
        runs = {}
        for world in (1, 2, 1, 2) if not quick else (1, 2):  # alternate: the machine's load drifts
            common.log(f"{world} worker(s)")
            got = measure(world, cfg, tmp, epochs)
            runs.setdefault(world, []).append(got)
    later = {w: [t for r in rs for t in r["epoch_s"][1:]] for w, rs in runs.items()}
    t1, t2 = common.median(later[1]), common.median(later[2])
    reduce_ms = [m for r in runs[2] for m in r["allreduce_ms"]]
    steps = runs[2][0]["steps"]
    comm_s = common.median(reduce_ms) * steps / 1000
    rows = [
        common.row("epoch time", common.side("2 workers (gloo)", later[2], "s"), common.side("1 worker", later[1], "s"),
                   common.safe_ratio(t2, t1), note=f"{steps} steps of batch 8 (4 per worker)"),
        common.row("gradient all-reduce x steps", common.side("2 workers", [comm_s], "s"),
                   common.side("2-worker epoch", [t2], "s"), common.safe_ratio(comm_s, t2),
                   note=f"{runs[2][0]['params']} parameters, {statistics.median(reduce_ms):.1f} ms per all-reduce"),
    ]
    details = {"runs": runs, "load_average": os.getloadavg(), "cpus": os.cpu_count(), "data": str(data_path)}
    return common.result(NAME, TARGET, rows, details)


if __name__ == "__main__":
    common.bench_main(NAME, TARGET, run)
