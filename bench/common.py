"""Shared plumbing of the benchmarks: environment, statistics, result rows, the table, a private Ray.

Every benchmark module has ``NAME``, ``TARGET`` and ``run(quick: bool) -> dict`` and can run on its
own (``python bench/<module>.py [--quick] [--json PATH]``); ``bench/run.py`` runs each one in its
own subprocess (so Ray, threads and memory of one never leak into the next) and collects the dicts.

A result dict::

    {"name": ..., "status": "ok" | "skipped" | "error", "target": "text", "met": bool | None,
     "rows": [row, ...], "details": {...}, "elapsed_s": float}

A row compares two things side by side: ``a`` and ``b`` each hold a label, a unit and the raw
``values`` (one per repetition / epoch), summarised as min/median/max; ``ratio`` is the number
the target is about (usually median(a) / median(b)), ``target`` its text and ``met`` the verdict
(None for rows that only inform).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "WANDB_MODE": "offline",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "PYTHONUNBUFFERED": "1",
    "TQDM_DISABLE": "1",  # no progress bars in the logs (rasterising, out-of-fold)
}
for _key, _value in ENV_DEFAULTS.items():
    os.environ.setdefault(_key, _value)

SAMPLE = ROOT / "data" / "camvid-sample" / "train" / "annotations.json"
CAMVID = ROOT.parent / "shared" / "data" / "camvid" / "train" / "annotations.json"
CAMVID_REL = "../shared/data/camvid/train/annotations.json"
# torch threads of every CPU measurement: the tool's default trial gets one CPU (cpus_per_trial: 1)
THREADS = int(os.environ.get("BENCH_THREADS", "1"))

# The tiny model of the issue: a 3-level Unet/resnet18 with a narrow decoder, random init.
TINY_MODEL = {"model.arch": "Unet", "model.encoder": "resnet18", "model.weights": None,
              "model.kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}}


def tiny_overrides(**extra: Any) -> dict:
    """Dotted overrides for the tiny model on CPU at 64x96."""
    out = {**TINY_MODEL, "train.image_size": [64, 96], "train.batch_size": 8, "train.device": "cpu",
           "train.seed": 0, "optimizer.lr": 3e-3}
    out.update(extra)
    return out


def set_threads(n: int = THREADS) -> None:
    import torch

    torch.set_num_threads(max(1, n))


# ---------------------------------------------------------------- statistics and rows


def summary(values: list[float]) -> dict:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"n": 0, "min": None, "median": None, "max": None}
    return {"n": len(vals), "min": min(vals), "median": statistics.median(vals), "max": max(vals)}


def median(values: list[float]) -> float:
    return summary(values)["median"]


def side(label: str, values: list[float], unit: str = "") -> dict:
    return {"label": label, "unit": unit, "values": [float(v) for v in values], **summary(values)}


def row(metric: str, a: dict, b: dict | None, ratio: float | None, target: str = "", met: bool | None = None,
        note: str = "") -> dict:
    return {"metric": metric, "a": a, "b": b, "ratio": ratio, "target": target, "met": met, "note": note}


def safe_ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def result(name: str, target: str, rows: list[dict], details: dict | None = None, status: str = "ok",
           met: bool | None = None) -> dict:
    if met is None:
        verdicts = [r["met"] for r in rows if r.get("met") is not None]
        met = all(verdicts) if verdicts else None
    return {"name": name, "status": status, "target": target, "met": met, "rows": rows, "details": details or {}}


def skipped(name: str, target: str, reason: str, details: dict | None = None) -> dict:
    return {"name": name, "status": "skipped", "target": target, "met": None, "rows": [], "reason": reason,
            "details": details or {}}


def log(*parts: Any) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


# ---------------------------------------------------------------- the table


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.{max(digits - 1, 1)}f}"
    if magnitude >= 0.1:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}g}"


def _side_text(s: dict | None) -> tuple[str, str]:
    if not s:
        return "", ""
    unit = f" {s['unit']}" if s.get("unit") else ""
    if s["n"] <= 1:
        return f"{s['label']}{unit}", _num(s["median"])
    return f"{s['label']}{unit}", f"{_num(s['min'])}/{_num(s['median'])}/{_num(s['max'])}"


def verdict(met: bool | None) -> str:
    return {True: "MET", False: "MISSED", None: ""}[met]


def format_table(results: list[dict]) -> str:
    """One block per benchmark: a line per row with A and B (min/median/max), ratio, target, verdict."""
    head = ["benchmark", "metric", "A", "A min/med/max", "B", "B min/med/max", "ratio", "target", ""]
    lines: list[list[str]] = []
    for res in results:
        if res["status"] != "ok":
            reason = res.get("reason") or res.get("error", "").strip().splitlines()[-1:] or [""]
            reason = reason if isinstance(reason, str) else reason[0]
            lines.append([res["name"], f"{res['status']}: {reason}"[:110], "", "", "", "", "", "", ""])
            continue
        for i, r in enumerate(res["rows"]):
            a_label, a_vals = _side_text(r["a"])
            b_label, b_vals = _side_text(r["b"])
            lines.append([res["name"] if i == 0 else "", r["metric"], a_label, a_vals, b_label, b_vals,
                          _num(r["ratio"]), r["target"], verdict(r["met"])])
        lines.append([""] * len(head))
    widths = [max(len(head[c]), *(len(line[c]) for line in lines)) if lines else len(head[c])
              for c in range(len(head))]
    # long text columns only: the numbers stay aligned
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
    for line in lines:
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out)


def overall_lines(results: list[dict]) -> list[str]:
    out = []
    for res in results:
        if res["status"] == "ok":
            out.append(f"{res['name']}: {verdict(res['met']) or 'no verdict'} (target: {res['target']})")
        else:
            reason = res.get("reason") or (res.get("error") or "").strip().splitlines()[-1:] or [""]
            out.append(f"{res['name']}: {res['status']} ({reason if isinstance(reason, str) else reason[0]})")
    return out


# ---------------------------------------------------------------- scratch space and a private Ray


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temporary directory (under /tmp, outside the repository), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def private_ray() -> Iterator[dict]:
    """Start a local Ray cluster of our own (its own RAY_TMPDIR: never joins another one on this
    machine) through the tool's ``tune.cluster.init_ray``; yields ``{"init_s": seconds}``. On exit
    Ray is shut down and only the processes of this cluster that are still alive are killed."""
    ray_dir = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # short: Ray's socket paths are limited
    for key in ("RAY_ADDRESS", "RAY_JOB_ID", "RAY_JOB_SUBMISSION_ID"):
        os.environ.pop(key, None)
    os.environ["RAY_TMPDIR"] = str(ray_dir)
    import ray

    from tune.localray import stop_ray
    from tune.cluster import init_ray

    start = time.perf_counter()
    init_ray(None, False)
    info = {"init_s": time.perf_counter() - start, "num_cpus": ray.cluster_resources().get("CPU")}
    try:
        yield info
    finally:
        ray.shutdown()
        stop_ray(ray_dir)
        shutil.rmtree(ray_dir, ignore_errors=True)


def quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("trainables", "tune", "ensemble", "ray", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:
        pass


def load_data(path: Path | None, cache_dir: Path, **kwargs):
    """``trainables.data.load_dataset`` with the tqdm bar silenced."""
    from trainables.data import load_dataset

    return load_dataset(path, cache_dir=cache_dir, **kwargs)


# ---------------------------------------------------------------- standalone entry point


def bench_main(name: str, target: str, run: Callable[..., dict],
               add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """``add_args``: a benchmark's own options, passed to ``run`` as keyword arguments."""
    parser = argparse.ArgumentParser(description=f"benchmark {name} (see bench/README.md)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions")
    parser.add_argument("--json", type=Path, help="write the result dict here (bench/run.py uses this)")
    own = set()
    if add_args is not None:
        before = {a.dest for a in parser._actions}
        add_args(parser)
        own = {a.dest for a in parser._actions} - before
    args = parser.parse_args()
    quiet_libraries()
    start = time.perf_counter()
    try:
        res = run(args.quick, **{key: getattr(args, key) for key in own})
    except Exception as exc:  # a crashed benchmark is a result too (run.py shows it in the table)
        import traceback

        traceback.print_exc()
        res = {"name": name, "status": "error", "target": target, "met": None, "rows": [],
               "error": f"{type(exc).__name__}: {exc}", "details": {}}
    res["elapsed_s"] = time.perf_counter() - start
    res["quick"] = args.quick
    if args.json:
        from trainables.io import atomic_write_json

        atomic_write_json(args.json, res)
    print()
    print(format_table([res]))
    for line in overall_lines([res]):
        print(line)
    if res["status"] == "error":
        raise SystemExit(1)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
