"""One way from an image to a member's input (trainables/preprocess.py), on every path.

Two images, one larger than ``data.max_size`` and one smaller, go through each path that runs a
member: validation during training, the out-of-fold pass, the holdout, ``ensemble/predict.py``'s
predictor from a written bundle (PyTorch and onnxruntime), latency timing, pseudo-labels and
Grad-CAM. Each path's network inputs are recorded and must equal, to 1e-5, the input written out
here with cv2 and numpy as training feeds it: area-shrunk to ``max_size``, bilinear to
``image_size`` (resize members) or windows of the working image (members trained on crops),
normalised with the ImageNet mean and std. (The Ray Data path runs the same ``Bundle.ensemble()``
per actor; tests/ensemble/test_ray_predict.py checks that it writes the local path's bytes.)
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from trainables.config import resolve

MAX_SIZE = 100
SHAPES = {"big": (150, 200), "small": (60, 80)}  # big: working size 75x100; small: left as it is
MEAN = np.array([0.485, 0.456, 0.406]) * 255
STD = np.array([0.229, 0.224, 0.225]) * 255
SIZES = {"resize": [48, 64], "tiles": [32, 48]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for stem, (h, w) in SHAPES.items():
        yy, xx = np.mgrid[:h, :w]  # smooth content plus noise: resampling differences show
        image = np.stack([(yy * 255 / h), (xx * 255 / w), ((yy + xx) % 64) * 4], -1) + rng.normal(0, 20, (h, w, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(((yy // 20 + xx // 30) % 3).astype(np.uint8)).save(root / "masks" / f"{stem}.png")
    return root


@pytest.fixture(scope="module")
def data(folder):
    from trainables.data import load_dataset

    return load_dataset(folder, cache_dir=folder / "cache")


def config(mode: str) -> dict:
    return resolve({"data": {"max_size": MAX_SIZE},
                    "model": {"arch": "Unet", "encoder": "resnet18", "weights": None,
                              "kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 4]}},
                    "augment": {"random_crop": mode == "tiles"},
                    "train": {"image_size": SIZES[mode], "batch_size": 1, "epochs": 1, "device": "cpu",
                              "num_workers": 0, "boundary_iou": "off"}})


def reference_inputs(folder: Path, mode: str) -> dict[str, np.ndarray]:
    """Each image as training feeds it, written with cv2 and numpy: (3, h, w) float32."""
    out = {}
    for stem, (h, w) in SHAPES.items():
        image = np.asarray(Image.open(folder / "images" / f"{stem}.png").convert("RGB"))
        if max(h, w) > MAX_SIZE:
            s = MAX_SIZE / max(h, w)
            image = cv2.resize(image, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        if mode == "resize":
            image = cv2.resize(image, SIZES[mode][::-1], interpolation=cv2.INTER_LINEAR)
        out[stem] = ((image.astype(np.float64) - MEAN) / STD).astype(np.float32).transpose(2, 0, 1)
    return out


def expected(folder: Path, mode: str) -> list[np.ndarray]:
    """What the network must receive for the two images: the whole input (resize members) or every
    window of the crop size over the working image, padded black where smaller (tiles members)."""
    from trainables.preprocess import window_starts

    out = []
    for x in reference_inputs(folder, mode).values():
        if mode == "resize":
            out.append(x)
            continue
        th, tw = SIZES[mode]
        h, w = x.shape[1:]
        padded = np.tile(((0 - MEAN) / STD).astype(np.float32)[:, None, None], (1, max(h, th), max(w, tw)))
        padded[:, :h, :w] = x
        for y0 in window_starts(padded.shape[1], th):
            for x0 in window_starts(padded.shape[2], tw):
                out.append(padded[:, y0:y0 + th, x0:x0 + tw])
    return out


class Recorder:
    """Records every batch a network receives (as (3, h, w) arrays), through a forward pre-hook
    (PyTorch) or by wrapping the callable (onnxruntime)."""

    def __init__(self):
        self.inputs: list[np.ndarray] = []

    def add(self, x) -> None:  # a tensor (torch runtime) or an array (onnx runtime)
        self.inputs.extend(x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.float32(x))

    def hook(self, module: torch.nn.Module) -> "Recorder":
        module.register_forward_pre_hook(lambda _m, args: self.add(args[0]))
        return self

    def wrap(self, model):
        def call(x):
            self.add(x)
            return model(x)
        call.eval = lambda: call
        return call


def assert_same_inputs(got: list[np.ndarray], want: list[np.ndarray], path: str) -> None:
    """The same multiset of tensors (order aside), each within 1e-5."""
    assert len(got) == len(want), f"{path}: {len(got)} inputs, expected {len(want)}"
    left = list(want)
    for x in got:
        match = [k for k, y in enumerate(left) if y.shape == x.shape and np.abs(y - x).max() <= 1e-5]
        closest = min((np.abs(y - x).max() for y in left if y.shape == x.shape), default=None)
        assert match, f"{path}: an input of shape {x.shape} matches none expected (closest differs by {closest})"
        left.pop(match[0])


@pytest.fixture(scope="module", params=["resize", "tiles"])
def member(request, data, folder, tmp_path_factory):
    """A real checkpoint of an untrained tiny Unet of each kind, its trainer and a bundle of it."""
    from ensemble.bundle import write_bundle
    from ensemble.predictor import load_member
    from trainables.checkpoint import make_checkpoint, save_checkpoint
    from trainables.loop import FoldTrainer

    mode = request.param
    cfg = config(mode)
    trainer = FoldTrainer(cfg, data, [0, 1], [0, 1], fold=0)
    out = tmp_path_factory.mktemp(mode)
    path = save_checkpoint(make_checkpoint(trainer.model.state_dict(), cfg, data.class_names, data.task, "val_miou",
                                           0.5, 1, 0), out / "model.pt")
    bundle = write_bundle(out / "bundle", [load_member(path, "m", torch.device("cpu"))], tta="none", voting="soft",
                          rule={},
                          metric="val_miou", mode="max", data={"has_background": True})
    return mode, trainer, path, bundle


def test_validation_feeds_the_network_as_training_defines_it(member, folder):
    mode, trainer, _, _ = member
    rec = Recorder().hook(trainer.model)
    trainer.validate()
    assert_same_inputs(rec.inputs, expected(folder, mode), "validation")


def test_out_of_fold_and_holdout_feed_the_same_inputs(member, folder, data, tmp_path):
    from ensemble.holdout import holdout_step
    from ensemble.oof import oof_evaluate
    from ensemble.predictor import Ensemble, load_member

    mode, _, path, _ = member
    m = load_member(path, "m", torch.device("cpu"))
    rec = Recorder().hook(m.model)
    ens = Ensemble([m], device="cpu")
    oof_evaluate({0: ens}, data, folds=[list(data.ids), []], max_size=MAX_SIZE, out_dir=tmp_path, batch_size=1)
    assert_same_inputs(rec.inputs, expected(folder, mode), "out-of-fold")
    rec.inputs.clear()
    holdout_step({0: ens}, data, holdout=list(data.ids), thresholds=None, post={}, steps={}, mode="max",
                 max_size=MAX_SIZE, batch_size=1)
    assert_same_inputs(rec.inputs, expected(folder, mode), "holdout")


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_the_bundle_predictor_feeds_the_same_inputs(member, folder, tmp_path, runtime):
    from ensemble.bundle import load_bundle
    from ensemble.predict import predict_with_bundle

    mode, _, _, bundle_dir = member
    if runtime == "onnx":
        from ensemble.onnx_export import export_bundle

        if not (bundle_dir / "onnx").exists():
            export_bundle(bundle_dir)
    bundle = load_bundle(bundle_dir, "cpu", runtime)
    rec = Recorder()
    for m in bundle.members:
        if runtime == "onnx":
            m.model = rec.wrap(m.model)
        else:
            rec.hook(m.model)
    predict_with_bundle(bundle, folder / "images", out=tmp_path / "out", batch_size=1, device="cpu")
    assert_same_inputs(rec.inputs, expected(folder, mode), f"predict ({runtime})")
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["big.png", "small.png"]


def test_pseudo_labels_latency_and_grad_cam_feed_the_same_inputs(member, folder, tmp_path):
    from ensemble.bundle import load_bundle
    from ensemble.cam import grad_cam
    from ensemble.latency import time_ms
    from ensemble.pseudo import write_pseudo_labels
    from trainables.data import read_image

    mode, _, _, bundle_dir = member
    bundle = load_bundle(bundle_dir, "cpu")
    rec = Recorder().hook(bundle.members[0].model)
    ens = bundle.ensemble("cpu")
    write_pseudo_labels(ens, None, inputs=folder / "images", out=tmp_path / "pseudo", class_names=bundle.class_names,
                        batch_size=1)
    assert_same_inputs(rec.inputs, expected(folder, mode), "pseudo-labels")
    rec.inputs.clear()
    images = [read_image(folder / "images" / f"{stem}.png") for stem in SHAPES]
    for image in images:
        time_ms(ens, image, reps=1)  # a warm-up and one timed run
    assert_same_inputs(rec.inputs, expected(folder, mode) * 2, "latency")
    if mode == "resize":  # Grad-CAM takes the whole input
        rec.inputs.clear()
        for image in images:
            grad_cam(bundle.members[0], image, 1)
        assert_same_inputs(rec.inputs, expected(folder, mode) * 2, "grad-cam")  # its forward and GradCAM's


def test_the_bundle_records_the_members_preprocessing(member):
    mode, _, _, bundle_dir = member
    entry = json.loads((bundle_dir / "bundle.json").read_text())["members"][0]
    assert (entry["input"], entry["max_size"], entry["image_size"]) == (mode, MAX_SIZE, SIZES[mode])


# ------------------------------------------------------------------ TTA scales of tiled members


def test_a_tta_scale_of_a_tiled_member_covers_the_whole_image():
    """A constant network gives every class the same probability at every pixel, whatever the view.
    With scales 1:1.25 and a working size of 0.8x the image, the 1.25 view is the image's own size:
    its windows must step over the rescaled input, not the working one (which covered only the
    top-left 64% of the image)."""
    from ensemble.predictor import TTA, Ensemble, Member
    from tests.ensemble.test_combine import Constant

    member = Member("c", 0, Constant([0.0, 0.0]), (64, 64), "multiclass", ["a", "b"], input="tiles", max_size=512)
    image = np.zeros((480, 640, 3), np.uint8)
    probs = Ensemble([member], TTA(scales=(1.0, 1.25)), device="cpu").predict_batch([image])[0]
    np.testing.assert_allclose(probs, 0.5, atol=1e-6)


# ------------------------------------------------------ what validation reports is what the predictor does


@pytest.mark.parametrize("mode", ["resize", "tiles"])
def test_a_members_validation_score_is_the_predictors_score_of_it(mode, tmp_path):
    """A member trained one short epoch on CamVid sample images (120x160, working size 90x120 at
    max_size 120, crops of 48x64 for the tiles member): the validation mIoU it reports (what ASHA,
    TPE, the best epoch and member ranking use) is row (a) of the out-of-fold pass, the ensemble
    predictor's score of that member on the same fold images."""
    from ensemble.oof import oof_evaluate
    from ensemble.predictor import Ensemble, load_member
    from trainables.checkpoint import save_checkpoint
    from trainables.data import load_dataset
    from trainables.folds import make_folds, train_val_indices
    from trainables.loop import FoldTrainer

    root = Path(__file__).resolve().parents[2] / "data" / "camvid-sample" / "train"
    data = load_dataset(root / "annotations.json", cache_dir=tmp_path / "cache").subset(list(range(0, 72, 6)))
    folds = make_folds("kfold", 2, 0, data.ids, data.presence)
    train_idx, val_idx = train_val_indices(folds, 0, data.ids)
    cfg = config(mode)
    cfg["data"]["max_size"] = 120
    cfg["train"].update(image_size=[48, 64], batch_size=3, max_train_batches=2)
    trainer = FoldTrainer(cfg, data, train_idx, val_idx, fold=0)
    record = next(trainer.epochs())
    member = load_member(save_checkpoint(trainer.best_checkpoint(), tmp_path / "m.pt"), "m", torch.device("cpu"))
    assert member.input == mode
    rows = oof_evaluate({0: Ensemble([member], device="cpu")}, data, folds=folds, max_size=120,
                        out_dir=tmp_path / "oof", batch_size=3)
    assert rows["single"]["miou"] == pytest.approx(record["val_miou"], abs=1e-9)
    assert rows["single"]["iou_per_class"] == pytest.approx(
        [record[f"val_iou/{name}"] for name in data.class_names], abs=1e-9, nan_ok=True)
