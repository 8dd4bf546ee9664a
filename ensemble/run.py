"""Ensemble the best trials of a finished search, tune class-wise thresholds out-of-fold, predict.

    python ensemble/run.py --experiment runs/segformer-demo
    python ensemble/run.py --experiment runs/smp --top-k 3 --tta hflip --predict test_images/ --out preds/

Writes runs/<name>/ensemble/: members.json, thresholds.json, oof_metrics.json with (a) the best
single trial per fold, (b) the ensemble at default decisions and (c) the ensemble with tuned
thresholds, all on the same out-of-fold pixels, and plots (iou_bars.png, threshold_curves.png,
confusion.png, overlays.png). With a holdout (folds.holdout), how the bundle combines the members
(uniform average, best member, or a fitted keep/drop that must beat both, cross-fitted on the
holdout: ensemble/combine.py) is decided there and recorded under ``combination``; without one,
that comparison is unknown and the uniform average is shipped. --predict runs the bundle's members
on new images (see ensemble/infer.py for the output format); --distill ARCH trains one student on
the ensemble's probabilities, with a bundle and rows of its own (ensemble/distill.py).

The work is done by the named steps of ensemble/steps.py (and ensemble/extras.py for --predict,
--pseudo-label, --cam); this module parses the flags, calls them in order, then writes the report.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from trainables.cli import (add_debug_flag, add_ray_actor_flags, add_wandb_flags, command_parser, exit_on_user_error,
                            ray_actor_args, wandb_mode)
from trainables.errors import ConfigError
from trainables.rows import FIELDS, NO_HOLDOUT, OOF_NOTE, OOF_ROWS, ROWS, format_table

logger = logging.getLogger("ensemble")

ENSEMBLE_DEBUG_HELP = ("check the ensemble step in about a minute: 1 member per fold, no TTA, 4 out-of-fold images "
                       "per fold, refits of one 2-batch epoch, written to runs/<name>/ensemble-debug")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", type=Path, required=True, help="runs/<name> written by tune/run.py")
    p.add_argument("--top-k", type=int, default=3, help="members per fold [3]")
    p.add_argument("--selection", choices=["topk", "greedy"], default="topk",
                   help="greedy: forward selection on out-of-fold score among the top 2k of each fold")
    p.add_argument("--voting", choices=["soft", "hard"], default="soft")
    p.add_argument("--tta", default="none", help="none | hflip | hflip,scales=0.75:1:1.25")
    p.add_argument("--min-area", action="store_true", help="also tune per-class minimum component areas")
    p.add_argument("--max-ms-per-image", type=float, metavar="MS",
                   help="latency budget of prediction on --device: members and TTA views are chosen greedily by "
                        "out-of-fold gain per measured millisecond (at least one member per fold); the thresholds "
                        "are then tuned for that set (ensemble/latency.py)")
    p.add_argument("--predict", type=Path, help="folder of images or COCO json to predict")
    p.add_argument("--out", type=Path, help="where --predict writes [runs/<name>/ensemble/predictions]")
    p.add_argument("--save-probs", action="store_true", help="also write float16 probabilities")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    add_wandb_flags(p, "log the report to the experiment's W&B group")
    p.add_argument("--crf", action="store_true",
                   help="fit a fully connected CRF on the out-of-fold probabilities (kept only if it helps; "
                        "needs pydensecrf2); row (d) of the report, applied by --predict and --pseudo-label")
    p.add_argument("--pseudo-label", type=Path, metavar="UNLABELED",
                   help="write the ensemble's labels of these images as a mask folder for data.extra_train")
    p.add_argument("--pseudo-out", type=Path, help="where --pseudo-label writes [runs/<name>/pseudo]")
    p.add_argument("--pseudo-confidence", type=float, default=0.9,
                   help="pixels whose probability of their label is below this are ignored (255) [0.9]")
    p.add_argument("--pseudo-per-fold", action="store_true",
                   help="one label set per fold, from that fold's members only: <pseudo-out>/fold<k>")
    p.add_argument("--compare", type=Path, metavar="RUN_DIR",
                   help="another experiment on the same folds (e.g. without pseudo-labels): out-of-fold mIoU side by side")
    p.add_argument("--cam", metavar="CLASS", help="Grad-CAM overlays of this class (name or index) for each fold's best member")
    p.add_argument("--cam-images", default="4", help="number of out-of-fold images, or a folder of images [4]")
    p.add_argument("--distill", metavar="ARCH",
                   help="also train one student on the ensemble's probabilities (out-of-fold for the training "
                        "images), e.g. Unet:resnet18 (ARCH alone keeps the best member's encoder); its own bundle "
                        "and rows beside the ensemble's in runs/<name>/ensemble/distill (ensemble/distill.py)")
    p.add_argument("--unlabeled", type=Path, metavar="DIR",
                   help="with --distill: images without labels, taught by the shipped ensemble's probabilities")
    p.add_argument("--distill-temperature", type=float, default=2.0, metavar="T", help="softening of the targets [2]")
    p.add_argument("--distill-alpha", type=float, default=0.5, metavar="ALPHA",
                   help="weight of the soft term; 1 - alpha on the true labels [0.5]")
    p.add_argument("--distill-epochs", type=int, metavar="N", help="student epochs [the best member's train.epochs]")
    p.add_argument("--refit", type=int, metavar="N",
                   help="retrain the N best configurations on every training image (the holdout excluded) for the "
                        "median of their fold trials' best epochs, as Ray tasks (a private local Ray, or --address), "
                        "and offer them to the holdout's combination as members; never in out-of-fold rows. "
                        "Needs folds.holdout (ensemble/refit.py)")
    add_debug_flag(p, ENSEMBLE_DEBUG_HELP)
    add_ray_actor_flags(p, "--predict / --pseudo-label on a Ray cluster (a Ray Data actor pool: "
                           "ensemble/ray_predict.py)")


def build_parser() -> argparse.ArgumentParser:
    return command_parser(__doc__, add_arguments)


def parse_args(argv) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def log_to_wandb(run_dir: Path, out_dir: Path, report: dict, mode: str, project: str) -> None:
    """The out-of-fold table and plots as one W&B run in the experiment's group (job type ensemble)."""
    import wandb

    run = wandb.init(project=project, group=run_dir.resolve().name, job_type="ensemble", name=f"{run_dir.name}-ensemble",
                     dir=str(run_dir), mode=mode, config={"experiment": str(run_dir)})
    table = wandb.Table(columns=["", "mIoU", "mean Dice", "boundary IoU", "pixel acc"])
    rows = [(k, label + (" (cross-fitted)" if k in ("tuned", "crf") else "")) for k, label in OOF_ROWS.items()]
    rows += [(f"{k}_in_sample", f"{OOF_ROWS[k]} (in-sample)") for k in ("tuned", "crf")]
    for key, label in rows:
        if key in report:
            table.add_data(label, *(report[key].get(f) for f in ("miou", "dice", "biou", "pixel_acc")))
    run.log({"ensemble/oof": table, **{f"ensemble/{k}_miou": report[k]["miou"] for k, _ in rows if k in report},
             **{f"ensemble/{p.stem}": wandb.Image(str(p)) for p in sorted(out_dir.glob("*.png"))}})
    run.finish()


def run(args: argparse.Namespace) -> None:
    """The steps of ensemble/steps.py in order (their tables printed), the extras asked for
    (ensemble/extras.py), then the report: plots, W&B and the experiment's report page."""
    # lazy: start-up time (--help without torch/ray)
    from ensemble import extras, steps

    ray_actor_args(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options = steps.EnsembleOptions(top_k=args.top_k, selection=args.selection, voting=args.voting, tta=args.tta,
                                    min_area=args.min_area, max_ms_per_image=args.max_ms_per_image, crf=args.crf,
                                    batch_size=args.batch_size, device=args.device, debug=args.debug)
    if args.debug:  # one member per fold, no TTA
        options = dataclasses.replace(options, top_k=1, tta="none", selection="topk")
    ray = (extras.RayOptions(args.address, args.actors, args.cpus_per_actor, args.gpus_per_actor)
           if args.on_ray else None)
    steps.check_options(options)
    distilled = distill_options(args)
    exp = steps.load_experiment_run(args.experiment, options)
    refits, refit_records = steps.refit(exp, args.refit, options=options, connect=lambda: connect_ray(args.address))
    members = steps.select_members(exp, options)
    oof = steps.out_of_fold(exp, members, options=options)
    post = steps.post_processing(exp, members, oof=oof, options=options)
    combined = steps.combination(exp, members, oof=oof, post=post, options=options, refits=refits)
    bundle_dir = steps.bundle(exp, members, oof=oof, post=post, combined=combined, options=options)
    report = steps.oof_metrics(exp, members, oof=oof, post=post, combined=combined, compare=args.compare,
                               refits=refit_records)
    print_report(report, exp.data.class_names)
    predicted = {}
    if args.predict:
        predicted = extras.predict(exp, bundle_dir, images=args.predict, out=args.out, save_probs=args.save_probs,
                       options=options, ray=ray)
    if args.pseudo_label:
        extras.pseudo_labels(exp, members, oof=oof, post=post, bundle_dir=bundle_dir, shipped=combined.shipped,
                             pseudo=extras.PseudoOptions(args.pseudo_label, args.pseudo_out, args.pseudo_confidence,
                                                         args.pseudo_per_fold),
                             options=options, ray=ray)
    if args.cam:
        extras.cam(exp, members, cls=args.cam, images=args.cam_images)
    if distilled:
        from ensemble.distill import distill_step  # lazy: start-up time (--help without torch/ray)

        distill_step(exp, members, oof=oof, combined=combined, bundle_dir=bundle_dir, options=options,
                     distill=distilled, test=args.predict, test_rows=predicted.get("test_rows"))
    write_reports(exp, members, oof, report, args)


def distill_options(args: argparse.Namespace):
    """--distill and its companions, checked before anything loads (None without --distill)."""
    from ensemble import distill  # lazy: start-up time (--help without torch/ray)

    if not args.distill:
        if args.unlabeled:
            raise ConfigError("command line", "--unlabeled", "only with --distill ARCH")
        return None
    options = distill.DistillOptions(args.distill, args.unlabeled, args.distill_temperature, args.distill_alpha,
                                     args.distill_epochs)
    distill.check_options(options)
    return options


def connect_ray(address: str | None) -> None:
    """Ray for --refit's tasks: the cluster at ``address``, else a private local Ray (the connection
    --predict's actor pool makes)."""
    from ensemble.ray_predict import connect  # lazy: start-up time (--help without torch/ray)

    connect(address)


def print_report(report: dict, class_names: list[str]) -> None:
    """The out-of-fold table, the holdout's, the combination shipped, the CRF and --compare."""
    from ensemble.combine import describe, summary  # lazy: start-up time (--help without torch/ray)

    print_table(report, class_names)
    if "holdout" in report:
        h = report["holdout"]
        print("\n" + format_table(h, class_names, f"holdout ({h['images']} images)")
              + f"\nrows (b)-(d): the shipped {describe(h['combination'])}; prediction applies row {ROWS[h['applied']]}")
    if report.get("refits"):
        r = report["refits"]
        offered = ", ".join(f"{m['name']} ({m['epochs']} epoch{'s' if m['epochs'] != 1 else ''})" for m in r["members"])
        print(f"refits offered: {offered}; "
              f"shipped: {', '.join(r['shipped']) or 'none'}. Holdout rows (b)-(d) and the bundle's (test) rows "
              f"include {'the shipped refits' if r['shipped'] else 'no refit'}; out-of-fold rows never do")
    print(summary(report["combination"]))
    print_extras(report)


def write_reports(exp, members, oof, report: dict, args: argparse.Namespace) -> None:
    """After the steps: the plots, the W&B run and the experiment's report page."""
    from ensemble.report import write_plots  # lazy: start-up time (--help without torch/ray)
    from tune.report import write_report  # lazy: start-up time (--help without torch/ray)

    out_dir = exp.out.root
    write_plots(out_dir, report, oof.thresholds, exp.data, members.ensembles, exp.folds, exp.max_size)
    mode = wandb_mode(args)
    if mode != "disabled":
        log_to_wandb(exp.run_dir, out_dir, report, mode, args.wandb_project)
    print(f"report: {out_dir} (and {write_report(exp.run_dir)})")


@exit_on_user_error
def main(argv=None) -> None:
    run(parse_args(argv))


def print_table(report: dict, class_names: list[str]) -> None:
    """(a), (b), then (c) and (d) cross-fitted with their in-sample scores beside them; under the
    table, that (b)'s members were chosen on these images and the holdout is the number to quote."""
    from ensemble.crossfit import optimism_summary  # lazy: start-up time (--help without torch/ray)

    cols = [(k, OOF_ROWS[k]) for k in ("single", "ensemble") if k in report]
    for k in ("tuned", "crf"):
        if k in report:
            cols += [(k, f"{ROWS[k]} x-fit"), (f"{k}_in_sample", "in-sample")]
    print(f"\nout-of-fold ({report['oof_images']} images; x-fit: each fold scored with decisions fitted on the "
          "others)\n" + " " * 28 + "".join(f"{label:>26}" for _, label in cols))
    for label, field in FIELDS:
        print(f"{label:<28}" + "".join(f"{report[k].get(field, float('nan')):>26.4f}" for k, _ in cols))
    for c, name in enumerate(class_names):
        print(f"  IoU {name:<22}" + "".join(f"{report[k]['iou_per_class'][c]:>26.4f}" for k, _ in cols))
    if "ensemble" in report:
        print(OOF_NOTE + ("" if "holdout" in report else f"; {NO_HOLDOUT}"))
    if report.get("steps"):
        print(optimism_summary(report["steps"]))
    if report.get("selection"):
        for fold, sel in sorted(report["selection"]["folds"].items()):
            print(f"greedy selection fold {fold} ({sel['metric']}): {sel['cross_fitted']:.4f} cross-fitted on half-folds, "
                  f"{sel['in_sample']:.4f} in-sample, top-k {sel['topk']:.4f}: {'kept' if sel['kept'] else 'top-k kept'}")


def print_extras(report: dict) -> None:
    """The CRF decision and the --compare table, under the out-of-fold table."""
    if report.get("postprocessing"):
        p, step = report["postprocessing"], report["steps"]["crf"]
        print(f"CRF {'kept' if p['kept'] else 'not kept'}: {step['metric']} {step['cross_fitted'] - step['gain']:.4f} "
              f"without, {step['cross_fitted']:.4f} with, cross-fitted ({p['params']})")
    if report.get("compare"):
        keys = [k for k in OOF_ROWS if all(k in report["compare"][side] for side in ("this", "other"))]
        print("\nout-of-fold mIoU" + " " * 8 + "".join(f"{OOF_ROWS[k]:>26}" for k in keys) + "  extra_train")
        for key in ("this", "other"):
            r = report["compare"][key]
            print(f"{Path(r['experiment']).name[:24]:<24}" + "".join(f"{r[k]:>26.4f}" for k in keys)
                  + f"  {r['extra_train'] or '-'}")


if __name__ == "__main__":
    main()
