"""Bundle members run by onnxruntime (``--runtime onnx``), without torch.

``ensemble/onnx_export.py`` writes ``<bundle>/onnx/<k>.onnx`` for member k (:func:`onnx_file`);
:class:`OnnxModel` runs one of them on numpy arrays, a member's network in
:class:`ensemble.voting.NumpyEnsemble`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def onnx_file(k: int) -> str:
    """Member ``k``'s ONNX file, relative to the bundle."""
    return f"onnx/{k:02d}.onnx"


def providers_for(device: str | None, available: list[str]) -> list[str]:
    """onnxruntime's execution providers for ``device`` ("cpu", "cuda[:i]", "auto" or None = CPU):
    CUDA first when asked for (or "auto") and installed, CPU always."""
    wanted = str(device or "cpu")
    cuda = (wanted == "auto" or wanted.startswith("cuda")) and "CUDAExecutionProvider" in available
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]


class OnnxModel:
    """A member's network run by onnxruntime: ``model(x)`` maps a (B, 3, H, W) float32 array to
    logits, as the PyTorch module did. ``threads``: onnxruntime's intra-op threads (None: its default)."""

    def __init__(self, path: Path, device: str | None = None, threads: int | None = None):
        import onnxruntime as ort  # lazy: optional dependency, needed only with --runtime onnx

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(path), options,
                                            providers=providers_for(device, ort.get_available_providers()))
        self.path = Path(path)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"image": np.ascontiguousarray(x, dtype=np.float32)})[0]

    def eval(self) -> "OnnxModel":
        return self
