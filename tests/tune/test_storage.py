"""What a kill leaves behind: Tune's storage, the saved search state, a private cluster's processes.

A driver SIGKILLed while Tune copied its experiment state to storage once left a 0-byte
``search_gen_state``; Tune then failed to restore, started the experiment again with one sample
and ``--resume`` exited 0 with one trial of six. These tests pin the fix: whole-file writes, a
damaged state refused in one line, the saved states reconciled with the experiment state, and a
teardown that finds every process of a private cluster.
"""
from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tests.tune.test_tune import assert_user_error, cli
from tune.storage import PARTIAL, AtomicLocalHandler, storage_filesystem, unreadable_state

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "camvid-sample" / "train" / "annotations.json"
TINY = ROOT / "tests" / "spaces" / "tiny.yaml"


@pytest.fixture
def fs():
    return pafs.PyFileSystem(AtomicLocalHandler())


def test_a_file_appears_only_when_its_stream_is_closed(fs, tmp_path):
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    with fs.open_output_stream(str(target)) as out:
        out.write(b"new ")
        out.write(b"content")
        assert target.read_bytes() == b"old"  # readers still see the previous whole file
        assert len(list(tmp_path.glob(f".state.json.*{PARTIAL}"))) == 1
    assert target.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # the temporary name is gone


def test_a_writer_killed_mid_file_leaves_the_old_file_whole(tmp_path):
    import ray.cloudpickle as cloudpickle

    target = tmp_path / "search_gen_state-x.json"
    whole = cloudpickle.dumps({"counter": 3, "total_samples": 6})
    target.write_bytes(whole)
    script = textwrap.dedent(f"""
        import os, pyarrow.fs as pafs
        from tune.storage import AtomicLocalHandler
        out = pafs.PyFileSystem(AtomicLocalHandler()).open_output_stream({str(target)!r})
        out.write(b"half of a new st")
        out.flush()
        os._exit(0)  # as SIGKILL would: no close, no rename
    """)
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=60)
    assert target.read_bytes() == whole
    assert len(list(tmp_path.glob(f".{target.name}.*{PARTIAL}"))) == 1  # the cut copy, under another name
    # and Tune's restore never looks at it: its state files are found by these patterns
    assert unreadable_state(str(tmp_path)) is None


def test_directory_upload_through_copy_files_and_permissions(fs, tmp_path):
    """Ray uploads the staging directory and trial checkpoints with pyarrow's copy_files."""
    src, dest = tmp_path / "staging", tmp_path / "storage"
    (src / "checkpoint_000001").mkdir(parents=True)
    (src / "experiment_state-a.json").write_text("{}")
    (src / "checkpoint_000001" / "model.pt").write_bytes(bytes(range(256)) * 5000)
    pafs.copy_files(str(src), str(dest), destination_filesystem=fs)
    assert (dest / "experiment_state-a.json").read_text() == "{}"
    assert (dest / "checkpoint_000001" / "model.pt").read_bytes() == bytes(range(256)) * 5000
    assert not list(dest.rglob(f"*{PARTIAL}"))
    assert (dest / "experiment_state-a.json").stat().st_mode & 0o044  # readable by the other nodes' users
    fs.copy_file(str(dest / "experiment_state-a.json"), str(dest / "copy.json"))
    assert (dest / "copy.json").read_text() == "{}"


def test_the_filesystem_pickles_for_the_trial_workers(fs):
    again = pickle.loads(pickle.dumps(fs))
    assert again.type_name == "py::local+atomic" and again.equals(fs)


def test_uris_keep_pyarrows_own_filesystem():
    assert storage_filesystem("s3://bucket/prefix") is None
    assert storage_filesystem("gs://bucket") is None
    assert isinstance(storage_filesystem(None), pafs.PyFileSystem)
    assert isinstance(storage_filesystem("/shared/runs"), pafs.PyFileSystem)


def fake_experiment(tune_dir: Path, search_gen: bytes) -> None:
    """Tune's experiment directory as a killed driver leaves it (contents do not matter for the check)."""
    import ray.cloudpickle as cloudpickle

    tune_dir.mkdir(parents=True)
    (tune_dir / "tuner.pkl").write_bytes(b"")
    (tune_dir / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": [], "runner_data": {}}')
    (tune_dir / "searcher-state-2026-01-01_00-00-00.pkl").write_text('{"suggested": {}, "live": {}}')
    (tune_dir / "search_gen_state-2026-01-01_00-00-00.json").write_bytes(cloudpickle.dumps({"counter": 1}))
    (tune_dir / "search_gen_state-2026-01-01_00-00-09.json").write_bytes(search_gen)  # the newest: Tune reads it


def test_unreadable_state_names_the_newest_damaged_file(tmp_path):
    import ray.cloudpickle as cloudpickle

    fake_experiment(tmp_path / "ok" / "tune", cloudpickle.dumps({"counter": 2}))
    assert unreadable_state(str(tmp_path / "ok" / "tune")) is None
    fake_experiment(tmp_path / "cut" / "tune", cloudpickle.dumps({"counter": 2})[:7])
    path, problem = unreadable_state(str(tmp_path / "cut" / "tune"))
    assert path.endswith("search_gen_state-2026-01-01_00-00-09.json") and "7 bytes" in problem


@pytest.mark.slow
def test_resume_refuses_a_damaged_experiment_in_one_line(tmp_path):
    run_dir = tmp_path / "killed"
    fake_experiment(run_dir / "tune", b"")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = cli("--space", str(TINY), "--data", str(SAMPLE), "--storage", str(tmp_path), "--name", "killed",
               "--resume", "--wandb", "disabled")
    error = assert_user_error(proc, "search_gen_state-2026-01-01_00-00-09.json", "0 bytes", "cannot resume")
    assert str(run_dir / "tune") in error
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


# ---------------------------------------------------------------- the saved states a snapshot apart


def experiment_state(trials: list[tuple[str, str, dict]]) -> str:
    """An experiment state file as Tune writes it, with only what the reconciliation reads."""
    import json

    return json.dumps({"trial_data": [[json.dumps({"trial_id": tid, "status": status, "config": config}), "{}"]
                                      for tid, status, config in trials], "runner_data": {}})


def snapshot(tune_dir: Path, searcher, counter: int, live: set[str], total: int = 4) -> None:
    """The search generator's and the searcher's state files as Tune saves them (ConcurrencyLimiter 1)."""
    import ray.cloudpickle as cloudpickle

    limiter = {"max_concurrent": 1, "batch": False, "live_trials": set(live), "num_unfinished_live_trials": len(live),
               "cached_results": {}, "_limit_concurrency": True, "_metric": "val_miou", "_mode": "max"}
    (tune_dir / "search_gen_state-s.json").write_bytes(cloudpickle.dumps(
        {"counter": counter, "total_samples": total, "finished": False, "experiment": None,
         "name:ConcurrencyLimiter": limiter}))
    searcher.save(str(tune_dir / "searcher-state-s.pkl"))


@pytest.mark.parametrize("uri", [False, True], ids=["path", "file-uri"])
def test_resume_reconciles_a_searcher_state_older_than_the_experiment_state(tmp_path, uri):
    """Killed mid-copy: the experiment state knows trial b, the generator and searcher files are
    from the snapshot before b was asked. Without the fix Tune creates 5 trials, not 4, and b's
    Optuna trial is failed as an orphan although b resumes. Also through a URI (--trial-storage)."""
    import ray.cloudpickle as cloudpickle
    from optuna.trial import TrialState

    from tests.tune.test_tune import by_tune_id, epochs, load, make_searcher
    from tune.resume import reconcile

    tune_dir = tmp_path / "tune"
    tune_dir.mkdir()
    searcher = make_searcher(tmp_path, num_samples=2)
    a = searcher.suggest("a")
    snapshot(tune_dir, searcher, counter=1, live={"a"})  # the older snapshot
    searcher.on_trial_complete("a", epochs(searcher, "a", [0.3, 0.4, 0.5]))
    b = searcher.suggest("b")
    (tune_dir / "experiment_state-s.json").write_text(experiment_state([("a", "TERMINATED", a),
                                                                         ("b", "RUNNING", b)]))
    location, storage = (f"file://{tune_dir}", f"file://{tmp_path}") if uri else (str(tune_dir), None)
    assert unreadable_state(location) is None
    changes = reconcile(location, storage, f"sqlite:///{tmp_path}/s.db", "t")
    assert len(changes) == 2, changes
    generator = cloudpickle.loads((tune_dir / "search_gen_state-s.json").read_bytes())
    limiter = generator["name:ConcurrencyLimiter"]
    assert generator["counter"] == 2 and limiter["live_trials"] == {"b"} and limiter["num_unfinished_live_trials"] == 1

    restored = make_searcher(tmp_path, num_samples=2)
    restored.restore(str(tune_dir / "searcher-state-s.pkl"))
    assert restored.suggested == {0: 1, 1: 1}
    assert restored.live["b"]["number"] == 0 and restored.live["b"]["fold"] == 1
    assert by_tune_id(load(tmp_path, 1))["b"].state == TrialState.RUNNING  # not failed as an orphan
    assert restored.suggest("b") == b  # b asking again after the restore
    assert [restored.suggest(t)["fold"] for t in ("c", "d")] == [0, 1]  # the two samples left
    assert reconcile(location, storage, f"sqlite:///{tmp_path}/s.db", "t") == []  # agrees now: untouched


def test_resume_reconciles_a_generator_state_newer_than_the_experiment_state(tmp_path):
    """The other way round: the generator's limiter holds trial b, which the experiment state
    lacks, so Tune never restores b and, with max_concurrent 1, waits for it forever."""
    import ray.cloudpickle as cloudpickle

    from tests.tune.test_tune import make_searcher
    from tune.resume import reconcile

    tune_dir = tmp_path / "tune"
    tune_dir.mkdir()
    searcher = make_searcher(tmp_path, num_samples=2)
    a = searcher.suggest("a")
    (tune_dir / "experiment_state-s.json").write_text(experiment_state([("a", "TERMINATED", a)]))
    searcher.on_trial_complete("a", {"epoch": 3, "val_miou": 0.5, "best_score": 0.5, "best_epoch": 3})
    searcher.suggest("b")
    snapshot(tune_dir, searcher, counter=2, live={"b"})
    reconcile(str(tune_dir), None, f"sqlite:///{tmp_path}/s.db", "t")
    generator = cloudpickle.loads((tune_dir / "search_gen_state-s.json").read_bytes())
    assert generator["counter"] == 1 and generator["name:ConcurrencyLimiter"]["live_trials"] == set()
    restored = make_searcher(tmp_path, num_samples=2)
    restored.restore(str(tune_dir / "searcher-state-s.pkl"))
    assert restored.suggested == {0: 1, 1: 0} and restored.live == {}
    assert restored.suggest("c")["fold"] == 1  # b's place is handed out again (b's Optuna trial failed)


# ---------------------------------------------------------------- tearing down a private local cluster


def test_a_process_known_only_by_its_open_log_is_part_of_the_cluster(tmp_path):
    """A Ray agent renames itself and can blank its environment, so neither names the cluster's
    RAY_TMPDIR; its open log file does. One left alive held port 52365 and broke the next
    cluster's job agent."""
    import os

    from tune.localray import ray_processes, stop_ray

    ray_dir = tmp_path / "rt"
    (ray_dir / "logs").mkdir(parents=True)
    script = "import sys, time; log = open(sys.stdin.readline().strip(), 'a'); print('ready', flush=True); time.sleep(120)"
    agent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env={"PATH": os.environ["PATH"]})
    try:
        agent.stdin.write(f"{ray_dir / 'logs' / 'dashboard_agent.log'}\n")
        agent.stdin.flush()
        assert agent.stdout.readline().strip() == "ready"
        assert str(ray_dir).encode() not in Path(f"/proc/{agent.pid}/cmdline").read_bytes()
        assert str(ray_dir).encode() not in Path(f"/proc/{agent.pid}/environ").read_bytes()
        assert ray_processes(ray_dir) == [agent.pid]
        assert ray_processes(tmp_path / "r") == []  # a sibling whose name is a prefix: not this cluster
        assert stop_ray(ray_dir, grace=0) == [agent.pid]
        assert agent.wait(timeout=10) == -9
    finally:
        agent.kill()
