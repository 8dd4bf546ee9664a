"""A bundle member and the TTA views, as both runtimes hold them: no torch.

:class:`Member` is one trained network (a PyTorch module, or an onnxruntime session:
``ensemble/onnx_runtime.py``) with what decides its input (:class:`trainables.inputs.InputSpec`)
and its weight in the ensemble's average.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from trainables.inputs import MEAN, STD, InputSpec


@dataclass
class Member:
    name: str
    fold: int
    model: object  # a torch.nn.Module, or ensemble.onnx_runtime.OnnxModel
    image_size: tuple[int, int]
    task: str
    class_names: list[str]
    score: float = float("nan")
    meta: dict = field(default_factory=dict)
    input: str = "resize"  # "resize": trained on images resized to image_size; "tiles": on native-resolution crops
    max_size: int | None = None  # data.max_size of its training (the resolution crops were taken at)
    mean: tuple[float, ...] = MEAN  # normalisation, in 0..255 pixel units
    std: tuple[float, ...] = STD
    weight: float = 1.0  # its share of the soft average (the holdout's combination, ensemble/combine.py); 0: left out

    @property
    def spec(self) -> InputSpec:
        """How an image becomes this member's input (the one definition training validated with)."""
        return InputSpec(self.image_size, self.max_size, self.input, self.mean, self.std)


def check_weights(weights: list[float]) -> float:
    """The total of members' weights, each finite and >= 0 with a positive total; ValueError otherwise."""
    bad = [w for w in weights if not (isinstance(w, numbers.Real) and math.isfinite(w) and w >= 0)]
    if bad:
        raise ValueError(f"member weights must be finite numbers >= 0, got {bad[0]!r}")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError("member weights sum to 0: an ensemble needs a member of positive weight")
    return total


def best_member_index(members: list, mode: str) -> int:
    """Index of the member with the best validation score in the search's ``mode``; NaN scores last,
    ties to the first."""
    sign = -1.0 if mode == "max" else 1.0
    return min(range(len(members)), key=lambda k: (math.isnan(members[k].score),
                                                    sign * (0.0 if math.isnan(members[k].score) else members[k].score)))


@dataclass
class TTA:
    hflip: bool = False
    scales: tuple[float, ...] = (1.0,)

    @classmethod
    def parse(cls, text: str | None) -> "TTA":
        """``"none"``, ``"hflip"``, ``"hflip,scales=0.75:1:1.25"``."""
        tta = cls()
        for part in filter(None, (text or "none").split(",")):
            if part == "hflip":
                tta.hflip = True
            elif part.startswith("scales="):
                tta.scales = tuple(float(s) for s in part[len("scales="):].split(":"))
            elif part != "none":
                raise ValueError(f"unknown TTA {part!r}: use none, hflip, scales=0.75:1:1.25")
        return tta

    def views(self) -> list[tuple[float, bool]]:
        return [(s, f) for s in self.scales for f in ((False, True) if self.hflip else (False,))]
