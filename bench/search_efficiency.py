"""search_efficiency: the tool's search against what a user writes with stock Ray, and against random search.

The search of ``bench/spaces/search.yaml`` (a tiny random-init Unet on CamVid train, 367 images
downscaled to 96 px and fed at 64x96, 2 folds, 8 batches of 8 an epoch, 8 trials per fold of at
most 8 epochs; learning rate, weight decay and loss searched) runs in three arms, each for every
seed (``--seeds``, default 0 1 2; the seed is the searchers' and the trials' training seed), one
private local Ray, 2 trials at a time, one CPU each, the same trainable (``tune/trainable.py``):

* **tool**: ``tune.search.run_search`` with the tool's defaults: per-fold Optuna TPE (10 random
  start-up trials, Optuna's default, constant liar), per-fold ASHA (the space's ``search.asha``),
  PRUNED feedback;
* **stock**: what a user writes with Ray's own classes: per fold one ``Tuner`` with
  ``OptunaSearch(seed=seed + fold)`` (its default ``TPESampler``, which tells Optuna ASHA-stopped
  trials as COMPLETE with their partial score) and one ``ASHAScheduler`` with the same grace period,
  reduction factor and epoch cap, the same trials per fold;
* **random**: the tool with ``n_startup_trials = num_samples`` (Optuna's seeded random sampler for
  every trial) and ``asha: null`` (every trial trains all epochs);
* the tool with one of its settings as it was, run only when named in ``--arms`` and shown beside
  the tool's row (:data:`EXTRA_ARMS`): **before** (the default until 2026-12-01: TPE after 4
  random trials) and **recheck** (``search.asha.recheck: true``, tune/scheduler.py).

Per arm and seed: the best ``val_miou`` per fold (a trial's best epoch) and the epochs spent; the
table gives mean over folds, then min/median/max over seeds; the targets are judged on the mean over
seeds. The random arm's per-epoch results are also *replayed* (in their recorded order) through other
scheduler settings (grace period, reduction factor, ``recheck``): the same learning curves under
each, labelled as replays; TPE arms cannot be replayed (what TPE proposes depends on what it saw).

Each finished (arm, seed) run is kept as JSON in ``--results DIR`` when given, so an interrupted
benchmark continues where it stopped and an arm can be rerun alone (``--arms stock``).
The trials run at normal priority (``RAY_worker_niceness=0``; Ray's default 15 lets any other
work on the machine starve them). Runtime: about 40 min on 2 idle cores for 3 seeds; ``--quick`` (1 seed, 2 trials/fold, 3 epochs,
4 batches an epoch) ~4 min: a check that it all works.
"""
from __future__ import annotations

import contextlib
import io
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import os

os.environ.setdefault("RAY_worker_niceness", "0")  # before Ray starts: its raylet reads it

from bench import common  # noqa: E402

NAME = "search_efficiency"
TARGET = ("tool's best mIoU >= stock Ray's at <= its epochs; within 0.01 of random search's with <= 0.30 of "
          "its epochs (means over seeds)")
SPACE = common.BENCH / "spaces" / "search.yaml"
MIOU_TOLERANCE = 0.01
EPOCH_RATIO = 0.30
ARMS = ("random", "tool", "stock")
# the tool with one search setting changed, run when asked (--arms): the settings each overrides
EXTRA_ARMS = {"before": {"n_startup_trials": 4},  # the default until 2026-12-01
              "recheck": {"asha": {"recheck": True}}}
SEEDS = (0, 1, 2)
# scheduler settings replayed on the random arm's curves: (grace period, reduction factor, recheck)
REPLAYS = [(g, rf, rc) for g in (1, 2, 3) for rf in (2, 3, 4) for rc in (False, True)]


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


def spec_for(quick: bool, cache_dir: Path, arm: str, seed: int):
    from tune.space import load_space, with_overrides

    spec = load_space(str(SPACE), common.ROOT / "search_spaces")
    fixed = {"data.path": str(common.CAMVID), "data.cache_dir": str(cache_dir), "train.seed": seed}
    search: dict = {"seed": seed}
    if quick:
        fixed.update({"train.epochs": 3, "train.max_train_batches": 4})
        search["num_samples"] = 2
    spec = with_overrides(spec, fixed=fixed, search=search)
    if arm == "random":
        spec = with_overrides(spec, search={"n_startup_trials": int(spec.search["num_samples"]), "asha": None})
    elif arm in EXTRA_ARMS:
        spec = with_overrides(spec, search=EXTRA_ARMS[arm])
    return spec


@contextlib.contextmanager
def recording(recorder):
    """Add ``recorder`` to the callbacks ``tune.search.build_tuner`` gives the Tuner."""
    import inspect

    import tune.search as search_module

    original = search_module.build_tuner
    signature = inspect.signature(original)
    if recorder is None:
        yield
        return

    def with_recorder(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["callbacks"] = [*(bound.arguments.get("callbacks") or []), recorder]
        return original(*bound.args, **bound.kwargs)

    search_module.build_tuner = with_recorder
    try:
        yield
    finally:
        search_module.build_tuner = original


def tool_search(spec, run_dir: Path, recorder=None) -> list[dict]:
    """The tool's search (or random search): trials.csv's rows as ``{fold, epochs, status, best}``."""
    from tune.search import run_search
    from trainables.runfiles import score_column

    with contextlib.redirect_stdout(io.StringIO()), recording(recorder):  # Tune's table: not on screen
        rows = run_search(spec, run_dir)
    column = score_column(spec.search["metric"])
    return [{"fold": int(r["fold"]), "epochs": int(float(r["epochs"] or 0)), "status": r["status"],
             "best": float(r[column]) if r.get(column) not in (None, "") else None} for r in rows]


def ray_space(spec) -> dict:
    """The space YAML's distributions as Ray's own (what a user of ``OptunaSearch`` writes by hand)."""
    import yaml
    from ray import tune

    raw = yaml.safe_load(Path(spec.source).read_text())["space"]
    out = {}
    for key, dist in raw.items():
        (kind, args), = dist.items()
        if kind == "loguniform":
            out[key] = tune.loguniform(*args)
        elif kind == "uniform":
            out[key] = tune.uniform(*args)
        elif kind == "choice":
            out[key] = tune.choice(args)
        elif kind == "int":
            out[key] = tune.randint(args[0], args[1] + 1)
        else:
            raise ValueError(f"{spec.source}: space.{key}: {kind} has no stock Ray counterpart in this benchmark")
    if set(out) != set(spec.space):
        raise ValueError(f"{spec.source}: the stock arm's space {sorted(out)} differs from {sorted(spec.space)}")
    return out


def stock_search(spec, run_dir: Path, seed: int) -> list[dict]:
    """Per fold one Tuner with Ray's OptunaSearch and ASHAScheduler over the tool's trainable."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from tune.search import prepare
    from tune.train_adapter import trial_trainable

    with contextlib.redirect_stdout(io.StringIO()):
        base, data, folds = prepare(spec, run_dir)
    metric, mode, asha = spec.search["metric"], spec.search["mode"], spec.search["asha"]
    max_t = int(base["train"]["epochs"])
    trainable = trial_trainable(spec.resources, base, folds, run_dir, None)
    rows = []
    for fold in range(len(folds)):
        tuner = tune.Tuner(
            trainable, param_space={"fold": fold, **ray_space(spec)},
            tune_config=tune.TuneConfig(
                search_alg=OptunaSearch(metric=metric, mode=mode, seed=seed + fold),
                scheduler=ASHAScheduler(metric=metric, mode=mode, max_t=max_t, grace_period=asha["grace_period"],
                                        reduction_factor=asha["reduction_factor"], brackets=asha["brackets"]),
                num_samples=int(spec.search["num_samples"]),
                max_concurrent_trials=spec.resources.get("max_concurrent")),
            run_config=tune.RunConfig(name=f"fold{fold}", storage_path=str(run_dir / "stock"), verbose=0,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        with contextlib.redirect_stdout(io.StringIO()):
            grid = tuner.fit()
        for res in grid:
            df = res.metrics_dataframe
            if res.error is not None or df is None or metric not in df:
                rows.append({"fold": fold, "epochs": 0 if df is None else int(df["training_iteration"].max()),
                             "status": "error", "best": None})
                continue
            epochs = int(df["training_iteration"].max())
            rows.append({"fold": fold, "epochs": epochs, "status": "completed" if epochs >= max_t else "stopped",
                         "best": float(df[metric].max())})
    return rows


def per_fold(rows: list[dict], folds: int) -> dict:
    out = {"best": [], "epochs": [], "stopped": [], "errors": 0}
    for fold in range(folds):
        mine = [r for r in rows if r["fold"] == fold]
        scores = [r["best"] for r in mine if r["status"] in ("completed", "stopped") and r["best"] is not None]
        out["best"].append(max(scores) if scores else float("nan"))
        out["epochs"].append(sum(r["epochs"] for r in mine))
        out["stopped"].append(sum(r["status"] == "stopped" for r in mine))
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


def one_run(arm: str, seed: int, quick: bool, cache: Path, tmp: Path) -> dict:
    spec = spec_for(quick, cache, arm, seed)
    k = int(spec.base_config()["folds"]["k"])
    common.log(f"  {arm} seed {seed}: {spec.search['num_samples']} trials/fold, "
               f"{spec.base_config()['train']['epochs']} epochs, asha={spec.search.get('asha')}")
    start = time.perf_counter()
    recorder = make_recorder() if arm == "random" else None
    run_dir = tmp / f"{arm}-{seed}"
    rows = stock_search(spec, run_dir, seed) if arm == "stock" else tool_search(spec, run_dir, recorder)
    wall = time.perf_counter() - start
    stats = per_fold(rows, k)
    common.log(f"  {arm} seed {seed}: {wall:.0f}s, best per fold {[round(b, 4) for b in stats['best']]}, "
               f"epochs {stats['epochs']}")
    return {"arm": arm, "seed": seed, "rows": rows, "stats": stats, "wall_s": wall, "folds": k,
            "max_t": int(spec.base_config()["train"]["epochs"]), "asha": spec.search.get("asha"),
            "events": recorder.events if recorder else None}


def fold_mean(values: list[float]) -> float:
    return sum(values) / len(values)


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def replays_of(random_runs: list[dict], asha: dict) -> dict:
    """Every REPLAYS setting on each seed's random curves: epochs ratio and mIoU difference, per seed."""
    from tune.scheduler import PerFoldASHA

    out = {}
    for grace, rf, recheck in REPLAYS:
        ratios, diffs = [], []
        for run in random_runs:
            max_t, k = run["max_t"], run["folds"]
            if grace >= max_t:
                continue
            args = {**asha, "grace_period": grace, "reduction_factor": rf, "recheck": recheck}
            r = replay(run["events"], PerFoldASHA("val_miou", "max", max_t, **args), max_t, k)
            ratios.append(sum(r["epochs"]) / max(sum(run["stats"]["epochs"]), 1))
            diffs.append(fold_mean(r["best"]) - fold_mean(run["stats"]["best"]))
        if ratios:
            out[f"grace {grace}, rf {rf}{', recheck' if recheck else ''}"] = {
                "grace_period": grace, "reduction_factor": rf, "recheck": recheck,
                "epoch_ratio": spread(ratios), "miou_diff": spread(diffs)}
    return out


def run(quick: bool, seeds=None, arms=ARMS, results: Path | None = None) -> dict:
    if not common.CAMVID.exists():
        return common.skipped(NAME, TARGET, f"CamVid not found at {common.CAMVID_REL}")
    seeds = list(seeds if seeds is not None else ((0,) if quick else SEEDS))
    runs: dict[tuple[str, int], dict] = {}
    if results is not None:
        results.mkdir(parents=True, exist_ok=True)
        for path in results.glob("*.json"):
            saved = json.loads(path.read_text())
            if saved.get("quick") == quick:
                runs[(saved["arm"], saved["seed"])] = saved
    todo = [(arm, seed) for seed in seeds for arm in arms if (arm, seed) not in runs]
    if todo:
        with common.scratch("search") as tmp:
            cache = tmp / "cache"
            common.load_data(common.CAMVID, cache)  # rasterise the masks once, before any run
            with common.private_ray() as ray_info:
                common.log(f"{NAME}: ray.init {ray_info['init_s']:.1f}s; to run: {todo}")
                for arm, seed in todo:
                    out = one_run(arm, seed, quick, cache, tmp)
                    out["quick"] = quick
                    runs[(arm, seed)] = out
                    if results is not None:
                        from trainables.io import atomic_write_json

                        atomic_write_json(results / f"{arm}-seed{seed}.json", out)
    return summarise(runs, seeds, quick)


def summarise(runs: dict, seeds: list[int], quick: bool) -> dict:
    by_arm = {arm: [runs[(arm, s)] for s in seeds if (arm, s) in runs] for arm in ARMS}
    if not all(by_arm.values()):
        missing = [arm for arm, rs in by_arm.items() if not rs]
        return common.skipped(NAME, TARGET, f"no finished run of arm(s) {', '.join(missing)}")
    done = sorted(set.intersection(*({r["seed"] for r in rs} for rs in by_arm.values())))
    by_arm = {arm: [r for r in rs if r["seed"] in done] for arm, rs in by_arm.items()}
    best = {arm: [fold_mean(r["stats"]["best"]) for r in rs] for arm, rs in by_arm.items()}
    epochs = {arm: [sum(r["stats"]["epochs"]) for r in rs] for arm, rs in by_arm.items()}
    mean = {arm: statistics.fmean(v) for arm, v in best.items()}
    mean_epochs = {arm: statistics.fmean(v) for arm, v in epochs.items()}
    vs_stock = mean["tool"] - mean["stock"]
    vs_random = mean["tool"] - mean["random"]
    epochs_vs_stock = mean_epochs["tool"] / mean_epochs["stock"]
    epochs_vs_random = mean_epochs["tool"] / mean_epochs["random"]
    rows = [
        common.row("best val mIoU (mean of folds), per seed", common.side("tool", best["tool"]),
                   common.side("stock Ray", best["stock"]), vs_stock, ">= 0 (mean A-B)", vs_stock >= 0),
        common.row("epochs spent (both folds), per seed", common.side("tool", epochs["tool"], "ep"),
                   common.side("stock Ray", epochs["stock"], "ep"), epochs_vs_stock, "<= 1 (mean A/B)",
                   epochs_vs_stock <= 1),
        common.row("best val mIoU (mean of folds), per seed", common.side("tool", best["tool"]),
                   common.side("random", best["random"]), vs_random, f">= -{MIOU_TOLERANCE} (mean A-B)",
                   vs_random >= -MIOU_TOLERANCE),
        common.row("epochs spent (both folds), per seed", common.side("tool", epochs["tool"], "ep"),
                   common.side("random", epochs["random"], "ep"), epochs_vs_random, f"<= {EPOCH_RATIO} (mean A/B)",
                   epochs_vs_random <= EPOCH_RATIO),
        common.row("search wall time, per seed", common.side("tool", [r["wall_s"] for r in by_arm["tool"]], "s"),
                   common.side("stock Ray", [r["wall_s"] for r in by_arm["stock"]], "s"),
                   common.safe_ratio(statistics.fmean(r["wall_s"] for r in by_arm["tool"]),
                                     statistics.fmean(r["wall_s"] for r in by_arm["stock"])), "info"),
    ]
    for arm in EXTRA_ARMS:
        extra = {r["seed"]: r for (a, _), r in runs.items() if a == arm and r["seed"] in done}
        if extra:
            seeds_x = sorted(extra)
            tool_x = [fold_mean(r["stats"]["best"]) for r in by_arm["tool"] if r["seed"] in extra]
            rows.append(common.row(f"best val mIoU, {arm} vs tool (seeds {seeds_x})",
                                   common.side(arm, [fold_mean(extra[s]["stats"]["best"]) for s in seeds_x]),
                                   common.side("tool", tool_x), None, "info"))
            rows.append(common.row(f"epochs spent, {arm} vs tool (seeds {seeds_x})",
                                   common.side(arm, [sum(extra[s]["stats"]["epochs"]) for s in seeds_x], "ep"),
                                   common.side("tool", [sum(r["stats"]["epochs"]) for r in by_arm["tool"]
                                                        if r["seed"] in extra], "ep"), None, "info"))
            best[arm] = [fold_mean(extra[s]["stats"]["best"]) for s in seeds_x]
            epochs[arm] = [sum(extra[s]["stats"]["epochs"]) for s in seeds_x]
            by_arm[arm] = [extra[s] for s in seeds_x]
    asha = by_arm["tool"][0]["asha"] or {}
    replays = replays_of(by_arm["random"], {k: v for k, v in asha.items() if k == "brackets"})
    for name, r in replays.items():
        rows.append(common.row(f"replay on random curves: {name}",
                               common.side("epochs x", [r["epoch_ratio"]["mean"]]),
                               common.side("mIoU diff", [r["miou_diff"]["mean"]]), None, "info (mean of seeds)"))
    details = {
        "quick": quick, "seeds": done, "data": common.CAMVID_REL,
        "space": str(SPACE.relative_to(common.ROOT)), "asha": asha,
        "num_samples_per_fold": len([r for r in by_arm["random"][0]["rows"] if r["fold"] == 0]),
        "max_epochs": by_arm["random"][0]["max_t"], "folds": by_arm["random"][0]["folds"],
        "best_miou": {arm: spread(v) for arm, v in best.items()},
        "epochs": {arm: spread(v) for arm, v in epochs.items()},
        "per_fold": {arm: [r["stats"] for r in rs] for arm, rs in by_arm.items()},
        "replays_of_random_curves": replays,
        "wall_s": {arm: [r["wall_s"] for r in rs] for arm, rs in by_arm.items()},
        "trials": {f"{arm}-seed{r['seed']}": r["rows"] for arm, rs in by_arm.items() for r in rs},
    }
    return common.result(NAME, TARGET, rows, details)


def add_args(parser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default 0 1 2; --quick: 0)")
    parser.add_argument("--arms", nargs="+", choices=ARMS + tuple(EXTRA_ARMS), default=list(ARMS))
    parser.add_argument("--results", type=Path, help="keep each finished (arm, seed) run here; reused on rerun")


if __name__ == "__main__":
    common.bench_main(NAME, TARGET, run, add_args=add_args)
