"""search_efficiency: the tool's search against what a user writes with stock Ray, and against random search.

The search of ``bench/spaces/search.yaml`` (a tiny random-init Unet on CamVid train, 367 images
downscaled to 96 px and fed at 64x96, 2 folds, 8 batches of 8 an epoch, 20 trials per fold of at
most 6 epochs, 8 random start-up trials in every TPE arm; learning rate, weight decay and loss
searched) runs in these arms, each for every seed (``--seeds``, default 0 1; the seed is the
searchers' and the trials' training seed), on one private local Ray, 2 trials at a time, one CPU
each, the same trainable (``tune/trainable.py``), ``reuse_actors`` on in every arm:

* **shared**: ``tune.search.run_search`` with ``search.share_folds: true``: one TPE model over both
  folds' trials, scores shifted by their fold's median at the first rung (tune/searcher.py),
  per-fold ASHA (grace 2, rf 3: rungs at 2 and 6), PRUNED feedback, constant liar;
* **independent**: the same with one TPE study per fold (``share_folds: false``);
* **stock**: what a user writes with Ray's own classes: per fold one ``Tuner`` with
  ``OptunaSearch`` and a ``TPESampler(seed=seed + fold, n_startup_trials=8)`` (Ray's searcher tells
  Optuna ASHA-stopped trials as COMPLETE with their partial score) and one ``ASHAScheduler`` with the
  same grace period, reduction factor and epoch cap, the same trials per fold;
* **random**: the tool with ``n_startup_trials = num_samples`` (Optuna's seeded random sampler for
  every trial) and ``asha: null`` (every trial trains all epochs);
* run only when named in ``--arms`` (:data:`TOOL_ARMS`): **before** (start-up 4, per fold) and
  **recheck** (``search.asha.recheck: true``).

Per arm and seed: the best ``val_miou`` per fold (a trial's best epoch), the epochs spent, and the
epoch-2 score of each trial with who proposed it (TPE or its start-up random sampler: recorded by
the tool's searcher; for stock Ray, a trial started after 8 of its study's trials had finished);
the TPE-proposed trials' mean epoch-2 score is compared with the random arm's trials', paired by
seed (more statistical power than a best-of-20). The random arm's per-epoch results are also
*replayed* (in their recorded order) through other scheduler settings (grace period, reduction
factor, ``recheck``); TPE arms cannot be replayed (what TPE proposes depends on what it saw).

Each finished (arm, seed) run is kept as JSON in ``--results DIR`` when given, so an interrupted
benchmark continues where it stopped and an arm can be rerun alone (``--arms stock``).
The trials run at normal priority (``RAY_worker_niceness=0``; Ray's default 15 lets any other
work on the machine starve them). Runtime: about 25 min a seed on 2 cores; ``--quick`` (1 seed,
2 trials/fold, 3 epochs, 4 batches an epoch) ~4 min: a check that it all works.
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
TARGET = ("shared search's best mIoU >= stock Ray's + 0.005 at <= its epochs; TPE-proposed trials above random "
          "ones at epoch 2 (means over seeds)")
SPACE = common.BENCH / "spaces" / "search.yaml"
GAIN = 0.005  # the best mIoU the tool's search must add over stock Ray's
ARMS = ("random", "independent", "shared", "stock")
# the tool's search with these search settings (any arm not listed here is stock Ray's or random search)
TOOL_ARMS = {"independent": {"share_folds": False},  # one TPE study per fold (the default until 2026-12-07)
             "shared": {"share_folds": True},  # one TPE model over both folds' normalised trials
             "before": {"n_startup_trials": 4, "share_folds": False},  # start-up 4 (the default until 2026-12-01)
             "recheck": {"asha": {"recheck": True}},
             # the racing rule and its reference, on the same 10 seeded random configurations (start-up
             # trials >= num_samples: fold 0's study draws the same sequence in both arms)
             # (share_folds false: the shared model's draws depend on the history, which differs)
             "racing": {"racing": {"eta": 2}, "n_startup_trials": 10 ** 6, "num_samples": 10, "share_folds": False},
             "exhaustive": {"racing": {"eta": 1}, "asha": None, "n_startup_trials": 10 ** 6, "num_samples": 10,
                            "share_folds": False}}
EXTRA_ARMS = tuple(a for a in TOOL_ARMS if a not in ARMS)
SEEDS = (0, 1)
STEP = 2  # the epoch at which the TPE-proposed and the random trials are compared (the first rung)
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
    elif arm in TOOL_ARMS:
        spec = with_overrides(spec, search={k: v for k, v in TOOL_ARMS[arm].items()
                                            if not (quick and k == "num_samples")})
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
    studies = optuna_studies(f"sqlite:///{run_dir / 'studies.db'}")
    proposed = {t.user_attrs.get("tune_trial_id"): t.user_attrs.get("proposed_by") for t in studies}
    early = {t.user_attrs.get("tune_trial_id"): score_at(t, STEP) for t in studies}
    return [{"fold": int(r["fold"]), "epochs": int(float(r["epochs"] or 0)), "status": r["status"],
             "best": float(r[column]) if r.get(column) not in (None, "") else None,
             "proposed_by": proposed.get(r["trial_id"]), "score_at_step": early.get(r["trial_id"])} for r in rows]


def optuna_studies(storage: str) -> list:
    """Every trial of every study in ``storage``."""
    import optuna

    return [t for name in optuna.get_all_study_names(storage)
            for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)]


def score_at(trial, step: int) -> float | None:
    """A trial's score at epoch ``step``: its intermediate value, or (a trial stopped there, whose last
    result Ray passes to the searcher's on_trial_complete only) its value when it reported no later epoch."""
    if step in trial.intermediate_values:
        return float(trial.intermediate_values[step])
    if trial.value is not None and max(trial.intermediate_values, default=0) < step:
        return float(trial.value)
    return None


def started_after_startup(trials: list, startup: int) -> dict[int, bool]:
    """Per Optuna trial number, whether TPE (not its start-up random sampler) proposed it: at least
    ``startup`` trials of the study had finished (COMPLETE or PRUNED) when it started (Optuna 5.0's rule)."""
    from optuna.trial import TrialState

    ends = [t.datetime_complete for t in trials
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.datetime_complete is not None]
    return {t.number: sum(e <= t.datetime_start for e in ends) >= startup for t in trials}


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
    import optuna
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
    startup = int(spec.search["n_startup_trials"])
    for fold in range(len(folds)):
        # the same start-up count as the tool's arms (Ray's OptunaSearch takes the sampler whole)
        searcher = OptunaSearch(metric=metric, mode=mode,
                                sampler=optuna.samplers.TPESampler(seed=seed + fold, n_startup_trials=startup))
        tuner = tune.Tuner(
            trainable, param_space={"fold": fold, **ray_space(spec)},
            tune_config=tune.TuneConfig(
                search_alg=searcher, reuse_actors=True,
                scheduler=ASHAScheduler(metric=metric, mode=mode, max_t=max_t, grace_period=asha["grace_period"],
                                        reduction_factor=asha["reduction_factor"], brackets=asha["brackets"]),
                num_samples=int(spec.search["num_samples"]),
                max_concurrent_trials=spec.resources.get("max_concurrent")),
            run_config=tune.RunConfig(name=f"fold{fold}", storage_path=str(run_dir / "stock"), verbose=0,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        with contextlib.redirect_stdout(io.StringIO()):
            grid = tuner.fit()
        # which trials TPE proposed, from the study Ray's searcher kept (matched to Tune's by parameters)
        ot_trials = searcher._ot_study.get_trials(deepcopy=False)
        by_tpe = started_after_startup(ot_trials, startup)
        ot = {json.dumps(t.params, sort_keys=True): t for t in ot_trials}
        for res in grid:
            params = {k: v for k, v in res.config.items() if k != "fold"}
            match = ot.get(json.dumps(params, sort_keys=True))
            proposal = {"proposed_by": None if match is None else ("tpe" if by_tpe[match.number] else "random"),
                        "score_at_step": None if match is None else score_at(match, STEP)}
            df = res.metrics_dataframe
            if res.error is not None or df is None or metric not in df:
                rows.append({"fold": fold, "epochs": 0 if df is None else int(df["training_iteration"].max()),
                             "status": "error", "best": None, **proposal})
                continue
            epochs = int(df["training_iteration"].max())
            rows.append({"fold": fold, "epochs": epochs, "status": "completed" if epochs >= max_t else "stopped",
                         "best": float(df[metric].max()), **proposal})
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
    scores = fold_scores(run_dir) if arm in ("racing", "exhaustive") else None
    common.log(f"  {arm} seed {seed}: {wall:.0f}s, best per fold {[round(b, 4) for b in stats['best']]}, "
               f"epochs {stats['epochs']}")
    return {"arm": arm, "seed": seed, "rows": rows, "stats": stats, "wall_s": wall, "folds": k,
            "max_t": int(spec.base_config()["train"]["epochs"]), "asha": spec.search.get("asha"),
            "events": recorder.events if recorder else None, "fold_scores": scores}


def fold_scores(run_dir: Path) -> dict[str, dict[str, float]]:
    """Per configuration (its parameters as JSON), its best score on each fold where it trained its
    planned epochs (COMPLETE), from the run's studies."""
    import optuna
    from optuna.trial import TrialState

    storage = f"sqlite:///{run_dir / 'studies.db'}"
    out: dict[str, dict[str, float]] = {}
    for name in optuna.get_all_study_names(storage):
        fold = name.rsplit("fold", 1)[1]
        for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False):
            if t.state == TrialState.COMPLETE and t.value is not None:
                out.setdefault(json.dumps(t.params, sort_keys=True), {})[fold] = float(t.value)
    return out


def race_against_reference(racing: dict, exhaustive: dict, folds: int) -> dict:
    """What racing selects (its best mean over the configurations that completed every fold) scored by
    the exhaustive arm's k-fold mean of the same configuration, against the exhaustive arm's best."""
    def means(run):
        return {key: statistics.fmean(s.values()) for key, s in run["fold_scores"].items() if len(s) == folds}

    raced, every = means(racing), means(exhaustive)
    chosen = max(raced, key=raced.get)
    best = max(every, key=every.get)
    return {"chosen": json.loads(chosen), "chosen_racing_mean": raced[chosen], "chosen_kfold_mean": every.get(chosen),
            "best": json.loads(best), "best_kfold_mean": every[best], "configs_every_fold": len(raced),
            "configs": len(every), "gap": every[best] - every.get(chosen, float("nan")),
            "epoch_ratio": sum(racing["stats"]["epochs"]) / max(sum(exhaustive["stats"]["epochs"]), 1)}


def race_replay(exhaustive: dict, eta: int, folds: int, max_t: int) -> dict:
    """Racing without ASHA replayed on the exhaustive arm's fold scores: configurations arrive in the order
    they were proposed, each judged at every fold it completes by :func:`tune.racing.promotable`, one at a
    time (the race run sequentially). Its choice (best mean over the configurations that reached every
    fold) is scored by the k-fold mean, its epochs against the exhaustive arm's."""
    from tune.racing import promotable

    scores = [[s[str(f)] for f in range(folds)] for s in exhaustive["fold_scores"].values() if len(s) == folds]
    reached: list[list[float]] = []
    for config in scores:
        ran = [config[0]]
        while len(ran) < folds:
            level = [statistics.fmean(r[:len(ran)]) for r in reached if len(r) >= len(ran)] + [statistics.fmean(ran)]
            if not promotable(statistics.fmean(ran), level, eta, "max"):
                break
            ran.append(config[len(ran)])
        reached.append(ran)
    full = [statistics.fmean(r) for r in reached if len(r) == folds]
    every = [statistics.fmean(c) for c in scores]
    return {"eta": eta, "gap": max(every) - max(full), "epoch_ratio": sum(len(r) for r in reached) / (len(scores) * folds),
            "configs_every_fold": len(full)}


def fold_mean(values: list[float]) -> float:
    return sum(values) / len(values)


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def promotion_replay(run: dict, grace: int, rf: float) -> dict:
    """Successive halving with promotion per fold (what ``search.asha.promotion`` does: a fold's trials
    pause at each rung and its top ``max(1, n // rf)`` there go on; tests/tune/test_scheduler_promotion.py
    holds the scheduler to this on 20 trials a fold) on the random arm's full curves. Exact for these
    curves: which trials go on depends only on their scores at the rungs, not on arrival order."""
    from tune.budget import milestones
    from tune.promotion import keep

    max_t, k = run["max_t"], run["folds"]
    curves: dict[str, dict[int, float]] = {}
    fold_of: dict[str, int] = {}
    for e in run["events"]:
        if e["val_miou"] is not None:
            curves.setdefault(e["trial_id"], {})[e["epoch"]] = e["val_miou"]
            fold_of[e["trial_id"]] = e["fold"]
    rungs = [m for m in milestones(max_t, {"grace_period": grace, "reduction_factor": rf, "brackets": 1}, max_t)
             if m < max_t]
    out = {"epochs": [], "best": []}
    for fold in range(k):
        alive = [t for t in curves if fold_of[t] == fold]
        ran = {t: 0 for t in alive}
        for rung in rungs:
            for t in alive:
                ran[t] = rung
            alive = sorted(alive, key=lambda t: -curves[t][rung])[: keep(len(alive), rf)]
        for t in alive:
            ran[t] = max_t
        out["epochs"].append(sum(ran.values()))
        out["best"].append(max(max(v for e, v in curves[t].items() if e <= ran[t]) for t in ran))
    return out


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


def at_step(run: dict, by: str | None) -> list[float]:
    """Epoch-``STEP`` scores of a run's trials (only those ``by`` "tpe" or "random" proposed; None: all)."""
    return [r["score_at_step"] for r in run["rows"] if r.get("score_at_step") is not None
            and (by is None or r.get("proposed_by") == by)]


def summarise(runs: dict, seeds: list[int], quick: bool) -> dict:
    by_arm = {arm: [runs[(arm, s)] for s in seeds if (arm, s) in runs] for arm in ARMS}
    if not all(by_arm.values()):
        missing = [arm for arm, rs in by_arm.items() if not rs]
        return common.skipped(NAME, TARGET, f"no finished run of arm(s) {', '.join(missing)}")
    done = sorted(set.intersection(*({r["seed"] for r in rs} for rs in by_arm.values())))
    by_arm = {arm: [r for r in rs if r["seed"] in done] for arm, rs in by_arm.items()}
    for arm in EXTRA_ARMS:  # shown when they ran for the same seeds
        extra = [runs[(arm, s)] for s in done if (arm, s) in runs]
        if len(extra) == len(done):
            by_arm[arm] = extra
    best = {arm: [fold_mean(r["stats"]["best"]) for r in rs] for arm, rs in by_arm.items()}
    epochs = {arm: [sum(r["stats"]["epochs"]) for r in rs] for arm, rs in by_arm.items()}
    mean = {arm: statistics.fmean(v) for arm, v in best.items()}
    mean_epochs = {arm: statistics.fmean(v) for arm, v in epochs.items()}
    rows = []
    for arm in ("shared", "independent"):
        gain, ratio = mean[arm] - mean["stock"], mean_epochs[arm] / mean_epochs["stock"]
        verdict = arm == "shared"
        rows.append(common.row(f"best val mIoU (mean of folds), per seed", common.side(arm, best[arm]),
                               common.side("stock Ray", best["stock"]), gain,
                               f">= {GAIN} (mean A-B)" if verdict else "info", gain >= GAIN if verdict else None))
        rows.append(common.row("epochs spent (both folds), per seed", common.side(arm, epochs[arm], "ep"),
                               common.side("stock Ray", epochs["stock"], "ep"), ratio,
                               "<= 1 (mean A/B)" if verdict else "info", ratio <= 1 if verdict else None))
    for arm in ("shared", "independent", "stock"):  # what TPE proposed against what was drawn at random
        tpe = [statistics.fmean(v) if (v := at_step(r, "tpe")) else float("nan") for r in by_arm[arm]]
        rand = [statistics.fmean(at_step(r, None)) for r in by_arm["random"]]
        diff = statistics.fmean(t - r for t, r in zip(tpe, rand))
        verdict = arm == "shared"
        rows.append(common.row(f"epoch-{STEP} mIoU of TPE-proposed trials vs random arm's, per seed",
                               common.side(f"{arm} TPE", tpe), common.side("random", rand), diff,
                               "> 0 (mean A-B)" if verdict else "info", diff > 0 if verdict else None))
    rows.append(common.row("best val mIoU, shared vs random search (info)", common.side("shared", best["shared"]),
                           common.side("random", best["random"]), mean["shared"] - mean["random"], "info"))
    rows.append(common.row("epochs spent, shared vs random search (info)",
                           common.side("shared", epochs["shared"], "ep"), common.side("random", epochs["random"], "ep"),
                           mean_epochs["shared"] / mean_epochs["random"], "info"))
    race_runs = [(runs[("racing", s)], runs[("exhaustive", s)]) for s in done
                 if ("racing", s) in runs and ("exhaustive", s) in runs]
    race = [race_against_reference(r, e, r["folds"]) for r, e in race_runs]
    if race:
        gap = statistics.fmean(r["gap"] for r in race)
        ratio = statistics.fmean(r["epoch_ratio"] for r in race)
        rows.append(common.row("k-fold mean: exhaustive best - racing's choice, per seed",
                               common.side("gap", [r["gap"] for r in race]), None, gap, "<= 0.005", gap <= 0.005))
        for eta in (2, 3):
            replayed = [race_replay(e, eta, r["folds"], r["max_t"]) for r, e in race_runs]
            rows.append(common.row(f"racing without ASHA, eta {eta}, replayed on the exhaustive scores: gap, per seed",
                                   common.side("gap", [x["gap"] for x in replayed]),
                                   common.side("fold-epochs x", [x["epoch_ratio"] for x in replayed]), None, "info"))
        rows.append(common.row("fold-epochs: racing / every configuration on every fold, per seed",
                               common.side("racing", [sum(r["stats"]["epochs"]) for r, _ in race_runs], "ep"),
                               common.side("exhaustive", [sum(e["stats"]["epochs"]) for _, e in race_runs], "ep"),
                               ratio, "<= 0.5", ratio <= 0.5))
    for arm in EXTRA_ARMS:
        if arm in by_arm and arm not in ("racing", "exhaustive"):
            rows.append(common.row(f"best val mIoU, {arm} vs independent", common.side(arm, best[arm]),
                                   common.side("independent", best["independent"]),
                                   mean[arm] - mean["independent"], "info"))
            rows.append(common.row(f"epochs spent, {arm} vs independent", common.side(arm, epochs[arm], "ep"),
                                   common.side("independent", epochs["independent"], "ep"),
                                   mean_epochs[arm] / mean_epochs["independent"], "info"))
    rows.append(common.row("search wall time, per seed",
                           common.side("shared", [r["wall_s"] for r in by_arm["shared"]], "s"),
                           common.side("stock Ray", [r["wall_s"] for r in by_arm["stock"]], "s"),
                           common.safe_ratio(statistics.fmean(r["wall_s"] for r in by_arm["shared"]),
                                             statistics.fmean(r["wall_s"] for r in by_arm["stock"])), "info"))
    asha = by_arm["shared"][0]["asha"] or {}
    promoted = [promotion_replay(r, asha.get("grace_period", 2), asha.get("reduction_factor", 3))
                for r in by_arm["random"]]
    from tune.scheduler import PerFoldASHA

    asha_replay = [replay(r["events"], PerFoldASHA("val_miou", "max", r["max_t"],
                                                   **{k: v for k, v in asha.items() if k != "promotion"}),
                          r["max_t"], r["folds"]) for r in by_arm["random"]]
    ratio_p = statistics.fmean(sum(p["epochs"]) / sum(r["stats"]["epochs"]) for p, r in zip(promoted, by_arm["random"]))
    diff_p = statistics.fmean(fold_mean(p["best"]) - fold_mean(r["stats"]["best"])
                              for p, r in zip(promoted, by_arm["random"]))
    rows.append(common.row("promotion on the random curves: epochs / random's, per seed",
                           common.side("promotion", [sum(p["epochs"]) for p in promoted], "ep"),
                           common.side("random", epochs["random"], "ep"), ratio_p, "<= 0.45", ratio_p <= 0.45))
    rows.append(common.row("promotion on the random curves: best mIoU - random's, per seed",
                           common.side("promotion", [fold_mean(p["best"]) for p in promoted]),
                           common.side("random", best["random"]), diff_p, ">= -0.01", diff_p >= -0.01))
    rows.append(common.row("ASHA (first arrivals pass) on the same curves, per seed",
                           common.side("asha", [sum(a["epochs"]) for a in asha_replay], "ep"),
                           common.side("asha best", [fold_mean(a["best"]) for a in asha_replay]), None, "info"))
    replays = replays_of(by_arm["random"], {k: v for k, v in asha.items() if k == "brackets"})
    for name, r in replays.items():
        rows.append(common.row(f"replay on random curves: {name}",
                               common.side("epochs x", [r["epoch_ratio"]["mean"]]),
                               common.side("mIoU diff", [r["miou_diff"]["mean"]]), None, "info (mean of seeds)"))
    proposals = {arm: {"tpe": [len(at_step(r, "tpe")) for r in rs], "random": [len(at_step(r, "random")) for r in rs],
                       "tpe_mean": [statistics.fmean(v) if (v := at_step(r, "tpe")) else None for r in rs],
                       "random_mean": [statistics.fmean(v) if (v := at_step(r, "random")) else None for r in rs]}
                 for arm, rs in by_arm.items() if arm != "random"}
    details = {
        "quick": quick, "seeds": done, "data": common.CAMVID_REL,
        "space": str(SPACE.relative_to(common.ROOT)), "asha": asha,
        "num_samples_per_fold": len([r for r in by_arm["random"][0]["rows"] if r["fold"] == 0]),
        "max_epochs": by_arm["random"][0]["max_t"], "folds": by_arm["random"][0]["folds"],
        "best_miou": {arm: spread(v) for arm, v in best.items()},
        "epochs": {arm: spread(v) for arm, v in epochs.items()},
        "proposals_at_step": proposals,
        "racing": race,
        "promotion_on_random_curves": promoted,
        "per_fold": {arm: [r["stats"] for r in rs] for arm, rs in by_arm.items()},
        "replays_of_random_curves": replays,
        "wall_s": {arm: [r["wall_s"] for r in rs] for arm, rs in by_arm.items()},
        "trials": {f"{arm}-seed{r['seed']}": r["rows"] for arm, rs in by_arm.items() for r in rs},
    }
    return common.result(NAME, TARGET, rows, details)


def add_args(parser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default 0 1; --quick: 0)")
    parser.add_argument("--arms", nargs="+", choices=ARMS + EXTRA_ARMS, default=list(ARMS))
    parser.add_argument("--results", type=Path, help="keep each finished (arm, seed) run here; reused on rerun")


if __name__ == "__main__":
    common.bench_main(NAME, TARGET, run, add_args=add_args)
