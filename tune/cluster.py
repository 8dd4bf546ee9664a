"""Joining a Ray cluster or starting a private one: the search's and Ray prediction's one way in.

Imports Ray and nothing of the search, so ``ensemble/ray_predict.py`` (prediction on a cluster)
does not pull in the search to connect.
"""
from __future__ import annotations

import os
from pathlib import Path

import ray

ROOT = Path(__file__).resolve().parents[1]


def init_ray(address: str | None, dashboard: bool, verbose: bool = False) -> None:
    """``verbose``: the workers' output (trials, W&B's logging actors) also on the driver's terminal;
    otherwise it stays in the trial logs (tune/progress.py)."""
    if ray.is_initialized():
        return
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for key in ("HF_HUB_OFFLINE", "WANDB_MODE", "WANDB_SILENT", "SEGHPO_CACHE"):
        if key in os.environ:
            env[key] = os.environ[key]
    # a driver started by `ray job submit` already ships the project through its working_dir
    inside_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    runtime_env = None if inside_job else {"env_vars": env}
    joined = address or os.environ.get("RAY_ADDRESS")
    if joined:
        ray.init(address=joined, runtime_env=runtime_env, log_to_driver=verbose)
        print(f"Ray: joined the cluster at {joined} ({'--address' if address else 'RAY_ADDRESS'}), "
              f"GCS {ray.get_runtime_context().gcs_address}")
    else:
        # "local": a new Ray of this search's own; a bare ray.init() would join any Ray already running on
        # this machine (another user's, a test cluster) and run the trials there
        ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1", runtime_env=runtime_env,
                 configure_logging=False, log_to_driver=verbose)
        print(f"Ray: a private local Ray, GCS {ray.get_runtime_context().gcs_address} (--address auto joins a "
              "running one)")


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
