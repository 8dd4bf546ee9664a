"""Sliding-window inference for members trained on crops at native resolution.

As nnU-Net's ``predict_sliding_window_return_logits`` and MMSegmentation's ``slide`` mode: tiles
of the training crop size step over the image with ``overlap`` (0.5: each pixel is seen by up to
four tiles), each tile's probabilities are weighted by a Gaussian centred on the tile (the
centre of a tile has the most context, its border the least; nnU-Net's ``compute_gaussian``,
sigma = tile / 8) and the weighted sum is divided by the summed weights. An image smaller than a
tile is padded (as ``RandomCrop(pad_if_needed=True)`` padded it in training) and cropped back.

Memory: the image's probability map and weight map, plus one window's tiles of the batch.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def parse_tile(text: str | None) -> tuple[int, int] | None:
    """``"auto"`` (or None) -> None (each member's training crop size); ``"512x768"`` -> (512, 768)."""
    if text in (None, "", "auto"):
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--tile must be auto or HxW such as 512x512, got {text!r}") from None
    if h < 8 or w < 8:
        raise ValueError(f"--tile must be at least 8x8, got {text!r}")
    return h, w


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

    ``predict`` maps a batch of tiles (B, 3, th, tw) to probabilities (B, C, th, tw) (softmax or
    sigmoid, TTA flips summed). ``pad_value`` (per channel, shape (3,)) fills the border of
    images smaller than a tile. Each tile adds ``probs * weight / sum of weights`` at its
    pixels: the summed weights are known from the window grid before any tile is predicted.
    """
    b, _, h, w = x.shape
    th, tw = tile
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


def working_size(height: int, width: int, max_size: int | None) -> tuple[int, int]:
    """The size training saw an image of this size at: the longer side at most ``data.max_size``
    (as :func:`trainables.dataset.downscale`)."""
    if not max_size or max(height, width) <= max_size:
        return height, width
    scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_probs(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    return F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
