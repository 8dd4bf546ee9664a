"""trial_overhead: what running one trial through Ray Tune costs against the bare training loop.

Both sides train the same tiny Unet (resnet18, encoder_depth 3, decoder [32, 16, 8], random init)
on fold 0 of the shipped CamVid sample (2 folds: 36 train / 36 val images) at 64x96, batch 8, one
torch thread (the tool's default trial: cpus_per_trial 1), same seed, for E epochs:

* **tune**: ``tune.Tuner(tune.with_resources(tune.with_parameters(tune.trainable.train_trial, ...)))``
  with one trial and the tool's run settings (checkpoint of the best epoch kept, ``trials.csv``
  callback), on a private local Ray started once; per-epoch seconds are the trial's reported
  ``time_this_iter_s`` (the ``time_total_s`` deltas), which include the per-epoch ``tune.report``
  and the checkpoint written when the metric improves, but not Ray's start;
* **direct**: ``load_dataset`` + ``FoldTrainer`` in this process, seconds between the yields of
  ``FoldTrainer.epochs()``.

Epoch 1 (which also decodes the images into the dataset's memory store) is left out of the rate;
epochs 2..E of every repetition are pooled. The variants alternate (direct, tune, tune, direct,
...). The fixed costs are reported on their own: ``ray.init`` once, and per trial the wall time of
``Tuner.fit`` minus the time of its epochs 2..E (worker start, imports, data and model set-up,
epoch 1, Tune's bookkeeping), against the same quantity of the direct run.

Two rows split Tune's per-epoch time: ``epoch_time_s`` measured by ``FoldTrainer.epochs()`` itself
(training + validation: slower here means slower compute inside the Ray worker) and the rest of
``time_this_iter_s`` (the files ``train_trial`` writes on an improved epoch, ``tune.report``,
Tune copying the checkpoint into its storage). ``details.checkpoint_parts_s`` times each file
``train_trial`` writes, on the direct side's trainer.

Target: tune epochs/s >= 0.95 x direct epochs/s.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench import common  # noqa: E402

NAME = "trial_overhead"
TARGET = "tune epochs/s >= 0.95 x direct"


def base_config(cache_dir: Path, epochs: int) -> dict:
    from trainables.config import resolve

    # no W&B here, so no example predictions with the checkpoints (as tune/run.py --wandb disabled)
    return resolve(common.tiny_overrides(**{"data.path": str(common.SAMPLE), "data.cache_dir": str(cache_dir),
                                            "train.epochs": epochs, "folds.k": 2, "train.preview_images": 0}))


def run_direct(base: dict, folds: list) -> dict:
    from trainables.folds import train_val_indices
    from trainables.loop import FoldTrainer

    common.set_threads()
    start = time.perf_counter()
    d = base["data"]
    data = common.load_data(d["path"], Path(d["cache_dir"]))
    train_idx, val_idx = train_val_indices(folds, 0, data.ids)
    trainer = FoldTrainer(base, data, train_idx, val_idx, fold=0)
    setup = time.perf_counter() - start
    epoch_s, inner_s, miou = [], [], []
    last = time.perf_counter()
    for record in trainer.epochs():
        now = time.perf_counter()
        epoch_s.append(now - last)
        inner_s.append(record["epoch_time_s"])
        miou.append(record["val_miou"])
        last = now
    total = time.perf_counter() - start
    return {"setup_s": setup, "epoch_s": epoch_s, "epoch_time_s": inner_s, "total_s": total, "val_miou": miou,
            "checkpoint_parts_s": checkpoint_parts(trainer)}


def checkpoint_parts(trainer) -> dict:
    """What tune.trainable.train_trial writes on an improved epoch, part by part (median of 3, seconds)."""
    import numpy as np
    import torch

    from trainables.checkpoint import save_checkpoint

    parts: dict[str, list[float]] = {"model.pt": [], "state.pt": [], "preview.npz": []}
    for _ in range(3):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            save_checkpoint(trainer.best_checkpoint(), tmp)
            parts["model.pt"].append(time.perf_counter() - t)
            t = time.perf_counter()
            state = trainer.state_dict()
            del state["best_state"], state["model"]  # as train_trial: those weights are in model.pt
            torch.save(state, Path(tmp) / "state.pt")
            parts["state.pt"].append(time.perf_counter() - t)
            if trainer.cfg["train"]["preview_images"]:
                t = time.perf_counter()
                np.savez_compressed(Path(tmp) / "preview.npz", **trainer.preview())
                parts["preview.npz"].append(time.perf_counter() - t)
            sizes = {p.name: p.stat().st_size for p in Path(tmp).iterdir()}
    return {**{k: common.median(v) for k, v in parts.items() if v}, "bytes": sizes}


def run_tune(base: dict, folds: list, storage: Path, rep: int) -> dict:
    from ray import tune

    from tune.experiment import TrialsTable
    from tune.search import trial_dirname
    from tune.trainable import train_trial

    cpus = common.THREADS
    metric = base["train"]["metric"]
    trainable = tune.with_resources(tune.with_parameters(train_trial, base=base, folds=folds, cpus=cpus),
                                    {"cpu": cpus, "gpu": 0})
    tuner = tune.Tuner(
        trainable,
        param_space={"fold": 0},
        tune_config=tune.TuneConfig(num_samples=1, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=f"rep{rep}", storage_path=str(storage),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=metric,
                                                    checkpoint_score_order="max"),
            callbacks=[TrialsTable(storage / f"rep{rep}-trials.csv", metric, int(base["train"]["epochs"]))],
            verbose=0),
    )
    start = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - start
    res = grid[0]
    if res.error:
        raise RuntimeError(f"the Tune trial failed: {res.error}")
    df = res.metrics_dataframe.sort_values("training_iteration")
    total = df["time_total_s"].tolist()
    epoch_s = [total[0]] + [b - a for a, b in zip(total, total[1:])]
    return {"wall_s": wall, "epoch_s": epoch_s, "time_total_s": total[-1], "val_miou": df["val_miou"].tolist(),
            "epoch_time_s": df["epoch_time_s"].tolist(), "time_this_iter_s": df["time_this_iter_s"].tolist(),
            "improved_epochs": int((df["best_epoch"] == df["epoch"]).sum())}


def run(quick: bool) -> dict:
    from trainables.folds import make_folds

    epochs, reps = (3, 1) if quick else (6, 3)
    with common.scratch("overhead") as tmp:
        base = base_config(tmp / "cache", epochs)
        data = common.load_data(common.SAMPLE, tmp / "cache")  # warm the mask cache for both sides
        folds = make_folds("kfold", 2, 0, data.ids, data.presence)
        direct, tuned = [], []
        with common.private_ray() as ray_info:
            common.log(f"{NAME}: ray.init {ray_info['init_s']:.1f}s; {reps} x (direct, tune), {epochs} epochs each")
            for rep in range(reps):
                order = ("direct", "tune") if rep % 2 == 0 else ("tune", "direct")
                for variant in order:
                    if variant == "direct":
                        direct.append(run_direct(base, folds))
                        common.log(f"  direct rep {rep}: epochs {[round(s, 2) for s in direct[-1]['epoch_s']]}")
                    else:
                        tuned.append(run_tune(base, folds, tmp / "tune", rep))
                        common.log(f"  tune   rep {rep}: epochs {[round(s, 2) for s in tuned[-1]['epoch_s']]}, "
                                   f"fit {tuned[-1]['wall_s']:.1f}s")
    tune_rate = [1 / s for r in tuned for s in r["epoch_s"][1:]]
    direct_rate = [1 / s for r in direct for s in r["epoch_s"][1:]]
    ratio = common.safe_ratio(common.median(tune_rate), common.median(direct_rate))
    tune_fixed = [r["wall_s"] - sum(r["epoch_s"][1:]) for r in tuned]
    direct_fixed = [r["total_s"] - sum(r["epoch_s"][1:]) for r in direct]
    per_epoch_ms = 1000 * (common.median([s for r in tuned for s in r["epoch_s"][1:]])
                           - common.median([s for r in direct for s in r["epoch_s"][1:]]))
    # where Tune's extra time goes: inside FoldTrainer's epoch (slower compute in the Ray worker) or
    # outside it (checkpoint files, tune.report, Tune copying the checkpoint into its storage)
    tune_inner = [s for r in tuned for s in r["epoch_time_s"][1:]]
    direct_inner = [s for r in direct for s in r["epoch_time_s"][1:]]
    tune_outside = [a - b for r in tuned for a, b in zip(r["epoch_s"][1:], r["epoch_time_s"][1:])]
    direct_outside = [a - b for r in direct for a, b in zip(r["epoch_s"][1:], r["epoch_time_s"][1:])]
    rows = [
        common.row("epochs/s, epochs 2..E", common.side("tune", tune_rate, "ep/s"),
                   common.side("direct", direct_rate, "ep/s"), ratio, ">= 0.95",
                   ratio is not None and ratio >= 0.95),
        common.row("  of which: FoldTrainer epoch_time_s", common.side("tune", tune_inner, "s"),
                   common.side("direct", direct_inner, "s"),
                   common.safe_ratio(common.median(tune_inner), common.median(direct_inner)), "info"),
        common.row("  of which: time outside the epoch", common.side("tune", tune_outside, "s"),
                   common.side("direct", direct_outside, "s"), None, "info"),
        common.row("whole trial wall time", common.side("tune fit", [r["wall_s"] for r in tuned], "s"),
                   common.side("direct", [r["total_s"] for r in direct], "s"),
                   common.safe_ratio(common.median([r["wall_s"] for r in tuned]),
                                     common.median([r["total_s"] for r in direct])), "info"),
        common.row("fixed cost per trial (wall - epochs 2..E)", common.side("tune", tune_fixed, "s"),
                   common.side("direct", direct_fixed, "s"),
                   common.safe_ratio(common.median(tune_fixed), common.median(direct_fixed)), "info"),
        common.row("Ray start (once per search)", common.side("ray.init", [ray_info["init_s"]], "s"), None, None,
                   "info"),
    ]
    same = all(abs(a - b) < 1e-6 for t, d in zip(tuned, direct) for a, b in zip(t["val_miou"], d["val_miou"]))
    details = {"epochs": epochs, "repetitions": reps, "threads": common.THREADS, "ray": ray_info,
               "tune_minus_direct_ms_per_epoch": per_epoch_ms,
               "checkpoint_parts_s": direct[-1]["checkpoint_parts_s"],
               "improved_epochs_tune": [r["improved_epochs"] for r in tuned],
               "same_val_miou_both_sides": same, "direct": direct, "tune": tuned}
    return common.result(NAME, TARGET, rows, details)


if __name__ == "__main__":
    common.bench_main(NAME, TARGET, run)
