"""A trial larger than one process: the Tune trial drives a Ray Train run of N data-parallel workers.

With ``resources.workers_per_trial: N`` (N > 1) the Tune function trainable is
:func:`train_trial_workers`. It reserves almost nothing itself (one byte of Ray's ``memory``
resource: a trial needs a non-empty bundle) and runs a ``ray.train.torch.TorchTrainer`` (Ray
Train V2) whose ``ScalingConfig`` asks for the N workers' CPUs and GPUs (``cpus_per_trial`` and
``gpus_per_trial`` are then *per worker*). Each worker runs :func:`worker_loop`: the same
:class:`trainables.loop.FoldTrainer` as a one-process trial, on the process group Ray Train set up
(gloo on CPU, nccl on GPU), so the training data is sharded across ranks, the model is DDP-wrapped
and the validation counts are summed (trainables/loop.py).

Reports: every worker calls ``ray.train.report`` each epoch (a barrier); rank 0 adds the checkpoint
at an improved epoch (model.pt, state.pt: the files of a one-process trial). Ray's
``TuneReportCallback`` forwards rank 0's metrics to Tune, with a ``checkpoint_path`` when there
was a checkpoint, but no Tune checkpoint. Every record also carries ``best_checkpoint``: where the
best epoch's ``model.pt`` is (a path, or a URI on an object store), which ``trials.csv``'s
checkpoint column and the ensemble read.

Stopping: Tune stops a trial (ASHA, or its last epoch reaching ``max_t``) by ending the trial's
process, and the Train controller it owns dies before it can release its workers' placement group
(Train's own cleaner needs the Ray dashboard's state API). The controller therefore records the
group's id (:class:`RecordPlacementGroup`) and the trial's ``cleanup`` removes it, so the next
trial's workers get the CPUs/GPUs.

Where: Train's run of a Tune trial is ``<experiment>/train/<trial dir>`` (the Tune experiment's
storage: ``runs/<name>/tune`` or ``--trial-storage``), a fixed name and storage path. A retried
trial (a lost worker fails it; ``--max-failures``) or one continued by ``--resume`` builds the same
Train run, which restores its latest checkpoint (the best epoch) by itself.
"""
from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

import torch
# Train's callback interface for controller-side hooks (internal; RunConfig.callbacks takes them)
from ray.train.v2._internal.execution.callback import WorkerGroupCallback

from trainables.checkpoint import FILENAME
from trainables.errors import ConfigError
from trainables.io import atomic_write_text
from trainables.runfiles import experiment_location
from tune.experiment import node_label
from tune.storage import storage_filesystem
from tune.trainable import build_trainer, load_trial_state, train_trial, write_trial_checkpoint

logger = logging.getLogger(__name__)

TRAIN_DIR = "train"  # below the Tune experiment: one Ray Train run per multi-worker trial
DRIVER_RESOURCES = {"cpu": 0, "memory": 1}  # Tune needs a non-empty bundle; the workers' come from ScalingConfig
NAME = "<checkpoint>"  # in the checkpoint reference a worker fills in


def checkpoint_name(epoch: int) -> str:
    return f"checkpoint_epoch{epoch:04d}"


def worker_loop(config: dict) -> None:
    """One Ray Train worker of a trial (every rank runs it; see the module docstring)."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(1, int(config["cpus"])))
    device = ray.train.torch.get_device() if config["gpus"] > 0 else None
    trainer, cfg = build_trainer(config["trial"], config["base"], config["folds"], device=device)
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as ckpt_dir:
            load_trial_state(trainer, ckpt_dir)
    # the restored checkpoint is the latest, whose model.pt holds the best weights
    best = config["checkpoint_ref"].replace(NAME, checkpoint_name(trainer.epoch)) if restored else ""
    node = node_label()
    for record in trainer.epochs():
        record["node"] = node
        name = checkpoint_name(trainer.epoch)
        if record.pop("improved") or trainer.epoch in config.get("pause_epochs", ()):
            best = config["checkpoint_ref"].replace(NAME, name)
            record["best_checkpoint"] = best
            if trainer.is_main:
                with tempfile.TemporaryDirectory() as tmp:
                    write_trial_checkpoint(trainer, cfg, tmp)
                    ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                     checkpoint_dir_name=name)
                continue
        record["best_checkpoint"] = best
        ray.train.report(record, checkpoint_dir_name=name)


def placement_group_record(trial_id: str) -> Path:
    """Where a trial's Train controller (on the trial's node) notes its workers' placement group."""
    return Path(tempfile.gettempdir()) / f"seghpo-train-{trial_id}.pg"


class RecordPlacementGroup(WorkerGroupCallback):
    """A Train controller callback: write the id of each started worker group's placement group.
    (Train's extension point for internal callbacks; ``RunConfig.callbacks`` accepts them.)"""

    def __init__(self, path: str):
        self.path = path

    def after_worker_group_start(self, worker_group) -> None:
        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        atomic_write_text(Path(self.path), group.id.hex())


def remove_placement_group_of(trial_id: str) -> None:
    """Release the workers' placement group a stopped trial's controller could not release."""
    path = placement_group_record(trial_id)
    if not path.exists():
        return
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(path.read_text().strip()))))
    except Exception as exc:  # noqa: BLE001 - already removed (a finished run), or Ray shutting down
        logger.debug("placement group of trial %s: %s", trial_id, exc)
    path.unlink(missing_ok=True)


def train_trial_workers(config: dict, base: dict, folds: list[list[str]], cpus: float, gpus: float,
                        workers: int, run_dir: str, trial_storage: str | None, pause_epochs=()) -> None:
    """Ray Tune function trainable of a multi-worker trial: runs the trial as a Ray Train run."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_dir = Path(tune.get_context().get_trial_dir()).name
    ref = experiment_location(Path(run_dir), trial_storage, f"{TRAIN_DIR}/{trial_dir}/{NAME}/{FILENAME}")
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"trial": config, "base": base, "folds": folds, "cpus": cpus, "gpus": gpus,
                           "checkpoint_ref": ref, "pause_epochs": list(pause_epochs)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=resources),
        run_config=RunConfig(
            name=trial_dir, storage_path=experiment_location(Path(run_dir), trial_storage, TRAIN_DIR),
            storage_filesystem=storage_filesystem(trial_storage),
            # checkpoints are written at improved epochs (and pause epochs): the latest holds the best model.pt
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=0),  # a lost worker fails the Tune trial, which Tune retries
            callbacks=[TuneReportCallback(),
                       RecordPlacementGroup(str(placement_group_record(tune.get_context().get_trial_id())))],
        ),
    )
    trainer.fit()


def workers(resources: dict) -> int:
    return int(resources.get("workers_per_trial") or 1)


def trial_demand(resources: dict) -> tuple[float, float]:
    """CPUs and GPUs one trial takes: its workers' together (``*_per_trial`` are per worker)."""
    n = workers(resources)
    return n * float(resources["cpus_per_trial"]), n * float(resources["gpus_per_trial"])


def check_workers(resources: dict, source) -> None:
    """Workers of one trial cannot share a GPU (NCCL refuses two ranks on one device)."""
    gpus = float(resources["gpus_per_trial"])
    if workers(resources) > 1 and gpus != int(gpus):
        raise ConfigError(source, "resources.gpus_per_trial",
                          f"with workers_per_trial {workers(resources)} it is per worker and must be whole "
                          f"(the workers of a trial cannot share a GPU), got {gpus:g}; pack small trials onto a GPU "
                          "with workers_per_trial 1 instead")


def concurrent_trials(resources: dict, cluster: dict) -> int:
    """How many multi-worker trials the Ray cluster's resources (``ray.cluster_resources()``) run at once.
    A driver that reserves nothing would otherwise let Tune start every trial: the searcher would sample
    them all before any result and the workers' placement groups would queue."""
    cpus, gpus = trial_demand(resources)
    fits = [cluster.get("CPU", 0) // cpus if cpus else math.inf, cluster.get("GPU", 0) // gpus if gpus else math.inf]
    return max(1, int(min(fits)))


def trial_trainable(resources: dict, base: dict, folds: list, run_dir: Path, trial_storage: str | None,
                    pause_epochs: list[int] | None = None):
    """The Tune trainable of a trial with its resources: one process (tune/trainable.py), or a driver of
    ``workers_per_trial`` Ray Train workers that reserves almost nothing itself. ``pause_epochs``: where the
    scheduler may pause a trial (tune/promotion.py), which checkpoints there."""
    from ray import tune

    cpus, gpus = float(resources["cpus_per_trial"]), float(resources["gpus_per_trial"])
    if workers(resources) == 1:
        return tune.with_resources(tune.with_parameters(train_trial, base=base, folds=folds, cpus=cpus,
                                                        pause_epochs=tuple(pause_epochs or ())),
                                   {"cpu": cpus, "gpu": gpus})
    from ray.tune.trainable import wrap_function

    function = wrap_function(tune.with_parameters(
        train_trial_workers, base=base, folds=folds, cpus=cpus, gpus=gpus, workers=workers(resources),
        run_dir=str(run_dir), trial_storage=trial_storage, pause_epochs=tuple(pause_epochs or ())))

    class WorkersTrial(function):
        """The trial's function, and on stop the release of its workers' placement group."""

        def cleanup(self):
            try:
                super().cleanup()
            finally:
                remove_placement_group_of(self.trial_id)

    WorkersTrial.__name__ = "train_trial_workers"  # Tune's trial names and the logs show it
    return tune.with_resources(WorkersTrial, DRIVER_RESOURCES)
