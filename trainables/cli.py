"""Shared command-line plumbing: user errors as one line + exit 2, ``--set key=value`` parsing,
the ``--debug`` budget, W&B's default mode."""
from __future__ import annotations

import functools
import logging
import os
import re
import sys
from typing import Callable

import yaml

from trainables.errors import ConfigError, SegHPOError

logger = logging.getLogger(__name__)


class _ValueLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` (no dot) as text; on the command line it can only mean the number."""


_ValueLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                   list("-+0123456789."))


# ``--debug``: a new dataset or space end to end in about a minute. Settings given explicitly on
# the command line (--set, --max-epochs, ...) still win over these.
DEBUG_SETTINGS = {
    "data.subset": 16,  # 16 images, evenly spaced over the dataset
    "data.max_size": 128,
    "folds.k": 2,
    "train.epochs": 1,
    "train.max_train_batches": 2,
    "train.batch_size": 4,
    "train.image_size": [64, 64],
}
DEBUG_HELP = ("check a dataset and space end to end in about a minute: 16 images, 2 folds, one epoch of 2 "
              "batches at 64x64")


def exit_on_user_error(main: Callable) -> Callable:
    """Turn a :class:`SegHPOError` into ``error: <file>: <problem>`` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except SegHPOError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def parse_sets(items: list[str], source: str = "command line") -> dict:
    """``["train.epochs=3", "train.image_size=[64,96]"]`` -> dotted overrides (values read as YAML,
    except that ``1e-4`` is a number as well as ``1.0e-4``)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(source, item, "expected section.key=value, e.g. train.epochs=3")
        try:
            out[key.strip()] = yaml.load(value, Loader=_ValueLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(source, key, f"cannot read value {value!r}: {exc}") from None
    return out


# W&B's modes (``--wandb``): offline by default, so no run ever needs the network or a prompt.
MODES = ("offline", "online", "disabled")


def default_mode() -> str:
    """offline unless an API key is configured (never prompt, never need the network)."""
    if os.environ.get("WANDB_MODE") in MODES:
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import wandb

        return "online" if wandb.api.api_key else "offline"
    except Exception:  # an unconfigured wandb raises various errors here
        return "offline"
