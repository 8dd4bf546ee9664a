"""Run the benchmark suite and print one table (see bench/README.md).

    python bench/run.py [--quick] [--only NAME[,NAME...]] [--out bench/results]

Each benchmark runs in its own Python process (``python bench/<name>.py --json ...``), one after
the other, its output going to ``<out>/<stamp>-<name>.log`` (progress lines are echoed here). The
results of the whole run are written atomically to ``<out>/<stamp>[-quick].json`` and the table
is printed: per benchmark and row, the two things compared (A, B) with min/median/max over the
repetitions, the ratio the target is about, the target and MET / MISSED.

Benchmarks are measurements, not tests: the exit status is 0 when every benchmark ran (whether or
not its target was met), 1 when one crashed.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bench.common import format_table, overall_lines  # noqa: E402

BENCHMARKS = ["trial_overhead", "reuse_actors", "search_efficiency", "data_path", "thresholds", "ensemble_inference", "predict_throughput", "ray_predict", "tiled_memory", "scale", "ddp_epoch", "gpu"]
PROGRESS = re.compile(r"^(\d\d:\d\d:\d\d |gpu: skipped)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (a few minutes)")
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results folder [bench/results]")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one benchmark may take [3600]")
    args = p.parse_args(argv)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            p.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
        args.names = names
    else:
        args.names = list(BENCHMARKS)
    return args


def git_state() -> dict:
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"), "dirty_files": len(git("status", "--porcelain").splitlines())}


def run_one(name: str, quick: bool, out: Path, stamp: str, timeout: float) -> dict:
    import json

    json_path = out / f".{stamp}-{name}.json"
    log_path = out / f"{stamp}-{name}.log"
    cmd = [sys.executable, str(ROOT / "bench" / f"{name}.py"), "--json", str(json_path)] + (["--quick"] if quick else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    load_before = os.getloadavg()
    start = time.perf_counter()
    print(f"--- {name}{' (quick)' if quick else ''}: log {log_path.relative_to(ROOT) if log_path.is_relative_to(ROOT) else log_path}",
          flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        echoed = None
        try:
            for line in proc.stdout:
                log.write(line)
                if PROGRESS.match(line) and line != echoed:
                    print("    " + line.rstrip(), flush=True)
                    echoed = line
                if time.perf_counter() - start > timeout:
                    proc.kill()
                    break
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    elapsed = time.perf_counter() - start
    if json_path.exists():
        res = json.loads(json_path.read_text())
        json_path.unlink()
    else:
        tail = log_path.read_text().strip().splitlines()[-5:]
        res = {"name": name, "status": "error", "target": "", "met": None, "rows": [], "details": {},
               "error": f"exit {proc.returncode}, no result" + (f" (killed after {timeout:.0f}s)" if elapsed > timeout
                                                                 else "") + ": " + " | ".join(tail)}
    res["wall_s"] = elapsed
    res["load_avg_before"] = list(load_before)
    res["load_avg_after"] = list(os.getloadavg())
    res["log"] = str(log_path)
    print(f"    {name}: {res['status']}, {elapsed:.0f}s, load average {load_before[0]:.1f} -> "
          f"{res['load_avg_after'][0]:.1f}", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    start = time.perf_counter()
    results = [run_one(name, args.quick, out, stamp, args.timeout) for name in args.names]
    total = time.perf_counter() - start
    import torch

    from trainables.io import atomic_write_json

    header = (f"bench/run.py {'--quick' if args.quick else '(full)'} - {now.strftime('%Y-%m-%d %H:%M UTC')} - "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"cuda {'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'} - "
              f"{total / 60:.1f} min")
    table = format_table(results)
    path = out / f"{stamp}.json"
    atomic_write_json(path, {
        "created": now.isoformat(timespec="seconds"), "quick": args.quick, "command": sys.argv,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available()},
        "git": git_state(), "total_s": total, "header": header, "table": table, "benchmarks": results,
    })
    print()
    print(header)
    print(table)
    print()
    for line in overall_lines(results):
        print(line)
    print(f"\nresults: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 1 if any(r["status"] == "error" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
