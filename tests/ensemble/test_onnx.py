"""ONNX export of bundle members, checked with onnxruntime against PyTorch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ensemble.bundle import load_bundle, write_bundle
from ensemble.onnx_export import export_bundle, export_model, max_abs_difference
from ensemble.onnx_runtime import OnnxModel
from ensemble.predictor import load_member
from tests.ensemble.test_bundle import _checkpoint
from trainables.models import build_model

pytest.importorskip("onnxruntime")


def test_smp_member_exports_with_dynamic_sizes(tmp_path):
    torch.manual_seed(0)
    model = build_model("Unet", "resnet18", 3, weights=None,
                        kwargs={"encoder_depth": 3, "decoder_channels": [32, 16, 8]}).eval()
    path = export_model(model, tmp_path / "m.onnx", (64, 96))
    assert max_abs_difference(model, path, (64, 96)) < 1e-4
    # batch and spatial axes are dynamic: another size and batch run and agree
    assert max_abs_difference(model, path, (96, 128), batch=3, seed=1) < 1e-4
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(OnnxModel(path)(x.numpy()), model(x).numpy(), atol=1e-4)


def test_segformer_member_exports(tmp_path):
    torch.manual_seed(0)
    model = build_model("segformer", "nvidia/mit-b0", 3, weights=None).eval()
    path = export_model(model, tmp_path / "s.onnx", (64, 64))
    assert max_abs_difference(model, path, (64, 64)) < 1e-3
    assert max_abs_difference(model, path, (96, 64), seed=1) < 1e-3


def test_bundle_runtime_onnx_predicts_as_torch(tmp_path):
    cpu = torch.device("cpu")
    members = [load_member(_checkpoint(tmp_path, f"m{k}", k, 0.5), f"m{k}", cpu) for k in range(2)]
    out = write_bundle(tmp_path / "bundle", members, tta="hflip", voting="soft", rule={"thresholds": None},
                       metric="val_miou", mode="max")
    with pytest.raises(Exception, match="--export onnx"):
        load_bundle(out, runtime="onnx")
    lines = export_bundle(out)
    assert len(lines) == 2 and all("max |onnxruntime - PyTorch|" in line for line in lines)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"onnx/00.onnx", "onnx/01.onnx"} <= set(manifest["files"])  # checksummed like the rest
    images = [np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)]
    want = load_bundle(out).ensemble("cpu").predict_batch(images)[0]
    onnx = load_bundle(out, runtime="onnx")
    assert all(isinstance(m.model, OnnxModel) for m in onnx.members)
    np.testing.assert_allclose(onnx.ensemble("cpu").predict_batch(images)[0], want, atol=1e-5)
