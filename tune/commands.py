"""``seghpo``: every step of the pipeline as one command with subcommands.

    seghpo plan --data annotations.json --out my.yaml  # = python tune/plan.py ...: a space for this data
    seghpo tune --space segformer.yaml               # = python tune/run.py --space segformer.yaml
    seghpo ensemble --experiment runs/segformer-demo # = python ensemble/run.py ...
    seghpo predict --bundle BUNDLE --images test/ --out preds/
    seghpo tune --help                               # each subcommand's flags

Each subcommand is a module with ``add_arguments(parser)`` and ``run(args)`` (the module's own
``main`` runs the same two as a script); only the chosen one is imported, so ``seghpo --help``
starts without torch or Ray.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from trainables.cli import exit_on_user_error

# subcommand -> (module, one line of help); the module is imported only when its subcommand is chosen
COMMANDS = {
    "plan": ("tune.plan", "plan a search space for a dataset and this machine"),
    "tune": ("tune.run", "search models and hyperparameters across k folds (Ray Tune)"),
    "ensemble": ("ensemble.run", "ensemble a search's best trials and write the bundle"),
    "predict": ("ensemble.predict", "predict with an ensemble bundle alone"),
    "train": ("trainables.train", "train one fold without Ray"),
    "report": ("tune.report", "write an experiment's report page"),
    "compare": ("tune.compare", "compare a search with a W&B sweep on one fold"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``seghpo`` parser; ``command``'s subparser gets its module's flags (the others only their
    line of help, so that listing them imports nothing)."""
    parser = argparse.ArgumentParser(prog="seghpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, summary) in COMMANDS.items():
        sp = sub.add_parser(name, help=summary, description=summary,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == command:
            module = importlib.import_module(module_name)  # lazy: start-up time (--help without torch/ray)
            sp.description = module.__doc__
            module.add_arguments(sp)
            sp.set_defaults(handler=module.run)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
