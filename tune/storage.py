"""Tune's storage on a local or shared disk, with every file written whole or not at all.

Tune writes the experiment state (``experiment_state-*.json``, ``search_gen_state-*.json``, the
searcher's state) to a staging directory and copies it to ``storage_path`` in a background
thread; trials copy their checkpoints there too. Through pyarrow's ``LocalFileSystem`` a file is
written in place, so a driver killed during a copy leaves it cut short (seen: a 0-byte
``search_gen_state``). Tune then cannot restore the run and quietly *starts it again* with a
wrong sample count. :func:`storage_filesystem` gives Tune a local filesystem whose output streams
write to a hidden ``.<name>.<random>.partial`` beside the target and rename it over the target
on close: a reader sees the old file or the new one, never a part.

Object stores (``s3://``, ``gs://``) already publish an object only when its upload completes;
they keep pyarrow's own filesystem.

Before ``--resume``, :func:`unreadable_state` reads the newest state files the way Tune will,
so a damaged experiment is refused in one line instead of being silently restarted.
"""
from __future__ import annotations

import fnmatch
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
from trainables.runfiles import is_uri

PARTIAL = ".partial"


class _AtomicFile:
    """A binary file written under a temporary name in the target's directory, renamed on close."""

    def __init__(self, path: str):
        self.path = path
        folder, name = os.path.split(path)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=PARTIAL, dir=folder or ".")
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide it from the other users of a shared disk
        self._file = os.fdopen(fd, "wb")
        self.closed = False

    def write(self, data) -> int:
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    def tell(self) -> int:
        return self._file.tell()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._file.close()
        os.replace(self.tmp, self.path)


class AtomicLocalHandler(pafs.FileSystemHandler):
    """pyarrow's ``LocalFileSystem`` but for writes, which appear whole (see the module doc)."""

    def __init__(self):
        self._fs = pafs.LocalFileSystem()

    def __eq__(self, other) -> bool:
        return isinstance(other, AtomicLocalHandler)

    def __ne__(self, other) -> bool:
        return not self == other

    def __reduce__(self):  # Ray ships the storage filesystem to every trial's worker
        return AtomicLocalHandler, ()

    def get_type_name(self) -> str:
        return "local+atomic"

    def normalize_path(self, path):
        return self._fs.normalize_path(path)

    def get_file_info(self, paths):
        return self._fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self._fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self._fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self._fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self._fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self._fs.delete_file(path)

    def move(self, src, dest):
        self._fs.move(src, dest)

    def copy_file(self, src, dest):
        with self._fs.open_input_stream(src) as source, self.open_output_stream(dest, None) as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)

    def open_input_stream(self, path):
        return self._fs.open_input_stream(path)

    def open_input_file(self, path):
        return self._fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_AtomicFile(path), mode="w")

    def open_append_stream(self, path, metadata):
        return self._fs.open_append_stream(path, metadata=metadata)


def storage_filesystem(trial_storage: str | None) -> pafs.FileSystem | None:
    """The filesystem Tune writes its storage through: atomic writes for a disk path, pyarrow's
    own for a URI (``None``: Tune infers it from the URI)."""
    if trial_storage and is_uri(trial_storage):
        return None
    return pafs.PyFileSystem(AtomicLocalHandler())


# the state files Tune reads on restore, newest of each kind, and how it reads them
STATE_FILES = {"experiment_state-*.json": "tune-json", "search_gen_state-*.json": "pickle",
               "searcher-state-*.pkl": "json", "callback-states-*.pkl": "pickle"}


def unreadable_state(location: str) -> tuple[str, str] | None:
    """``(file, problem)`` for the first of the newest state files in Tune's experiment
    directory (a path or a URI) that cannot be read as Tune will read it on restore; else None."""
    from ray import cloudpickle
    from ray.train._internal.storage import get_fs_and_path

    fs, root = get_fs_and_path(location)
    names = [Path(info.path).name for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
             if info.type == pafs.FileType.File]
    for pattern, kind in STATE_FILES.items():
        matching = fnmatch.filter(names, pattern)
        if not matching:
            continue
        newest = max(matching)
        path = f"{root.rstrip('/')}/{newest}"
        with fs.open_input_stream(path) as stream:
            raw = stream.readall()
        try:
            if not raw:
                raise ValueError("empty")
            if kind == "json":  # our searcher's own state (tune/searcher.py)
                json.loads(raw)
            elif kind == "tune-json":
                from ray.tune.utils.serialization import _loads_with_cloudpickle

                _loads_with_cloudpickle(raw)
            else:
                cloudpickle.loads(raw)
        except Exception as exc:  # noqa: BLE001 - any failure means Tune's restore would fail the same way
            return path, (f"cut short or damaged ({len(raw)} bytes, {type(exc).__name__}: {exc}); Tune cannot "
                          "resume from it")
    return None
