"""How an image becomes a member's input, and how its probabilities come back: one definition.

Every path that runs a trained network on an image goes through :class:`InputSpec` and
:func:`add_probs`: validation during training (``trainables/loop.py``), the out-of-fold pass, the
holdout, prediction with a bundle (local, Ray Data, onnxruntime), latency timing, pseudo-labels and
Grad-CAM. So the number the search optimised, the rows the report shows and what the bundle
delivers are measured on the same tensors::

    spec = InputSpec.from_config(cfg)        # recorded in every checkpoint (its config) and bundle
    x = spec.model_input(images)             # (B, 3, h, w) float32: what the network receives

From an RGB uint8 image of any size:

1. **Working size.** An image whose longer side exceeds ``data.max_size`` is shrunk to it with area
   interpolation (``cv2.INTER_AREA``), as :func:`trainables.dataset.downscale` does when training
   reads it. An image from the training set (already shrunk on load) and the same image read at
   full size from disk therefore give the same input; an image at most ``max_size`` is left alone.
2. **Input size.** A member trained on resized whole images (``mode="resize"``) receives the
   working image resized bilinearly to ``train.image_size`` (``cv2.INTER_LINEAR`` on uint8: what
   albumentations' ``Resize`` does in training). A member trained on native-resolution crops
   (``augment.random_crop``, ``mode="tiles"``) receives the working image itself, predicted by
   sliding windows of its crop size (:func:`sliding_window`; an image smaller than a window is
   padded as ``RandomCrop(pad_if_needed=True)`` padded it). A TTA scale resizes the input
   (resize members: to the scaled ``image_size``, a multiple of 32; tile members: the working
   image scaled) with the same bilinear interpolation.
3. **Normalisation** with the member's mean and std (0..255 pixel units), channels first.

Probabilities (softmax or sigmoid of the logits) come back to any output size bilinearly: the
working size for validation and the out-of-fold pass (where the masks are), the original size for
prediction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

MEAN = tuple(float(v) for v in np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255)
STD = tuple(float(v) for v in np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255)
MODES = ("resize", "tiles")


def working_size(height: int, width: int, max_size: int | None) -> tuple[int, int]:
    """The size training sees an image of this size at: the longer side at most ``data.max_size``."""
    if not max_size or max(height, width) <= max_size:
        return height, width
    scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def normalise(images: np.ndarray, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> normalised float32 (B, 3, H, W), ``mean``/``std`` in 0..255 pixel units."""
    x = (images.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


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

    def model_input(self, images: np.ndarray, scale: float = 1.0) -> torch.Tensor:
        """What the network receives for the (B, H, W, 3) uint8 batch ``images`` (one size)."""
        return normalise(self.resize(images, scale), self.mean, self.std)

    def pad_value(self) -> torch.Tensor:
        """The normalised value of a black pixel: what ``RandomCrop(pad_if_needed=True)`` padded with."""
        return -torch.tensor(self.mean) / torch.tensor(self.std)

    def to_dict(self) -> dict:
        return {"image_size": list(self.image_size), "max_size": self.max_size, "input": self.mode,
                "mean": list(self.mean), "std": list(self.std)}


def add_probs(forward: Callable[[torch.Tensor, bool], torch.Tensor], spec: InputSpec,
              inputs: Callable[[float], torch.Tensor], acc: torch.Tensor,
              views: Sequence[tuple[float, bool]] = ((1.0, False),), tile: tuple[int, int] | None = None,
              overlap: float = 0.5) -> None:
    """Add one member's probabilities of every view into ``acc`` (B, C, H, W), at ``acc``'s size.

    ``forward(x, flip)`` maps a (B, 3, h, w) input to probabilities (softmax or sigmoid; ``flip``:
    the input flipped horizontally and the output flipped back); ``inputs(scale)`` gives
    :meth:`InputSpec.model_input` of the batch at a TTA scale, on ``acc``'s device; ``views``: (scale,
    hflip) pairs. Tile members step windows of ``tile`` (None: their crop size) over the input."""
    out_size = tuple(acc.shape[-2:])
    for scale in sorted({s for s, _ in views}):
        flips = [f for s, f in views if s == scale]
        x = inputs(scale)
        if spec.mode == "resize":
            for flip in flips:
                acc += resize_probs(forward(x, flip), out_size)
            continue

        def window_probs(inp: torch.Tensor) -> torch.Tensor:  # summed over the flips
            return sum(forward(inp, f) for f in flips)

        window = tile or spec.image_size
        if tuple(x.shape[-2:]) == out_size:  # the windows add straight into acc
            sliding_window(window_probs, x, window, acc.shape[1], overlap, spec.pad_value(), out=acc)
        else:
            acc += resize_probs(sliding_window(window_probs, x, window, acc.shape[1], overlap, spec.pad_value()),
                                out_size)


def activate(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Probabilities of the logits (B, C, H, W): softmax over classes, or a sigmoid per class
    (multilabel); what validation and the predictor both score."""
    return torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, 1)


def resize_probs(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Probabilities (B, C, h, w) to ``size``, bilinearly (unchanged when already there)."""
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    return F.interpolate(probs, size=tuple(size), mode="bilinear", align_corners=False)


def as_logits(probs: torch.Tensor, task: str, eps: float = 1e-7) -> torch.Tensor:
    """Values whose softmax (multiclass) or sigmoid (multilabel) are ``probs``: a loss that takes
    logits then scores the probability map itself (validation loss of stitched or resized maps)."""
    p = probs.clamp(eps, 1 - eps)
    return p.log() if task == "multiclass" else p.log() - (-p).log1p()


# Sliding windows for members trained on crops at native resolution, as nnU-Net's
# ``predict_sliding_window_return_logits`` and MMSegmentation's ``slide`` mode: tiles of the crop
# size step over the image with ``overlap`` (0.5: each pixel seen by up to four tiles), each tile's
# probabilities weighted by a Gaussian centred on it (nnU-Net's ``compute_gaussian``, sigma = tile /
# 8) and divided by the summed weights. Memory: the image's probability and weight maps, plus one
# window's tiles of the batch.

def gaussian_weight(height: int, width: int, sigma_scale: float = 1 / 8) -> torch.Tensor:
    """(height, width) float32 Gaussian importance map, 1 at the centre, never 0 (nnU-Net's)."""
    axes = []
    for n in (height, width):
        centre, sigma = (n - 1) / 2, max(n * sigma_scale, 1e-3)
        axes.append(np.exp(-0.5 * ((np.arange(n) - centre) / sigma) ** 2))
    g = np.outer(*axes).astype(np.float32)
    g /= g.max()
    g[g == 0] = g[g > 0].min()
    return torch.from_numpy(g)


def window_starts(size: int, tile: int, overlap: float = 0.5) -> list[int]:
    """Evenly spaced starts from 0 to ``size - tile`` with at least ``overlap`` between neighbours."""
    if size <= tile:
        return [0]
    steps = math.ceil((size - tile) / (tile * (1 - overlap))) + 1
    return [round(k * (size - tile) / (steps - 1)) for k in range(steps)]


@torch.no_grad()
def sliding_window(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: tuple[int, int],
                   num_classes: int, overlap: float = 0.5, pad_value: torch.Tensor | float = 0.0,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Probabilities (B, C, H, W) of the normalised images ``x`` (B, 3, H, W), added into ``out``
    when given (an ensemble's running sum: no map of this image's own is allocated).

    ``predict`` maps a batch of tiles (B, 3, th, tw) to probabilities (B, C, th, tw).
    ``pad_value`` (per channel, shape (3,)) fills the border of images smaller than a tile. Each
    tile adds ``probs * weight / sum of weights`` at its pixels: the summed weights are known
    from the window grid before any tile is predicted.
    """
    b, _, h, w = x.shape
    th, tw = tile
    if out is not None and tuple(out.shape[-2:]) != (h, w):
        raise ValueError(f"sliding_window: out is {tuple(out.shape[-2:])}, the images {(h, w)}")
    ph, pw = max(th, h), max(tw, w)
    if (ph, pw) != (h, w):
        padded = torch.empty((b, x.shape[1], ph, pw), dtype=x.dtype, device=x.device)
        padded[:] = torch.as_tensor(pad_value, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        padded[:, :, :h, :w] = x
        x = padded
    weight = gaussian_weight(th, tw).to(x.device)
    windows = [(y0, x0) for y0 in window_starts(ph, th, overlap) for x0 in window_starts(pw, tw, overlap)]
    norm = torch.zeros((ph, pw), dtype=torch.float32, device=x.device)
    for y0, x0 in windows:
        norm[y0:y0 + th, x0:x0 + tw] += weight
    if out is None:
        out = torch.zeros((b, num_classes, h, w), dtype=torch.float32, device=x.device)
    for y0, x0 in windows:
        vh, vw = min(th, h - y0), min(tw, w - x0)  # the part of the tile inside the image
        share = (weight / norm[y0:y0 + th, x0:x0 + tw])[:vh, :vw]
        probs = predict(x[:, :, y0:y0 + th, x0:x0 + tw])
        out[:, :, y0:y0 + vh, x0:x0 + vw] += probs[:, :, :vh, :vw].float() * share
    return out
