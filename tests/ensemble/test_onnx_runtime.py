"""``ensemble/predict.py --runtime onnx`` without torch: the same masks as the PyTorch runtime.

A real bundle of two tiny members (one trained on resized images, one on native-resolution crops,
so predicted by sliding windows) with hflip and multi-scale TTA and a tuned rule is exported to
ONNX, then predicted twice in subprocesses: with PyTorch, and with onnxruntime in a process where
importing torch (or any library of training and search) raises ImportError.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ensemble.bundle import write_bundle
from ensemble.predictor import load_member
from tests.ensemble.test_bundle import _checkpoint

pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "torchvision", "timm", "segmentation_models_pytorch", "transformers", "ray", "optuna",
           "albumentations")
RULE = {"thresholds": {"thresholds": [0.0, 0.4, 0.6], "fallback": 0, "min_area": [0, 5, 0]}, "crf": None,
        "max_size": 100}

# Runs ensemble/predict.py with the libraries above unimportable, then reports which of them (and
# which project modules) were imported.
BLOCKER = """
import importlib.abc, json, runpy, sys
BLOCKED = set(sys.argv[1].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
report, script, *argv = sys.argv[2:]
sys.argv = [script, *argv]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exc:
    code = exc.code or 0
with open(report, "w") as fh:
    json.dump({"code": code, "modules": sorted(sys.modules)}, fh)
raise SystemExit(code)
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def _predict(args: list, cwd: Path, blocked: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, dict]:
    script = cwd / "_blocked.py"
    script.write_text(BLOCKER)
    report = cwd / f"_report_{len(blocked)}.json"
    cmd = [sys.executable, str(script), ",".join(blocked) or "-", str(report), str(ROOT / "ensemble" / "predict.py"),
           *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc, json.loads(report.read_text())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A bundle of a resize member and a tiles member, hflip + two scales, exported to ONNX; images
    of three sizes (one shrunk to max_size, one smaller than a tile)."""
    from ensemble.onnx_export import export_bundle

    tmp = tmp_path_factory.mktemp("onnx_runtime")
    cpu = torch.device("cpu")
    members = [load_member(_checkpoint(tmp, "resize", 0, 0.4, **{"data.max_size": 100}), "resize", cpu),
               load_member(_checkpoint(tmp, "tiles", 1, 0.6, **{"augment.random_crop": True, "data.max_size": 100}),
                           "tiles", cpu)]
    assert [m.input for m in members] == ["resize", "tiles"]
    bundle = write_bundle(tmp / "bundle", members, tta="hflip,scales=0.75:1", voting="soft", rule=RULE,
                          metric="val_miou", mode="max",
                          data={"has_background": True})
    export_bundle(bundle)
    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in (("big", (150, 200)), ("mid", (80, 100)), ("small", (40, 50))):
        Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(images / f"{name}.png")
    return tmp, bundle, images


@pytest.mark.slow
def test_onnx_runtime_predicts_without_torch_as_the_torch_runtime(exported):
    tmp, bundle, images = exported
    args = ["--bundle", bundle, "--images", images, "--save-probs", "--batch-size", 2, "--device", "cpu"]
    _, ref_report = _predict([*args, "--out", tmp / "torch"], tmp)
    assert "torch" in ref_report["modules"]  # the reference ran on PyTorch
    proc, report = _predict([*args, "--out", tmp / "onnx", "--runtime", "onnx"], tmp, BLOCKED)
    assert "predicted 3 images with 2 members" in proc.stdout
    loaded = [m for m in report["modules"] if m.split(".")[0] in BLOCKED]
    assert loaded == [], loaded
    fit = [m for m in report["modules"] if m in ("ensemble.thresholds", "ensemble.image_thresholds", "ensemble.oof",
                                                 "ensemble.crossfit", "ensemble.crf") or m.startswith("tune")]
    assert fit == [], fit
    for name in ("big", "mid", "small"):
        want = np.asarray(Image.open(tmp / "torch" / "masks" / f"{name}.png"))
        got = np.asarray(Image.open(tmp / "onnx" / "masks" / f"{name}.png"))
        np.testing.assert_array_equal(got, want, err_msg=name)
        p_want = np.load(tmp / "torch" / "probs" / f"{name}.npy").astype(np.float32)
        p_got = np.load(tmp / "onnx" / "probs" / f"{name}.npy").astype(np.float32)
        assert p_got.shape == p_want.shape
        np.testing.assert_allclose(p_got, p_want, atol=2e-3)  # float16 on disk
    assert (tmp / "onnx" / "submission.csv").read_text() == (tmp / "torch" / "submission.csv").read_text()


def test_numpy_ensemble_agrees_with_torch_ensemble_in_float32(exported):
    """The probabilities in memory (no float16 rounding): onnx runtime vs PyTorch, per member kind."""
    from ensemble.bundle import load_bundle

    _, bundle, _ = exported
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (150, 200, 3), dtype=np.uint8), rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)]
    ref, onnx = load_bundle(bundle, "cpu"), load_bundle(bundle, "cpu", "onnx")
    for k in range(2):
        want = ref.ensemble("cpu").predict_batch_and_member(images, k)
        got = onnx.ensemble("cpu").predict_batch_and_member(images, k)
        for (p_want, m_want), (p_got, m_got) in zip(want, got):
            np.testing.assert_allclose(p_got, p_want, atol=1e-4)
            np.testing.assert_allclose(m_got, m_want, atol=1e-4)


@pytest.mark.parametrize("size", [(37, 53), (200, 120), (64, 96)])
def test_cv2_linear_resize_of_probabilities_matches_torch_bilinear(size):
    """trainables.inputs.resize_probs_array (cv2 INTER_LINEAR) against F.interpolate(bilinear,
    align_corners=False), up and down, with more channels than cv2 takes at once in one call."""
    from trainables.inputs import resize_probs_array

    probs = np.random.default_rng(0).random((2, 5, 64, 96), dtype=np.float32)
    want = F.interpolate(torch.from_numpy(probs), size=size, mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(resize_probs_array(probs, size), want, atol=1e-5)
    many = np.random.default_rng(1).random((1, 600, 8, 12), dtype=np.float32)
    want = F.interpolate(torch.from_numpy(many), size=(16, 20), mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(resize_probs_array(many, (16, 20)), want, atol=1e-5)
    assert cv2.INTER_LINEAR == 1


def test_annotated_inputs_without_torch_are_predicted_not_scored(exported):
    """Scoring needs torch (SegMetrics): without it an annotated mask folder is predicted as the
    torch runtime predicts it, test_metrics.json is not written and one line says why."""
    tmp, bundle, images = exported
    folder = tmp / "annotated"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    (folder / "classes.txt").write_text("background\na\nb\n")
    for path in sorted(images.glob("*.png")):
        (folder / "images" / path.name).write_bytes(path.read_bytes())
        h, w = np.asarray(Image.open(path)).shape[:2]
        Image.fromarray(np.random.default_rng(h).integers(0, 3, (h, w), dtype=np.uint8)).save(
            folder / "masks" / path.name)
    args = ["--bundle", bundle, "--images", folder, "--device", "cpu", "--runtime", "onnx"]
    proc, report = _predict([*args, "--out", tmp / "annotated_onnx"], tmp, BLOCKED)
    assert [m for m in report["modules"] if m.split(".")[0] in BLOCKED] == []
    assert "scoring needs torch" in proc.stderr
    assert not (tmp / "annotated_onnx" / "test_metrics.json").exists()
    from ensemble.bundle import load_bundle
    from ensemble.predict import predict_with_bundle

    ref = predict_with_bundle(load_bundle(bundle, "cpu"), folder, out=tmp / "annotated_torch", device="cpu")
    assert "test_metrics" in ref  # with torch the same inputs are scored
    for name in ("big", "mid", "small"):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp / "annotated_onnx" / "masks" / f"{name}.png")),
                                      np.asarray(Image.open(tmp / "annotated_torch" / "masks" / f"{name}.png")))
