"""Predict with an ensemble bundle alone: no training data, no run directory, no Ray (unless asked).

    python ensemble/predict.py --bundle runs/<name>/ensemble/bundle --images test_images/ --out preds/
    python ensemble/predict.py --bundle BUNDLE --images test/annotations.json --out preds/   # + test rows
    python ensemble/predict.py --bundle BUNDLE --images test/ --out preds/ --sample-submission sample_submission.csv
    python ensemble/predict.py --bundle BUNDLE --export onnx            # then --runtime onnx
    python ensemble/predict.py --bundle BUNDLE --images big/ --out preds/ --address auto --gpus-per-actor 1

The bundle (``ensemble/run.py`` writes it, see ensemble/bundle.py) holds the members, the kept
thresholds / min-areas / CRF, TTA and voting; outputs are those of ensemble/infer.py. Members
trained on native-resolution crops (``augment.random_crop``) predict by sliding windows
(``--tile auto``: their crop size, overlap 0.5). With ``--ray`` or ``--address`` the images are
predicted by a Ray Data actor pool (ensemble/ray_predict.py) into the same files.

``--runtime onnx`` (after ``--export onnx``) imports no torch: numpy, OpenCV, Pillow and
onnxruntime do the rest; annotated inputs are then predicted but not scored (scoring needs torch).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ensemble.bundle import load_bundle
from ensemble.infer import PredictOptions, check_batch_size, check_out, predict_folder, submission_skip
from ensemble.ray_predict import predict_on_ray
from ensemble.submission import Submission
from ensemble.tiling import parse_tile
from trainables.cli import add_ray_actor_flags, command_parser, exit_on_user_error, ray_actor_args
from trainables.errors import ConfigError
from trainables.rows import format_table
from trainables.runfiles import TEST_METRICS_JSON

logger = logging.getLogger("ensemble.predict")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the prediction flags to ``parser`` (this script's, or a subcommand's)."""
    parser.add_argument("--bundle", type=Path, required=True, help="folder written by ensemble/run.py (ensemble/bundle)")
    parser.add_argument("--images", type=Path, help="folder of images, COCO json or mask folder to predict")
    parser.add_argument("--out", type=Path, help="where predictions go (required with --images)")
    parser.add_argument("--save-probs", action="store_true", help="also write float16 probabilities")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tile", default="auto",
                   help="sliding-window size of members trained on native-resolution crops: auto (their crop size) "
                        "or HxW [auto]")
    parser.add_argument("--sample-submission", type=Path, help="a competition's sample_submission.csv: its columns, ids, "
                                                           "class rows and row order")
    parser.add_argument("--rle-order", choices=["column", "row"], default="column",
                   help="pixel numbering of the RLE: column-major (Kaggle default) or row-major [column]")
    parser.add_argument("--boundary-iou", action="store_true",
                   help="also score boundary IoU on annotated inputs (at full resolution: slower than the rest)")
    parser.add_argument("--export", choices=["onnx"], help="write every member as ONNX into the bundle, checked against "
                                                      "PyTorch with onnxruntime")
    parser.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                   help="run the members with PyTorch or with onnxruntime (after --export onnx) [torch]")
    add_ray_actor_flags(parser)
    return parser


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """The checks across flags (one line, exit 2); sets ``args.on_ray``."""
    ray_actor_args(args)
    if args.images is None and args.export is None:
        raise ConfigError("command line", "--images", "give --images (and --out) to predict, or --export onnx")
    if args.images is not None and args.out is None:
        raise ConfigError("command line", "--out", "--images needs --out")
    return args


def build_parser() -> argparse.ArgumentParser:
    return command_parser(__doc__, add_arguments)


def parse_args(argv):
    return check_args(build_parser().parse_args(argv))


def predict_with_bundle(bundle, images: Path, *, out: Path, batch_size: int = 8, save_probs: bool = False,
                        device="auto", tile=None, sample_submission: Path | None = None, rle_order: str = "column",
                        cache_dir=None, boundary: bool = False) -> dict:
    """The bundle's ensemble and decision rule on ``images``; see :func:`ensemble.infer.predict_folder`."""
    thresholds = bundle.thresholds
    ens = bundle.ensemble(device, tile=tile)
    data = bundle.info.get("data", {})  # how the training data was read, for annotated inputs
    has_background = data.get("has_background")
    submission = Submission(bundle.class_names, bundle.task, submission_skip(thresholds, has_background), rle_order,
                            sample_submission)
    unannotated = data.get("unannotated", bundle.info.get("unannotated", "background"))
    options = {k: data[k] for k in ("crowd", "background") if k in data}
    return predict_folder(ens, thresholds, PredictOptions(
        images, out, task=bundle.task, unannotated=unannotated, class_names=bundle.class_names,
        batch_size=batch_size, save_probs=save_probs, cache_dir=cache_dir, refine=bundle.refiner(),
        best=bundle.best_member(), submission=submission, rle_order=rle_order, boundary=boundary, options=options,
        has_background=has_background))


def print_result(res: dict, n_members: int, class_names: list[str], seconds: float | None = None) -> None:
    took = f" in {seconds:.1f}s" if seconds is not None else ""
    print(f"predicted {res['images']} images with {n_members} members{took} -> {res['out']}")
    if "test_rows" in res:
        print(format_table(res["test_rows"], class_names, f"test ({res['images']} images)"))
        print(f"test metrics -> {Path(res['out']) / TEST_METRICS_JSON}")


def run(args: argparse.Namespace) -> None:
    """Export and/or predict as the parsed ``args`` (of :func:`add_arguments`) ask."""
    check_args(args)
    try:
        tile = parse_tile(args.tile)
    except ValueError as exc:
        raise ConfigError("command line", "--tile", str(exc)) from None
    if args.images is not None:  # the rest (stems, sample submission) once the inputs are listed
        check_batch_size(args.batch_size)
        check_out(args.out)
    if args.export == "onnx":
        from ensemble.onnx_export import export_bundle  # lazy: exporting needs torch; predicting with onnx does not

        for line in export_bundle(args.bundle):
            print(line)
        if args.images is None:
            return
    if args.on_ray and args.images is not None:
        start = time.perf_counter()
        res = predict_on_ray(args.bundle, args.images, args.out, address=args.address, actors=args.actors,
                             batch_size=args.batch_size, cpus_per_actor=args.cpus_per_actor,
                             gpus_per_actor=args.gpus_per_actor, save_probs=args.save_probs, device=args.device,
                             tile=tile, sample_submission=args.sample_submission, rle_order=args.rle_order,
                             boundary=args.boundary_iou, runtime=args.runtime)
        print_result(res, res["members"], res["class_names"], time.perf_counter() - start)
        print(f"on Ray: {len(res['actors'])} actor processes on {len({a['node'] for a in res['actors']})} nodes")
        return
    bundle = load_bundle(args.bundle, args.device, args.runtime)
    start = time.perf_counter()
    res = predict_with_bundle(bundle, args.images, out=args.out, batch_size=args.batch_size,
                              save_probs=args.save_probs, device=args.device, tile=tile,
                              sample_submission=args.sample_submission, rle_order=args.rle_order,
                              boundary=args.boundary_iou)
    print_result(res, len(bundle.members), bundle.class_names, time.perf_counter() - start)


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)  # run() checks the flags together
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(args)


if __name__ == "__main__":
    main()
