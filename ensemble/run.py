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
on new images (see ensemble/infer.py for the output format).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from trainables.cli import exit_on_user_error
from trainables.errors import ConfigError, InputError
from trainables.runfiles import RunFiles, read_experiment, read_folds, read_trials_csv

logger = logging.getLogger("ensemble")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--wandb", choices=["offline", "online", "disabled"],
                   help="log the report to the experiment's W&B group [offline, online with an API key]")
    p.add_argument("--wandb-project", default="segmentation-hpo")
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
    p.add_argument("--debug", action="store_true",
                   help="check the ensemble step in about a minute: 1 member per fold, no TTA, 4 out-of-fold images "
                        "per fold, written to runs/<name>/ensemble-debug")
    ray = p.add_argument_group("--predict / --pseudo-label on a Ray cluster (a Ray Data actor pool: "
                               "ensemble/ray_predict.py)")
    ray.add_argument("--ray", action="store_true", help="on a Ray started on this machine")
    ray.add_argument("--address", help="on this running cluster (auto: the one this job runs in)")
    ray.add_argument("--actors", type=int, help="actor pool size [as many as the cluster's CPUs/GPUs hold]")
    ray.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs each actor reserves [1]")
    ray.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs each actor reserves [0]")
    args = p.parse_args(argv)
    args.on_ray = bool(args.ray or args.address)
    return args


def ray_options(args) -> dict:
    """Keyword arguments of ensemble/ray_predict.py's entry points from the command line."""
    return {"address": args.address, "actors": args.actors, "batch_size": args.batch_size,
            "cpus_per_actor": args.cpus_per_actor, "gpus_per_actor": args.gpus_per_actor, "device": args.device}


def log_to_wandb(run_dir: Path, out_dir: Path, report: dict, mode: str, project: str) -> None:
    """The out-of-fold table and plots as one W&B run in the experiment's group (job type ensemble)."""
    import wandb

    run = wandb.init(project=project, group=run_dir.resolve().name, job_type="ensemble", name=f"{run_dir.name}-ensemble",
                     dir=str(run_dir), mode=mode, config={"experiment": str(run_dir)})
    from trainables.rows import OOF_ROWS

    table = wandb.Table(columns=["", "mIoU", "mean Dice", "boundary IoU", "pixel acc"])
    rows = [(k, label + (" (cross-fitted)" if k in ("tuned", "crf") else "")) for k, label in OOF_ROWS.items()]
    rows += [(f"{k}_in_sample", f"{OOF_ROWS[k]} (in-sample)") for k in ("tuned", "crf")]
    for key, label in rows:
        if key in report:
            table.add_data(label, *(report[key].get(f) for f in ("miou", "dice", "biou", "pixel_acc")))
    run.log({"ensemble/oof": table, **{f"ensemble/{k}_miou": report[k]["miou"] for k, _ in rows if k in report},
             **{f"ensemble/{p.stem}": wandb.Image(str(p)) for p in sorted(out_dir.glob("*.png"))}})
    run.finish()


def load_experiment(run_dir: Path) -> tuple[dict, list[list[str]], list[dict]]:
    """experiment.json, the folds and the rows of trials.csv of a finished search."""
    return read_experiment(run_dir), read_folds(run_dir), read_trials_csv(RunFiles(run_dir).trials_csv)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ensemble.members import local_checkpoint, top_k
    from ensemble.predictor import TTA, Ensemble, load_member
    from trainables.data import load_data
    from trainables.io import atomic_write_json

    if args.debug:
        args.top_k, args.tta, args.selection = 1, "none", "topk"
    run_dir = args.experiment
    if args.crf:
        from ensemble.crf import missing

        if missing():
            raise ConfigError("command line", "--crf", missing())
    experiment, folds, rows = load_experiment(run_dir)
    settings = experiment["settings"]
    metric, mode = settings["search"]["metric"], settings["search"]["mode"]
    from trainables.metrics import empty_score

    empty = empty_score(settings["fixed"].get("metrics", {}).get("empty", 1))  # per-image metrics' empty pairs
    try:
        tta = TTA.parse(args.tta)
    except ValueError as exc:
        raise ConfigError("command line", "--tta", str(exc)) from None
    pool = top_k(rows, metric, mode, args.top_k * (2 if args.selection == "greedy" else 1))
    d = settings["fixed"]["data"]
    data = load_data(d)
    if data.fingerprint != experiment["dataset"]["fingerprint"]:
        raise InputError(d["path"], "the dataset changed since the search: out-of-fold results would be mixed")
    files = RunFiles(run_dir)
    out = files.ensemble(args.debug)
    out_dir = out.root
    ensembles = {}
    from trainables.device import resolve_device

    device = resolve_device(args.device)
    for fold, chosen in pool.items():
        # a URI (trials in an object store) is fetched once into the run directory
        members = [load_member(local_checkpoint(r["checkpoint"], files.checkpoints_dir), r["trial_id"], device)
                   for r in chosen]
        ensembles[fold] = Ensemble(members, tta, args.voting, device)
    selection = None
    if args.selection == "greedy":
        from ensemble.selection import greedy_members

        ensembles, selection = greedy_members(ensembles, data, folds, d["max_size"], args.top_k, metric, mode,
                                              empty=1.0 if empty is None else empty)
    latency = None
    if args.max_ms_per_image is not None:
        from ensemble.latency import budget_members, summary_line

        if not args.max_ms_per_image > 0:
            raise ConfigError("command line", "--max-ms-per-image", f"expected milliseconds > 0, got {args.max_ms_per_image:g}")
        ensembles, args.tta, latency = budget_members(ensembles, data, folds, d["max_size"], args.max_ms_per_image,
                                                           metric, mode, empty=1.0 if empty is None else empty,
                                                           max_images=4 if args.debug else None)
        tta = TTA.parse(args.tta)
        print(summary_line(latency))
    members_json = {str(f): [{"trial_id": m.name, "score": m.score, "epoch": m.meta["epoch"],
                              "checkpoint": next(r["checkpoint"] for r in pool[f] if r["trial_id"] == m.name)}
                             for m in e.members] for f, e in ensembles.items()}
    atomic_write_json(out.members_json, {"selection": args.selection, "top_k": args.top_k,
                                         "voting": args.voting, "tta": args.tta, "members": members_json})
    from ensemble.crossfit import score_key
    from ensemble.oof import oof_evaluate
    from trainables.rows import ROWS

    result = oof_evaluate(ensembles, data, folds, d["max_size"], out_dir, args.batch_size, args.min_area,
                          max_per_fold=4 if args.debug else None, metric=metric, empty=empty)
    thresholds = result["thresholds"]  # fitted on all out-of-fold predictions: what --predict applies if kept
    atomic_write_json(out.thresholds_json, thresholds)
    report = {k: v for k, v in result.items() if k in ROWS or k.endswith("_in_sample") or k == "thresholds_only"}
    report["class_names"] = data.class_names
    report["oof_images"] = len(result["images"])
    report["extra_train"] = d.get("extra_train")  # pseudo-labels (or other extra data) the members trained on
    report["steps"] = result["steps"]
    if selection:
        report["selection"] = selection
    if latency:
        report["latency"] = latency
    post = {"crf": None, "steps": result["steps"]}
    if args.crf:
        from ensemble.crf import crf_step

        report["crf"], report["crf_in_sample"], crf = crf_step(result, next(iter(ensembles.values())), data,
                                                               d["max_size"], out_dir, args.min_area,
                                                               metric=metric, empty=empty)
        post.update(crf)
        report["steps"] = post["steps"] = {**result["steps"], "crf": crf["crf"]["step"]}
        report["postprocessing"] = {k: v for k, v in crf["crf"].items() if k not in ("thresholds", "step")}
    from trainables.folds import read_holdout

    holdout = read_holdout(files.folds_json)
    weights = None  # how the bundle combines every fold's members: decided on the holdout (None: uniform)
    if holdout:
        from ensemble.combine import combine_on_holdout
        from ensemble.holdout import everyone, holdout_indices, holdout_step
        from ensemble.predictor import best_member_index

        ens = everyone(ensembles)
        weights, report["combination"] = combine_on_holdout(
            ens, data, holdout_indices(data, holdout), metric, mode, best_member_index(ens.members, mode),
            empty=1.0 if empty is None else empty, seed=int(settings["fixed"].get("folds", {}).get("seed", 0)))
        report["holdout"] = holdout_step(ensembles, data, holdout, thresholds, post, report["steps"], mode,
                                         d["max_size"], args.batch_size, weights=weights,
                                         combination=report["combination"]["shipped"])
    else:
        from ensemble.combine import no_holdout_record

        report["combination"] = no_holdout_record()
    from ensemble.combine import shipped_members

    shipped = shipped_members([m for e in ensembles.values() for m in e.members], weights)
    key = score_key(data.task, metric)
    report["optimism"] = {k: report[f"{k}_in_sample"][key] - report[k][key] for k in ("tuned", "crf") if k in report}
    atomic_write_json(out.postprocessing_json, post)
    from ensemble.bundle import write_bundle
    from ensemble.crossfit import prediction_rule
    from trainables.data import dataset_options

    bundle_dir = write_bundle(out.bundle_dir, shipped, args.tta,
                              args.voting, prediction_rule(thresholds, post, d["max_size"]), metric, mode, {"experiment": str(run_dir.resolve())},
                              {"unannotated": d["unannotated"], **dataset_options(d), "has_background": data.has_background})
    if args.compare:
        from ensemble.compare import compare_oof

        report["compare"] = compare_oof(run_dir, args.compare, report, experiment)
    atomic_write_json(out.oof_metrics_json, report)
    write_plots(out_dir, report, thresholds, data, ensembles, folds, d["max_size"])
    print_table(report, data.class_names)
    if "holdout" in report:
        from trainables.rows import format_table

        from ensemble.combine import describe

        h = report["holdout"]
        print("\n" + format_table(h, data.class_names, f"holdout ({h['images']} images)")
              + f"\nrows (b)-(d): the shipped {describe(h['combination'])}; prediction applies row {ROWS[h['applied']]}")
    from ensemble.combine import summary

    print(summary(report["combination"]))
    print_extras(report)
    if args.predict:  # the bundle just written, as ensemble/predict.py runs it anywhere
        from ensemble.bundle import load_bundle
        from ensemble.predict import predict_with_bundle, print_result

        if args.on_ray:
            from ensemble.ray_predict import predict_on_ray

            res = predict_on_ray(bundle_dir, args.predict, args.out or out.predictions_dir, save_probs=args.save_probs,
                                 cache_dir=d["cache_dir"], **ray_options(args))
            print_result(res, res["members"], res["class_names"])
        else:
            bundle = load_bundle(bundle_dir, device)
            res = predict_with_bundle(bundle, args.predict, args.out or out.predictions_dir, args.batch_size,
                                      args.save_probs, device, cache_dir=d["cache_dir"])
            print_result(res, len(bundle.members), bundle.class_names)
    if args.pseudo_label:
        write_pseudo(args, ensembles, post, thresholds, data, d, run_dir, tta, device, bundle_dir, shipped)
    if args.cam:
        from ensemble.cam import cam_step

        cam_step(ensembles, data, folds, d["max_size"], args.cam, args.cam_images, out_dir, d["cache_dir"])
    from tune.report import write_report
    from trainables.cli import default_mode

    mode = args.wandb or default_mode()
    if mode != "disabled":
        log_to_wandb(run_dir, out_dir, report, mode, args.wandb_project)
    print(f"report: {out_dir} (and {write_report(run_dir)})")


def print_table(report: dict, class_names: list[str]) -> None:
    """(a), (b), then (c) and (d) cross-fitted with their in-sample scores beside them; under the
    table, that (b)'s members were chosen on these images and the holdout is the number to quote."""
    from ensemble.crossfit import optimism_summary
    from trainables.rows import FIELDS, NO_HOLDOUT, OOF_NOTE, OOF_ROWS, ROWS

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
        from trainables.rows import OOF_ROWS

        keys = [k for k in OOF_ROWS if all(k in report["compare"][side] for side in ("this", "other"))]
        print("\nout-of-fold mIoU" + " " * 8 + "".join(f"{OOF_ROWS[k]:>26}" for k in keys) + "  extra_train")
        for key in ("this", "other"):
            r = report["compare"][key]
            print(f"{Path(r['experiment']).name[:24]:<24}" + "".join(f"{r[k]:>26.4f}" for k in keys)
                  + f"  {r['extra_train'] or '-'}")


def write_pseudo(args, ensembles: dict, post: dict, thresholds: dict, data, d: dict, run_dir: Path, tta,
                 device, bundle_dir: Path, shipped: list) -> None:
    """Pseudo-labels of the bundle's combination of members (``shipped``), or each fold's members
    (``--pseudo-per-fold``, their plain average); on Ray, the actors load the same members from the
    bundle just written (``shipped``, in this order)."""
    from ensemble.bundle import rule_refiner, rule_thresholds
    from ensemble.crossfit import prediction_rule
    from ensemble.predictor import Ensemble
    from ensemble.pseudo import write_pseudo_labels

    out = args.pseudo_out or RunFiles(run_dir).pseudo_dir
    rule = prediction_rule(thresholds, post, d["max_size"])  # what the bundle applies
    sets = ({f"fold{f}": e.members for f, e in ensembles.items()} if args.pseudo_per_fold else {"": shipped})
    for sub, members in sets.items():
        provenance = {"experiment": str(run_dir), "members": [m.name for m in members]}
        if args.on_ray:
            from ensemble.ray_predict import pseudo_label_on_ray

            indices = [k for k, m in enumerate(shipped) if any(m is x for x in members)]
            if len(indices) != len(members):
                raise ConfigError("command line", "--pseudo-per-fold", f"{sub}'s members are not all in the bundle "
                                  "(the combination shipped dropped some): run it without --ray/--address")
            summary = pseudo_label_on_ray(bundle_dir, args.pseudo_label, out / sub if sub else out, indices,
                                          args.pseudo_confidence, provenance, cache_dir=d["cache_dir"],
                                          **ray_options(args))
            summary.pop("actors")
        else:
            summary = write_pseudo_labels(
                Ensemble(members, tta, args.voting, device), rule_thresholds(rule), args.pseudo_label,
                out / sub if sub else out, data.class_names, args.pseudo_confidence, rule_refiner(rule),
                args.batch_size, provenance, d["cache_dir"])
        print(f"pseudo-labels: {summary['images']} images, {100 * summary['kept_share']:.0f}% of pixels kept "
              f"-> {out / sub if sub else out}")
    entry = out / "fold{fold}" if args.pseudo_per_fold else out
    print(f"train with them: --set \"data.extra_train=['{entry}']\"")


def write_plots(out_dir: Path, report: dict, thresholds: dict, data, ensembles, folds, max_size) -> None:
    import numpy as np

    from ensemble.report import confusion_plot, iou_bars, overlays, threshold_curves
    from trainables.dataset import SegDataset
    from trainables.folds import train_val_indices
    from trainables.runfiles import EnsembleFiles

    iou_bars(report, data.class_names, out_dir / "iou_bars.png")
    threshold_curves(thresholds, data.class_names, out_dir / "threshold_curves.png")
    if "confusion" in report["tuned"]:
        confusion_plot(report["tuned"]["confusion"], data.class_names, out_dir / "confusion.png")
    if data.task != "multiclass":
        return
    samples = []
    for fold, ens in sorted(ensembles.items()):
        _, val_idx = train_val_indices(folds, fold, data.ids)
        ds = SegDataset(data, val_idx[:2], transform=None, max_size=max_size, cache=False)
        for i in val_idx[:2]:
            image, mask = ds.load(i)
            probs = np.load(EnsembleFiles(out_dir).oof_probs_dir / f"{i}.npy").astype(np.float32)
            samples.append((data.ids[i], image, mask, ens.decide(probs, thresholds)))
    overlays(samples[:4], data.num_classes, out_dir / "overlays.png")


if __name__ == "__main__":
    main()
