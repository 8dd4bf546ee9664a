"""Pretrained weights: what was actually loaded is recorded (model, checkpoint, per-epoch record,
trials.csv), local encoder state dicts load through ``model.weights``, local Hugging Face folders
through ``model.encoder``; nothing is downloaded."""
from __future__ import annotations

import csv
import logging
from types import SimpleNamespace

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from safetensors.torch import save_file

from tests.conftest import tiny_config
from trainables.checkpoint import model_from_checkpoint
from trainables.errors import ConfigError
from trainables.loop import FoldTrainer
from trainables.models import RANDOM_INIT, build_model

SMALL_UNET = {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}


def known_values(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Give every parameter and buffer values no initialiser produces (k + sin of its position)."""
    with torch.no_grad():
        for k, (name, tensor) in enumerate(module.state_dict().items()):
            if tensor.is_floating_point():
                tensor.copy_(k + torch.sin(torch.arange(tensor.numel(), dtype=tensor.dtype)).reshape(tensor.shape))
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_encoder_holds(model: torch.nn.Module, saved: dict[str, torch.Tensor], prefix: str = "") -> None:
    own = model.encoder.state_dict()
    assert own, "the encoder has no weights"
    for name, tensor in own.items():
        assert torch.equal(tensor, saved[prefix + name]), name


def test_an_encoder_state_dict_path_is_loaded_and_recorded(tmp_path):
    source = smp.Unet("resnet18", encoder_weights=None, classes=2, **SMALL_UNET)
    saved = known_values(source.encoder)
    path = tmp_path / "resnet18-encoder.pt"
    torch.save(source.encoder.state_dict(), path)
    model = build_model("Unet", "resnet18", 3, weights=str(path), kwargs=SMALL_UNET)
    assert_encoder_holds(model, saved)
    assert model.weights_loaded == str(path.resolve())


def test_a_timm_model_state_dict_loads_into_a_tu_encoder(tmp_path):
    """A timm model's own state dict (here as safetensors, the form the timm hub stores)."""
    net = timm.create_model("resnet18", pretrained=False)
    saved = known_values(net)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    model = build_model("Unet", "tu-resnet18", 3, weights=str(path), kwargs=SMALL_UNET)
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(tensor, saved[name.removeprefix("model.")]), name
    assert model.weights_loaded == str(path.resolve())


def test_a_state_dict_of_another_encoder_is_refused_in_one_line(tmp_path):
    path = tmp_path / "resnet18-encoder.pt"
    torch.save(smp.Unet("resnet18", encoder_weights=None, classes=2).encoder.state_dict(), path)
    with pytest.raises(ConfigError) as err:
        build_model("Unet", "resnet34", 3, weights=str(path), kwargs=SMALL_UNET)  # resnet34 has more blocks
    message = str(err.value)
    assert str(path) in message and "model.weights" in message and "missing" in message and "\n" not in message


def test_a_missing_weights_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_model("Unet", "resnet18", 3, weights=str(tmp_path / "nope.pt"), kwargs=SMALL_UNET)


def test_random_init_is_recorded_as_such(caplog):
    assert build_model("Unet", "resnet18", 3, weights=None, kwargs=SMALL_UNET).weights_loaded == RANDOM_INIT
    assert build_model("Unet", "resnet18", 3, weights=RANDOM_INIT, kwargs=SMALL_UNET).weights_loaded == RANDOM_INIT
    with caplog.at_level(logging.WARNING, logger="trainables.models"):
        tried = build_model("segformer", "nvidia/mit-b0", 3, weights="imagenet")
    # offline (the tests' hub is): random init, and the model says so instead of "imagenet"
    assert tried.weights_loaded == (RANDOM_INIT if "RANDOM INIT" in caplog.text else "imagenet")


@pytest.fixture
def tiny_segformer_folder(tmp_path):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1],
                             decoder_hidden_size=16, num_labels=2)
    net = SegformerForSemanticSegmentation(config)
    saved = known_values(net.segformer)
    folder = tmp_path / "tiny-segformer"
    net.save_pretrained(folder)
    return folder, saved


def test_a_local_hugging_face_folder_is_the_segformer_encoder(tiny_segformer_folder):
    folder, saved = tiny_segformer_folder
    model = build_model("segformer", str(folder), 3, weights="imagenet")
    assert_encoder_holds(model, saved)
    assert model.weights_loaded == str(folder.resolve()) and model.net.config.num_labels == 3
    out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 3, 64, 64)
    # rebuilt without weights (as ensemble members are), it takes its shape from the folder's config
    again = build_model("segformer", str(folder), 3, weights=None)
    assert again.weights_loaded == RANDOM_INIT and again.net.config.hidden_sizes == [8, 16, 24, 32]


def test_the_checkpoint_and_each_epoch_record_what_was_loaded(sample, tmp_path):
    source = smp.Unet("resnet18", encoder_weights=None, classes=2, **SMALL_UNET)
    known_values(source.encoder)
    path = tmp_path / "encoder.pt"
    torch.save(source.encoder.state_dict(), path)
    idx = list(range(8))
    for asked, loaded in ((str(path), str(path.resolve())), (None, RANDOM_INIT)):
        cfg = tiny_config(**{"model.weights": asked, "train.epochs": 1, "train.max_train_batches": 1,
                             "train.image_size": [64, 64]})
        trainer = FoldTrainer(cfg, sample, idx[:6], idx[6:], fold=0)
        records = list(trainer.epochs())
        assert [r["weights"] for r in records] == [loaded]
        ckpt = trainer.best_checkpoint()
        assert ckpt["config"]["model"]["weights"] == loaded
        assert ckpt["extra"]["weights_requested"] == asked
        assert cfg["model"]["weights"] == asked  # the trainer's own config is left as given
        model_from_checkpoint(ckpt)  # rebuilds without loading anything


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_trials_csv_has_a_weights_column_and_a_mixed_search_is_warned_once(tmp_path, caplog):
    from tune.experiment import TrialsTable

    trials = [SimpleNamespace(trial_id=t, status="RUNNING", config={"fold": 0}, last_result=None, checkpoint=None,
                              num_failures=0) for t in "abc"]
    table = TrialsTable(tmp_path / "trials.csv", "val_miou", max_epochs=3)
    with caplog.at_level(logging.WARNING, logger="tune.experiment"):
        for k, weights in enumerate(["imagenet", RANDOM_INIT, RANDOM_INIT]):
            result = {"epoch": 1, "node": "w1", "weights": weights}
            table.on_trial_result(k, trials, trials[k], result)
            trials[k].last_result = result  # Tune sets it after the callbacks
            assert ("mixes" in caplog.text) == (k > 0)
    warnings = [r.getMessage() for r in caplog.records if "mixes" in r.getMessage()]
    assert len(warnings) == 1 and "imagenet" in warnings[0] and RANDOM_INIT in warnings[0]
    rows = read_rows(tmp_path / "trials.csv")
    assert [r["weights"] for r in rows] == ["imagenet", RANDOM_INIT, RANDOM_INIT]


def test_whether_the_hub_answers_is_asked_again_for_every_model(monkeypatch):
    """Trials reuse worker processes (resources.reuse_actors): one hub timeout switched the whole process
    offline for good, and every later trial there started from random init although the hub answered."""
    import os
    import socket

    import huggingface_hub.constants as hub_constants

    from trainables.models import hub_reachable

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the tests' offline hub, off for this test
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused = closed.getsockname()[1]  # nothing listens there once it is closed
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{refused}")
    assert hub_reachable() is False
    # a trial whose hub did not answer: its weights came from the cache or random init, offline (no retries)
    build_model("Unet", "resnet18", 3, weights="imagenet", kwargs=SMALL_UNET)
    assert "HF_HUB_OFFLINE" not in os.environ and hub_constants.HF_HUB_OFFLINE is False  # the process is not

    with socket.socket() as hub:  # the next trial in the same process: the hub answers now
        hub.bind(("127.0.0.1", 0))
        hub.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.getsockname()[1]}")
        assert hub_reachable() is True
