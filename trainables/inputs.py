"""How an image becomes a member's input, without torch: sizes, resizing, normalisation, windows.

The arithmetic of :mod:`trainables.preprocess` that needs no network: the working size, the
input size of each TTA scale, the uint8 resizing (OpenCV), the normalisation, where sliding
windows start and how much each one counts. Both runtimes use it: PyTorch (training, validation,
the out-of-fold pass, the torch predictor: :mod:`trainables.preprocess` wraps the arrays as
tensors) and onnxruntime (``ensemble/predict.py --runtime onnx``, which imports no torch: the
numpy half of :func:`add_probs` below). Only the network call and where probabilities accumulate
differ between the two, so both feed a member the same numbers.

Probabilities are resized bilinearly: ``cv2.INTER_LINEAR`` on float32 maps here, torch's
``F.interpolate(mode="bilinear", align_corners=False)`` in :mod:`trainables.preprocess`. Both
sample at ``(x + 0.5) * scale - 0.5`` clamped to the border, without antialiasing; they agree to
float32 rounding (tests/ensemble/test_onnx_runtime.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np

MEAN = tuple(float(v) for v in np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255)
STD = tuple(float(v) for v in np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255)
MODES = ("resize", "tiles")
CV2_MAX_CHANNELS = 128  # the most channels the cv2 Python binding takes in one array


def working_size(height: int, width: int, max_size: int | None) -> tuple[int, int]:
    """The size training sees an image of this size at: the longer side at most ``data.max_size``."""
    if not max_size or max(height, width) <= max_size:
        return height, width
    scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def normalise_array(images: np.ndarray, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> np.ndarray:
    """(B, H, W, 3) uint8 -> normalised float32 (B, 3, H, W), ``mean``/``std`` in 0..255 pixel units."""
    x = (images.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def input_mode(config: dict) -> str:
    """How a member saw its training images: native-resolution crops ("tiles") or resized whole
    images ("resize"). A custom albumentations pipeline always ends with a resize."""
    augment = config.get("augment") or {}
    return "tiles" if augment.get("random_crop") and not augment.get("albumentations") else "resize"


@dataclass(frozen=True)
class InputSpec:
    """A member's preprocessing: ``image_size`` (its input, or its crop size for tiles),
    ``max_size`` (``data.max_size`` of its training), ``mode`` ("resize" or "tiles") and the
    normalisation ``mean``/``std`` in 0..255 pixel units."""

    image_size: tuple[int, int]
    max_size: int | None = None
    mode: str = "resize"
    mean: tuple[float, ...] = MEAN
    std: tuple[float, ...] = STD

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"input mode must be one of {MODES}, got {self.mode!r}")
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @classmethod
    def from_config(cls, cfg: dict) -> "InputSpec":
        """The spec of a trial's resolved config (what a checkpoint carries)."""
        return cls(tuple(cfg["train"]["image_size"]), (cfg.get("data") or {}).get("max_size"), input_mode(cfg))

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        return working_size(height, width, self.max_size)

    def input_size(self, height: int, width: int, scale: float = 1.0) -> tuple[int, int]:
        """The (h, w) the network receives for an image of ``height`` x ``width`` at a TTA ``scale``
        (for tiles: the whole image that the windows step over)."""
        if self.mode == "tiles":
            h, w = self.working_size(height, width)
            return (h, w) if scale == 1.0 else (max(8, round(h * scale)), max(8, round(w * scale)))
        if scale == 1.0:
            return self.image_size
        return tuple(max(32, round(s * scale / 32) * 32) for s in self.image_size)

    def resize(self, images: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """(B, H, W, 3) uint8 images of one size -> (B, h, w, 3) uint8 at the input size: area to
        the working size, then bilinear to the input size (each step only where the size changes)."""
        height, width = images.shape[1:3]
        work = self.working_size(height, width)
        size = self.input_size(height, width, scale)
        if work == (height, width) and size == work:
            return images
        out = []
        for image in images:
            if work != (height, width):
                image = cv2.resize(image, (work[1], work[0]), interpolation=cv2.INTER_AREA)
            if size != work:
                image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
            out.append(image)
        return np.stack(out)

    def input_array(self, images: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """What the network receives for the (B, H, W, 3) uint8 batch ``images`` (one size), as a
        (B, 3, h, w) float32 array."""
        return normalise_array(self.resize(images, scale), self.mean, self.std)

    def model_input(self, images: np.ndarray, scale: float = 1.0):
        """:meth:`input_array` as a torch tensor (what the PyTorch networks receive)."""
        import torch  # lazy: the onnx runtime uses input_array and runs without torch

        return torch.from_numpy(self.input_array(images, scale))

    def pad_array(self) -> np.ndarray:
        """The normalised value of a black pixel, per channel: what ``RandomCrop(pad_if_needed=True)``
        padded with."""
        return -np.asarray(self.mean, np.float32) / np.asarray(self.std, np.float32)

    def pad_value(self):
        """:meth:`pad_array` as a torch tensor."""
        import torch  # lazy: the onnx runtime uses pad_array and runs without torch

        return torch.from_numpy(self.pad_array())

    def to_dict(self) -> dict:
        return {"image_size": list(self.image_size), "max_size": self.max_size, "input": self.mode,
                "mean": list(self.mean), "std": list(self.std)}


# --------------------------------------------------------------------------- sliding windows
# For members trained on crops at native resolution, as nnU-Net's ``predict_sliding_window_return_logits``
# and MMSegmentation's ``slide`` mode: tiles of the crop size step over the image with ``overlap``
# (0.5: each pixel seen by up to four tiles), each tile's probabilities weighted by a Gaussian centred
# on it (nnU-Net's ``compute_gaussian``, sigma = tile / 8) and divided by the summed weights.


def gaussian_array(height: int, width: int, sigma_scale: float = 1 / 8) -> np.ndarray:
    """(height, width) float32 Gaussian importance map, 1 at the centre, never 0 (nnU-Net's)."""
    axes = []
    for n in (height, width):
        centre, sigma = (n - 1) / 2, max(n * sigma_scale, 1e-3)
        axes.append(np.exp(-0.5 * ((np.arange(n) - centre) / sigma) ** 2))
    g = np.outer(*axes).astype(np.float32)
    g /= g.max()
    g[g == 0] = g[g > 0].min()
    return g


def window_starts(size: int, tile: int, overlap: float = 0.5) -> list[int]:
    """Evenly spaced starts from 0 to ``size - tile`` with at least ``overlap`` between neighbours."""
    if size <= tile:
        return [0]
    steps = math.ceil((size - tile) / (tile * (1 - overlap))) + 1
    return [round(k * (size - tile) / (steps - 1)) for k in range(steps)]


@dataclass(frozen=True)
class Window:
    """One tile: its top-left corner, the part of it inside the image (``vh`` x ``vw``) and that
    part's share of each pixel's prediction (its Gaussian weight over the summed weights)."""

    y0: int
    x0: int
    vh: int
    vw: int
    share: np.ndarray


def window_plan(height: int, width: int, tile: tuple[int, int], overlap: float = 0.5
                ) -> tuple[tuple[int, int], list[Window]]:
    """(padded size, windows) of an image of ``height`` x ``width``: an image smaller than a tile is
    padded to it; the summed weights are known from the grid before any tile is predicted."""
    th, tw = tile
    ph, pw = max(th, height), max(tw, width)
    weight = gaussian_array(th, tw)
    corners = [(y0, x0) for y0 in window_starts(ph, th, overlap) for x0 in window_starts(pw, tw, overlap)]
    norm = np.zeros((ph, pw), dtype=np.float32)
    for y0, x0 in corners:
        norm[y0:y0 + th, x0:x0 + tw] += weight
    windows = []
    for y0, x0 in corners:
        vh, vw = min(th, height - y0), min(tw, width - x0)
        windows.append(Window(y0, x0, vh, vw, (weight / norm[y0:y0 + th, x0:x0 + tw])[:vh, :vw]))
    return (ph, pw), windows


def pad_to(x: np.ndarray, size: tuple[int, int], value: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) ``x`` padded at the bottom and right to ``size`` with ``value`` per channel."""
    b, ch, h, w = x.shape
    if (h, w) == tuple(size):
        return x
    padded = np.empty((b, ch, *size), dtype=x.dtype)
    padded[:] = np.asarray(value, dtype=x.dtype).reshape(1, -1, 1, 1)
    padded[:, :, :h, :w] = x
    return padded


def sliding_window_array(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tile: tuple[int, int],
                         num_classes: int, overlap: float = 0.5, pad_value: np.ndarray | float = 0.0,
                         out: np.ndarray | None = None) -> np.ndarray:
    """Probabilities (B, C, H, W) of the normalised images ``x`` (B, 3, H, W), added into ``out``
    when given; numpy twin of :func:`trainables.preprocess.sliding_window` (the same plan)."""
    b, _, h, w = x.shape
    if out is not None and tuple(out.shape[-2:]) != (h, w):
        raise ValueError(f"sliding_window: out is {tuple(out.shape[-2:])}, the images {(h, w)}")
    padded, windows = window_plan(h, w, tile, overlap)
    x = pad_to(x, padded, np.broadcast_to(np.asarray(pad_value, np.float32), (x.shape[1],)))
    if out is None:
        out = np.zeros((b, num_classes, h, w), dtype=np.float32)
    th, tw = tile
    for win in windows:
        probs = predict(x[:, :, win.y0:win.y0 + th, win.x0:win.x0 + tw])
        out[:, :, win.y0:win.y0 + win.vh, win.x0:win.x0 + win.vw] += (
            probs[:, :, :win.vh, :win.vw].astype(np.float32) * win.share)
    return out


# --------------------------------------------------------------------------- probabilities


def activate_array(logits: np.ndarray, task: str) -> np.ndarray:
    """Probabilities of the logits (B, C, H, W): softmax over classes, or a sigmoid per class."""
    logits = np.asarray(logits, dtype=np.float32)
    if task == "multilabel":
        return 1.0 / (1.0 + np.exp(-logits))
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def resize_probs_array(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Probabilities (B, C, h, w) to ``size`` bilinearly (``cv2.INTER_LINEAR``; unchanged when there)."""
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    b, c = probs.shape[:2]
    out = np.empty((b, c, *size), dtype=np.float32)
    for i in range(b):
        for start in range(0, c, CV2_MAX_CHANNELS):
            part = np.ascontiguousarray(probs[i, start:start + CV2_MAX_CHANNELS].transpose(1, 2, 0), np.float32)
            resized = cv2.resize(part, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
            out[i, start:start + part.shape[-1]] = resized.reshape(*size, -1).transpose(2, 0, 1)
    return out


@dataclass(frozen=True)
class ArrayOps:
    """The array library a path accumulates probabilities with: ``resize(probs, size)``,
    ``sliding_window(predict, x, tile, C, overlap, pad, out=None)`` and ``pad(spec)`` (a black
    pixel, normalised)."""

    resize: Callable
    sliding_window: Callable
    pad: Callable[[InputSpec], object]


NUMPY = ArrayOps(resize_probs_array, sliding_window_array, InputSpec.pad_array)


def add_probs(forward: Callable, spec: InputSpec, inputs: Callable[[float], object], acc,
              views: Sequence[tuple[float, bool]] = ((1.0, False),), tile: tuple[int, int] | None = None,
              overlap: float = 0.5, ops: ArrayOps = NUMPY) -> None:
    """Add one member's probabilities of every view into ``acc`` (B, C, H, W), at ``acc``'s size.

    ``forward(x, flip)`` maps a (B, 3, h, w) input to probabilities (softmax or sigmoid; ``flip``:
    the input flipped horizontally and the output flipped back); ``inputs(scale)`` gives the
    member's input of the batch at a TTA scale; ``views``: (scale, hflip) pairs. Tile members step
    windows of ``tile`` (None: their crop size) over the input. ``ops``: numpy arrays (default) or
    torch tensors (:data:`trainables.preprocess.TORCH`)."""
    out_size = tuple(acc.shape[-2:])
    for scale in sorted({s for s, _ in views}):
        flips = [f for s, f in views if s == scale]
        x = inputs(scale)
        if spec.mode == "resize":
            for flip in flips:
                acc += ops.resize(forward(x, flip), out_size)
            continue

        def window_probs(inp):  # summed over the flips
            return sum(forward(inp, f) for f in flips)

        window = tile or spec.image_size
        if tuple(x.shape[-2:]) == out_size:  # the windows add straight into acc
            ops.sliding_window(window_probs, x, window, acc.shape[1], overlap, ops.pad(spec), out=acc)
        else:
            acc += ops.resize(ops.sliding_window(window_probs, x, window, acc.shape[1], overlap, ops.pad(spec)),
                              out_size)
