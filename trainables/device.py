"""Which device and which autocast dtype: one resolution for training, validation and prediction."""
from __future__ import annotations

import torch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_amp(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. AMP runs on CUDA only (CPU autocast is slower here)."""
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[setting]
