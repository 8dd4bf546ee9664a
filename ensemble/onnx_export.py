"""Bundle members as ONNX, checked against PyTorch with onnxruntime, and run with onnxruntime.

``export_bundle`` writes ``<bundle>/onnx/<k>.onnx`` for member k (batch, height and width
dynamic; torch's TorchScript exporter, ``dynamo=False``, opset 17), runs each file with
onnxruntime on a random input of the member's size and compares with the PyTorch logits, then
adds the files to the bundle's manifest. ``--runtime onnx`` runs them without torch
(:class:`ensemble.onnx_runtime.OnnxModel` in :class:`ensemble.voting.NumpyEnsemble`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ensemble.bundle import load_bundle, write_manifest
from ensemble.onnx_runtime import onnx_file
from trainables.errors import InputError
from trainables.io import atomic_path

logger = logging.getLogger(__name__)

OPSET = 17
TOLERANCE = 1e-3  # max abs difference of logits accepted (float32 kernels differ in summation order)


def export_model(model: torch.nn.Module, path: Path, size: tuple[int, int]) -> Path:
    """Write ``model`` (eval mode, CPU) as ONNX with dynamic batch and spatial axes."""
    model = model.eval()
    x = torch.randn(1, 3, *size)
    with atomic_path(path) as tmp, torch.no_grad():
        torch.onnx.export(model, (x,), str(tmp), input_names=["image"], output_names=["logits"], opset_version=OPSET,
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                        "logits": {0: "batch", 2: "height", 3: "width"}},
                          dynamo=False)
    return path


def max_abs_difference(model: torch.nn.Module, path: Path, size: tuple[int, int], batch: int = 2,
                       seed: int = 0) -> float:
    """Largest |PyTorch - onnxruntime| of the logits of one random batch of ``size``."""
    import onnxruntime as ort  # lazy: optional dependency, needed only to export

    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((batch, 3, *size)).astype(np.float32))
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})[0]
    if got.shape != ref.shape:
        raise RuntimeError(f"onnxruntime output {got.shape} != PyTorch {ref.shape}")
    return float(np.abs(got - ref).max())


def export_bundle(root: Path) -> list[str]:
    """Export every member of the bundle at ``root``; returns one summary line per member."""
    bundle = load_bundle(root, "cpu")
    lines = []
    for k, member in enumerate(bundle.members):
        path = Path(root) / onnx_file(k)
        try:
            export_model(member.model, path, member.image_size)
        except Exception as exc:  # the exporter raises many types for unsupported operators
            raise InputError(root / bundle.info["members"][k]["file"],
                             f"cannot export member {member.name} to ONNX ({type(exc).__name__}: {exc})") from None
        diff = max_abs_difference(member.model, path, member.image_size)
        if not diff <= TOLERANCE:
            path.unlink()
            raise InputError(path, f"onnxruntime differs from PyTorch by {diff:.2e} (> {TOLERANCE}): not kept")
        lines.append(f"member {member.name}: {path} ({path.stat().st_size / 1e6:.1f} MB), "
                     f"max |onnxruntime - PyTorch| {diff:.2e}")
    write_manifest(Path(root))
    return lines
