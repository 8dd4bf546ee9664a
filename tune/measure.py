"""Measured, not estimated: peak memory and step time of a few training steps of one model at one
input size and batch size, on this machine, as a trial would run them.

A step is forward, loss, backward and an AdamW update (its state counts too), in the autocast mode
the device supports (``trainables.device.resolve_amp`` with ``auto``: bf16 or fp16 on CUDA, fp32
on CPU) and channels-last on CUDA. Memory: on CUDA the allocator's peak (``max_memory_reserved``,
which ``max_memory_allocated`` plus the cached blocks make: what another allocation would have to
fit beside); on CPU the process's peak resident set while the steps run, sampled from
``/proc/self/statm`` (the whole process: torch and the model included, as in a trial's process).
The planner (``tune/plan.py``) compares it with the memory a trial gets.
"""
from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from trainables.device import resolve_amp
from trainables.models import build_model


@dataclass(frozen=True)
class Machine:
    """What the trials share: the device kind, its memory (bytes: one GPU's, or the RAM), CPUs, GPUs."""

    kind: str  # cuda | cpu
    name: str
    memory: int
    cpus: int
    gpus: int
    amp: str  # bf16 | fp16 | off

    def describe(self) -> str:
        gib = self.memory / 2 ** 30
        if self.kind == "cuda":
            return f"{self.gpus} x {self.name} ({gib:.0f} GiB each), {self.cpus} CPUs, AMP {self.amp}"
        return f"CPU only: {self.cpus} cores, {gib:.0f} GiB available, AMP off"


@dataclass(frozen=True)
class Measurement:
    peak: int  # bytes
    step_s: float  # seconds per training step
    fits: bool = True  # False: out of memory


MeasureFn = Callable[[int, int], Measurement]  # (height, width) and batch -> measurement


def available_ram() -> int:
    """Available RAM in bytes (MemAvailable), or the total when /proc is not there."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def this_machine(gpus: int | None = None) -> Machine:
    """This machine; ``gpus``: how many of its GPUs the search may use (None: all; 0: CPU only)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    use = found if gpus is None else min(gpus, found)
    if use:
        props = torch.cuda.get_device_properties(0)
        amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}[resolve_amp("auto", torch.device("cuda"))]
        return Machine("cuda", props.name, int(props.total_memory), cpus, use, amp)
    return Machine("cpu", "cpu", available_ram(), cpus, 0, "off")


def _rss() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no /proc: the lifetime peak, an upper bound
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _PeakRSS:
    """The highest resident set size seen while the block runs (sampled every 2 ms)."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


class StepMeter:
    """Measures one (architecture, encoder) on ``machine``: call it with a size and a batch."""

    def __init__(self, arch: str, encoder: str, num_classes: int, machine: Machine, task: str = "multiclass",
                 kwargs: dict | None = None, steps: int = 3, threads: int | None = None):
        self.arch, self.encoder, self.num_classes, self.task = arch, encoder, num_classes, task
        self.kwargs, self.machine, self.steps, self.threads = dict(kwargs or {}), machine, steps, threads
        self.device = torch.device("cuda" if machine.kind == "cuda" else "cpu")
        self.dtype = resolve_amp(machine.amp if machine.kind == "cuda" else "off", self.device)

    def _model(self) -> torch.nn.Module:
        model = build_model(self.arch, self.encoder, self.num_classes, weights=None, kwargs=self.kwargs)
        model = model.to(self.device).train()
        return model.to(memory_format=torch.channels_last) if self.device.type == "cuda" else model

    def _steps(self, model, optimizer, x, y) -> float:
        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                out = model(x)
                loss = F.cross_entropy(out.float(), y) if self.task == "multiclass" else \
                    F.binary_cross_entropy_with_logits(out.float(), y)
            loss.backward()
            optimizer.step()

        step()  # the first step allocates the optimizer state and picks the kernels: not timed
        self._sync()
        times = []
        for _ in range(self.steps):
            start = time.perf_counter()
            step()
            self._sync()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]  # the median: one step slowed by another process counts less

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __call__(self, size: tuple[int, int], batch: int) -> Measurement:
        h, w = size
        old_threads = torch.get_num_threads()
        if self.threads and self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        model = optimizer = x = y = None
        try:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            model = self._model()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            x = torch.randn(batch, 3, h, w, device=self.device)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            if self.task == "multiclass":
                y = torch.randint(0, self.num_classes, (batch, h, w), device=self.device)
            else:
                y = torch.randint(0, 2, (batch, self.num_classes, h, w), device=self.device).float()
            if self.device.type == "cuda":
                step_s = self._steps(model, optimizer, x, y)
                return Measurement(int(torch.cuda.max_memory_reserved()), step_s)
            with _PeakRSS() as rss:
                step_s = self._steps(model, optimizer, x, y)
            return Measurement(rss.peak, step_s)
        except torch.cuda.OutOfMemoryError:
            return Measurement(self.machine.memory, float("inf"), fits=False)
        finally:
            del model, optimizer, x, y
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            torch.set_num_threads(old_threads)
