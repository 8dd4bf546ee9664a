"""gpu: mixed precision, memory format and fractional-GPU packing on a CUDA GPU (no Ray needed).

    python bench/gpu.py [--quick] [--json PATH]        # standalone: imports trainables only, never Ray

Without a CUDA GPU it prints ``gpu: skipped (no CUDA GPU)`` and records ``skipped``.

With one, for Unet-ResNet34 and SegFormer-B2 (``arch: segformer``, ``encoder: nvidia/mit-b2``),
random init, 512x512, batch 8, CE loss, AdamW, built by ``FoldTrainer`` (so AMP, channels_last and
the GradScaler are the tool's own settings):

* **train images/s** of the training step of ``FoldTrainer.train_one_epoch`` (forward under the
  trainer's autocast, float32 loss, backward, clip, step) on pre-made batches already on the GPU,
  for ``train.amp`` bf16 vs off (fp32) and ``train.channels_last`` on vs off; each variant is
  built alone (so ``torch.cuda.max_memory_allocated`` is its own peak) and the variants are
  visited in alternating order over the repetitions;
* **the real loop** (bf16, channels_last): ``FoldTrainer.epochs()`` records (epochs 2-3) on a
  synthetic folder dataset of 64 random 512x512 PNGs, ``num_workers`` 0 vs 4: ``train_images_per_s`` and ``data_wait_frac``;
* **packing**: N processes (N = 2 and 4, as ``gpus_per_trial`` 1/N would place them) each
  training Unet-ResNet34 bf16 at the same time, against one process alone: total images/s.

Rows are informational (the issue sets no number): bf16/fp32 > 1 and packed/alone > 1 are what
one hopes for. On the lent GPU machines smp, albumentations and pycocotools may be missing:
carry them as wheels (see /work/.library/device/README.md); only a folder dataset is used here, so
pycocotools is not needed.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from bench import common  # noqa: E402

NAME = "gpu"
TARGET = "info: bf16 vs fp32, channels_last, packing (no CUDA: skipped)"
MODELS = {"Unet-R34": ("Unet", "resnet34"), "SegFormer-B2": ("segformer", "nvidia/mit-b2")}
SIZE = 512
BATCH = 8


def make_folder_dataset(root: Path, n: int = 32, size: int = SIZE, classes: int = 12) -> Path:
    """``images/*.png`` + ``masks/*.png`` (class indices) + ``classes.txt``: no pycocotools needed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "images" / f"{i:03d}.png")
        blocks = rng.integers(0, classes, (size // 32, size // 32), dtype=np.uint8)
        Image.fromarray(np.kron(blocks, np.ones((32, 32), dtype=np.uint8))).save(root / "masks" / f"{i:03d}.png")
    (root / "classes.txt").write_text("\n".join(["background"] + [f"c{i}" for i in range(1, classes)]) + "\n")
    return root


def config(model: str, amp: str, channels_last: bool, workers: int = 0, epochs: int = 1,
           max_batches: int | None = None, size: int = SIZE, batch: int = BATCH) -> dict:
    from trainables.config import resolve

    arch, encoder = MODELS[model]
    return resolve({"model.arch": arch, "model.encoder": encoder, "model.weights": None, "model.kwargs": {},
                    "train.image_size": [size, size], "train.batch_size": batch, "train.amp": amp,
                    "train.channels_last": channels_last, "train.num_workers": workers, "train.epochs": epochs,
                    "train.max_train_batches": max_batches, "train.device": "auto", "train.seed": 0})


def step_throughput(trainer, steps: int, warmup: int = 3) -> float:
    """Images/s of the per-batch work of ``train_one_epoch`` on a pre-made on-device batch."""
    import torch

    bs, (h, w) = trainer.cfg["train"]["batch_size"], trainer.cfg["train"]["image_size"]
    images = torch.randn(bs, 3, h, w)
    target = torch.randint(0, trainer.data.num_classes, (bs, h, w))
    images, target = trainer._to_device(images, target)
    trainer.model.train()

    def step():
        trainer.train_step(images, target)

    for _ in range(warmup):
        step()
    sync = trainer.device.type == "cuda"
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if sync:
        torch.cuda.synchronize()
    return steps * bs / (time.perf_counter() - start)


def variant_run(data, idx, model: str, amp: str, cl: bool, steps: int, size: int, batch: int) -> dict:
    """One variant built alone: images/s and its own peak memory."""
    import gc

    import torch

    from trainables.loop import FoldTrainer

    cuda = torch.cuda.is_available()
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = FoldTrainer(config(model, amp, cl, size=size, batch=batch), data, idx, idx[:batch], fold=0)
    ips = step_throughput(trainer, steps)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    del trainer
    return {"ips": ips, "peak_mb": peak}


def _packed_worker(rank: int, root: str, steps: int, size: int, batch: int, barrier, queue) -> None:
    import torch

    common.quiet_libraries()
    if not torch.cuda.is_available():
        common.set_threads(1)  # the CPU smoke test
    from trainables.data import load_dataset
    from trainables.loop import FoldTrainer

    data = load_dataset(root, cache_dir=Path(root) / f".cache{rank}")
    idx = list(range(len(data)))
    trainer = FoldTrainer(config("Unet-R34", "bf16", True, size=size, batch=batch), data, idx, idx[:batch], fold=0)
    step_throughput(trainer, 2)  # build kernels, allocate
    barrier.wait()
    start = time.perf_counter()
    ips = step_throughput(trainer, steps, warmup=0)
    end = time.perf_counter()
    queue.put({"rank": rank, "start": start, "end": end, "images": steps * batch, "ips": ips,
               "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None})


def packed(root: Path, n: int, steps: int, size: int, batch: int) -> dict:
    """N processes training at once on the one GPU; total images over the span from first start to last end."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_packed_worker, args=(r, str(root), steps, size, batch, barrier, queue))
             for r in range(n)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"n": n, "total_ips": sum(r["images"] for r in results) / span, "per_process": results}


def run(quick: bool, force_cpu_smoke: bool = False) -> dict:
    import torch

    if not torch.cuda.is_available() and not force_cpu_smoke:
        print("gpu: skipped (no CUDA GPU)", flush=True)
        return common.skipped(NAME, TARGET, "no CUDA GPU", {"torch": torch.__version__})
    from trainables.data import load_dataset
    from trainables.loop import FoldTrainer

    smoke = not torch.cuda.is_available()  # the code path on CPU at toy sizes, to check the script itself
    if smoke:
        common.set_threads(1)
    size, batch = (64, 2) if smoke else (SIZE, BATCH)
    steps = 2 if smoke else (10 if quick else 25)
    reps = 1 if smoke or quick else 3
    packs = [2] if (quick or smoke) else [2, 4]
    models = ["Unet-R34"] if smoke else list(MODELS)
    variants = [(m, amp, cl) for m in models for amp in ("bf16", "off") for cl in (True, False)]
    device = torch.cuda.get_device_name(0) if not smoke else "cpu (smoke test)"
    common.log(f"{NAME}: {device}, {size}x{size}, batch {batch}, {steps} steps x {reps} reps")
    with common.scratch("gpu") as tmp:
        root = make_folder_dataset(tmp / "data", n=8 if smoke else 64, size=size)
        data = load_dataset(root, cache_dir=tmp / "cache")
        idx = list(range(len(data)))
        results: dict[tuple, list[dict]] = {v: [] for v in variants}
        for rep in range(reps):
            for v in (variants if rep % 2 == 0 else variants[::-1]):  # alternate the order
                results[v].append(variant_run(data, idx, *v, steps=steps, size=size, batch=batch))
                common.log(f"  {v[0]} amp={v[1]} channels_last={v[2]}: {results[v][-1]['ips']:.1f} img/s, "
                           f"peak {results[v][-1]['peak_mb'] or 0:.0f} MB")
        loop = {}
        loop_workers = (0, 1) if smoke else (0, 4)
        for workers in loop_workers:
            cfg = config("Unet-R34", "bf16", True, workers=workers, epochs=2 if smoke else 3, size=size, batch=batch)
            trainer = FoldTrainer(cfg, data, idx, idx[:batch], fold=0)
            loop[workers] = [{k: r[k] for k in ("epoch", "train_images_per_s", "data_wait_frac")}
                             for r in trainer.epochs()]
            del trainer
            common.log(f"  loop workers {workers}: {loop[workers]}")
        alone = packed(root, 1, steps, size, batch)
        packs_out = {n: packed(root, n, steps, size, batch) for n in packs}
        common.log(f"  alone {alone['total_ips']:.1f} img/s; packed "
                   f"{ {n: round(p['total_ips'], 1) for n, p in packs_out.items()} }")

    def ips(v):
        return [r["ips"] for r in results[v]]

    def peak(v):
        return [r["peak_mb"] for r in results[v] if r["peak_mb"] is not None]

    rows = []
    for m in models:
        for cl in (True, False):
            a, b = ips((m, "bf16", cl)), ips((m, "off", cl))
            rows.append(common.row(f"{m} train img/s, channels_last {'on' if cl else 'off'}",
                                   common.side("bf16", a, "img/s"), common.side("fp32", b, "img/s"),
                                   common.safe_ratio(common.median(a), common.median(b)), "info (> 1)"))
        for amp in ("bf16", "off"):
            a, b = ips((m, amp, True)), ips((m, amp, False))
            rows.append(common.row(f"{m} train img/s, {'bf16' if amp == 'bf16' else 'fp32'}",
                                   common.side("channels_last", a, "img/s"), common.side("contiguous", b, "img/s"),
                                   common.safe_ratio(common.median(a), common.median(b)), "info"))
        a, b = peak((m, "bf16", True)), peak((m, "off", True))
        rows.append(common.row(f"{m} peak memory (channels_last)", common.side("bf16", a, "MB"),
                               common.side("fp32", b, "MB"), common.safe_ratio(common.median(a), common.median(b)),
                               "info"))
    for workers in loop_workers:
        later = [r for r in loop[workers] if r["epoch"] >= 2] or loop[workers]
        rows.append(common.row(f"loop Unet-R34 bf16, workers {workers}: img/s | data_wait_frac",
                               common.side("train", [r["train_images_per_s"] for r in later], "img/s"),
                               common.side("data_wait_frac", [r["data_wait_frac"] for r in later]), None, "info"))
    for n, p in packs_out.items():
        rows.append(common.row(f"{n} trials packed vs one alone (total img/s)", common.side(f"{n} packed",
                               [p["total_ips"]], "img/s"), common.side("alone", [alone["total_ips"]], "img/s"),
                               common.safe_ratio(p["total_ips"], alone["total_ips"]), "info (> 1)"))
    details = {"device": device, "torch": torch.__version__, "size": size, "batch": batch, "steps": steps,
               "reps": reps, "smoke": smoke,
               "variants": {f"{m}|amp={amp}|channels_last={cl}": results[(m, amp, cl)] for m, amp, cl in variants},
               "loop": loop, "alone": alone, "packed": packs_out}
    return common.result(NAME, TARGET, rows, details)


if __name__ == "__main__":
    if "--cpu-smoke" in sys.argv:  # check the script's code path without a GPU (tiny sizes; not a benchmark)
        sys.argv.remove("--cpu-smoke")
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
        common.bench_main(NAME, TARGET, lambda quick: run(quick, force_cpu_smoke=True))
    else:
        common.bench_main(NAME, TARGET, run)
