"""W&B sweep program: one sweep run = one config trained on one fold, with the same training loop
and the same metric names as a Ray Tune trial, logged into the same W&B project.

    python tune/run.py --space smp.yaml --export-wandb-sweep sweep.yaml   # writes the sweep config
    wandb sweep sweep.yaml && wandb agent <entity/project/sweep id>      # W&B runs this program

Run by hand (or in a test) with ``--params params.json`` to supply the parameters a sweep would
put in ``wandb.config``; W&B's mode follows WANDB_MODE (offline by default without an API key).
``--set section.key=value`` overrides trial settings as in tune/run.py. ``tune/compare.py`` sets
the sweep's runs against the Tune experiment's.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from trainables.cli import add_set_flag, default_mode, exit_on_user_error, parse_sets  # noqa: E402
from trainables.folds import make_split  # noqa: E402
from tune.space import load_space, sample, with_demo, with_overrides  # noqa: E402
from tune.wandb_logging import SweepTrial  # noqa: E402


def sweep_trial(spec, fold: int, trial):
    """The trainer of one sweep run (``trial``: the sweep's parameters as an Optuna-like trial) and the
    sampled settings: built by the Tune trial's own builder (tune/trainable.py) from the same fixed
    config (tune/search.py), so a sweep run trains on a Tune trial's data, ``data.extra_train`` included."""
    from trainables.extra import check_extra_train  # lazy: start-up time (--help without torch)
    from tune.search import trial_base  # lazy: start-up time (--help without torch/ray)
    from tune.trainable import build_trainer  # lazy: start-up time (--help without torch/ray)

    base, data = trial_base(spec)
    f = base["folds"]
    folds, _ = make_split(f["strategy"], f["k"], f["seed"], data.ids, data.presence, f["group_regex"], f["holdout"])
    check_extra_train(base["data"], data, folds)
    sampled = sample(spec, trial, data.num_classes)
    trainer, _ = build_trainer({"fold": fold, **sampled}, base, folds)
    return trainer, sampled


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", required=True)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--data", help="as tune/run.py --data; without it the space's demo settings apply")
    p.add_argument("--params", type=Path, help="JSON of sweep parameters (instead of wandb.config)")
    p.add_argument("--project", default="segmentation-hpo")
    p.add_argument("--dir", type=Path, default=Path("runs/wandb-sweeps"))
    add_set_flag(p)
    return p


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import wandb

    spec = load_space(args.space, ROOT / "search_spaces")
    fixed = parse_sets(args.set)
    spec = with_overrides(with_demo(spec), fixed) if args.data is None \
        else with_overrides(spec, {**fixed, "data.path": args.data})
    params = json.loads(args.params.read_text()) if args.params else None
    args.dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=args.project, config=params, dir=str(args.dir), mode=default_mode(),
                     group=f"{spec.name}-sweep", tags=[f"fold{args.fold}", "wandb-sweep"])
    trainer, sampled = sweep_trial(spec, args.fold, SweepTrial(dict(run.config)))
    run.config.update({"fold": args.fold, **{f"resolved/{k}": v for k, v in sampled.items()}}, allow_val_change=True)
    for record in trainer.epochs():
        record.pop("improved")
        wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["epoch"])
    run.summary["best_score"] = trainer.best_score
    run.finish()


if __name__ == "__main__":
    main()
