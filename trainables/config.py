"""The trial configuration: one nested dict, its defaults, what each setting means, and the one
check of every setting's value.

Every setting of one training run lives under a section (``data``, ``model``, ``loss``...).
Search spaces address settings by dotted keys (``optimizer.lr``), the command line overrides
them the same way, and the resolved dict is saved beside every result, so a checkpoint can
always be rebuilt without the space that produced it.

Values are checked here once (:func:`setting_problem`, :func:`validate_config`): the search-space
loader checks fixed values and every choice with it, and ``trainables/`` checks the config it
trains with the same functions, so a bad value reads the same wherever it is found.
"""
from __future__ import annotations

import copy
import os
import re
from typing import Any, Mapping

from trainables.errors import ConfigError

DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"path": None, "images": None, "task": "multiclass", "unannotated": "background", "crowd": "ignore",
             "background": 0, "max_size": None, "cache_dir": None, "subset": None, "extra_train": None},
    "folds": {"strategy": "kfold", "k": 5, "seed": 0, "group_regex": None, "holdout": None},
    "model": {"arch": "Unet", "encoder": "resnet34", "weights": "imagenet", "kwargs": {}},
    "loss": {"name": "ce", "class_weights": "none", "focal_gamma": 2.0, "tversky_alpha": 0.5, "tversky_beta": 0.5,
             "label_smoothing": 0.0},
    "optimizer": {"name": "adamw", "lr": 1e-3, "encoder_lr_mult": 0.1, "weight_decay": 1e-4, "momentum": 0.9},
    "scheduler": {"name": "cosine", "warmup_epochs": 0, "min_lr_ratio": 0.01, "poly_power": 0.9, "step_size": 10,
                  "gamma": 0.1, "patience": 3},
    "augment": {"hflip": 0.5, "vflip": 0.0, "scale_rotate": 0.0, "scale_limit": 0.2, "rotate_limit": 15,
                "color": 0.0, "elastic": 0.0, "grid_distortion": 0.0, "random_crop": False, "albumentations": None,
                "copy_paste": 0.0, "copy_paste_classes": 3, "copy_paste_scale": [0.1, 2.0], "copy_paste_max": 3},
    "train": {"epochs": 20, "batch_size": 8, "image_size": [256, 256], "amp": "auto", "channels_last": True,
              "grad_clip": 1.0, "accum_steps": 1, "seed": 0, "num_workers": 0, "metric": "val_miou", "mode": "max",
              "device": "auto", "max_train_batches": None, "boundary_iou": "last", "preview_images": 4,
              "oversample": 0.0, "oversample_cap": 5.0, "ema_decay": None, "ema_warmup": True, "ema_start_epoch": 0,
              "swa_epochs": 0},
    "metrics": {"average": "dataset", "empty": 1},
}

# What each setting means (docs/reference/settings.md is generated from this: tune/settings_doc.py)
MEANINGS: dict[str, str] = {
    "data.path": "COCO json, or a folder with images/ + masks/; null: the shipped sample",
    "data.images": "image root for the COCO file names (null: <json dir>/images)",
    "data.task": "multiclass (softmax, one class per pixel) | multilabel (sigmoid per class)",
    "data.unannotated": "COCO pixels without annotation: background | ignore (left out of loss and metrics)",
    "data.crowd": "COCO iscrowd regions: ignore (COCO's meaning: not ground truth) | class (painted)",
    "data.background": "mask folders: 0 (class 0 is background; with classes.txt only if named `background`, "
                       "`_background_` or `bg`) | none (every index a real class)",
    "data.max_size": "downscale on load so the longer side is at most this (null: full size)",
    "data.cache_dir": "mask cache (null: $SEGHPO_CACHE or ~/.cache/seghpo)",
    "data.subset": "use only this many images, evenly spaced (quick checks, --debug)",
    "data.extra_train": "datasets added to every fold's training set only (pseudo-labels); {fold} allowed",
    "folds.strategy": "kfold | stratified (rarest class) | multilabel (iterative stratification) | group",
    "folds.k": "number of folds",
    "folds.seed": "seed of the split",
    "folds.group_regex": "group strategy: the group key is the first capture group (or match) on the file name",
    "folds.holdout": "images kept outside the folds, never searched or tuned on: a share (0.1), names, or a regex",
    "model.arch": "smp architecture name, or segformer / upernet (transformers)",
    "model.encoder": "smp/timm encoder, or a Hugging Face name such as nvidia/mit-b0",
    "model.weights": "pretrained weights to try (null: random init), or a local encoder state dict "
                     "(.pt/.pth/.bin/.safetensors); SegFormer: a local Hugging Face folder goes in model.encoder",
    "model.kwargs": "extra keyword arguments of the model constructor",
    "loss.name": "ce | focal | dice | jaccard | lovasz | tversky | bce, or a weighted sum such as 0.5*focal+0.5*dice",
    "loss.class_weights": "none | inverse | median | sqrt_inverse (pixel frequency) | [w0, w1, ...] one per class",
    "loss.focal_gamma": "focal loss focusing parameter",
    "loss.tversky_alpha": "Tversky loss weight of false positives",
    "loss.tversky_beta": "Tversky loss weight of false negatives",
    "loss.label_smoothing": "label smoothing of the cross-entropy",
    "optimizer.name": "adamw | adam | sgd (Nesterov) | radam",
    "optimizer.lr": "decoder/head learning rate",
    "optimizer.encoder_lr_mult": "encoder learning rate = lr * encoder_lr_mult",
    "optimizer.weight_decay": "weight decay",
    "optimizer.momentum": "SGD momentum",
    "scheduler.name": "cosine | poly | step | plateau | none (after the warmup)",
    "scheduler.warmup_epochs": "linear warmup from 0, in epochs",
    "scheduler.min_lr_ratio": "cosine/poly: the last learning rate as a share of lr",
    "scheduler.poly_power": "poly: the power of the decay",
    "scheduler.step_size": "step: epochs between decays",
    "scheduler.gamma": "step and plateau: the factor of each decay",
    "scheduler.patience": "plateau: epochs without improvement before a decay",
    "augment.hflip": "probability of a horizontal flip",
    "augment.vflip": "probability of a vertical flip",
    "augment.scale_rotate": "probability of an Affine scale/rotate/shift",
    "augment.scale_limit": "Affine scale range: 1 +- this",
    "augment.rotate_limit": "Affine rotation range in degrees: +- this",
    "augment.color": "probability of colour jitter",
    "augment.elastic": "probability of an elastic transform",
    "augment.grid_distortion": "probability of a grid distortion",
    "augment.random_crop": "crop image_size from a padded/resized image instead of resizing",
    "augment.albumentations": "a full albumentations pipeline (A.to_dict form) used instead of the above",
    "augment.copy_paste": "probability of pasting instances from other training images (trainables/copypaste.py)",
    "augment.copy_paste_classes": "n: the n rarest classes by pixel share, or a list of class names/indices",
    "augment.copy_paste_scale": "large-scale jitter: scale range of each pasted instance",
    "augment.copy_paste_max": "at most this many instances per pasted image",
    "train.epochs": "epochs of a trial (the ASHA maximum)",
    "train.batch_size": "images per optimiser step (over all workers of a trial)",
    "train.image_size": "[height, width] fed to the network",
    "train.amp": "auto (bf16 if supported, else fp16 on CUDA; off on CPU) | bf16 | fp16 | off",
    "train.channels_last": "channels-last memory format (CUDA only)",
    "train.grad_clip": "max gradient norm; 0 disables",
    "train.accum_steps": "gradient accumulation steps per optimiser step",
    "train.seed": "seed of the model, the draws and the augmentations (plus the fold number)",
    "train.num_workers": "DataLoader worker processes",
    "train.metric": "checkpoint/selection metric (a search sets its search.metric)",
    "train.mode": "max | min: whether a higher metric is better",
    "train.device": "auto | cpu | cuda | cuda:N",
    "train.max_train_batches": "cap on batches per epoch (debug and benchmarks)",
    "train.boundary_iou": "boundary IoU (val_biou) at: every epoch | last (the planned last epoch) | off",
    "train.preview_images": "validation images + predictions kept with each best checkpoint (W&B); 0: none",
    "train.oversample": "draw images with rare classes more often: strength, 0 = off (trainables/sampling.py)",
    "train.oversample_cap": "most an image's sampling weight can be (the commonest images have 1)",
    "train.ema_decay": "exponential moving average of the weights, updated after every optimiser step: its decay "
                       "in (0, 1) (0.999); validation and the best checkpoint use the average; null: off",
    "train.ema_warmup": "the n-th averaged step uses decay min(ema_decay, 1 - n ** (-2/3)) (timm's warmup; short "
                        "runs need it); false: ema_decay from the second step (the first copies the weights)",
    "train.ema_start_epoch": "epochs trained before the averaging starts (until then the EMA is the raw weights)",
    "train.swa_epochs": "stochastic weight averaging: the equal average of the weights at the end of each of the "
                        "last N epochs, BatchNorm statistics recomputed on the training images; validation and the "
                        "best checkpoint use it in those epochs; 0: off (not with train.ema_decay)",
    "metrics.average": "dataset | image: also report val_miou_image, val_dice_image (per-image means, Kaggle "
                       "style; implied when one is train.metric); val_miou/val_dice are always dataset-level",
    "metrics.empty": "per-image scores: a pair with empty truth and empty prediction scores 1 | nan (left out)",
}


def defaults() -> dict[str, dict[str, Any]]:
    return copy.deepcopy(DEFAULTS)


def known_keys() -> list[str]:
    return [f"{section}.{key}" for section, values in DEFAULTS.items() for key in values]

def get_dotted(cfg: Mapping[str, Any], key: str) -> Any:
    section, _, name = key.partition(".")
    return cfg[section][name]


def set_dotted(cfg: dict[str, Any], key: str, value: Any, source: str = "config") -> None:
    """Set ``section.name`` in ``cfg``; unknown keys are a :class:`ConfigError`."""
    section, _, name = key.partition(".")
    if section not in DEFAULTS or name not in DEFAULTS[section]:
        raise ConfigError(source, key, f"unknown setting; known: {', '.join(known_keys())}")
    cfg.setdefault(section, {})[name] = value


def merge(base: Mapping[str, Any], override: Mapping[str, Any], source: str = "config") -> dict:
    """Return ``base`` updated by ``override`` (nested sections or dotted keys)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if "." in key:
            set_dotted(out, key, value, source)
        elif key in DEFAULTS and isinstance(value, Mapping):
            for name, item in value.items():
                set_dotted(out, f"{key}.{name}", item, source)
        else:
            raise ConfigError(source, key, f"unknown section; known: {', '.join(DEFAULTS)}")
    return out


def resolve(*overrides: Mapping[str, Any], source: str = "config") -> dict:
    """Defaults, then each override in turn (later wins)."""
    cfg = defaults()
    for override in overrides:
        cfg = merge(cfg, override, source)
    return cfg


def flatten(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``{"optimizer": {"lr": 1}}`` -> ``{"optimizer.lr": 1}`` (one level, as the schema)."""
    return {f"{s}.{k}": v for s, values in cfg.items() if isinstance(values, Mapping) for k, v in values.items()}


# ---------------------------------------------------------------- checking values

CLASS_WEIGHT_SCHEMES = ("none", "inverse", "median", "sqrt_inverse")
ALLOWED = {"data.task": ("multiclass", "multilabel"), "data.unannotated": ("background", "ignore"),
           "data.crowd": ("ignore", "class"), "folds.strategy": ("kfold", "stratified", "multilabel", "group"),
           "train.amp": ("auto", "bf16", "fp16", "off"), "train.mode": ("max", "min"),
           "train.boundary_iou": ("every", "last", "off"), "metrics.average": ("dataset", "image")}
MINIMUM = {"folds.k": 2, "train.epochs": 1, "train.batch_size": 1, "train.accum_steps": 1, "train.ema_start_epoch": 0,
           "train.swa_epochs": 0}
NULLABLE = {"model.weights"}  # settings with a non-null default that also accept null
HOLDOUT = "a share of the images in (0, 0.5), a list of image names or a regular expression on them"


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def got(value: Any) -> str:
    """``got <value>``, with a hint when YAML read a number such as 1e-4 as text."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", item.strip()):
            return f"got {value!r} (YAML reads 1e-4 as text: write 1.0e-4)"
    return f"got {value!r}"


def _either(options: tuple) -> str:
    return f"{', '.join(options[:-1])} or {options[-1]}"


def _regex_problem(value: Any) -> str | None:
    try:
        re.compile(value)
    except (re.error, TypeError) as exc:
        return f"invalid regular expression {value!r}: {exc}"
    return None


def _class_weights(value: Any, num_classes: int | None) -> str | None:
    if isinstance(value, (list, tuple)) and value and all(is_number(w) for w in value):
        if not all(w > 0 for w in value):
            return f"class weights must be positive, got {list(value)!r}"
        if num_classes is not None and len(value) != num_classes:
            return (f"needs one weight per class: the data has {num_classes} classes, "
                    f"got {len(value)} weights in {list(value)!r}")
        return None
    if value is None or value in CLASS_WEIGHT_SCHEMES:
        return None
    expected = f"expected {_either(CLASS_WEIGHT_SCHEMES)}, or a list with one weight per class"
    return f"unknown scheme {value!r}; {expected}" if isinstance(value, str) else f"{expected}, {got(value)}"


def _copy_paste_classes(value: Any) -> str | None:  # the n rarest classes, or class names/indices
    if is_int(value):
        return None if value >= 1 else f"expected at least 1 rarest class, got {value!r}"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) or is_int(v) for v in value):
        return None
    return f"expected a number of rarest classes or a list of class names/indices, {got(value)}"


def _pair(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2


def _empty(value: Any) -> str | None:
    from trainables.metrics import empty_score  # lazy: metrics imports torch; checking settings needs no torch

    return None if empty_score(value) is not None else f"expected 1 or nan, {got(value)}"


def _holdout(value: Any) -> str | None:
    if value is None or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
        return None
    if is_number(value):
        return None if 0 < value < 0.5 else f"a share must lie in (0, 0.5), got {value}"
    if isinstance(value, str):
        return _regex_problem(value)
    return f"expected {HOLDOUT}, got {value!r}"


def _paths(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) or (
        isinstance(value, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in value))


CHECKS = {  # settings whose values need more than the type of their default
    "train.image_size": lambda v: None if _pair(v) and all(is_int(s) and s > 0 for s in v)
    else f"expected [height, width], two positive integers, {got(v)}",
    "train.oversample": lambda v: None if v is None or v is False or (is_number(v) and v >= 0)
    else f"expected a strength >= 0 (0 = off), {got(v)}",
    "train.oversample_cap": lambda v: None if is_number(v) and v >= 1 else f"expected a weight cap >= 1, {got(v)}",
    "train.ema_decay": lambda v: None if v is None or (is_number(v) and 0 < v < 1)
    else f"expected a decay in (0, 1) such as 0.999, or null (off), {got(v)}",
    "augment.copy_paste": lambda v: None if is_number(v) and 0 <= v <= 1
    else f"expected a probability in [0, 1], {got(v)}",
    "augment.copy_paste_classes": _copy_paste_classes,
    "augment.copy_paste_scale": lambda v: None if _pair(v) and all(is_number(s) for s in v) and 0 < v[0] <= v[1]
    else f"expected [low, high] with 0 < low <= high, {got(v)}",
    "augment.copy_paste_max": lambda v: None if is_int(v) and v >= 1 else f"expected an integer >= 1, {got(v)}",
    "data.background": lambda v: None if v is None or str(v).lower() in ("0", "none") and not isinstance(v, bool)
    else f"expected 0 or none, got {v!r}",
    "data.extra_train": lambda v: None if not v or _paths(v) else f"expected a list of dataset paths, got {v!r}",
    "folds.group_regex": lambda v: None if v is None else _regex_problem(v),
    "folds.holdout": _holdout,
    "metrics.empty": _empty,
}


def setting_problem(key: str, value: Any, num_classes: int | None = None) -> str | None:
    """Why ``value`` cannot be the setting ``key`` (a known dotted key); None if it can. With
    ``num_classes``, a class-weight vector must also have one weight per class."""
    if key == "loss.class_weights":
        return _class_weights(value, num_classes)
    if key in CHECKS:
        return CHECKS[key](value)
    default = get_dotted(DEFAULTS, key)
    if value is None:
        return None if default is None or key in NULLABLE else "cannot be null"
    if default is None:
        expected = "text, a number or a list"
        ok = isinstance(value, (str, int, float, list, tuple, dict, os.PathLike)) and not isinstance(value, bool)
    elif isinstance(default, bool):
        expected, ok = "true or false", isinstance(value, bool)
    elif isinstance(default, int):
        expected, ok = "an integer", is_int(value)
    elif isinstance(default, float):
        expected, ok = "a number", is_number(value)
    elif isinstance(default, str):
        expected, ok = "text", isinstance(value, (str, os.PathLike))
    else:
        expected, ok = "a mapping", isinstance(value, dict)
    if not ok:
        return f"expected {expected}, {got(value)}"
    if key in ALLOWED and value not in ALLOWED[key]:
        return f"expected {_either(ALLOWED[key])}, got {value!r}"
    if key in MINIMUM and value < MINIMUM[key]:
        return f"must be at least {MINIMUM[key]}, got {value!r}"
    return None


def check_setting(key: str, value: Any, num_classes: int | None = None, source: str = "config") -> None:
    """:func:`setting_problem` as a :class:`ConfigError` naming ``source`` and ``key``."""
    problem = setting_problem(key, value, num_classes)
    if problem:
        raise ConfigError(source, key, problem)


def validate_config(cfg: Mapping[str, Any], num_classes: int | None = None, source: str = "config") -> None:
    """Check every known setting of a (possibly partial) trial config, then the ones that depend
    on each other; the first problem raises a :class:`ConfigError`."""
    known = set(known_keys())
    for key, value in flatten(cfg).items():
        if key in known:
            check_setting(key, value, num_classes, source)
    train = cfg.get("train") or {}
    if train.get("swa_epochs") and train.get("ema_decay") is not None:
        raise ConfigError(source, "train.swa_epochs", f"{train['swa_epochs']} with train.ema_decay "
                          f"{train['ema_decay']}: one weight average at a time (set the other to 0 / null)")
    folds = cfg.get("folds") or {}
    if folds.get("strategy") == "group" and not folds.get("group_regex"):
        raise ConfigError(source, "folds.group_regex", "the group strategy needs a group_regex")
