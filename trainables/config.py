"""The trial configuration: one nested dict, its defaults, and how overrides apply.

Every setting of one training run lives under a section (``data``, ``model``, ``loss``...).
Search spaces address settings by dotted keys (``optimizer.lr``), the command line overrides
them the same way, and the resolved dict is saved beside every result, so a checkpoint can
always be rebuilt without the space that produced it.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

from trainables.errors import ConfigError

DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {
        "path": None,  # COCO json, or a folder with images/ + masks/; None: the shipped sample
        "images": None,  # image root for COCO file names (default: <json dir>/images)
        "task": "multiclass",  # multiclass (softmax) | multilabel (sigmoid per class)
        "unannotated": "background",  # COCO pixels without annotation: background | ignore
        "crowd": "ignore",  # COCO iscrowd regions: ignore (COCO's meaning: not ground truth) | class (painted)
        "background": 0,  # mask folders without classes.txt: 0 (class 0 is background) | none (every index a class)
        "max_size": None,  # downscale on load so the longer side is at most this
        "cache_dir": None,  # mask cache (default: $SEGHPO_CACHE or ~/.cache/seghpo)
        "subset": None,  # use only this many images, evenly spaced (quick checks, --debug)
        "extra_train": None,  # datasets added to every fold's training set only (pseudo-labels); {fold} allowed
    },
    "folds": {
        "strategy": "kfold",  # kfold | stratified | multilabel | group
        "k": 5,
        "seed": 0,
        "group_regex": None,  # group key = first capture group (or match) of the file name
        "holdout": None,  # images kept outside the folds, never searched or tuned on: a share (0.1), names, or a regex
    },
    "model": {
        "arch": "Unet",  # smp architecture name, or "segformer" / "upernet" (transformers)
        "encoder": "resnet34",  # smp/timm encoder, or HF name such as nvidia/mit-b0
        "weights": "imagenet",  # pretrained weights to try (None: random init), or a local encoder state dict path
        #                         (.pt/.pth/.bin/.safetensors); SegFormer: a local Hugging Face folder goes in encoder
        "kwargs": {},  # extra keyword arguments for the model constructor
    },
    "loss": {
        "name": "ce",  # ce | focal | dice | jaccard | lovasz | tversky | bce | combos "0.5*focal+0.5*dice"
        "class_weights": "none",  # none | inverse | median | sqrt_inverse | [w0, w1, ...]
        "focal_gamma": 2.0,
        "tversky_alpha": 0.5,
        "tversky_beta": 0.5,
        "label_smoothing": 0.0,
    },
    "optimizer": {
        "name": "adamw",  # adamw | adam | sgd | radam
        "lr": 1e-3,  # decoder/head learning rate
        "encoder_lr_mult": 0.1,  # encoder learning rate = lr * encoder_lr_mult
        "weight_decay": 1e-4,
        "momentum": 0.9,
    },
    "scheduler": {
        "name": "cosine",  # cosine | poly | step | plateau | none
        "warmup_epochs": 0,
        "min_lr_ratio": 0.01,
        "poly_power": 0.9,
        "step_size": 10,
        "gamma": 0.1,
        "patience": 3,
    },
    "augment": {
        "hflip": 0.5,
        "vflip": 0.0,
        "scale_rotate": 0.0,  # probability of Affine scale/rotate/shift
        "scale_limit": 0.2,
        "rotate_limit": 15,
        "color": 0.0,  # probability of colour jitter
        "elastic": 0.0,
        "grid_distortion": 0.0,
        "random_crop": False,  # crop image_size from a padded/resized image instead of resizing
        "albumentations": None,  # a full albumentations pipeline (A.to_dict form) used instead
        "copy_paste": 0.0,  # probability of pasting instances from other training images (trainables/copypaste.py)
        "copy_paste_classes": 3,  # n: the n rarest classes by pixel share, or a list of class names/indices
        "copy_paste_scale": [0.1, 2.0],  # large-scale jitter: scale range of each pasted instance
        "copy_paste_max": 3,  # at most this many instances per pasted image
    },
    "train": {
        "epochs": 20,
        "batch_size": 8,
        "image_size": [256, 256],  # [height, width] fed to the network
        "amp": "auto",  # auto (bf16 if supported, else fp16 on CUDA; off on CPU) | bf16 | fp16 | off
        "channels_last": True,  # on CUDA only
        "grad_clip": 1.0,  # max gradient norm; 0 disables
        "accum_steps": 1,
        "seed": 0,
        "num_workers": 0,
        "metric": "val_miou",  # checkpoint/selection metric
        "mode": "max",
        "device": "auto",  # auto | cpu | cuda | cuda:N
        "max_train_batches": None,  # cap batches per epoch (debug and benchmarks)
        "boundary_iou": "last",  # boundary IoU (val_biou) at: every epoch | last (the planned last epoch) | off
        "preview_images": 4,  # validation images + predictions kept with each best checkpoint (W&B); 0: none
        "oversample": 0.0,  # draw images with rare classes more often: strength, 0 = off (trainables/sampling.py)
        "oversample_cap": 5.0,  # most an image's sampling weight can be (the commonest images have 1)
    },
    "metrics": {  # how validation scores average (trainables/metrics.py); val_miou/val_dice are always dataset-level
        "average": "dataset",  # dataset | image: also report val_miou_image, val_dice_image (mean over images of
        #                        each image's mean over classes, Kaggle style); implied when one is train.metric
        "empty": 1,  # per-image scores: a pair with empty truth and empty prediction scores 1 | nan (left out)
    },
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
