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

The arithmetic that needs no network (sizes, resizing, normalisation, window plans) lives in the
torch-free :mod:`trainables.inputs`, shared with the onnx runtime; this module adds the torch side:
tensors, the network's probabilities and where they accumulate.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from trainables import inputs as _inputs
from trainables.inputs import (  # noqa: F401  (the names every torch path imports from here)
    MEAN,
    MODES,
    STD,
    InputSpec,
    input_mode,
    normalise_array,
    window_plan,
    window_starts,
    working_size,
)


def normalise(images: np.ndarray, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> normalised float32 (B, 3, H, W), ``mean``/``std`` in 0..255 pixel units."""
    return torch.from_numpy(normalise_array(images, mean, std))


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


def gaussian_weight(height: int, width: int, sigma_scale: float = 1 / 8) -> torch.Tensor:
    """(height, width) float32 Gaussian importance map (:func:`trainables.inputs.gaussian_array`)."""
    return torch.from_numpy(_inputs.gaussian_array(height, width, sigma_scale))


@torch.no_grad()
def sliding_window(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: tuple[int, int],
                   num_classes: int, overlap: float = 0.5, pad_value: torch.Tensor | float = 0.0,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Probabilities (B, C, H, W) of the normalised images ``x`` (B, 3, H, W), added into ``out``
    when given (an ensemble's running sum: no map of this image's own is allocated).

    ``predict`` maps a batch of tiles (B, 3, th, tw) to probabilities (B, C, th, tw).
    ``pad_value`` (per channel, shape (3,)) fills the border of images smaller than a tile. Each
    tile adds ``probs * weight / sum of weights`` at its pixels (:func:`trainables.inputs.window_plan`).
    Memory: the image's probability map, plus one window's tiles of the batch.
    """
    b, _, h, w = x.shape
    th, tw = tile
    if out is not None and tuple(out.shape[-2:]) != (h, w):
        raise ValueError(f"sliding_window: out is {tuple(out.shape[-2:])}, the images {(h, w)}")
    (ph, pw), windows = window_plan(h, w, tile, overlap)
    if (ph, pw) != (h, w):
        padded = torch.empty((b, x.shape[1], ph, pw), dtype=x.dtype, device=x.device)
        padded[:] = torch.as_tensor(pad_value, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        padded[:, :, :h, :w] = x
        x = padded
    if out is None:
        out = torch.zeros((b, num_classes, h, w), dtype=torch.float32, device=x.device)
    for win in windows:
        share = torch.from_numpy(win.share).to(x.device)
        probs = predict(x[:, :, win.y0:win.y0 + th, win.x0:win.x0 + tw])
        out[:, :, win.y0:win.y0 + win.vh, win.x0:win.x0 + win.vw] += probs[:, :, :win.vh, :win.vw].float() * share
    return out


TORCH = _inputs.ArrayOps(resize_probs, sliding_window, InputSpec.pad_value)


def add_probs(forward: Callable[[torch.Tensor, bool], torch.Tensor], spec: InputSpec,
              inputs: Callable[[float], torch.Tensor], acc: torch.Tensor,
              views: Sequence[tuple[float, bool]] = ((1.0, False),), tile: tuple[int, int] | None = None,
              overlap: float = 0.5) -> None:
    """:func:`trainables.inputs.add_probs` on torch tensors: one member's probabilities of every
    view added into ``acc`` (B, C, H, W), at ``acc``'s size; ``inputs(scale)`` gives
    :meth:`InputSpec.model_input` of the batch at a TTA scale, on ``acc``'s device."""
    _inputs.add_probs(forward, spec, inputs, acc, views, tile, overlap, ops=TORCH)
