"""search_efficiency: the tool's Optuna (TPE) + per-fold ASHA against random search without early stopping.

The search of ``bench/spaces/search.yaml`` (a tiny random-init Unet on CamVid train, 367 images
downscaled to 96 px and fed at 64x96, 2 folds, 16 batches of 8 an epoch, learning rate, weight
decay and loss searched) runs through the tool's own ``tune.search.run_search`` three times on one
private local Ray (2 trials at a time, one CPU each):

* **optuna+asha**: the tool's searcher and scheduler as configured (TPE after 4 random trials;
  ASHA grace 2, reduction factor 3, one bracket, max_t = epochs: the tool's defaults);
* **random**: the same spec with ``n_startup_trials = num_samples`` (Optuna's random start-up
  sampler for every trial, same seed) and ``asha: null`` (every trial trains all epochs);
* **shared ASHA** (full mode only): like optuna+asha, but ``tune.search.PerFoldASHA`` is swapped
  for one stock ``ASHAScheduler`` over all folds, to count the fold-1 trials that a shared
  bracket stops.

From each run's ``trials.csv``: the best ``val_miou`` per fold and the epochs spent (sum of the
``epochs`` column). The per-epoch results of the random run (a Tune callback records them in
order) are also *replayed* through ``PerFoldASHA`` and through a shared ``ASHAScheduler``: the same
learning curves under both schedulers, without the timing luck of a real run.

Target: the best mIoU per fold within noise of random search (mean over folds, A - B >= -0.02) with
at most 1/3 of its epochs. Runtime: ~60 min full on 2 idle cores (12 trials/fold, 18 epochs: rungs
at 2, 6 and 18, where ideal successive halving spends 0.26 of the epochs), ~2 min quick (2
trials/fold, 3 epochs, 4 batches an epoch, no shared-ASHA run: a check that it all works).
"""
from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from types import SimpleNamespace

from bench import common  # noqa: E402

NAME = "search_efficiency"
TARGET = "best mIoU within 0.02 of random search with <= 1/3 of its epochs"
SPACE = common.BENCH / "spaces" / "search.yaml"
MIOU_TOLERANCE = 0.02
EPOCH_RATIO = 1 / 3


def make_recorder():
    from ray.tune import Callback

    class Recorder(Callback):
        """Every trial result in the order the driver sees them (for the replay)."""

        def __init__(self):
            self.events: list[dict] = []

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.events.append({"trial_id": trial.trial_id, "fold": int(trial.config["fold"]),
                                "epoch": int(result.get("epoch", result.get("training_iteration", 0))),
                                "val_miou": result.get("val_miou"), "t": time.time()})

    return Recorder()


def spec_for(quick: bool, cache_dir: Path, random: bool):
    from tune.space import load_space, with_overrides

    spec = load_space(str(SPACE), common.ROOT / "search_spaces")
    fixed = {"data.path": str(common.CAMVID), "data.cache_dir": str(cache_dir)}
    search: dict = {}
    if quick:
        fixed.update({"train.epochs": 3, "train.max_train_batches": 4})
        search["num_samples"] = 2
    spec = with_overrides(spec, fixed=fixed, search=search)
    if random:
        spec = with_overrides(spec, search={"n_startup_trials": int(spec.search["num_samples"]), "asha": None})
    return spec


@contextlib.contextmanager
def shared_asha():
    """``tune.search.build_tuner`` builds one stock ASHAScheduler for every fold instead of PerFoldASHA."""
    import tune.search as search_module
    from ray.tune.schedulers import ASHAScheduler

    original = search_module.PerFoldASHA

    def one_for_all_folds(metric, mode, max_t, state_path=None, **asha):
        return ASHAScheduler(metric=metric, mode=mode, max_t=max_t, **asha)

    search_module.PerFoldASHA = one_for_all_folds
    try:
        yield
    finally:
        search_module.PerFoldASHA = original


@contextlib.contextmanager
def recording(recorder):
    """Add ``recorder`` to the callbacks ``tune.search.build_tuner`` gives the Tuner (run_search's own
    arguments change more often than build_tuner's); without a ``callbacks`` parameter, nothing is added
    and the events are read back from the trials' result.json files instead."""
    import inspect

    import tune.search as search_module

    original = search_module.build_tuner
    signature = inspect.signature(original)
    if recorder is None or "callbacks" not in signature.parameters:
        yield False
        return

    def with_recorder(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["callbacks"] = [*(bound.arguments.get("callbacks") or []), recorder]
        return original(*bound.args, **bound.kwargs)

    search_module.build_tuner = with_recorder
    try:
        yield True
    finally:
        search_module.build_tuner = original


def events_from_results(run_dir: Path) -> list[dict]:
    """Per-epoch results of every trial from Tune's result.json files, in (approximate) wall-clock order."""
    import json

    events = []
    for path in sorted((run_dir / "tune").glob("*/result.json")):
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                events.append({"trial_id": r["trial_id"], "fold": int(r["config"]["fold"]),
                               "epoch": int(r.get("epoch", r.get("training_iteration", 0))),
                               "val_miou": r.get("val_miou"), "t": r.get("timestamp", 0)})
    return sorted(events, key=lambda e: (e["t"], e["epoch"]))


def one_search(label: str, spec, run_dir: Path, recorder=None) -> dict:
    from tune.search import run_search

    common.log(f"  {label}: {spec.search['num_samples']} trials/fold, {spec.base_config()['train']['epochs']} epochs,"
               f" asha={spec.search.get('asha')}, n_startup_trials={spec.search['n_startup_trials']}")
    start = time.perf_counter()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), recording(recorder) as recorded:  # Tune's table: not on screen
        rows = run_search(spec, run_dir)
    if recorder is not None and not recorded:
        recorder.events[:] = events_from_results(run_dir)
    wall = time.perf_counter() - start
    summary = out.getvalue().strip().split("best trial per fold")[-1]
    common.log(f"  {label}: {wall:.0f}s; best trial per fold{summary}")
    return {"rows": rows, "wall_s": wall}


def per_fold(rows: list[dict], folds: int, metric: str = "val_miou") -> dict:
    from trainables.runfiles import best_per_fold

    best = best_per_fold(rows, metric, "max")
    out = {"best": [], "epochs": [], "stopped": [], "completed": [], "errors": 0}
    for fold in range(folds):
        mine = [r for r in rows if int(r["fold"]) == fold]
        out["best"].append(float(best[fold][f"best_{metric}"]) if fold in best else float("nan"))
        out["epochs"].append(sum(int(float(r["epochs"] or 0)) for r in mine))
        out["stopped"].append(sum(r["status"] == "stopped" for r in mine))
        out["completed"].append(sum(r["status"] == "completed" for r in mine))
        out["errors"] += sum(r["status"] == "error" for r in mine)
    return out


def replay(events: list[dict], scheduler, max_t: int, folds: int) -> dict:
    """Feed recorded results, in their order, to ``scheduler``; a stopped trial's later results are dropped."""
    from ray.tune.schedulers import TrialScheduler

    trials: dict[str, SimpleNamespace] = {}
    stopped_at: dict[str, int] = {}
    ran: dict[str, int] = {}
    best: dict[str, float] = {}
    for e in events:
        tid = e["trial_id"]
        if tid in stopped_at or e["val_miou"] is None:
            continue
        if tid not in trials:
            trials[tid] = SimpleNamespace(trial_id=tid, config={"fold": e["fold"]})
            scheduler.on_trial_add(None, trials[tid])
        ran[tid] = e["epoch"]
        best[tid] = max(best.get(tid, float("-inf")), e["val_miou"])
        decision = scheduler.on_trial_result(None, trials[tid], {"training_iteration": e["epoch"],
                                                                 "val_miou": e["val_miou"], "epoch": e["epoch"]})
        if decision == TrialScheduler.STOP and e["epoch"] < max_t:
            stopped_at[tid] = e["epoch"]
    out = {"stopped": [], "epochs": [], "best": []}
    for fold in range(folds):
        ids = [t for t, tr in trials.items() if tr.config["fold"] == fold]
        out["stopped"].append(sum(t in stopped_at for t in ids))
        out["epochs"].append(sum(ran[t] for t in ids))
        out["best"].append(max(best[t] for t in ids) if ids else float("nan"))
    return out


def epoch_noise(events: list[dict]) -> float | None:
    """Median |change| of val mIoU between the last epochs of the random trials (metric noise scale)."""
    by_trial: dict[str, list[tuple[int, float]]] = {}
    for e in events:
        if e["val_miou"] is not None:
            by_trial.setdefault(e["trial_id"], []).append((e["epoch"], e["val_miou"]))
    steps = []
    for curve in by_trial.values():
        values = [v for _, v in sorted(curve)][-3:]
        steps += [abs(b - a) for a, b in zip(values, values[1:])]
    return common.median(steps)


def run(quick: bool) -> dict:
    if not common.CAMVID.exists():
        return common.skipped(NAME, TARGET, f"CamVid not found at {common.CAMVID_REL}")
    from ray.tune.schedulers import ASHAScheduler

    from tune.scheduler import PerFoldASHA

    runs: dict[str, dict] = {}
    with common.scratch("search") as tmp:
        cache = tmp / "cache"
        common.load_data(common.CAMVID, cache)  # rasterise the masks once, before any timing
        asha_spec = spec_for(quick, cache, random=False)
        random_spec = spec_for(quick, cache, random=True)
        k = int(asha_spec.base_config()["folds"]["k"])
        max_t = int(asha_spec.base_config()["train"]["epochs"])
        recorder = make_recorder()
        with common.private_ray() as ray_info:
            common.log(f"{NAME}: ray.init {ray_info['init_s']:.1f}s")
            runs["optuna+asha"] = one_search("optuna+asha", asha_spec, tmp / "asha")
            runs["random"] = one_search("random", random_spec, tmp / "random", recorder)
            if not quick:
                with shared_asha():
                    runs["shared-asha"] = one_search("shared ASHA", asha_spec, tmp / "shared")
    stats = {name: per_fold(r["rows"], k) for name, r in runs.items()}
    asha_args = {**asha_spec.search["asha"], "metric": "val_miou", "mode": "max", "max_t": max_t}
    replays = {"per-fold": replay(recorder.events, PerFoldASHA(**asha_args), max_t, k),
               "shared": replay(recorder.events, ASHAScheduler(**asha_args), max_t, k)}
    a, b = stats["optuna+asha"], stats["random"]
    # other ASHA settings on the same curves: what would meet the epoch target (for tuning the defaults)
    sweep = {}
    for grace, rf in ((1, 3), (1, 4), (2, 2), (2, 3), (2, 4), (2, 6), (3, 3), (3, 4)):
        if grace >= max_t:
            continue
        args = {**asha_args, "grace_period": grace, "reduction_factor": rf}
        r = replay(recorder.events, PerFoldASHA(**args), max_t, k)
        sweep[f"grace {grace}, rf {rf}"] = {
            "epoch_ratio": sum(r["epochs"]) / max(sum(b["epochs"]), 1),
            "miou_diff": sum(r["best"]) / k - sum(b["best"]) / k, "stopped": r["stopped"]}
    common.log("  replay of the random curves under other per-fold ASHA settings: " + "; ".join(
        f"{name}: epochs x{v['epoch_ratio']:.2f}, mIoU {v['miou_diff']:+.3f}" for name, v in sweep.items()))
    miou_diff = sum(a["best"]) / k - sum(b["best"]) / k
    epoch_ratio = sum(a["epochs"]) / max(sum(b["epochs"]), 1)
    rows = [
        common.row("best val mIoU per fold (ratio: A-B mean)", common.side("optuna+asha", a["best"]),
                   common.side("random", b["best"]), miou_diff, f">= -{MIOU_TOLERANCE}", miou_diff >= -MIOU_TOLERANCE),
        common.row("epochs spent per fold", common.side("optuna+asha", a["epochs"], "ep"),
                   common.side("random", b["epochs"], "ep"), epoch_ratio, f"<= {EPOCH_RATIO:.3f}",
                   epoch_ratio <= EPOCH_RATIO),
        common.row("search wall time", common.side("optuna+asha", [runs["optuna+asha"]["wall_s"]], "s"),
                   common.side("random", [runs["random"]["wall_s"]], "s"),
                   common.safe_ratio(runs["optuna+asha"]["wall_s"], runs["random"]["wall_s"]), "info"),
    ]
    if "shared-asha" in stats:
        s = stats["shared-asha"]
        for fold in range(k):
            rows.append(common.row(f"fold-{fold} trials stopped early (real runs)",
                                   common.side("per-fold ASHA", [a["stopped"][fold]]),
                                   common.side("shared ASHA", [s["stopped"][fold]]), None, "info"))
        rows.append(common.row("shared ASHA: best mIoU per fold / epochs", common.side("best", s["best"]),
                               common.side("epochs", s["epochs"], "ep"), None, "info"))
    rp, rs = replays["per-fold"], replays["shared"]
    for fold in range(k):
        rows.append(common.row(f"fold-{fold} stopped, replay of random curves", common.side("per-fold ASHA",
                               [rp["stopped"][fold]]), common.side("shared ASHA", [rs["stopped"][fold]]), None, "info"))
    replay_ratio = sum(rp["epochs"]) / max(sum(b["epochs"]), 1)
    rows.append(common.row("replay: per-fold ASHA on random curves, epochs", common.side("replayed", rp["epochs"], "ep"),
                           common.side("random", b["epochs"], "ep"), replay_ratio, "info"))
    details = {
        "quick": quick, "data": common.CAMVID_REL,
        "space": str(SPACE.relative_to(common.ROOT) if SPACE.is_relative_to(common.ROOT) else SPACE),
        "num_samples_per_fold": int(asha_spec.search["num_samples"]), "max_epochs": max_t, "folds": k,
        "asha": asha_spec.search["asha"], "ray": ray_info,
        "miou_diff_tolerance": MIOU_TOLERANCE, "epoch_to_epoch_miou_noise": epoch_noise(recorder.events),
        "per_run": stats, "replay": replays, "replay_asha_settings": sweep, "random_events": recorder.events,
        "trials": {name: r["rows"] for name, r in runs.items()},
        "wall_s": {name: r["wall_s"] for name, r in runs.items()},
    }
    return common.result(NAME, TARGET, rows, details)


if __name__ == "__main__":
    common.bench_main(NAME, TARGET, run)
