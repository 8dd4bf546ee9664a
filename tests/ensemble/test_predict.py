"""``ensemble/predict.py`` from a bundle alone, the test rows on annotated inputs, sliding windows.

The module trains the tiny 2-fold experiment of tests/ensemble/test_ensemble.py, runs ``ensemble/run.py
--predict`` on it once (which writes the bundle), then predicts again from a copy of the bundle
in a fresh directory with the run directory moved away, watching every file the process opens.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.ensemble.test_ensemble import _check_ok, _env, _one_error_line, _one_torch_thread, experiment, run_cli  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
VAL_DIR = ROOT / "data" / "camvid-sample" / "val"
TRAIN_DIR = ROOT / "data" / "camvid-sample" / "train"
NUM_CLASSES = 12

# Runs ensemble/predict.py's main with an audit hook that records every file opened, then
# reports the opened files and whether Ray was imported.
WRAPPER = """
import json, runpy, sys
opened = []
def watch(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        opened.append(str(args[0]))
sys.addaudithook(watch)
report, script, *argv = sys.argv[1:]
sys.argv = [script, *argv]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exc:
    code = exc.code or 0
with open(report, "w") as fh:
    json.dump({"code": code, "ray": sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")),
               "opened": opened}, fh)
raise SystemExit(code)
"""


def run_predict(args: list, cwd: Path, cache: Path, report: Path | None = None, timeout: int = 300):
    wrapper = cwd / "_watch.py"
    wrapper.write_text(WRAPPER)
    cmd = [sys.executable, str(wrapper), str(report or cwd / "_watch.json"), str(ROOT / "ensemble" / "predict.py"),
           *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=_env(cache), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def predicted(experiment):  # noqa: F811
    """``ensemble/run.py --top-k 2 --predict <val json>``: the bundle and today's predictions."""
    out = experiment.tmp / "pred_run"
    proc = run_cli(["--experiment", experiment.run_dir, "--top-k", 2, "--predict", VAL_DIR / "annotations.json",
                    "--out", out], experiment.cache)
    _check_ok(proc)
    return SimpleNamespace(proc=proc, out=out, bundle=experiment.run_dir / "ensemble" / "bundle")


def _masks(folder: Path) -> dict:
    return {p.stem: np.asarray(Image.open(p)) for p in sorted((folder / "masks").glob("*.png"))}


# --------------------------------------------------------------------------- the bundle anywhere


@pytest.mark.slow
def test_bundle_predicts_alone_as_run_predict_did(experiment, predicted, tmp_path):  # noqa: F811
    fresh = tmp_path / "fresh"
    shutil.copytree(predicted.bundle, fresh / "bundle")
    shutil.copytree(VAL_DIR, fresh / "val")
    hidden = experiment.run_dir.with_name("run-hidden")
    experiment.run_dir.rename(hidden)  # the run directory (and its checkpoints) is gone
    try:
        proc = run_predict(["--bundle", "bundle", "--images", "val/annotations.json", "--out", "out"], fresh,
                           tmp_path / "fresh-cache", tmp_path / "watch.json")
    finally:
        hidden.rename(experiment.run_dir)
    _check_ok(proc)
    watch = json.loads((tmp_path / "watch.json").read_text())
    assert watch["ray"] == []
    opened = [os.path.abspath(os.path.join(fresh, p)) for p in watch["opened"]]
    for forbidden in (experiment.run_dir, hidden, TRAIN_DIR, experiment.cache):
        assert not [p for p in opened if p.startswith(str(forbidden))], forbidden
    assert any(p.startswith(str(fresh / "bundle" / "members")) for p in opened)
    # the same masks, submission and test rows as ensemble/run.py --predict
    ref, got = _masks(predicted.out), _masks(fresh / "out")
    assert set(ref) == set(got) and len(ref) == 24
    for stem in ref:
        np.testing.assert_array_equal(got[stem], ref[stem])
    assert (fresh / "out" / "submission.csv").read_text() == (predicted.out / "submission.csv").read_text()
    ref_metrics = json.loads((predicted.out / "test_metrics.json").read_text())
    assert json.loads((fresh / "out" / "test_metrics.json").read_text()) == ref_metrics
    assert "predicted 24 images with 4 members" in proc.stdout and "(a) best single" in proc.stdout


def _iou_by_confusion(preds: list[np.ndarray], truths: list[np.ndarray]) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    p = np.concatenate([x.ravel() for x in preds])
    t = np.concatenate([x.ravel() for x in truths])
    keep = t != 255
    cm = confusion_matrix(t[keep], p[keep], labels=list(range(NUM_CLASSES))).astype(float)
    tp = np.diag(cm)
    den = cm.sum(0) + cm.sum(1) - tp
    return np.where(den > 0, tp / np.where(den > 0, den, 1), np.nan)


def test_test_rows_against_a_bare_model_loop_and_sklearn(experiment, predicted):  # noqa: F811
    """(a) the best member by validation score, (b) the average of all members at argmax, (c) the
    written masks: each one's per-class IoU as sklearn's confusion matrix gives it."""
    from trainables.checkpoint import load_checkpoint, model_from_checkpoint
    from trainables.data import load_dataset, read_image
    from trainables.preprocess import MEAN, STD

    metrics = json.loads((predicted.out / "test_metrics.json").read_text())
    info = json.loads((predicted.bundle / "bundle.json").read_text())
    best = max(info["members"], key=lambda m: m["score"])
    assert metrics["best_single"] == best["name"]
    assert set(metrics["rows"]) == {"single", "ensemble", "tuned"}
    models = {m["name"]: model_from_checkpoint(load_checkpoint(predicted.bundle / m["file"])).eval()
              for m in info["members"]}
    data = load_dataset(VAL_DIR / "annotations.json", cache_dir=experiment.cache)
    single, ensemble, written, truths = [], [], [], []
    masks = _masks(predicted.out)
    for i in range(len(data)):
        image = read_image(data.image_paths[i])
        # as training fed it: 120x160 area-shrunk to data.max_size 96 (tests/spaces/tiny.yaml), then
        # bilinear to image_size 64x96; probabilities bilinear back to the image's size
        assert image.shape[:2] == (120, 160)
        work = cv2.resize(image, (96, 72), interpolation=cv2.INTER_AREA)
        inp = cv2.resize(work, (96, 64), interpolation=cv2.INTER_LINEAR)
        x = torch.from_numpy(((inp - np.float32(MEAN)) / np.float32(STD)).astype(np.float32).transpose(2, 0, 1))[None]
        with torch.no_grad():
            probs = {n: F.interpolate(torch.softmax(m(x), 1), size=image.shape[:2], mode="bilinear",
                                      align_corners=False)[0].numpy() for n, m in models.items()}
        single.append(probs[best["name"]].argmax(0))
        ensemble.append(np.mean(list(probs.values()), 0).argmax(0))
        written.append(masks[Path(data.ids[i]).stem])
        truths.append(data.read_mask(i))
    for key, preds in (("single", single), ("ensemble", ensemble), ("tuned", written)):
        np.testing.assert_allclose(metrics["rows"][key]["iou_per_class"], _iou_by_confusion(preds, truths),
                                   atol=1e-6, err_msg=key)
    assert metrics["miou"] == metrics["rows"]["tuned"]["miou"]
    assert abs(metrics["rows"]["single"]["miou"] - metrics["rows"]["ensemble"]["miou"]) > 1e-6


@pytest.mark.slow
def test_damaged_or_incomplete_bundle_is_refused_in_one_line(experiment, predicted, tmp_path, capsys):  # noqa: F811
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(next((VAL_DIR / "images").iterdir()), images)
    bundle = tmp_path / "bundle-damaged"
    shutil.copytree(predicted.bundle, bundle)
    _flip_byte(bundle / "members" / sorted(os.listdir(bundle / "members"))[0])
    proc = run_predict(["--bundle", bundle, "--images", images, "--out", tmp_path / "out"], tmp_path, experiment.cache)
    assert "damaged" in _one_error_line(proc) and not (tmp_path / "out").exists()
    # in process, the same entry point: an incomplete bundle
    from ensemble.predict import main

    for name in ("bundle.json", "manifest.json"):
        bundle = tmp_path / f"bundle-{name}"
        shutil.copytree(predicted.bundle, bundle)
        (bundle / name).unlink()
        with pytest.raises(SystemExit) as exit_info:
            main(["--bundle", str(bundle), "--images", str(images), "--out", str(tmp_path / "out2")])
        assert exit_info.value.code == 2
        line = _one_error_line(subprocess.CompletedProcess([], 2, "", capsys.readouterr().err))
        assert name in line and ("missing" in line), line
        assert not (tmp_path / "out2").exists()


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- sliding windows


def test_windows_cover_with_overlap():
    from trainables.preprocess import window_starts

    for size in (50, 64, 65, 100, 257, 2048):
        for tile in (64, 96):
            starts = window_starts(size, tile, 0.5)
            covered = np.zeros(max(size, tile), bool)
            for s in starts:
                covered[s:s + tile] = True
            assert covered.all() and starts[0] == 0 and max(starts) == max(0, size - tile)
            assert all(b - a <= tile // 2 for a, b in zip(starts, starts[1:]))  # at least half a tile of overlap


def test_sliding_window_of_a_pointwise_model_is_the_full_image():
    """A 1x1 convolution sees one pixel: every window agrees, so the Gaussian-weighted average of
    overlapping tiles is the whole-image prediction (also for an image smaller than a tile)."""
    from trainables.preprocess import sliding_window

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 1)
    for shape in ((150, 230), (40, 50)):
        x = torch.randn(2, 3, *shape)
        got = sliding_window(lambda t: torch.softmax(conv(t), 1), x, (64, 96), 5, 0.5)
        np.testing.assert_allclose(got.detach().numpy(), torch.softmax(conv(x), 1).detach().numpy(), atol=1e-6)


def _tiles_member(crop: tuple[int, int]):
    """A one-layer fully convolutional network (3x3, zero padding: tiles differ at their borders),
    cheap at 2048x2048."""
    from ensemble.predictor import Member

    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 3, padding=1).eval()
    return Member("tiles", 0, model, crop, "multiclass", ["background", "a", "b"], 0.5, {}, input="tiles",
                  max_size=None)


def test_tiled_member_on_a_2048_grayscale_image(tmp_path):
    """A member trained on 256x256 native crops predicts a 2048x2048 grayscale image (read as 3
    channels) by sliding windows at full resolution; one window the size of the image is the
    plain forward pass."""
    from ensemble.predictor import Ensemble
    from trainables.data import read_image
    from trainables.dataset import normalise

    rng = np.random.default_rng(0)
    gray = (rng.random((2048, 2048)) * 255).astype(np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "xray.png")
    image = read_image(tmp_path / "xray.png")
    assert image.shape == (2048, 2048, 3)
    member = _tiles_member((256, 256))
    probs = Ensemble([member], device="cpu").predict_batch([image])[0]
    assert probs.shape == (3, 2048, 2048) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    # one window covering a 512x512 crop: the network's own softmax at full resolution
    crop = image[:512, :512]
    one = Ensemble([member], device="cpu", tile=(512, 512)).predict_batch([crop])[0]
    with torch.no_grad():
        direct = torch.softmax(member.model(normalise(crop[None])), 1)[0].numpy()
    np.testing.assert_allclose(one, direct, atol=1e-5)
    # a resized-input member of the same network squashes the image: a different (smoother) answer
    member.input = "resize"
    squashed = Ensemble([member], device="cpu").predict_batch([crop])[0]
    assert np.abs(squashed - one).max() > 1e-2


def test_random_crop_takes_native_resolution_crops():
    """augment.random_crop crops image_size out of the image as it is (no rescaling first), and
    pads an image smaller than the crop with void mask pixels."""
    from trainables.config import resolve
    from trainables.dataset import build_transforms

    augment = {**resolve({})["augment"], "random_crop": True, "hflip": 0.0}
    tf = build_transforms(augment, [64, 80], train=True, seed=0)
    h, w = 300, 500
    yy, xx = np.mgrid[:h, :w]
    image = np.stack([yy % 256, xx % 256, (yy // 256) * 16 + xx // 256], -1).astype(np.uint8)
    mask = np.ones((h, w), np.uint8)
    out = tf(image=image, mask=mask)["image"]
    assert out.shape == (64, 80, 3)
    y0, x0 = int(out[0, 0, 0]) + 256 * (int(out[0, 0, 2]) // 16), int(out[0, 0, 1]) + 256 * (int(out[0, 0, 2]) % 16)
    np.testing.assert_array_equal(out, image[y0:y0 + 64, x0:x0 + 80])  # a window of the original pixels
    small = tf(image=image[:40, :50], mask=mask[:40, :50])
    assert small["image"].shape == (64, 80, 3)
    assert (small["mask"] == 255).sum() == 64 * 80 - 40 * 50 and (small["mask"] == 1).sum() == 40 * 50


def test_hard_voting_of_multilabel_members_is_a_majority_of_their_votes():
    """Three members with constant logits: class 0 at +0.1, +0.1, -5 (two of three vote yes, but the
    mean probability is 0.35), class 1 at -0.1, -0.1, +5 (one vote, mean 0.65). Hard voting decides
    by votes; soft voting by the mean probability."""
    from ensemble.predictor import Ensemble, Member
    from tests.ensemble.test_combine import Constant

    members = [Member(f"m{k}", 0, Constant(v), (32, 32), "multilabel", ["a", "b"])
               for k, v in enumerate([[0.1, -0.1], [0.1, -0.1], [-5.0, 5.0]])]
    image = np.zeros((40, 50, 3), np.uint8)
    hard = Ensemble(members, voting="hard", device="cpu")
    probs = hard.predict_batch([image])[0]
    np.testing.assert_allclose(probs[:, 0, 0], [2 / 3, 1 / 3], atol=1e-6)
    assert hard.decide(probs)[:, 0, 0].tolist() == [True, False]
    soft = Ensemble(members, voting="soft", device="cpu")
    assert soft.decide(soft.predict_batch([image])[0])[:, 0, 0].tolist() == [False, True]
