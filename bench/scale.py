"""scale: the per-trial costs that a 1,000-trial search on 64 GPUs multiplies (README "Scale").

No Ray and no GPU: each figure is a cost per trial or per trial-epoch that does not depend on where
the trial ran.

* **searcher** (the driver): ``FoldedOptunaSearch`` on ``search_spaces/smp.yaml`` (5 folds, TPE
  with constant liar, studies in SQLite) driven as Tune drives it, 64 trials in flight (one per
  GPU): ``suggest``, one ``on_trial_result`` per epoch, ``on_trial_complete``. Epochs per trial
  follow the space's ASHA (grace 4, reduction factor 3, 40 epochs: 2/3 of the trials stop at 4,
  2/9 at 12, 2/27 at 36, 1/27 run 40; 9.5 on average); scores are synthetic. Driver seconds per
  trial over the first and the last 10% of N trials (N = 1,000 full, 200 quick). Target: the last
  10% cost under 1 s a trial (a GPU trial of the real space takes minutes).
* **checkpoint** (the storage): the files ``tune.trainable.train_trial`` writes at an improved
  epoch (``model.pt`` best weights + ``state.pt`` to resume: weights, AdamW moments, RNG) for
  three encoders of the space, after one real training step on the shipped sample; info.
* **results** (the storage and the driver): bytes a trial-epoch adds to Tune's ``result.json``
  (the trainable's record plus Tune's fields and the trial config, one JSON line) and one
  ``trials.csv`` row, and the time to rewrite ``trials.csv`` at N trials (done when a trial
  starts, ends or is retried); info.
"""
from __future__ import annotations

import json
import math
import random
import tempfile
import time
from pathlib import Path

from bench import common  # noqa: E402

NAME = "scale"
TARGET = "searcher driver time per trial < 1 s at the last 10% of 1,000 trials"
IN_FLIGHT = 64
BUDGET_S = 1.0
ROOT = Path(__file__).resolve().parents[1]
ENCODERS = [("Unet", "resnet34"), ("FPN", "resnet50"), ("DeepLabV3Plus", "resnext101_32x4d")]


def asha_epochs(rng: random.Random, grace: int = 4, factor: int = 3, max_t: int = 40) -> int:
    """Epochs an ASHA-scheduled trial trains: stopped at a rung with probability 1 - 1/factor."""
    t = grace
    while t < max_t:
        if rng.random() > 1 / factor:  # not in the top 1/factor of its rung
            return t
        t *= factor
    return max_t


def drive_searcher(n: int, tmp: Path) -> dict:
    """Seconds the driver spends in the searcher per trial, in trial order, and split into
    suggest / per-epoch results / complete over all trials."""
    from tune.searcher import FoldedOptunaSearch
    from tune.space import load_space

    spec = load_space("smp.yaml", ROOT / "search_spaces")
    k = int(spec.fixed["folds"]["k"])
    spec.search["num_samples"] = n // k
    searcher = FoldedOptunaSearch(spec, k, 12, f"sqlite:///{tmp / 'studies.db'}", "scale",
                                  int(spec.fixed["train"]["epochs"]))
    rng = random.Random(0)
    cost: dict[str, float] = {}
    split = {"suggest": 0.0, "results": 0.0, "complete": 0.0, "epochs": 0}
    live: list[str] = []

    def finish(trial_id: str) -> None:
        config, epochs = searcher.live[trial_id]["config"], asha_epochs(rng)
        quality = 0.7 - 0.1 * abs(math.log10(config["optimizer.lr"]) + 3.2)
        start, best = time.perf_counter(), 0.0
        for epoch in range(1, epochs + 1):
            score = quality * (1 - 0.8 ** epoch) + rng.gauss(0, 0.01)
            best = max(best, score)
            result = {"epoch": epoch, "training_iteration": epoch, "val_miou": score, "best_score": best,
                      "best_epoch": epoch}
            if epoch < epochs:
                searcher.on_trial_result(trial_id, result)
        middle = time.perf_counter()
        searcher.on_trial_complete(trial_id, result)
        end = time.perf_counter()
        cost[trial_id] += end - start
        split["results"] += middle - start
        split["complete"] += end - middle
        split["epochs"] += epochs

    for i in range(n):
        if len(live) >= IN_FLIGHT:
            finish(live.pop(0))
        trial_id = f"t{i:05d}"
        start = time.perf_counter()
        config = searcher.suggest(trial_id)
        cost[trial_id] = time.perf_counter() - start
        split["suggest"] += cost[trial_id]
        assert isinstance(config, dict), config
        live.append(trial_id)
        if (i + 1) % max(1, n // 10) == 0:
            common.log(f"  searcher: {i + 1}/{n} trials suggested")
    for trial_id in live:
        finish(trial_id)
    return {"per_trial_s": [cost[f"t{i:05d}"] for i in range(n)], "split_s": split,
            "db_bytes": (tmp / "studies.db").stat().st_size}


def checkpoint_bytes(tmp: Path) -> dict:
    """What train_trial writes at an improved epoch, per architecture/encoder, after one step."""
    import torch

    from trainables.checkpoint import save_checkpoint
    from trainables.config import resolve
    from trainables.loop import FoldTrainer

    data = common.load_data(common.SAMPLE, tmp / "cache")
    ids = list(data.ids)
    train_idx, val_idx = list(range(0, len(ids), 2)), list(range(1, len(ids), 2))[:4]
    out, record = {}, None
    for arch, encoder in ENCODERS:
        cfg = resolve({"model.arch": arch, "model.encoder": encoder, "model.weights": None,
                       "data.path": str(common.SAMPLE), "data.cache_dir": str(tmp / "cache"),
                       "train.image_size": [64, 96], "train.batch_size": 2, "train.epochs": 1,
                       "train.max_train_batches": 1, "train.device": "cpu", "train.preview_images": 0})
        trainer = FoldTrainer(cfg, data, train_idx, val_idx, fold=0)
        record = next(trainer.epochs())
        params = sum(p.numel() for p in trainer.model.parameters())
        with tempfile.TemporaryDirectory() as ckpt:
            save_checkpoint(trainer.best_checkpoint(), ckpt)
            state = trainer.state_dict()
            del state["best_state"]
            torch.save(state, Path(ckpt) / "state.pt")
            sizes = {p.name: p.stat().st_size for p in Path(ckpt).iterdir()}
        out[f"{arch}/{encoder}"] = {"params": params, **sizes}
        common.log(f"  checkpoint {arch}/{encoder}: {params / 1e6:.1f} M parameters, "
                   f"{sum(sizes.values()) / 1e6:.0f} MB")
        del trainer
    return {"checkpoints": out, "record": {k: v for k, v in record.items() if k != "improved"}}


def result_bytes(record: dict, n: int, tmp: Path) -> dict:
    """Tune's result.json line for one epoch, a trials.csv row, and rewriting trials.csv at n rows."""
    from trainables.runfiles import write_trials_csv
    from tune.space import load_space

    spec = load_space("smp.yaml", ROOT / "search_spaces")
    config = {"fold": 0, **{name: 0.001 for name in spec.space}}
    tune_fields = {"timestamp": 1795452013, "checkpoint_dir_name": "checkpoint_000003", "done": False,
                   "training_iteration": 4, "trial_id": "cbef0b27", "date": "2026-11-23_16-40-13",
                   "time_this_iter_s": 212.5, "time_total_s": 850.1, "pid": 11120, "hostname": "ip-10-0-1-17",
                   "node_ip": "10.0.1.17", "time_since_restore": 850.1, "iterations_since_restore": 4,
                   "config": config}
    line = json.dumps({**record, "node": "ip-10-0-1-17", **tune_fields}) + "\n"
    row = {"trial_id": "cbef0b27", "fold": 0, "status": "completed", "retrain": False, "epochs": 40, "best_epoch": 37,
           "best_val_miou": 0.7123456789, "node": "ip-10-0-1-17", "nodes": "ip-10-0-1-17", "failures": 0,
           "error": "", "checkpoint": "s3://bucket/seghpo/smp/fold0_cbef0b27/checkpoint_000011/model.pt",
           **{f"param:{k}": 0.0012345678 for k in spec.space}}
    rows = [dict(row, trial_id=f"{i:08x}") for i in range(n)]
    times = []
    for _ in range(5):
        start = time.perf_counter()
        write_trials_csv(tmp / "trials.csv", rows)
        times.append(time.perf_counter() - start)
    return {"result_line_bytes": len(line), "trials_csv_bytes": (tmp / "trials.csv").stat().st_size,
            "trials_csv_row_bytes": (tmp / "trials.csv").stat().st_size / n, "rewrite_s": times}


def run(quick: bool) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    common.set_threads()
    n = 200 if quick else 1000
    with common.scratch(NAME) as tmp:
        common.log(f"scale: searcher with {n} trials, {IN_FLIGHT} in flight")
        searcher = drive_searcher(n, tmp)
        common.log(f"  searcher split: {searcher['split_s']}")
        shm = Path("/dev/shm")
        if shm.is_dir():  # the same studies without disk syncs: what is TPE, what is SQLite's commit
            with tempfile.TemporaryDirectory(dir=shm) as mem:
                common.log(f"scale: searcher with {n // 5} trials, studies.db in memory ({shm})")
                in_memory = drive_searcher(n // 5, Path(mem))
        else:
            in_memory = None
        common.log("scale: checkpoint sizes")
        ckpt = checkpoint_bytes(tmp)
        results = result_bytes(ckpt["record"], n, tmp)
    per_trial = searcher["per_trial_s"]
    tenth = max(1, n // 10)
    first, last = per_trial[:tenth], per_trial[-tenth:]
    median_last = common.median(last)
    largest = max(ckpt["checkpoints"].items(), key=lambda kv: kv[1]["params"])
    rows = [
        common.row(f"searcher driver s/trial, last vs first {tenth} of {n}", common.side("last 10%", last, "s"),
                   common.side("first 10%", first, "s"), common.safe_ratio(median_last, common.median(first)),
                   f"A < {BUDGET_S:g} s", median_last < BUDGET_S),
        common.row(f"searcher total over {n} trials (info)", common.side("total", [sum(per_trial)], "s"),
                   common.side("studies.db", [searcher["db_bytes"] / 1e6], "MB"), None, "info"),
        *([common.row(f"searcher s/trial, first {n // 5}: db on disk vs in memory (info)",
                      common.side("disk", per_trial[: n // 5], "s"),
                      common.side("/dev/shm", in_memory["per_trial_s"], "s"),
                      common.safe_ratio(common.median(per_trial[: n // 5]), common.median(in_memory["per_trial_s"])),
                      "info")] if in_memory else []),
        *[common.row(f"checkpoint of {name} (info)", common.side("model.pt", [c["model.pt"] / 1e6], "MB"),
                     common.side("state.pt", [c["state.pt"] / 1e6], "MB"),
                     (c["model.pt"] + c["state.pt"]) / 1e6, "info") for name, c in ckpt["checkpoints"].items()],
        common.row("result.json line per trial-epoch vs trials.csv row (info)",
                   common.side("result.json", [results["result_line_bytes"]], "B"),
                   common.side("trials.csv", [results["trials_csv_row_bytes"]], "B"), None, "info"),
        common.row(f"trials.csv rewrite at {n} rows (info)", common.side("rewrite", results["rewrite_s"], "s"),
                   None, None, "info"),
    ]
    details = {"trials": n, "in_flight": IN_FLIGHT, "searcher_per_trial_s": per_trial,
               "searcher_split_s": searcher["split_s"],
               "in_memory": in_memory,
               "studies_db_bytes": searcher["db_bytes"], "checkpoints": ckpt["checkpoints"],
               "largest": largest[0], "results": results}
    return common.result(NAME, TARGET, rows, details)


if __name__ == "__main__":
    common.bench_main(NAME, TARGET, run)
