"""Search architectures, losses, class weights and learning rates across k folds with Ray Tune.

    python tune/run.py --space segformer.yaml                 # demo: the shipped CamVid sample, CPU
    python tune/run.py --space smp.yaml --data path/to/annotations.json --gpus-per-trial 0.5
    python tune/run.py --space smp.yaml --data ... --name smp --resume     # continue after a crash
    python tune/run.py --space smp.yaml --data path/to/annotations.json --plan --time-budget 8h

Without --data the space's ``demo:`` overrides apply (small images, few epochs and trials) so the
command finishes in minutes on a laptop CPU; with --data the space runs as written. With --plan, the
space's fixed half is planned for the data and this machine first (tune/plan.py: printed, written to
<storage>/plans/) and the space given is the base whose searched half is kept; a planned space is
recorded in the run (plan.yaml, plan.fingerprint.json). Every setting can be overridden: the flags
below, or ``--set section.key=value`` for any trial setting.
Results: runs/<name>/ (trials.csv, experiment.json, folds.json, studies.db, tune/ = Ray experiment).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Collection
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from trainables.cli import (DEBUG_HELP, DEBUG_SETTINGS, add_address_flag, add_debug_flag, add_set_flag,  # noqa: E402
                            add_wandb_flags, command_parser, exit_on_user_error, parse_sets, wandb_mode)
from trainables.errors import ConfigError  # noqa: E402
from trainables.io import atomic_write_text  # noqa: E402
from tune.rundir import earlier_state  # noqa: E402
from tune.space import load_space, with_demo, with_overrides  # noqa: E402
from tune.wandb_logging import sweep_config  # noqa: E402


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", required=True, help="search_spaces/<name>.yaml, a name, or a path")
    p.add_argument("--plan", action="store_true",
                   help="plan the fixed half for --data first (seghpo plan, with --time-budget [8h]); --space is "
                        "the base whose searched half is kept")
    p.add_argument("--data", help="COCO json or image/mask folder (default: the shipped sample, demo budget)")
    p.add_argument("--images", help="image root of a COCO json (default: <json dir>/images)")
    p.add_argument("--task", choices=["multiclass", "multilabel"])
    p.add_argument("--name", help="experiment name (default: the space's name; '-demo' added for the demo)")
    p.add_argument("--storage", type=Path, default=Path("runs"), help="where runs/<name>/ goes [runs]")
    p.add_argument("--trial-storage", metavar="PATH_OR_URI",
                   help="where the trials write results and checkpoints (Tune's storage_path): a directory every "
                        "node sees, or s3://bucket/prefix, gs://... [runs/<name>/tune]")
    p.add_argument("--resume", action="store_true", help="continue the experiment runs/<name>")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in runs/<name> (by default a new run there is refused)")
    p.add_argument("--folds", type=int, help="number of folds k")
    p.add_argument("--fold-strategy", choices=["kfold", "stratified", "multilabel", "group"])
    p.add_argument("--group-regex", help="group key regex on file names (fold strategy 'group')")
    p.add_argument("--num-samples", type=int, help="trials per fold")
    p.add_argument("--max-epochs", type=int, help="epochs of a trial that is not stopped early")
    p.add_argument("--epoch-budget", type=int, metavar="N",
                   help="total training epochs of all trials and folds: no trial starts that would not fit its "
                        "next rung (tune/budget.py); with --resume, the experiment's new total")
    p.add_argument("--time-budget", metavar="DURATION",
                   help="wall-clock limit of the search (2h, 90m, 3600s): trials that would not finish their next "
                        "rung in time do not start; with --resume, the experiment's new total")
    p.add_argument("--metric", help="metric to optimise (val_miou, val_dice, val_biou, ...)")
    p.add_argument("--mode", choices=["max", "min"])
    p.add_argument("--seed", type=int, help="Optuna sampler seed")
    p.add_argument("--search-folds", type=int, nargs="+", help="search only these folds, retrain top configs on the rest")
    p.add_argument("--cpus-per-trial", type=float)
    p.add_argument("--gpus-per-trial", type=float, help="fractional packs several trials on one GPU")
    p.add_argument("--workers-per-trial", type=int,
                   help="data-parallel workers of one trial (a Ray Train run); --cpus/--gpus-per-trial are then "
                        "per worker [1]")
    p.add_argument("--max-concurrent", type=int)
    p.add_argument("--max-failures", type=int, default=0, help="retries of a failing trial [0]")
    add_address_flag(p)
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard (127.0.0.1:8265) locally")
    add_set_flag(p)
    add_wandb_flags(p, "W&B logging of every trial")
    p.add_argument("--export-wandb-sweep", type=Path, metavar="SWEEP_YAML",
                   help="write the space as a W&B sweep config (one fold: --sweep-fold) and exit")
    p.add_argument("--sweep-fold", type=int, default=0)
    add_debug_flag(p, DEBUG_HELP + ", one trial per fold (runs/<name>-debug)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also print every trial's output, W&B's and Tune's own trial table (by default they go to "
                        "the trial logs, runs/<name>/tune/<trial>/stdout|stderr, and one progress view is shown)")


def build_parser() -> argparse.ArgumentParser:
    return command_parser(__doc__, add_arguments)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def overrides(args: argparse.Namespace, searched: Collection[str] = ()) -> tuple[dict, dict, dict]:
    """Fixed settings, search settings and resources from the flags; ``searched``: the space's parameters,
    which ``--debug``'s defaults leave to the search (a space that searches train.batch_size keeps it)."""
    fixed = parse_sets(args.set)
    for key, value in (("data.path", args.data), ("data.images", args.images), ("data.task", args.task),
                       ("folds.k", args.folds), ("folds.strategy", args.fold_strategy),
                       ("folds.group_regex", args.group_regex), ("train.epochs", args.max_epochs)):
        if value is not None:
            fixed[key] = value
    search = {k: v for k, v in (("num_samples", args.num_samples), ("metric", args.metric), ("mode", args.mode),
                                ("seed", args.seed), ("search_folds", args.search_folds),
                                ("epoch_budget", args.epoch_budget), ("time_budget", args.time_budget))
              if v is not None}
    if args.debug:
        fixed = {**{k: v for k, v in DEBUG_SETTINGS.items() if k not in searched}, **fixed}
        search.setdefault("num_samples", 1)
    resources = {k: v for k, v in (("cpus_per_trial", args.cpus_per_trial), ("gpus_per_trial", args.gpus_per_trial),
                                   ("max_concurrent", args.max_concurrent),
                                   ("workers_per_trial", args.workers_per_trial)) if v is not None}
    return fixed, search, resources


def debug_resources(asked: dict, address: str | None) -> dict:
    """``--debug`` on a local Ray: trials take what this machine has, two at a time, so a space written
    for GPUs (``smp.yaml``: 4 CPUs and half a GPU a trial) is checked on a CPU laptop too."""
    from tune.cluster import local_resources, starts_local_ray  # lazy: start-up time (--help without ray)

    if not starts_local_ray(address):
        return {}
    cpus, gpus = local_resources()
    n = int(asked.get("workers_per_trial") or 1)  # per worker then: the trial's workers share the machine
    fit = {"cpus_per_trial": min(float(asked["cpus_per_trial"]), max(1.0, cpus // (2 * n)) if cpus >= n else cpus / n),
           "gpus_per_trial": min(float(asked["gpus_per_trial"]), gpus // n if n > 1 else gpus)}
    if any(fit[k] != float(asked[k]) for k in fit):
        print(f"debug: a trial takes {fit['cpus_per_trial']:g} CPU and {fit['gpus_per_trial']:g} GPU on this machine "
              f"(the space asks for {float(asked['cpus_per_trial']):g} and {float(asked['gpus_per_trial']):g})")
    return fit


def export_sweep(spec, args: argparse.Namespace) -> None:
    import yaml

    from trainables.data import load_data  # lazy: start-up time (--help without torch)

    d = spec.base_config()["data"]
    data = load_data(d)
    config = sweep_config(spec, data.num_classes, args.sweep_fold, args.wandb_project, args.space,
                          str(Path(args.data).resolve()) if args.data else None)
    atomic_write_text(args.export_wandb_sweep, yaml.safe_dump(config, sort_keys=False))
    print(f"W&B sweep config for fold {args.sweep_fold}: {args.export_wandb_sweep} "
          f"({len(config['parameters'])} parameters)\nnext: wandb sweep {args.export_wandb_sweep}")


def plan_first(args: argparse.Namespace) -> Path:
    """``--plan``: the planned space for ``--data`` from the base ``--space`` (tune/plan.py)."""
    if not args.data:
        raise ConfigError("command line", "--plan", "needs --data: the dataset to plan the space for")
    if args.resume:
        raise ConfigError("command line", "--plan", "a resumed run keeps its space: give --space runs/<name>/plan.yaml "
                                                    "without --plan")
    # lazy: start-up time (the planner measures with torch; --help and plain searches need none of it here)
    from tune.plan import DEFAULT_BUDGET, make_plan

    out = args.storage / "plans" / f"{Path(args.space).stem}-{Path(args.data).resolve().stem}.yaml"
    plan_args = argparse.Namespace(data=args.data, images=args.images, task=args.task, space=args.space,
                                   time_budget=args.time_budget or DEFAULT_BUDGET, gpus=None, out=out, cache_dir=None)
    args.time_budget = plan_args.time_budget
    return make_plan(plan_args)


def record_plan(space: Path, run_dir: Path) -> None:
    """A planned space (``seghpo plan`` wrote its fingerprint beside it) and the fingerprint, kept in the run."""
    from tune.plan import fingerprint_path  # lazy: start-up time (the planner imports torch to measure)

    fingerprint = fingerprint_path(space)
    if fingerprint.is_file():
        atomic_write_text(run_dir / "plan.yaml", space.read_text())
        atomic_write_text(run_dir / "plan.fingerprint.json", fingerprint.read_text())


def run(args: argparse.Namespace) -> None:
    """The search (tune/search.py), then the experiment's report page (tune/report.py)."""
    if args.overwrite and args.resume:
        raise ConfigError("command line", "--overwrite", "replaces the earlier run, --resume continues it: "
                                                         "give one of the two")
    planned = plan_first(args) if args.plan else None
    if planned:
        args.space = str(planned)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic trial table, with our columns
    if not args.verbose:  # read once, when Ray and W&B are imported (tune/progress.py: what -v shows)
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "10")
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created" per fold
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    spec = load_space(args.space, ROOT / "search_spaces")
    demo = args.data is None and not spec.fixed.get("data", {}).get("path")
    if demo:
        spec = with_demo(spec)
        print(f"demo: no --data given, running {spec.source.name} on the shipped CamVid sample with its demo budget")
    mode = wandb_mode(args)
    fixed, search, resources = overrides(args, spec.space)
    if args.debug:
        resources = {**debug_resources({**spec.resources, **resources}, args.address), **resources}  # flags win
    if mode == "disabled":
        fixed.setdefault("train.preview_images", 0)  # example predictions are only for W&B
    spec = with_overrides(spec, fixed, search, resources)
    name = args.name or (f"{spec.name}-demo" if demo else spec.name)
    if args.debug:
        name += "-debug"
        print(f"debug: {DEBUG_HELP} -> {args.storage / name}")
    if args.export_wandb_sweep:
        export_sweep(spec, args)
        return
    from tune.report import write_report  # lazy: start-up time (--help without torch/ray)
    from tune.search import run_search  # lazy: start-up time (--help without torch/ray)

    run_dir = args.storage / name
    overwrite = args.overwrite or (args.debug and not args.resume)  # --debug always replaces its last run
    if overwrite and earlier_state(run_dir):
        print(f"{'debug: ' if args.debug else ''}replacing the earlier {'debug ' if args.debug else ''}run {run_dir}")
    rows = run_search(spec, run_dir, resume=args.resume, address=args.address, max_failures=args.max_failures,
                      trial_storage=args.trial_storage, overwrite=overwrite,
                      dashboard=args.dashboard, wandb_mode=mode,
                      wandb_project=args.wandb_project, verbose=args.verbose)
    record_plan(Path(spec.source), run_dir)
    print(f"report: {write_report(run_dir)}")
    ok = [r for r in rows if r["status"] in ("completed", "stopped")]
    if not ok and rows and all(r["status"] == "not_run_budget" for r in rows):
        print("the budget let no trial run: raise --epoch-budget / --time-budget", file=sys.stderr)
        raise SystemExit(1)
    if not ok:
        errors = sorted({r["error"] for r in rows if r.get("error")})
        print(f"every trial failed ({len(rows)}); errors:\n  " + "\n  ".join(errors), file=sys.stderr)
        raise SystemExit(1)
    print(f"\nresults: {run_dir}/trials.csv ({len(rows)} trials)\n"
          f"next: python ensemble/run.py --experiment {run_dir}")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
