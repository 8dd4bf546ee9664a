"""Shared fixtures: an offline Hugging Face hub, a private mask cache, synthetic datasets, tiny configs.

The environment is set before anything imports ``huggingface_hub``/``transformers``/``torch`` (they
read it at import time), so every pretrained-weight attempt fails fast and falls back to random init.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"  # albumentations would ask the network for a newer version
# One intra-op thread (read when torch starts; the CLI subprocesses inherit it): on a small shared
# CPU machine two threads per process competing with other work run these tiny models far slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

if "huggingface_hub" in sys.modules:  # imported earlier by a plugin: switch its constant too
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "data" / "camvid-sample" / "train"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Nothing a test does may read or write ~/.cache/seghpo (an explicit cache_dir wins anyway)."""
    monkeypatch.setenv("SEGHPO_CACHE", str(tmp_path_factory.getbasetemp() / "default-cache"))


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sample-cache")


@pytest.fixture(scope="session")
def sample(sample_cache):
    """The shipped CamVid sample (72 images, 11 categories + background), loaded once per session."""
    from trainables.data import load_dataset

    return load_dataset(cache_dir=sample_cache)


def write_image(path: Path, height: int, width: int, mode: str = "RGB", seed: int = 0) -> np.ndarray:
    """A small random image file; returns the pixels written."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    if mode == "L":
        pixels = pixels[..., 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode=mode).save(path)
    return pixels


def write_coco(json_path: Path, images: list[dict], annotations: list[dict], categories: list[dict],
               image_root: Path | None = None) -> Path:
    """Write a COCO file and one PNG per image (under ``image_root``, default ``<json dir>/images``)."""
    image_root = image_root or json_path.parent / "images"
    for i, img in enumerate(images):
        write_image(image_root / img["file_name"], img["height"], img["width"], seed=i)
    for i, ann in enumerate(annotations):
        ann.setdefault("id", i + 1)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return json_path


@pytest.fixture
def coco_factory(tmp_path):
    """``coco_factory(images, annotations, categories, name=..., image_root=...)`` -> annotation path."""

    def make(images, annotations, categories, name="annotations.json", image_root=None):
        return write_coco(tmp_path / "coco" / name, images, annotations, categories, image_root)

    return make


def tiny_config(**overrides) -> dict:
    """The smallest useful training config: a 3-level Unet/resnet18 on 64x96 images, CPU, no download."""
    from trainables.config import resolve

    base = {
        "model.arch": "Unet", "model.encoder": "resnet18", "model.weights": None,
        "model.kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]},
        "train.image_size": [64, 96], "train.batch_size": 8, "train.epochs": 2, "train.device": "cpu",
        "train.seed": 0, "optimizer.lr": 3e-3,
    }
    base.update(overrides)
    return resolve(base)


# ---------------------------------------------------------------------------- markers and the fast tier
UNMARKED_SLOW_S = 5.0  # an unmarked test slower than this belongs in the slow tier
_unmarked_slow: list[tuple[float, str]] = []
# module fixtures that train or search before their first test (15-25 s each here): their tests are slow
SLOW_FIXTURES = {"experiment", "compared", "sweep_runs", "no_background", "two_workers", "e2e", "setup"}


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip, saying so, without a CUDA device; ``ray`` tests and the tests of a fixture
    in :data:`SLOW_FIXTURES` are ``slow`` as well."""
    cuda = None
    for item in items:
        if ("ray" in item.keywords or SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))) \
                and "slow" not in item.keywords:
            item.add_marker(pytest.mark.slow)
        if "gpu" in item.keywords:
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed and report.duration > UNMARKED_SLOW_S \
            and "slow" not in report.keywords:
        _unmarked_slow.append((report.duration, report.nodeid))


def pytest_terminal_summary(terminalreporter):
    """Keeps the fast tier fast: names the unmarked tests that took longer than a few seconds."""
    if _unmarked_slow:
        terminalreporter.write_sep("-", f"unmarked tests over {UNMARKED_SLOW_S:g} s: mark them @pytest.mark.slow")
        for seconds, nodeid in sorted(_unmarked_slow, reverse=True):
            terminalreporter.write_line(f"{seconds:6.1f}s {nodeid}")
