"""Processes of one local Ray cluster, found by its own temp directory (``RAY_TMPDIR``).

A cluster started with its own ``RAY_TMPDIR`` carries that path in every process's command line,
environment or open files (each writes its logs below it), so it can be stopped without touching
other Ray clusters on the same machine (``ray stop --force`` stops them all). The open files
matter: a Ray agent renames itself (``ray::DashboardAgent``) and its environment can be blanked by
that, and a dashboard agent missed by a teardown keeps port 52365, so the next cluster's job agent
cannot start ("No available agent to submit job"). Used by the tests and benchmarks that start
private clusters, and by the multi-node test to find (and kill) one node's processes.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _has_open_file_below(proc: Path, folder: str) -> bool:
    try:
        fds = list((proc / "fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd).startswith(folder):
                return True
        except OSError:
            continue
    return False


def ray_processes(ray_dir: Path) -> list[int]:
    """Live processes of the Ray cluster under ``ray_dir``: its path in their command line or
    environment, or a file below it open (see the module doc)."""
    marker = str(ray_dir).encode()
    folder = str(ray_dir).rstrip("/") + "/"
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie: already dead
            if (marker in (proc / "cmdline").read_bytes() or marker in (proc / "environ").read_bytes()
                    or _has_open_file_below(proc, folder)):
                pids.append(int(proc.name))
        except (OSError, IndexError):
            continue
    return pids


def node_processes(ray_dir: Path, label: str) -> list[int]:
    """Processes of one node of that cluster: started by a ``ray start`` whose environment had
    ``SEGHPO_NODE_LABEL=<label>`` (the raylet and what it starts: its trial workers inherit it)."""
    marker = f"SEGHPO_NODE_LABEL={label}".encode()
    out = []
    for pid in ray_processes(ray_dir):
        try:
            if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                out.append(pid)
        except OSError:
            continue
    return out


def stop_ray(ray_dir: Path, grace: float = 10.0) -> list[int]:
    """Wait up to ``grace`` seconds for the cluster under ``ray_dir`` to go away, then SIGKILL
    what is left; returns the killed pids."""
    deadline = time.monotonic() + grace
    while ray_processes(ray_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    killed = ray_processes(ray_dir)
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return killed
