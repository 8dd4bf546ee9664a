"""The tool in its ecosystem: Ray cluster config, Ray Jobs API + dashboard, W&B runs and sweeps,
the HTML report."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from tests.tune.test_tune import clean_up_ray, private_ray_dir
from tests.tune.wandb_records import history, records
from tune.space import load_space, sample
from tune.wandb_logging import SweepTrial, sweep_config

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "camvid-sample" / "train" / "annotations.json"
TINY = ROOT / "tests" / "spaces" / "tiny.yaml"


def env(tmp_path: Path, **extra) -> dict:
    out = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "SEGHPO_CACHE": str(tmp_path / "cache"),
           "PYTHONUNBUFFERED": "1"}
    out.update(extra)
    return out


def test_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(config)  # ray/autoscaler/ray-schema.json
    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["head_node_type"] == "head" and "gpu_worker" in prepared["available_node_types"]
    broken = {**config, "max_workers": "many"}
    with pytest.raises(Exception):
        validate_config(broken)


@pytest.mark.parametrize("space", ["smp", "segformer", "mixed"])
def test_sweep_export_validates_and_samples_like_the_searcher(space):
    from wandb.apis.public.sweeps import _validate_config_and_fill_distribution

    spec = load_space(space, ROOT / "search_spaces")
    config = sweep_config(spec, num_classes=12, fold=0, project="p", space_arg=f"{space}.yaml")
    filled = _validate_config_and_fill_distribution(config)  # the check wandb runs before creating a sweep
    assert filled["method"] == "bayes" and filled["metric"] == {"name": "val_miou", "goal": "maximize"}
    assert filled["early_terminate"]["type"] == "hyperband"
    assert filled["early_terminate"]["min_iter"] == spec.search["asha"]["grace_period"]
    allowed = {"uniform", "log_uniform_values", "int_uniform", "q_uniform", "q_log_uniform_values"}
    for name, param in filled["parameters"].items():
        assert ("values" in param and param["values"]) or param.get("distribution") in allowed, name
    # draw sweep values at random from the exported parameters; the agent's sampling obeys the space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        params = {}
        for name, param in filled["parameters"].items():
            if "values" in param:
                params[name] = trial.suggest_categorical(name, param["values"])
            else:
                params[name] = trial.suggest_float(name, param["min"], param["max"])
        sampled = sample(spec, SweepTrial(params), 12)
        loss = sampled.get("loss.name", spec.base_config()["loss"]["name"])
        assert ("loss.focal_gamma" in sampled) == ("focal" in loss and "loss.focal_gamma" in spec.space)
        if "model.encoder" in spec.space and spec.space["model.encoder"].kind == "dependent":
            arch = sampled["model.arch"]
            assert sampled["model.encoder"] in spec.space["model.encoder"].by[arch]


@pytest.mark.slow
def test_sweep_agent_runs_the_training_loop_offline(tmp_path):
    spec = load_space(str(TINY), ROOT / "search_spaces")
    params = {"optimizer.lr": 0.003, "loss.name": "ce"}
    assert set(params) == set(sweep_config(spec, 12, 0, "p", str(TINY))["parameters"])
    (tmp_path / "params.json").write_text(json.dumps(params))
    proc = subprocess.run([sys.executable, "tune/sweep_agent.py", "--space", str(TINY), "--data", str(SAMPLE),
                           "--params", str(tmp_path / "params.json"), "--dir", str(tmp_path / "w")],
                          cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [run_file] = list((tmp_path / "w" / "wandb").glob("offline-run-*/run-*.wandb"))
    rows = history(run_file)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(0 <= r["val_miou"] <= 1 and "train_loss" in r and "val_iou/Sky" in r for r in rows)
    keys = set()
    for r in records(run_file):  # the initial config, then config updates
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            keys |= {item.key for item in (r.run.config if kind == "run" else r.config).update}
    assert {"optimizer.lr", "loss.name", "fold"} <= keys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


JOB_CLIENT = """
import json, sys, time
from ray.job_submission import JobStatus, JobSubmissionClient
address, entrypoint, runtime_env, budget = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])
start = time.monotonic()
def say(**event):  # one JSON line per step, flushed: a test that times out still shows the last one
    print(json.dumps({"t": round(time.monotonic() - start, 1), **event}), flush=True)
say(step="connect")
client = JobSubmissionClient(address)
say(step="submit")
# the head's job agent registers a few seconds after `ray start` returns (longer on a busy machine)
for attempt in range(60):
    try:
        job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        break
    except RuntimeError as exc:
        if "No available agent" not in str(exc) or attempt == 59 or time.monotonic() - start > budget / 3:
            raise
        time.sleep(2)
say(step="submitted", job=job, attempts=attempt + 1)
ended, status = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED), None
while time.monotonic() - start < budget:
    now = client.get_job_status(job)
    if now != status:
        status = now
        say(step="status", status=str(status))
    if status in ended:
        break
    time.sleep(2)
info = client.get_job_info(job)
if status not in ended:
    client.stop_job(job)
say(step="done", job=job, status=str(status), message=info.message, logs=client.get_job_logs(job),
    listed=any(j.submission_id == job for j in client.list_jobs()))
"""

JOB_BUDGET = 480  # seconds for the whole round trip; the job itself takes about a minute here


def ray_log_tails(ray_dir: Path, lines: int = 15) -> str:
    """The last lines of the head's agent, job and dashboard logs, to say where a job got stuck."""
    out = []
    for log in sorted((ray_dir / "ray" / "session_latest" / "logs").glob("*")):
        if log.is_file() and log.suffix in (".log", ".err", ".out") and any(
                k in log.name for k in ("agent", "job", "dashboard")) and log.stat().st_size:
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(tail))
    return "\n".join(out)[-6000:]


@pytest.mark.ray
@pytest.mark.slow
def test_jobs_api_round_trip_with_wandb_and_report(tmp_path):
    """A local head with the dashboard (token authentication on, as Ray starts it); a tiny search
    submitted through the Jobs API, whose status and logs are read back through it; then the
    search's W&B offline runs and its report are checked."""
    port, dash, agent, client_port = (_free_port() for _ in range(4))
    ray_dir = private_ray_dir()  # only this cluster is stopped afterwards, never another one on the machine
    ray_env = env(tmp_path, RAY_AUTH_MODE="token", RAY_TMPDIR=str(ray_dir))
    # every port of its own: with another Ray on the machine holding the job agent's default 52365,
    # this head's job agent cannot start and every submission answers "No available agent"
    start = subprocess.run(["ray", "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
                            f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
                            f"--ray-client-server-port={client_port}", "--include-dashboard=true", "--num-cpus=2",
                            "--disable-usage-stats"], env=ray_env, capture_output=True, text=True, timeout=180)
    storage = tmp_path / "runs"
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        entrypoint = (f"python tune/run.py --space {TINY} --data {SAMPLE} --storage {storage} --name job "
                      f"--address auto --wandb offline")
        runtime_env = {"working_dir": str(ROOT), "excludes": ["runs", "wandb", "bench/results", ".pytest_cache"],
                       "env_vars": {k: ray_env[k] for k in ("HF_HUB_OFFLINE", "WANDB_MODE", "SEGHPO_CACHE")}}
        try:
            client = subprocess.run([sys.executable, "-c", JOB_CLIENT, f"http://127.0.0.1:{dash}", entrypoint,
                                     json.dumps(runtime_env), str(JOB_BUDGET)], env=ray_env, capture_output=True,
                                    text=True, timeout=JOB_BUDGET + 120)
        except subprocess.TimeoutExpired as exc:
            steps = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout
            pytest.fail(f"the job client hung; its steps:\n{steps}\n{ray_log_tails(ray_dir)}")
        steps = [json.loads(line) for line in client.stdout.splitlines() if line.startswith("{")]
        where = f"steps: {[{k: v for k, v in e.items() if k != 'logs'} for e in steps]}\n{client.stderr[-2000:]}"
        assert client.returncode == 0 and steps[-1]["step"] == "done", where + ray_log_tails(ray_dir)
        answer = steps[-1]
        assert answer["status"] == "SUCCEEDED", where + answer["logs"][-3000:] + ray_log_tails(ray_dir)
        assert "best trial per fold" in answer["logs"] and "next: python ensemble/run.py" in answer["logs"]
        assert answer["listed"]
    finally:
        clean_up_ray(ray_dir)
    run_dir = storage / "job"
    trials = (run_dir / "trials.csv").read_text().splitlines()[1:]
    # W&B: one offline run per trial, grouped by experiment, with the per-epoch metrics
    run_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == len(trials) == 4
    for run_file in run_files:
        rows = history(run_file)
        assert rows and all("val_miou" in r for r in rows)
        assert any("best/class_iou/_type" in r for r in rows)  # the class-wise IoU table at a best epoch
        assert any(k.startswith("best/examples") for r in rows for k in r)  # masks from preview.npz
        run = next(r.run for r in records(run_file) if r.WhichOneof("record_type") == "run")
        assert run.run_group == "job" and any(t.startswith("fold") for t in run.tags)
    # the report exists, with its interactive figures (learning curves, each fold's history), and
    # every image it references is there
    page = (run_dir / "report" / "report.html").read_text()
    assert "learning curves of the best" in page and "optimisation history" in page
    images = re.findall(r"<img src='([^']+)'>", page)
    for image in images:
        assert (run_dir / "report" / image).exists(), image


def test_a_sweep_run_and_a_tune_trial_of_one_config_train_on_the_same_data(tmp_path):
    """The sweep agent built its trials its own way and dropped data.extra_train: its runs trained on
    fewer images than the Tune trials they are compared with (tune/compare.py)."""
    from tune.search import prepare
    from tune.space import with_overrides
    from tune.sweep_agent import sweep_trial
    from tune.trainable import build_trainer

    other = SAMPLE.parents[1] / "val" / "annotations.json"  # images that are none of the folds' (a fold's own are refused)
    coco = json.loads(other.read_text())
    kept = coco["images"][:5]
    ids = {img["id"] for img in kept}
    extra = tmp_path / "extra" / "annotations.json"
    extra.parent.mkdir()
    (extra.parent / "images").symlink_to(other.parent / "images")
    extra.write_text(json.dumps({**coco, "images": kept,
                                 "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}))
    spec = with_overrides(load_space(str(TINY), ROOT / "search_spaces"),
                          {"data.path": str(SAMPLE), "data.extra_train": [str(extra)]})
    params = {"optimizer.lr": 0.003, "loss.name": "dice"}

    sweep, sampled = sweep_trial(spec, 1, SweepTrial(params))
    base, _, folds = prepare(spec, tmp_path / "run")
    tuned, _ = build_trainer({"fold": 1, **sampled}, base, folds)

    def images(dataset) -> list[str]:
        return [dataset.data.image_paths[i] for i in dataset.indices]

    assert images(sweep.train_set) == images(tuned.train_set)
    assert images(sweep.val_set) == images(tuned.val_set)
    assert sum("extra" in i for i in (sweep.train_set.data.ids[j] for j in sweep.train_set.indices)) == 5
    assert sweep.cfg == tuned.cfg
