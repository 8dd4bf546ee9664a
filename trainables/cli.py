"""Shared command-line plumbing: user errors as one line + exit 2, ``--set key=value`` parsing,
the ``--debug`` budget, W&B's default mode, and the flag groups several commands share (declared
once here: ``add_..._flags(parser)``)."""
from __future__ import annotations

import argparse
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


# The flag groups several commands share. Each adds its flags to ``parser`` (a parser or an
# argument group) and returns it; the command's own words go in ``help``/``title`` where the
# flag's effect differs between commands.

WANDB_DEFAULT = "offline, or online when an API key is configured"
SET_HELP = "override settings: section.key=value, the value read as YAML (repeatable), e.g. train.epochs=3"
ADDRESS_HELP = ("join a Ray cluster: auto, ray://host:10001 (default: the RAY_ADDRESS environment variable, else "
                "start a private local Ray, never one already running on this machine)")


def add_wandb_flags(parser, help: str = "W&B logging") -> None:
    """``--wandb MODE`` (one of :data:`MODES`; not given: :func:`wandb_mode` resolves it with
    :func:`default_mode` when the command runs, so ``--help`` never imports wandb) and ``--wandb-project``."""
    parser.add_argument("--wandb", choices=MODES, default=None, help=f"{help} [{WANDB_DEFAULT}]")
    parser.add_argument("--wandb-project", default="segmentation-hpo", help="W&B project [segmentation-hpo]")


def wandb_mode(args: argparse.Namespace) -> str:
    """``--wandb`` as given, else :func:`default_mode`."""
    return args.wandb or default_mode()


def add_debug_flag(parser, help: str = DEBUG_HELP) -> None:
    parser.add_argument("--debug", action="store_true", help=help)


def add_set_flag(parser, help: str = SET_HELP) -> None:
    """``--set KEY=VALUE ...``, repeatable (``--set a.b=1 --set c.d=2`` and ``--set a.b=1 c.d=2`` both
    collect every item); read them with :func:`parse_sets`."""
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help=help)


def add_address_flag(parser, help: str = ADDRESS_HELP) -> None:
    """``--address``: a running Ray cluster to join."""
    parser.add_argument("--address", help=help)


def add_ray_actor_flags(parser, title: str = "on a Ray cluster (Ray Data actor pool; see ensemble/ray_predict.py)"):
    """``--ray``, ``--address``, ``--actors``, ``--cpus-per-actor``, ``--gpus-per-actor``: prediction by
    a Ray Data actor pool, as a group titled ``title``; check them with :func:`ray_actor_args`."""
    ray = parser.add_argument_group(title)
    ray.add_argument("--ray", action="store_true", help="predict with Ray Data on a Ray started on this machine")
    add_address_flag(ray, "predict with Ray Data on this running cluster (auto: the one this job runs in)")
    ray.add_argument("--actors", type=int, help="actor pool size [as many as the cluster's CPUs/GPUs hold]")
    ray.add_argument("--cpus-per-actor", type=float, default=1.0,
                     help="CPUs each actor reserves (and its torch threads) [1]")
    ray.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs each actor reserves [0]")
    return ray


def ray_actor_args(args: argparse.Namespace) -> argparse.Namespace:
    """Sets ``args.on_ray`` (``--ray`` or ``--address``); the actor flags without either are a
    :class:`ConfigError` (one line, exit 2)."""
    args.on_ray = bool(args.ray or args.address)
    if not args.on_ray and (args.actors is not None or args.cpus_per_actor != 1.0 or args.gpus_per_actor):
        raise ConfigError("command line", "--actors", "--actors, --cpus-per-actor and --gpus-per-actor need --ray "
                                                      "or --address")
    return args


def ray_actor_options(args: argparse.Namespace) -> dict:
    """The actor flags as keyword arguments of ensemble/ray_predict.py's entry points."""
    return {"address": args.address, "actors": args.actors, "cpus_per_actor": args.cpus_per_actor,
            "gpus_per_actor": args.gpus_per_actor}


def command_parser(description: str | None, add_arguments: Callable[[argparse.ArgumentParser], object],
                   ) -> argparse.ArgumentParser:
    """A script's parser: its module docstring as the description, its flags from ``add_arguments``
    (the same function ``seghpo <command>`` fills its subparser with)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


# durations (--time-budget, search.time_budget): 2h, 90m, 3600s, 1h30m or seconds
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | float | int, source: str = "command line", key: str = "--time-budget") -> float:
    """``2h``, ``90m``, ``3600s``, ``1h30m`` or a number of seconds -> seconds (> 0)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd]?)", str(text).strip().lower())
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smhd]?)", "", str(text).strip().lower()).strip():
            raise ConfigError(source, key, f"expected a duration such as 2h, 90m or 3600s, got {text!r}")
        seconds = sum(float(n) * UNITS[u or "s"] for n, u in parts)
    if not seconds > 0:
        raise ConfigError(source, key, f"expected a duration > 0, got {text!r}")
    return seconds
