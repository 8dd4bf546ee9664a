"""The ``--tile`` option of prediction: the sliding-window size of members trained on native-resolution
crops (``augment.random_crop``). The windows themselves are stepped by
:func:`trainables.preprocess.sliding_window`, the one definition of how an image becomes a
member's input that validation, the out-of-fold pass and prediction share.
"""
from __future__ import annotations


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
