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
import os
import time
from pathlib import Path

import ray
from ray import tune

from tune.experiment import (TrialsTable, experiment_location, is_uri, read_trials_csv, summary_table,
                             write_experiment_json)
from tune.resume import reconcile
from tune.scheduler import PerFoldASHA
from tune.searcher import FoldedOptunaSearch
from tune.space import SearchSpec, check_classes
from tune.storage import storage_filesystem, unreadable_state
from tune.trainable import train_trial
from trainables.data import SegData, load_data
from trainables.errors import ConfigError, InputError
from trainables.extra import absolute_extra_train, check_extra_train
from trainables.folds import coverage_table, fold_coverage, load_or_make_folds

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]


def absolute_data_paths(base: dict) -> dict:
    """Trials run in other processes (and nodes): make every path in the config absolute."""
    data = base["data"]
    for key in ("path", "images", "cache_dir"):
        if data.get(key):
            data[key] = str(Path(data[key]).expanduser().resolve())
    if data.get("extra_train"):
        data["extra_train"] = absolute_extra_train(data)
    return base


def prepare(spec: SearchSpec, run_dir: Path) -> tuple[dict, SegData, list[list[str]]]:
    base = absolute_data_paths(spec.base_config())
    d = base["data"]
    data = load_data(d)
    if d["path"] is None:
        base["data"]["path"] = str(data.source)
    check_classes(spec, data.num_classes)
    f = base["folds"]
    folds = load_or_make_folds(run_dir / "folds.json", f["strategy"], f["k"], f["seed"], data.ids, data.presence,
                               data.fingerprint, f["group_regex"])
    check_extra_train(d, data, len(folds))  # folds are the labelled images' only
    print(f"{data.source}: {len(data)} images, {data.num_classes} classes, {f['k']} folds ({f['strategy']})")
    print(coverage_table(fold_coverage(folds, data.ids, data.presence), data.class_names))
    return base, data, folds


def init_ray(address: str | None, dashboard: bool) -> None:
    if ray.is_initialized():
        return
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for key in ("HF_HUB_OFFLINE", "WANDB_MODE", "SEGHPO_CACHE"):
        if key in os.environ:
            env[key] = os.environ[key]
    # a driver started by `ray job submit` already ships the project through its working_dir
    inside_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    runtime_env = None if inside_job else {"env_vars": env}
    if address:
        ray.init(address=address, runtime_env=runtime_env)
    else:
        ray.init(include_dashboard=dashboard, dashboard_host="127.0.0.1", runtime_env=runtime_env,
                 configure_logging=False)


def starts_local_ray(address: str | None) -> bool:
    """Whether :func:`init_ray` will start a Ray on this machine (not join one: ``--address``,
    ``RAY_ADDRESS`` as in a Jobs API driver, or a Ray this process already runs)."""
    return not address and not os.environ.get("RAY_ADDRESS") and not ray.is_initialized()


def local_resources() -> tuple[float, float]:
    """CPUs and GPUs a Ray started on this machine offers (Ray's own CPU count: affinity and cgroup
    limits; the CUDA devices this process sees)."""
    try:
        from ray._private.utils import get_num_cpus

        cpus = float(get_num_cpus())
    except Exception:  # a private helper of Ray's: fall back to the CPUs this process may use
        cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    import torch

    return cpus, float(torch.cuda.device_count())  # 0 without CUDA


def check_trial_fits(resources: dict, source) -> None:
    """A trial that asks for more than the local Ray has would wait forever (Tune only warns that no
    node can take it): say so in one line before anything is written."""
    cpus, gpus = local_resources()
    want_cpus, want_gpus = float(resources["cpus_per_trial"]), float(resources["gpus_per_trial"])
    if want_gpus > gpus:
        raise ConfigError(source, "resources.gpus_per_trial",
                          f"a trial asks for {want_gpus:g} GPU but the local Ray has {gpus:g}; add --gpus-per-trial "
                          f"{gpus:g} (0 trains on CPU) or join a cluster with GPUs with --address")
    if want_cpus > cpus:
        raise ConfigError(source, "resources.cpus_per_trial",
                          f"a trial asks for {want_cpus:g} CPUs but the local Ray has {cpus:g}; add "
                          f"--cpus-per-trial {cpus:g} (or fewer)")


def storage_root(trial_storage: str | None) -> str | None:
    """A plain path made absolute (the same on every node); a URI as given."""
    if not trial_storage or is_uri(trial_storage):
        return trial_storage
    return str(Path(trial_storage).expanduser().resolve())


def experiment_exists(location: str) -> bool:
    if is_uri(location):
        return tune.Tuner.can_restore(location)
    return Path(location).exists()


def trial_dirname(trial) -> str:
    return f"fold{trial.config['fold']}_{trial.trial_id}"


def progress_reporter(metric: str) -> tune.CLIReporter:
    return tune.CLIReporter(
        metric_columns={"epoch": "epoch", "train_loss": "loss", metric: metric, "best_score": "best"},
        parameter_columns={"fold": "fold", "model.arch": "arch", "model.encoder": "encoder", "loss.name": "loss",
                           "optimizer.lr": "lr"},
        max_report_frequency=30, sort_by_metric=False)


def build_tuner(spec: SearchSpec, base: dict, folds: list, data: SegData, run_dir: Path, max_failures: int,
                resume: bool, callbacks: list | None = None, trial_storage: str | None = None) -> tune.Tuner:
    search, res = spec.search, spec.resources
    metric, mode, max_epochs = search["metric"], search["mode"], int(base["train"]["epochs"])
    cpus, gpus = float(res["cpus_per_trial"]), float(res["gpus_per_trial"])
    trainable = tune.with_resources(tune.with_parameters(train_trial, base=base, folds=folds, cpus=cpus),
                                    {"cpu": cpus, "gpu": gpus})
    filesystem = storage_filesystem(trial_storage)  # whole files on a disk path (tune/storage.py)
    if resume:
        return tune.Tuner.restore(experiment_location(run_dir, trial_storage), trainable=trainable,
                                  resume_errored=True, storage_filesystem=filesystem)
    searcher = FoldedOptunaSearch(spec, len(folds), data.num_classes, f"sqlite:///{run_dir / 'studies.db'}",
                                  spec.name, max_epochs)
    asha = search.get("asha")
    scheduler = (PerFoldASHA(metric, mode, max_epochs, state_path=str(run_dir / "asha_state.json"), **asha)
                 if asha else None)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=searcher.total_trials,
                                    max_concurrent_trials=res.get("max_concurrent"),
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=run_dir.name if trial_storage else "tune", storage_path=trial_storage or str(run_dir),
            storage_filesystem=filesystem,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=metric,
                                                    checkpoint_score_order=mode),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            callbacks=[TrialsTable(run_dir / "trials.csv", metric, max_epochs, trial_storage), *(callbacks or [])],
            progress_reporter=progress_reporter(metric),
            verbose=1,
        ),
    )


def run_search(spec: SearchSpec, run_dir: Path, *, resume: bool = False, address: str | None = None,
               max_failures: int = 0, dashboard: bool = False, wandb_mode: str = "disabled",
               wandb_project: str = "segmentation-hpo", trial_storage: str | None = None) -> list[dict]:
    """Search, then print the best trial per fold; returns the rows of ``trials.csv``.

    ``trial_storage``: Tune's storage for the trials' results and checkpoints (see the module doc);
    on ``--resume`` the one recorded in experiment.json unless given again (it must then match)."""
    run_dir = run_dir.resolve()
    trial_storage = storage_root(trial_storage)
    saved = run_dir / "experiment.json"
    if resume and saved.exists():
        recorded = json.loads(saved.read_text())["settings"].get("trial_storage")
        if trial_storage and trial_storage != recorded:
            raise ConfigError("command line", "--trial-storage", f"the experiment in {run_dir} keeps its trials in "
                                                                 f"{recorded or run_dir / 'tune'}, not {trial_storage}")
        trial_storage = recorded
    location = experiment_location(run_dir, trial_storage)
    if resume and not tune.Tuner.can_restore(location):
        raise ConfigError("command line", "--resume", f"no experiment to resume in {run_dir}")
    if resume and (damaged := unreadable_state(location)):
        # Tune would fail to restore it and quietly start the experiment again with a wrong sample count
        raise InputError(*damaged)
    studies_name = json.loads(saved.read_text())["settings"].get("name", spec.name) if resume and saved.exists() \
        else spec.name  # the searcher's study names, from the run being resumed
    if not resume and ((run_dir / "tune").exists() or (trial_storage and experiment_exists(location))):
        where = location if trial_storage else run_dir
        raise ConfigError("command line", "--name", f"{where} already holds an experiment; "
                                                    "add --resume to continue it or choose another --name")
    if starts_local_ray(address):
        check_trial_fits(spec.resources, spec.source)
    start = time.perf_counter()
    base, data, folds = prepare(spec, run_dir)
    settings = {"space": str(spec.source), "name": spec.name, "fixed": base, "search": spec.search,
                "resources": spec.resources, "space_params": sorted(spec.space), "trial_storage": trial_storage}
    write_experiment_json(run_dir, settings, {"fingerprint": data.fingerprint, "source": str(data.source),
                                              "class_names": data.class_names, "task": data.task,
                                              "images": len(data)})
    init_ray(address, dashboard)
    callbacks = []
    if wandb_mode != "disabled":
        from tune.wandb_logging import wandb_callback

        callbacks.append(wandb_callback(wandb_project, run_dir.name, str(run_dir), wandb_mode, data.class_names,
                                        base))
        print(f"W&B ({wandb_mode}): project {wandb_project}, group {run_dir.name}, files in {run_dir / 'wandb'}")
    if trial_storage:
        print(f"trials' results and checkpoints: {location}")
    if resume:  # a kill during Tune's copy to storage can leave the saved states a snapshot apart
        for change in reconcile(location, trial_storage, f"sqlite:///{run_dir / 'studies.db'}", studies_name):
            print(f"--resume: {change} (made to agree with Tune's experiment state)")
    tuner = build_tuner(spec, base, folds, data, run_dir, max_failures, resume, callbacks, trial_storage)
    tuner.fit()
    rows = read_trials_csv(run_dir / "trials.csv")
    metric, mode = spec.search["metric"], spec.search["mode"]
    from tune.report import write_report

    print(f"report: {write_report(run_dir)}")
    print(f"\nbest trial per fold ({metric}, {time.perf_counter() - start:.0f}s):")
    print(summary_table(rows, metric, mode))
    return rows
