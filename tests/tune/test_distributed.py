"""The search on a real multi-node Ray cluster on this machine, and the loss of a worker node.

Started as Ray's own multi-node tests do (``ray start --head``, then ``ray start --address=...``
per worker): a head without CPUs (it runs the driver, the searcher and the scheduler, like the CPU
head of cluster.yaml) and two worker nodes with one CPU each. Every node has its own custom
resource (``node_<label>``) and ``SEGHPO_NODE_LABEL`` in the environment of its Ray processes, which
their trial workers inherit, so ``trials.csv`` says where each trial ran.

``tune/run.py --address auto`` runs a tiny search (tests/spaces/tiny.yaml without early stopping)
on the real CamVid split with its trials' results and checkpoints in a ``file://`` URI (the
object-store code path of ``--trial-storage``). Once a trial has finished and a trial started on
worker ``w1`` after it has reported its first epoch (and so its first checkpoint), w1's raylet is
killed with SIGKILL: the node is gone, its trial fails and Tune retries it from that checkpoint on
the surviving worker (``--max-failures``). The search must finish with every trial accounted for,
the per-fold studies consistent, and every checkpoint readable by the ensemble step.

The cluster is private (its own ``RAY_TMPDIR``) and is torn down by killing exactly its processes
(``tune.localray.stop_ray``), also when the test fails.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.tune.test_tune import (ROOT, RUN, TINY, TRAIN_JSON, by_tune_id, camvid_cache, clean_up_ray,  # noqa: F401 (fixture)
                             cli_env, needs_camvid, private_ray_dir, read_rows, scratch_dir, tail)
from tune.localray import node_processes
from tune.searcher import study_name

WORKERS = ("w1", "w2")
# the head notices a dead node after 3 missed health checks of 1 s (Ray's default takes longer)
HEALTH_CHECKS = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                 "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A head and worker nodes on this machine, one ``ray start`` each, under one private RAY_TMPDIR."""

    def __init__(self, ray_dir: Path, cache: Path):
        self.ray_dir, self.port = ray_dir, _free_port()
        # token authentication is on by default; every node and the driver read ~/.ray/auth_token
        self.env = {**cli_env(ray_dir, cache), "RAY_AUTH_MODE": "token", **HEALTH_CHECKS}

    def _start(self, label: str, *args: str) -> subprocess.Popen:
        return subprocess.Popen(["ray", "start", *args, "--disable-usage-stats",
                                 f"--resources={json.dumps({f'node_{label}': 1})}"],
                                env={**self.env, "SEGHPO_NODE_LABEL": label}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    @staticmethod
    def _wait(label: str, proc: subprocess.Popen) -> None:
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"ray start of {label} failed:\n{tail(out)}"

    def start(self, workers: tuple[str, ...], cpus_per_worker: int = 1) -> None:
        self._wait("head", self._start("head", "--head", f"--port={self.port}", "--num-cpus=0",
                                       "--include-dashboard=false"))
        for label in workers:  # one at a time: a node that takes over 30 s to register fails to start
            self._wait(label, self._start(label, f"--address=127.0.0.1:{self.port}", f"--num-cpus={cpus_per_worker}"))

    def raylet(self, label: str) -> int:
        (pid,) = [p for p in node_processes(self.ray_dir, label) if cmdline(p).split(b"\0")[0].endswith(b"/raylet")]
        return pid

    def kill_node(self, label: str) -> int:
        pid = self.raylet(label)
        os.kill(pid, signal.SIGKILL)
        return pid


@pytest.fixture
def cluster(camvid_cache):
    ray_dir = private_ray_dir()
    try:
        yield LocalCluster(ray_dir, camvid_cache)
    finally:
        clean_up_ray(ray_dir)


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def epochs_in(storage: Path, name: str, row: dict) -> list[int]:
    path = storage / name / f"fold{row['fold']}_{row['trial_id']}" / "result.json"
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()]


def node_counts(rows: list[dict]) -> dict[str, int]:
    """Trials per node, counting every attempt (a trial retried elsewhere counts on both)."""
    counts: dict[str, int] = {}
    for row in rows:
        for node in row["nodes"].split(">"):
            counts[node] = counts.get(node, 0) + 1
    return counts


# ---------------------------------------------------------------- without Ray: node history, storage URIs


def test_trials_csv_records_the_node_of_every_attempt(tmp_path):
    """Rewritten when a trial reports its first result on a node and when it is retried; the
    history survives a new callback (--resume)."""
    from tune.experiment import TrialsTable

    a = SimpleNamespace(trial_id="a", status="RUNNING", config={"fold": 0}, last_result=None, checkpoint=None,
                        num_failures=0)
    b = SimpleNamespace(trial_id="b", status="PENDING", config={"fold": 1}, last_result=None, checkpoint=None,
                        num_failures=0)
    path = tmp_path / "trials.csv"
    table = TrialsTable(path, "val_miou", max_epochs=3)
    table.on_trial_result(0, [a, b], a, {"epoch": 1, "node": "w1"})  # Tune sets last_result afterwards
    (row_a, row_b) = read_rows(path)
    assert (row_a["status"], row_a["node"], row_a["nodes"], row_a["epochs"]) == ("running", "w1", "w1", "1")
    assert row_b["nodes"] == "" and row_b["status"] == "pending"
    a.last_result = {"epoch": 1, "node": "w1"}
    before = path.stat().st_mtime_ns
    table.on_trial_result(1, [a, b], a, {"epoch": 2, "node": "w1"})  # same node: no rewrite
    assert path.stat().st_mtime_ns == before
    a.status, a.num_failures = "PENDING", 1  # its node died: Tune requeues it
    table.on_trial_recover(2, [a, b], a)
    assert read_rows(path)[0]["failures"] == "1"
    a.status = "RUNNING"
    table.on_trial_result(3, [a, b], a, {"epoch": 2, "node": "w2"})
    assert read_rows(path)[0]["nodes"] == "w1>w2"
    resumed = TrialsTable(path, "val_miou", max_epochs=3)
    a.last_result = {"epoch": 3, "node": "w2"}
    resumed.on_trial_complete(4, [a, b], a)
    row = read_rows(path)[0]
    assert (row["status"], row["node"], row["nodes"], row["failures"]) == ("completed", "w2", "w1>w2", "1")


def test_checkpoints_in_an_object_store_are_recorded_as_uris_and_fetched(tmp_path):
    from ensemble.members import checkpoint_exists, local_checkpoint
    from trainables.runfiles import experiment_location, read_trial_file
    from tune.experiment import checkpoint_ref

    store = tmp_path / "bucket"
    trial_dir = store / "exp" / "fold0_abc"
    (trial_dir / "checkpoint_000002").mkdir(parents=True)
    (trial_dir / "checkpoint_000002" / "model.pt").write_bytes(b"weights" * 100)
    (trial_dir / "result.json").write_text('{"epoch": 1}\n')
    uri = store.as_uri()
    # Tune's checkpoint path is the one inside the filesystem, without the scheme
    ckpt = SimpleNamespace(path=str(trial_dir / "checkpoint_000002"))
    ref = checkpoint_ref(ckpt, uri)
    assert ref == f"{uri}/exp/fold0_abc/checkpoint_000002/model.pt"
    assert checkpoint_ref(ckpt, None) == str(trial_dir / "checkpoint_000002" / "model.pt")
    assert checkpoint_ref(ckpt, str(store)) == str(trial_dir / "checkpoint_000002" / "model.pt")
    assert experiment_location(tmp_path / "runs" / "exp", uri) == f"{uri}/exp"
    assert experiment_location(tmp_path / "runs" / "exp", "s3://b/p/?region=x", "f/result.json") == \
        "s3://b/p/exp/f/result.json?region=x"

    assert checkpoint_exists(ref) and not checkpoint_exists(ref.replace("000002", "000001"))
    cache = tmp_path / "cache"
    local = local_checkpoint(ref, cache)
    assert local == cache / "fold0_abc" / "checkpoint_000002" / "model.pt"
    assert local.read_bytes() == b"weights" * 100
    mtime = local.stat().st_mtime_ns
    assert local_checkpoint(ref, cache) == local and local.stat().st_mtime_ns == mtime  # fetched once
    assert local_checkpoint(str(local), cache) == local  # a path stays a path

    run_dir = tmp_path / "runs" / "exp"
    run_dir.mkdir(parents=True)
    (run_dir / "experiment.json").write_text(json.dumps({"settings": {"trial_storage": uri}}))
    assert read_trial_file(run_dir, "fold0_abc", "result.json") == '{"epoch": 1}\n'
    assert read_trial_file(run_dir, "fold0_zzz", "result.json") is None


# ---------------------------------------------------------------- a real cluster


@pytest.mark.ray
@pytest.mark.slow
@needs_camvid
def test_search_across_nodes_survives_losing_a_worker(cluster, camvid_cache):
    from ensemble.members import local_checkpoint, top_k
    from ensemble.predictor import load_member

    start = time.monotonic()
    scratch = scratch_dir("dist")
    storage, name, shared = scratch / "runs", "dist", scratch / "shared"
    run_dir = storage / name
    # the tiny space without early stopping: every trial trains its 3 epochs, so a trial on w1
    # is still training when it is chosen (ASHA could stop it at its first result)
    space = yaml.safe_load(TINY.read_text())
    space["search"]["asha"] = None
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "tiny.yaml").write_text(yaml.safe_dump(space))
    cluster.start(WORKERS)
    started = time.monotonic() - start
    args = ["--space", str(scratch / "tiny.yaml"), "--data", str(TRAIN_JSON), "--storage", str(storage), "--name", name,
            "--trial-storage", shared.as_uri(), "--address", "auto", "--folds", "2", "--num-samples", "2",
            "--max-epochs", "3", "--max-failures", "2", "--wandb", "disabled"]
    log = scratch / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen([sys.executable, str(RUN), *args], cwd=RUN.parents[1], env=cluster.env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # wait until a trial has finished and a trial started on w1 after that has reported its
        # first epoch: its checkpoint is in the storage before Tune sees the result (tune.report
        # persists it first), and it has epochs to go
        deadline, victim, first_round = time.monotonic() + 480, None, None
        while victim is None:
            assert driver.poll() is None, f"the search ended before a node was lost:\n{tail(log.read_text())}"
            assert time.monotonic() < deadline, f"no second trial ran on w1 in time:\n{tail(log.read_text())}"
            time.sleep(0.5)
            rows = read_rows(run_dir / "trials.csv") if (run_dir / "trials.csv").exists() else []
            if first_round is None and any(r["status"] == "completed" for r in rows):
                first_round = {r["trial_id"] for r in rows if r["nodes"]}
            victim = next((r for r in rows if first_round is not None and r["trial_id"] not in first_round
                           and r["status"] == "running" and r["node"] == "w1" and int(r["epochs"] or 0) >= 1), None)
        time.sleep(1.0)
        before = {r["trial_id"]: r for r in read_rows(run_dir / "trials.csv") if r["status"] in ("completed", "stopped")}
        assert victim["trial_id"] not in before, "the trial on w1 ended before its node was killed"
        assert before, "no trial had finished before the node was killed"
        cluster.kill_node("w1")
        killed_at = time.monotonic() - start
        driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
    output = log.read_text()
    assert driver.returncode == 0, tail(output)
    assert "The actor died because its node has died" in output  # the loss, as Tune saw it
    assert not [p for p in node_processes(cluster.ray_dir, "w1") if b"train_trial" in cmdline(p)]  # its trial died

    # every trial accounted for: 2 folds x 2, each finished, none repeated
    rows = read_rows(run_dir / "trials.csv")
    now = {r["trial_id"]: r for r in rows}
    summary = "\n".join(f"  {r['trial_id']} fold {r['fold']} {r['status']:9} nodes {r['nodes']:6} "
                        f"failures {r['failures']} epochs {epochs_in(shared, name, r)}" for r in rows)
    print(f"\ncluster up in {started:.0f}s, w1 killed at {killed_at:.0f}s, done at {time.monotonic() - start:.0f}s;"
          f" trials per node {node_counts(rows)}\n{summary}")
    assert len(now) == len(rows) == 4 and sorted(r["fold"] for r in rows) == ["0", "0", "1", "1"], summary
    assert all(r["status"] in ("completed", "stopped") for r in rows), summary
    assert len({n for r in rows for n in r["nodes"].split(">")}) >= 2, summary  # more than one node ran trials
    assert all(r["nodes"].split(">")[0] in WORKERS for r in rows), summary  # none on the CPU-less head

    # the trial of the lost node: retried from its checkpoint on the surviving worker
    lost = now[victim["trial_id"]]
    assert lost["nodes"] == "w1>w2" and lost["node"] == "w2" and int(lost["failures"]) == 1, summary
    continued = epochs_in(shared, name, lost)
    assert continued.count(1) == 1 and continued == sorted(continued), continued  # not from scratch
    assert sorted(set(continued)) == list(range(1, int(lost["epochs"]) + 1)), continued
    # the trials that had finished before are untouched (also one that ran on w1: its checkpoint is
    # in the storage, not on the node); nothing ran on w1 after the loss
    for trial_id, row in before.items():
        kept = ("fold", "status", "epochs", "best_epoch", "best_val_miou", "checkpoint", "nodes")
        assert {k: now[trial_id][k] for k in kept} == {k: row[k] for k in kept}, trial_id
    assert all(r["node"] != "w1" for r in rows if r["trial_id"] not in before), summary

    # the per-fold studies: one Optuna trial per Tune trial, told once, as it finally ended
    db = f"sqlite:///{run_dir / 'studies.db'}"
    for fold in (0, 1):
        trials = by_tune_id(optuna.load_study(study_name=study_name("tiny", fold), storage=db))
        assert set(trials) == {r["trial_id"] for r in rows if r["fold"] == str(fold)}
        for trial_id, t in trials.items():
            row = now[trial_id]
            assert t.state == (TrialState.COMPLETE if row["status"] == "completed" else TrialState.PRUNED), row
            assert sorted(t.intermediate_values) == list(range(1, int(row["epochs"]) + 1)), row

    # the ensemble step reads every member from the trials' storage, whichever node trained it
    assert all(r["checkpoint"].startswith(shared.as_uri() + "/") for r in rows), summary
    members = top_k(rows, "val_miou", "max", k=2)
    assert sum(len(m) for m in members.values()) == 4
    cache = run_dir / "checkpoints"
    for fold, chosen in members.items():
        for row in chosen:
            path = local_checkpoint(row["checkpoint"], cache)
            assert cache in path.parents
            member = load_member(path, row["trial_id"], "cpu")
            assert member.fold == fold and member.meta["epoch"] == int(row["best_epoch"]), row
            assert member.score == pytest.approx(float(row["best_val_miou"]))
    assert sorted(p.parent.parent.name for p in cache.rglob("model.pt")) == sorted(
        f"fold{r['fold']}_{r['trial_id']}" for r in rows)
    shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.ray
def test_without_an_address_the_search_starts_its_own_ray_beside_a_running_one():
    """``ray.init()`` joins any Ray already running on the machine (another user's, a test cluster): the
    search must start a private one unless --address or RAY_ADDRESS names one, and say which it uses."""
    ray_dir = private_ray_dir()
    env = cli_env(ray_dir)  # no RAY_ADDRESS; the same Ray temp dir, where ray.init() finds the running head
    port = _free_port()
    try:
        started = subprocess.run(["ray", "start", "--head", f"--port={port}", "--num-cpus=1",
                                  "--include-dashboard=false", "--disable-usage-stats"],
                                 env=env, capture_output=True, text=True, timeout=240)
        assert started.returncode == 0, tail(started.stdout + started.stderr)
        script = ("import ray\nfrom tune.cluster import init_ray\ninit_ray(None, False)\n"
                  "print('gcs', ray.get_runtime_context().gcs_address)\n")
        proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=240)
        assert proc.returncode == 0, tail(proc.stdout + proc.stderr)
        [gcs] = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("gcs ")]
        assert not gcs.endswith(f":{port}"), f"joined the running Ray at {gcs}"
        assert "Ray: a private local Ray" in proc.stdout, proc.stdout
    finally:
        clean_up_ray(ray_dir)
