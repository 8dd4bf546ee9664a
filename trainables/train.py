"""Train one fold from the command line, without Ray, and print per-epoch metrics.

    python -m trainables.train --data ../shared/data/camvid/train/annotations.json --fold 0 \
        --set data.max_size=160 train.image_size=[128,160] train.epochs=5 --out runs/plain

``--config`` takes a YAML of trial-config sections (or a search-space YAML: its ``fixed``
section is used); ``--set key=value`` overrides any dotted setting (values parsed as YAML).
The best checkpoint of the fold is written to ``--out/fold<k>/model.pt``, the per-epoch
records to ``--out/fold<k>/epochs.csv``.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
from pathlib import Path

import yaml

from trainables.checkpoint import save_checkpoint  # noqa: E402
from trainables.cli import DEBUG_SETTINGS, add_debug_flag, add_set_flag, command_parser, exit_on_user_error, parse_sets  # noqa: E402
from trainables.config import resolve, validate_config  # noqa: E402
from trainables.data import load_data  # noqa: E402
from trainables.errors import InputError  # noqa: E402
from trainables.extra import with_extra_train  # noqa: E402
from trainables.folds import coverage_table, fold_coverage, load_or_make_folds, train_val_indices  # noqa: E402
from trainables.io import atomic_write_text  # noqa: E402
from trainables.loop import FoldTrainer  # noqa: E402
from trainables.metrics import summary_line  # noqa: E402


def load_config_file(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(path, f"cannot read YAML ({exc})") from None
    return doc.get("fixed", doc) if isinstance(doc, dict) else {}


def records_csv(records: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in records for k in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys)
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="COCO json or image/mask folder (default: the shipped CamVid sample)")
    parser.add_argument("--config", type=Path, help="YAML with trial-config sections")
    add_set_flag(parser)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/plain"))
    add_debug_flag(parser)


def build_parser() -> argparse.ArgumentParser:
    return command_parser(__doc__, add_arguments)


def run(args: argparse.Namespace) -> None:
    """Train fold ``args.fold`` and write its best checkpoint and per-epoch records under ``args.out``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    overrides = {**(DEBUG_SETTINGS if args.debug else {}), **parse_sets(args.set)}
    if args.data:
        overrides["data.path"] = args.data
    cfg = resolve(load_config_file(args.config), overrides, source="command line")
    validate_config(cfg, source="command line")  # before the data loads
    d = cfg["data"]
    data = load_data(d)
    f = cfg["folds"]
    folds = load_or_make_folds(args.out / "folds.json", f["strategy"], k=f["k"], seed=f["seed"], ids=data.ids,
                               presence=data.presence,
                               fingerprint=data.fingerprint, group_regex=f["group_regex"], holdout=f.get("holdout"))
    print(coverage_table(fold_coverage(folds, data.ids, data.presence), data.class_names))
    train_idx, val_idx = train_val_indices(folds, args.fold, data.ids)
    labelled = len(data)  # data.extra_train: appended to training only
    data, train_idx = with_extra_train(data, train_idx, d, args.fold)
    extra = f" ({len(data) - labelled} extra)" if len(data) > labelled else ""
    print(f"{data.source}: {labelled} images, {data.num_classes} classes; fold {args.fold}: "
          f"{len(train_idx)} train{extra} / {len(val_idx)} val")
    trainer = FoldTrainer(cfg, data, train_idx, val_idx, fold=args.fold)
    fold_dir = args.out / f"fold{args.fold}"
    records = []
    for rec in trainer.epochs():
        records.append(rec)
        per_class = {"iou_per_class": [rec[f"val_iou/{n}"] for n in data.class_names]}
        line = summary_line({"miou": rec["val_miou"], "dice": rec["val_dice"], "pixel_acc": rec["val_pixel_acc"],
                             **({"biou": rec["val_biou"]} if "val_biou" in rec else {}), **per_class}, data.class_names)
        print(f"epoch {rec['epoch']:3d} loss {rec['train_loss']:.4f} val_loss {rec['val_loss']:.4f} | {line}"
              f" | {rec['epoch_time_s']:.1f}s", flush=True)
        atomic_write_text(fold_dir / "epochs.csv", records_csv(records))
    path = save_checkpoint(trainer.best_checkpoint(), fold_dir)
    print(f"best {trainer.metric} {trainer.best_score:.4f} at epoch {trainer.best_epoch}; checkpoint {path}")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
