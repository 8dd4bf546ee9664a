"""Run one search: data and folds once on the driver, then a Ray Tune experiment over all folds.

What stays on the driver, in the run directory: experiment.json, folds.json, trials.csv,
studies.db (the searcher) and asha_state.json (the scheduler); both run in the driver process.
What the trials write (Tune's per-trial results and checkpoints) goes to Tune's ``storage_path``:
by default ``<run dir>/tune``, or ``--trial-storage``, a directory every node sees (NFS, EFS) or
an object store URI (``s3://bucket/prefix``, ``gs://...``, any pyarrow filesystem URI), where the
experiment is ``<trial storage>/<name>``. A trial never reads the driver's disk: it gets the fixed
config (absolute data paths, which must exist on its node) and the folds as arguments.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import ray
from ray import tune

from tune import cluster
from tune.budget import (Budget, BudgetStopper, attach_budget, fold_report, mark_budget,
                         record_limits)
from tune.experiment import TrialsTable, summary_table
from tune.progress import FoldProgress, verbose_reporter
from tune.racing import RacingSearch
from tune.resume import apply_run_settings, grow_samples, reconcile, reopen_search
from tune.rundir import check_resume_settings, clear_earlier_run, earlier_state, run_settings
from tune.promotion import pause_epochs
from tune.scheduler import build_scheduler
from tune.searcher import FoldedOptunaSearch, planned_trials, random_start_warning
from tune.space import SearchSpec, check_classes
from tune.storage import storage_filesystem, unreadable_state
from tune.train_adapter import check_workers, concurrent_trials, trial_demand, trial_trainable, workers
from trainables.data import SegData, load_data
from trainables.cli import parse_duration
from trainables.errors import ConfigError, InputError
from trainables.extra import absolute_extra_train, check_extra_train
from trainables.folds import coverage_table, fold_coverage, load_or_make_folds
from trainables.models import is_local_folder, weights_file
from trainables.runfiles import RunFiles, experiment_location, is_uri, read_trials_csv, write_experiment_json
from tune.wandb_logging import wandb_callback

logger = logging.getLogger(__name__)

def absolute_data_paths(base: dict) -> dict:
    """Trials run in other processes (and nodes): make every path in the config absolute."""
    data = base["data"]
    for key in ("path", "images", "cache_dir"):
        if data.get(key):
            data[key] = str(Path(data[key]).expanduser().resolve())
    if data.get("extra_train"):
        data["extra_train"] = absolute_extra_train(data)
    model = base.get("model") or {}
    local = weights_file(model.get("weights"))
    if local is not None:  # a local encoder state dict: checked here, before any trial starts
        if not local.is_file():
            raise ConfigError(local, "model.weights", "weights file not found")
        model["weights"] = str(local.resolve())
    if isinstance(model.get("encoder"), str) and is_local_folder(model["encoder"]):  # a local Hugging Face folder
        model["encoder"] = str(Path(model["encoder"]).expanduser().resolve())
    return base


def trial_base(spec: SearchSpec) -> tuple[dict, SegData]:
    """The fixed config every trial of ``spec`` gets (absolute paths, ``data.path`` filled in) and its
    dataset: the Tune search's and the W&B sweep agent's (tune/sweep_agent.py)."""
    base = absolute_data_paths(spec.base_config())
    d = base["data"]
    data = load_data(d)
    if d["path"] is None:
        base["data"]["path"] = str(data.source)
    check_classes(spec, data.num_classes)
    return base, data


def prepare(spec: SearchSpec, run_dir: Path, clear: Callable[[], None] | None = None
            ) -> tuple[dict, SegData, list[list[str]]]:
    """``clear``: removes an earlier run (``--overwrite``) once this one's data has loaded."""
    base, data = trial_base(spec)
    d = base["data"]
    if clear:
        clear()
    f = base["folds"]
    folds = load_or_make_folds(RunFiles(run_dir).folds_json, f["strategy"], k=f["k"], seed=f["seed"], ids=data.ids,
                               presence=data.presence,
                               fingerprint=data.fingerprint, group_regex=f["group_regex"], holdout=f.get("holdout"))
    check_extra_train(d, data, folds)  # folds are the labelled images' only
    held = len(data) - sum(len(fold) for fold in folds)
    print(f"{data.source}: {len(data)} images, {data.num_classes} classes, {f['k']} folds ({f['strategy']})"
          + (f", {held} images held out" if held else ""))
    print(coverage_table(fold_coverage(folds, data.ids, data.presence), data.class_names))
    return base, data, folds


def check_trial_fits(resources: dict, source) -> None:
    """A trial that asks for more than the local Ray has would wait forever (Tune only warns that no
    node can take it): say so in one line before anything is written."""
    cpus, gpus = cluster.local_resources()
    want_cpus, want_gpus = trial_demand(resources)  # a multi-worker trial: all its workers' together
    n = workers(resources)
    trial = f"a trial of {n} workers" if n > 1 else "a trial"
    if want_gpus > gpus:
        fit = f"--gpus-per-trial {gpus // n:g} (per worker)" if n > 1 else f"--gpus-per-trial {gpus:g}"
        raise ConfigError(source, "resources.gpus_per_trial",
                          f"{trial} asks for {want_gpus:g} GPU but the local Ray has {gpus:g}; add {fit} "
                          f"(0 trains on CPU) or join a cluster with GPUs with --address")
    if want_cpus > cpus:
        fit = f"--cpus-per-trial {cpus / n:g} (per worker) or fewer workers" if n > 1 else \
            f"--cpus-per-trial {cpus:g} (or fewer)"
        raise ConfigError(source, "resources.cpus_per_trial",
                          f"{trial} asks for {want_cpus:g} CPUs but the local Ray has {cpus:g}; add {fit}")


def storage_root(trial_storage: str | None) -> str | None:
    """A plain path made absolute (the same on every node); a URI as given."""
    if not trial_storage or is_uri(trial_storage):
        return trial_storage
    return str(Path(trial_storage).expanduser().resolve())


def experiment_exists(location: str) -> bool:
    if is_uri(location):
        return tune.Tuner.can_restore(location)
    return Path(location).exists()


def reuse_actors(resources: dict) -> bool:
    """Tune's ``reuse_actors`` for one-process trials (``resources.reuse_actors``): the next trial runs in a
    finished trial's worker, without starting a process and importing torch again. A multi-worker trial's
    actor releases its workers' placement group when it ends (tune/train_adapter.py), so it is never reused."""
    return bool(resources.get("reuse_actors", True)) and workers(resources) == 1


def max_concurrent(resources: dict) -> int | None:
    """``max_concurrent``, or for multi-worker trials (whose driver reserves almost nothing) as many as the
    Ray cluster's resources hold now, counting every worker of a trial."""
    if resources.get("max_concurrent") or workers(resources) == 1:
        return resources.get("max_concurrent")
    n = concurrent_trials(resources, ray.cluster_resources())
    print(f"{n} trial{'s' * (n > 1)} of {workers(resources)} workers at a time (what the Ray cluster has now; "
          "--max-concurrent to change)")
    return n


def searched_folds(spec: SearchSpec, num_folds: int) -> int:
    return len(spec.search["search_folds"]) if spec.search["search_folds"] is not None else num_folds


def total_trials(spec: SearchSpec, num_folds: int) -> int:
    """The trials of the whole search (the searcher's ``total_trials``; with racing its upper bound,
    ``num_samples`` configurations each on every fold, which the same formula gives)."""
    search = spec.search
    search_folds = searched_folds(spec, num_folds)
    return planned_trials(int(search["num_samples"]), search_folds, num_folds - search_folds,
                          int(search["retrain_top"]))


def trial_dirname(trial) -> str:
    return f"fold{trial.config['fold']}_{trial.trial_id}"


def build_tuner(spec: SearchSpec, base: dict, *, folds: list, data: SegData, run_dir: Path, max_failures: int,
                resume: bool, callbacks: list | None = None, trial_storage: str | None = None,
                verbose: bool = False, budget: Budget | None = None) -> tune.Tuner:
    search, res, files = spec.search, spec.resources, RunFiles(run_dir)
    metric, mode, max_epochs = search["metric"], search["mode"], int(base["train"]["epochs"])
    trainable = trial_trainable(res, base, folds, run_dir, trial_storage,  # one process, or N Ray Train workers
                                pause_epochs(search.get("asha"), max_epochs))
    filesystem = storage_filesystem(trial_storage)  # whole files on a disk path (tune/storage.py)
    table = TrialsTable(files.trials_csv, metric, max_epochs, trial_storage)
    concurrent = max_concurrent(res)

    def reporter(total: int):
        return verbose_reporter(metric) if verbose else \
            FoldProgress(metric, mode, max_epochs, total, base["model"].get("weights"))

    if resume:
        # what may change on --resume (tune/rundir.py) is applied here: Tuner.restore brings back the run and
        # tune configs of the search's start and Tune the saved states (tune/resume.py: apply_run_settings)
        location = experiment_location(run_dir, trial_storage)
        for change in apply_run_settings(location, trial_storage, max_failures, concurrent, reuse_actors(res),
                                         metric, mode):
            print(f"--resume: {change}")
        tuner = tune.Tuner.restore(location, trainable=trainable, resume_errored=True, storage_filesystem=filesystem)
        internal = tuner._local_tuner  # Ray 2.60's, which requirements.txt pins (as tune/budget.py's attach_budget)
        internal._run_config.failure_config = tune.FailureConfig(max_failures=max_failures)
        internal._run_config.callbacks = [table, *(callbacks or [])]  # W&B as asked now; trials.csv as it is now
        internal._run_config.progress_reporter = reporter(total_trials(spec, len(folds)))
        internal._tune_config.max_concurrent_trials = concurrent
        internal._tune_config.reuse_actors = reuse_actors(res)
        return attach_budget(tuner, budget) if budget is not None else tuner
    searcher_class = RacingSearch if search.get("racing") else FoldedOptunaSearch  # racing: tune/racing.py
    searcher = searcher_class(spec, len(folds), data.num_classes, files.studies_url, spec.name, max_epochs, budget)
    asha = search.get("asha")
    scheduler = (build_scheduler(metric, mode, max_epochs, asha, str(files.asha_state), int(search["num_samples"]))
                 if asha else None)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=searcher.total_trials,
                                    max_concurrent_trials=concurrent,
                                    trial_dirname_creator=trial_dirname, reuse_actors=reuse_actors(res)),
        run_config=tune.RunConfig(
            name=run_dir.name if trial_storage else "tune", storage_path=trial_storage or str(run_dir),
            storage_filesystem=filesystem,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=metric,
                                                    checkpoint_score_order=mode),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            stop=BudgetStopper(budget) if budget is not None else None,
            callbacks=[table, *(callbacks or [])],
            progress_reporter=reporter(searcher.total_trials),
            log_to_file=True,  # each trial's stdout/stderr, copied beside its results (sync_artifacts)
            sync_config=tune.SyncConfig(sync_artifacts=True),
            verbose=1,
        ),
    )


def start_budget(spec: SearchSpec, run_dir: Path, resume: bool, started: float, location: str,
                 trial_storage: str | None) -> Budget | None:
    """The search's budget (``search.epoch_budget`` / ``search.time_budget``; on ``--resume`` the recorded
    one where not given again), counting time from ``started``; None without one."""
    epochs, seconds = spec.search.get("epoch_budget"), spec.search.get("time_budget")
    budget = record_limits(run_dir, epochs, parse_duration(seconds) if seconds is not None else None, resume,
                           started)
    if not budget.limited:
        return None
    if resume:
        changes, unfinished = reopen_search(location, trial_storage)
        for change in changes:
            print(f"--resume: {change} (budget: {budget.spent_text()} spent)")
        budget.keep_running(unfinished)
    print(f"budget: {budget.spent_text()} spent so far")
    return budget


def run_search(spec: SearchSpec, run_dir: Path, *, resume: bool = False, address: str | None = None,
               max_failures: int = 0, dashboard: bool = False, wandb_mode: str = "disabled",
               wandb_project: str = "segmentation-hpo", trial_storage: str | None = None,
               overwrite: bool = False, verbose: bool = False) -> list[dict]:
    """Search, then print the best trial per fold; returns the rows of ``trials.csv``.

    ``trial_storage``: Tune's storage for the trials' results and checkpoints (see the module doc);
    on ``--resume`` the one recorded in experiment.json unless given again (it must then match).
    A new run refuses a directory that holds an earlier run's state (tune/rundir.py) unless
    ``overwrite``, which removes that run first; ``--resume`` refuses changed settings."""
    run_dir = run_dir.resolve()
    trial_storage = storage_root(trial_storage)
    files = RunFiles(run_dir)
    saved = files.experiment_json
    saved_settings = json.loads(saved.read_text())["settings"] if resume and saved.exists() else None
    if saved_settings is not None:
        recorded = saved_settings.get("trial_storage")
        if trial_storage and trial_storage != recorded:
            raise ConfigError("command line", "--trial-storage", f"the experiment in {run_dir} keeps its trials in "
                                                                 f"{recorded or files.tune_dir}, not {trial_storage}")
        trial_storage = recorded
    location = experiment_location(run_dir, trial_storage)
    if resume and not tune.Tuner.can_restore(location):
        raise ConfigError("command line", "--resume", f"no experiment to resume in {run_dir}")
    if resume and (damaged := unreadable_state(location)):
        # Tune would fail to restore it and quietly start the experiment again with a wrong sample count
        raise InputError(*damaged)
    if saved_settings is not None:
        check_resume_settings(saved, saved_settings,
                              run_settings(spec, absolute_data_paths(spec.base_config()), trial_storage))
    studies_name = saved_settings.get("name", spec.name) if saved_settings is not None \
        else spec.name  # the searcher's study names, from the run being resumed
    clear = None
    if not resume:
        left, elsewhere = earlier_state(run_dir), bool(trial_storage) and experiment_exists(location)
        if (left or elsewhere) and overwrite:
            clear = lambda: clear_earlier_run(run_dir, location if elsewhere else None)  # noqa: E731
        elif left or elsewhere:
            what = f"{run_dir} already holds an experiment's state ({', '.join(left)})" if left \
                else f"{location} already holds an experiment"
            raise ConfigError("command line", "--name", f"{what}; add --resume to continue it, --overwrite to "
                                                        "replace it, or choose another --name")
    check_workers(spec.resources, spec.source)
    if cluster.starts_local_ray(address):
        check_trial_fits(spec.resources, spec.source)
    start, start_wall = time.perf_counter(), time.time()
    base, data, folds = prepare(spec, run_dir, clear)
    if warning := random_start_warning(spec.search, searched_folds(spec, len(folds))):
        print(f"warning: {warning}")
    write_experiment_json(run_dir, run_settings(spec, base, trial_storage),
                          {"fingerprint": data.fingerprint, "source": str(data.source),
                           "class_names": data.class_names, "task": data.task, "images": len(data)})
    cluster.init_ray(address, dashboard, verbose)
    callbacks = []
    if wandb_mode != "disabled":
        callbacks.append(wandb_callback(wandb_project, run_dir.name, str(run_dir), wandb_mode, data.class_names,
                                        base))
        print(f"W&B ({wandb_mode}): project {wandb_project}, group {run_dir.name}, files in {run_dir / 'wandb'}")
    if trial_storage:
        print(f"trials' results and checkpoints: {location}")
    if resume:  # a kill during Tune's copy to storage can leave the saved states a snapshot apart
        for change in reconcile(location, trial_storage, files.studies_url, studies_name):
            print(f"--resume: {change} (made to agree with Tune's experiment state)")
        total = total_trials(spec, len(folds))
        for change in grow_samples(location, trial_storage, int(spec.search["num_samples"]), total):
            print(f"--resume: {change}")
    budget = start_budget(spec, run_dir, resume, start_wall, location, trial_storage)
    tuner = build_tuner(spec, base, folds=folds, data=data, run_dir=run_dir, max_failures=max_failures, resume=resume,
                        callbacks=callbacks, trial_storage=trial_storage, verbose=verbose,
                        budget=budget)
    tuner.fit()
    rows = read_trials_csv(files.trials_csv)
    if budget is not None:
        rows = mark_budget(rows, budget, spec.search, len(folds), files.trials_csv)
    metric, mode = spec.search["metric"], spec.search["mode"]
    print(f"\nbest trial per fold ({metric}, {time.perf_counter() - start:.0f}s):")
    print(summary_table(rows, metric, mode))
    if budget is not None:
        print("\n".join(fold_report(rows, budget)))
    return rows
