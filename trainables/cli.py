"""Shared command-line plumbing: user errors as one line + exit 2, ``--set key=value`` parsing."""
from __future__ import annotations

import functools
import logging
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
