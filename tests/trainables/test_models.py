"""Model builders (smp and Hugging Face SegFormer, offline), parameter groups, checkpoints."""
from __future__ import annotations

import logging

import pytest
import segmentation_models_pytorch as smp
import torch

from trainables.checkpoint import FORMAT, load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from trainables.config import resolve
from trainables.errors import ConfigError, InputError
from trainables.models import HFSegmentation, build_model, model_problem, split_parameters

C = 5
SMALL_UNET = {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}

# (arch, encoder, weights, kwargs, expected class)
MODELS = [
    ("Unet", "resnet18", None, {}, smp.Unet),
    ("UnetPlusPlus", "resnet18", None, SMALL_UNET, smp.UnetPlusPlus),
    ("DeepLabV3Plus", "resnet18", None, {}, smp.DeepLabV3Plus),
    ("FPN", "resnet18", None, {}, smp.FPN),
    ("UPerNet", "resnet18", None, {}, smp.UPerNet),
    ("Segformer", "mit_b0", None, {}, smp.Segformer),  # smp's own SegFormer
    ("segformer", "nvidia/mit-b0", "imagenet", {}, HFSegmentation),  # offline: random init + warning
]


@pytest.mark.parametrize("arch, encoder, weights, kwargs, cls", MODELS, ids=[m[0] for m in MODELS])
def test_forward_backward(arch, encoder, weights, kwargs, cls, caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="trainables.models"):
        model = build_model(arch, encoder, C, weights=weights, kwargs=kwargs)
    assert type(model) is cls
    assert ("RANDOM INIT" in caplog.text) == (weights is not None)
    # eval(): DeepLabV3Plus and UPerNet pool to 1x1 before a BatchNorm, which needs >1 value in train mode
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    out = model(x)
    assert out.shape == (1, C, 64, 64) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    encoder_params, decoder_params = split_parameters(model)
    assert encoder_params and decoder_params
    for group in (encoder_params, decoder_params):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in group)
    assert len(encoder_params) + len(decoder_params) == len(list(model.parameters()))
    assert {id(p) for p in encoder_params}.isdisjoint(id(p) for p in decoder_params)


def test_hf_segformer_offline_fallback_keeps_the_random_init(caplog):
    """A failed download must not consume random numbers: same seed, same weights as weights=None."""
    torch.manual_seed(7)
    with caplog.at_level(logging.WARNING, logger="trainables.models"):
        tried = build_model("segformer", "nvidia/mit-b0", 3, weights="imagenet")
    assert "PRETRAINED WEIGHTS UNAVAILABLE for nvidia/mit-b0" in caplog.text and "RANDOM INIT" in caplog.text
    torch.manual_seed(7)
    plain = build_model("segformer", "nvidia/mit-b0", 3, weights=None)
    for (name, a), (_, b) in zip(tried.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name
    assert tried.net.config.hidden_sizes == [32, 64, 160, 256] and tried.net.config.num_labels == 3


@pytest.mark.parametrize("arch, encoder", [
    ("Unet", "resnet18"), ("unet", "resnet18"), ("FPN", "tu-resnet18"), ("Segformer", "mit_b0"),
    ("segformer", "nvidia/mit-b0"), ("segformer", "mit-b2"), ("segformer", "someone/segformer-b0-finetuned"),
])
def test_model_problem_accepts_valid(arch, encoder):
    assert model_problem(arch, encoder) is None


@pytest.mark.parametrize("arch, encoder, message", [
    ("Unett", "resnet18", "unknown architecture 'Unett'"),
    ("Unet", "resnet999", "smp does not know encoder 'resnet999'"),
    ("Unet", "tu-notamodel", "timm has no model 'notamodel'"),
    ("segformer", "resnet34", "Hugging Face name"),
])
def test_model_problem_explains_invalid(arch, encoder, message):
    problem = model_problem(arch, encoder)
    assert problem is not None and message in problem
    with pytest.raises(ConfigError, match="model"):
        build_model(arch, encoder, 3, weights=None)


@pytest.mark.parametrize("arch, encoder, kwargs", [
    ("Unet", "resnet18", SMALL_UNET), ("segformer", "nvidia/mit-b0", {}),
])
def test_checkpoint_round_trip(tmp_path, arch, encoder, kwargs):
    torch.manual_seed(0)
    model = build_model(arch, encoder, 4, weights=None, kwargs=kwargs)
    # move BatchNorm statistics away from their init, so buffers are checked too
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    model.eval()
    cfg = resolve({"model.arch": arch, "model.encoder": encoder, "model.weights": None, "model.kwargs": kwargs})
    names = ["background", "a", "b", "c"]
    ckpt = make_checkpoint(model.state_dict(), cfg, names, "multiclass", "val_miou", 0.25, 3, 1,
                           extra={"dataset": "abc"})
    path = save_checkpoint(ckpt, tmp_path / "fold1")
    assert path == tmp_path / "fold1" / "model.pt" and path.exists()
    loaded = load_checkpoint(tmp_path / "fold1")  # a directory means its model.pt
    assert loaded["format"] == FORMAT and loaded["class_names"] == names
    assert loaded["model"] == {"arch": arch, "encoder": encoder, "num_classes": 4, "kwargs": kwargs}
    assert (loaded["score"], loaded["epoch"], loaded["fold"], loaded["extra"]) == (0.25, 3, 1, {"dataset": "abc"})
    assert loaded["config"] == cfg
    rebuilt = model_from_checkpoint(loaded).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_load_checkpoint_errors_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(InputError, match="cannot read checkpoint") as err:
        load_checkpoint(garbage)
    assert str(err.value).startswith(str(garbage))
    with pytest.raises(InputError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(InputError, match="not a seghpo-checkpoint/1 checkpoint"):
        load_checkpoint(other)


@pytest.mark.parametrize("arch, encoder, kwargs, dropped", [
    ("Unet", "resnet18", SMALL_UNET, ["encoder.layer3", "encoder.layer4"]),
    ("DeepLabV3Plus", "resnet18", {"encoder_depth": 4}, ["encoder.layer4"]),
    ("Unet", "mit_b0", {"encoder_depth": 4, "decoder_channels": [64, 32, 16, 8]},
     ["encoder.patch_embed4", "encoder.block4", "encoder.norm4"]),
    ("Unet", "resnet18", {}, []),  # full depth: every stage is used
])
def test_unused_encoder_stages_are_dropped_without_changing_the_model(arch, encoder, kwargs, dropped):
    from trainables.models import _build_smp

    torch.manual_seed(0)
    full = _build_smp(arch, encoder, C, None, dict(kwargs)).eval()
    torch.manual_seed(0)
    model = build_model(arch, encoder, C, weights=None, kwargs=kwargs).eval()
    assert model.trimmed_modules == dropped
    state, full_state = model.state_dict(), full.state_dict()
    assert set(state) == {k for k in full_state if not k.startswith(tuple(f"{d}." for d in dropped))}
    assert all(torch.equal(state[k], full_state[k]) for k in state)  # same random init for what is kept
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model(x), full(x))
    # a checkpoint written before trimming (with the unused weights) still loads
    ckpt = make_checkpoint(full_state, resolve({"model.arch": arch, "model.encoder": encoder, "model.kwargs": kwargs}),
                           [f"c{i}" for i in range(C)], "multiclass", "val_miou", 0.5, 1, None)
    with torch.no_grad():
        assert torch.equal(model_from_checkpoint(ckpt).eval()(x), full(x))


def test_encoder_weights_used_without_calling_their_module_are_kept():
    """The hooks only see module calls: weights read directly (here ``skip.weight``) must survive
    because the encoder's output would change without them."""
    from torch import nn

    from trainables.models import trim_unused_encoder

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.skip, self.unused = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return [self.stem(x) + nn.functional.conv2d(x, self.skip.weight)]

    model = nn.Module()
    model.encoder = Encoder()
    assert trim_unused_encoder(model) == []  # dropping skip changed the output: everything put back
    assert isinstance(model.encoder.skip, nn.Conv2d) and isinstance(model.encoder.unused, nn.Conv2d)


@pytest.mark.parametrize("weights", [None, "imagenet"])
def test_model_kwargs_smp_refuses_are_one_config_error(weights, caplog):
    """A depth-5 Unet given 3 decoder widths, or a second value for an argument smp sets: smp's ValueError or
    TypeError becomes one line naming model.kwargs (before, a traceback), with no 'pretrained weights
    unavailable' before it when weights were asked for (the weights are not what went wrong)."""
    with pytest.raises(ConfigError, match=r"model\.kwargs: Unet/resnet18 refuses .*decoder_channels.*3 blocks"):
        build_model("Unet", "resnet18", 3, weights, {"decoder_channels": [64, 32, 16]})
    with pytest.raises(ConfigError, match=r"model\.kwargs: Unet/resnet18 refuses \{'depth': 3\}: .*multiple values"):
        build_model("Unet", "resnet18", 3, weights, {"depth": 3})  # Unet passes encoder_depth as depth
    assert "PRETRAINED" not in caplog.text  # the weights are not what went wrong
