"""Grad-CAM (Selvaraju et al. 2017) of one class for trained members, as image overlays.

Uses the ``grad-cam`` package (``pytorch_grad_cam``) with its segmentation target: the score
of class ``c`` summed over the pixels the member predicts as ``c`` (all pixels when it predicts
none), backpropagated to a feature map near the output:

* smp models: ``model.decoder`` (the decoder's last feature map, before the segmentation head;
  every smp architecture has one);
* Hugging Face SegFormer (:class:`trainables.models.HFSegmentation`): the decode head's
  ``linear_fuse`` (the fused multi-scale features, before the classifier).

:func:`write_cams` writes one overlay per (member, image) as
``<out>/cam/<class>/<member>/<stem>.png`` and a summary figure ``<out>/cam_<class>.png``
(rows: images; columns: image, then each member's overlay with its predicted area outlined).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ensemble.infer import list_inputs
from ensemble.predictor import Member
from trainables.data import read_image
from trainables.dataset import SegDataset
from trainables.errors import ConfigError
from trainables.folds import train_val_indices
from trainables.io import atomic_path, atomic_save_figure
from trainables.models import HFSegmentation

logger = logging.getLogger(__name__)


def target_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The layer whose activations and gradients make the map (see the module doc)."""
    if isinstance(model, HFSegmentation):
        return model.net.decode_head.linear_fuse
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        raise ValueError(f"no Grad-CAM target layer known for {type(model).__name__}")
    return decoder


def class_index(name_or_index: str, class_names: list[str]) -> int:
    """``--cam`` value (a class name, case-insensitive, or an index) -> class index."""
    lowered = [n.lower() for n in class_names]
    if name_or_index.lower() in lowered:
        return lowered.index(name_or_index.lower())
    if name_or_index.isdigit() and int(name_or_index) < len(class_names):
        return int(name_or_index)
    raise ConfigError("command line", "--cam", f"unknown class {name_or_index!r}; classes: {', '.join(class_names)}")


def grad_cam(member: Member, image: np.ndarray, cls: int) -> tuple[np.ndarray, np.ndarray]:
    """(CAM in [0, 1], member's predicted mask of ``cls``), both (H, W) at the image's size."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    model = member.model
    device = next(model.parameters()).device
    x = member.spec.model_input(image[None]).to(device)  # the input every other path gives this member
    with torch.no_grad():
        logits = model(x)[0].float()
    predicted = (logits.argmax(0) == cls).cpu().numpy()
    mask = predicted.astype(np.float32) if predicted.any() else np.ones(predicted.shape, np.float32)
    with GradCAM(model=model, target_layers=[target_layer(model)]) as cam:
        heat = cam(input_tensor=x, targets=[SemanticSegmentationTarget(cls, mask)])[0]
    h, w = image.shape[:2]
    heat = F.interpolate(torch.from_numpy(heat)[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    up = F.interpolate(torch.from_numpy(predicted.astype(np.float32))[None, None], size=(h, w), mode="nearest")[0, 0]
    return heat.clamp(0, 1).numpy(), up.numpy() > 0.5


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32) / 255, heat, use_rgb=True, image_weight=0.5)


def write_cams(members: list[Member], samples: list[tuple[str, np.ndarray]], cls: int, class_names: list[str],
               out: Path) -> list[Path]:
    """Overlays of class ``cls`` for every member on every (image id, RGB image); returns the files."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    name = re.sub(r"[^\w.-]+", "_", class_names[cls])
    written: list[Path] = []
    grid = []
    for image_id, image in samples:
        row = []
        for m in members:
            heat, predicted = grad_cam(m, image, cls)
            pic = overlay(image, heat)
            path = out / "cam" / name / m.name / f"{Path(image_id).stem}.png"
            with atomic_path(path) as tmp:
                Image.fromarray(pic).save(tmp, format="PNG")
            written.append(path)
            row.append((pic, predicted))
        grid.append((image_id, image, row))
    fig, axes = plt.subplots(len(grid), 1 + len(members), figsize=(3 * (1 + len(members)), 2.4 * len(grid)),
                             squeeze=False)
    for ax_row, (image_id, image, row) in zip(axes, grid):
        ax_row[0].imshow(image)
        ax_row[0].set_title(Path(image_id).name, fontsize=7)
        for ax, m, (pic, predicted) in zip(ax_row[1:], members, row):
            ax.imshow(pic)
            if predicted.any():
                ax.contour(predicted, levels=[0.5], colors="white", linewidths=0.6)
            ax.set_title(f"{m.name} (fold {m.fold}): {name}", fontsize=7)
        for ax in ax_row:
            ax.axis("off")
    written.append(atomic_save_figure(fig, out / f"cam_{name}.png"))
    logger.info("Grad-CAM of %s: %d overlays -> %s", name, len(written) - 1, out / "cam" / name)
    return written


def cam_step(ensembles: dict, data, folds: list[list[str]], max_size: int | None, cls_arg: str, images_arg: str,
             out: Path, cache_dir=None) -> list[Path]:
    """``--cam CLASS --cam-images N|PATH``: the best member of every fold, on ``N`` out-of-fold
    images taken in turn from each fold's validation set, or on the images of ``PATH``."""
    cls = class_index(cls_arg, data.class_names)
    members = [e.members[0] for _, e in sorted(ensembles.items())]
    if images_arg.isdigit():
        per_fold = [train_val_indices(folds, f, data.ids)[1] for f in sorted(ensembles)]
        order = [v[k] for k in range(max(map(len, per_fold))) for v in per_fold if k < len(v)][:int(images_arg)]
        ds = SegDataset(data, order, transform=None, max_size=max_size, cache=False)
        samples = [(data.ids[i], ds.load(i)[0]) for i in order]
    else:
        paths, ids, _ = list_inputs(Path(images_arg), data.task, "background", cache_dir)
        samples = [(image_id, read_image(p)) for p, image_id in zip(paths, ids)]
    if not samples:
        raise ConfigError("command line", "--cam-images", f"no images to explain, got {images_arg!r}")
    return write_cams(members, samples, cls, data.class_names, out)
