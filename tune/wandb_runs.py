"""The runs of a W&B sweep as per-epoch curves: from W&B's server (``entity/project/sweep_id``, read
with ``wandb.Api()``) or from offline run folders (``wandb/offline-run-*`` as ``tune/sweep_agent.py``
writes them with ``WANDB_MODE=offline``).

An offline run's only record of what it logged is its ``run-<id>.wandb`` file: a LevelDB-style log
(a 7-byte ``:W&B`` header, then 32 KiB blocks of records with a 7-byte header: crc32, length, type
FULL/FIRST/MIDDLE/LAST) of ``wandb_internal_pb2.Record`` protobufs. wandb ships the protobufs but,
since its reader moved into the Go ``wandb-core`` binary, no reader in its Python package, so
:func:`records` reads the framing and leaves the decoding to the protobufs.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from trainables.errors import InputError

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class SearchRun:
    """One trial of a search: its metric per epoch, in epoch order (NaN where it was not logged)."""
    name: str
    start: float  # seconds since the epoch, orders the runs of a search
    fold: int | None
    values: list[float] = field(default_factory=list)


def records(path: Path):
    """The ``wandb_internal_pb2.Record`` messages of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if len(data) < HEADER or struct.unpack("<4sHB", data[:HEADER])[:2] != (b":W&B", 0xBEE1):
        raise InputError(path, "not a W&B run file (no ':W&B' header)")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - (pos % BLOCK)
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:
            pos += left  # zero padding at the end of a block
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FIRST, MIDDLE):
            continue
        record = pb.Record()
        record.ParseFromString(pending)
        yield record
        pending = b""


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def history(path: Path) -> list[dict]:
    """The logged rows (``wandb.log`` calls) as {key: value} dicts (values JSON-decoded)."""
    return [_items(r.history.item) for r in records(path) if r.WhichOneof("record_type") == "history"]


def _curve(rows: list[dict], metric: str) -> list[float]:
    """The metric per epoch: rows ordered by their ``epoch`` (W&B's step when there is none)."""
    by_epoch = {}
    for row in rows:
        epoch = row.get("epoch", row.get("_step"))
        if epoch is not None:
            value = row.get(metric)
            by_epoch[int(epoch)] = float(value) if isinstance(value, (int, float)) else math.nan
    return [by_epoch[e] for e in sorted(by_epoch)]


def offline_run(folder: Path, metric: str) -> SearchRun:
    """An offline run folder (``offline-run-<date>-<id>``) as a :class:`SearchRun`."""
    files = sorted(Path(folder).glob("run-*.wandb"))
    if not files:
        raise InputError(folder, "no run-*.wandb file: not a W&B run folder")
    config, rows, start, name = {}, [], None, Path(folder).name
    for r in records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            config.update(_items(r.run.config.update))
            start = r.run.start_time.ToDatetime().timestamp() if r.run.HasField("start_time") else None
            name = r.run.run_id or name
        elif kind == "config":
            config.update(_items(r.config.update))
        elif kind == "history":
            rows.append(_items(r.history.item))
    fold = config.get("fold")
    return SearchRun(name, start if start is not None else files[0].stat().st_mtime,
                     None if fold is None else int(fold), _curve(rows, metric))


def sweep_runs(sweep: str, metric: str) -> list[SearchRun]:
    """The runs of a W&B sweep (``entity/project/sweep_id``) from the W&B server."""
    import wandb

    try:
        found = wandb.Api().sweep(sweep)
    except Exception as exc:  # wandb raises CommError, ValueError, ... for a missing sweep or no login
        raise InputError(sweep, f"cannot read the W&B sweep: {exc}") from None
    out = []
    for run in found.runs:
        rows = list(run.scan_history(keys=["epoch", metric]))
        start = datetime.fromisoformat(str(run.created_at).replace("Z", "+00:00")).timestamp()
        fold = run.config.get("fold")
        out.append(SearchRun(run.id, start, None if fold is None else int(fold), _curve(rows, metric)))
    return out


def read_sweep(sources: list[str], metric: str) -> list[SearchRun]:
    """``sources``: one sweep path, or offline run folders (or wandb directories holding them)."""
    folders: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            folders += [path] if list(path.glob("run-*.wandb")) else sorted(path.glob("offline-run-*"))
        elif path.exists():
            raise InputError(path, "expected an offline run folder (offline-run-*) or a W&B sweep path")
        elif len(sources) == 1 and source.count("/") == 2:
            return sweep_runs(source, metric)
        else:
            raise InputError(path, "no such run folder, and not a W&B sweep path entity/project/sweep_id")
    if not folders:
        raise InputError(sources[0], "no offline-run-* folders found")
    return [offline_run(f, metric) for f in folders]
