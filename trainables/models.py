"""Build a segmentation model by name: any smp architecture/encoder, or Hugging Face SegFormer.

``build_model(arch, encoder, num_classes, weights)`` always returns an ``nn.Module`` mapping
(B, 3, H, W) images to (B, C, H, W) logits at the input size. Pretrained weights are tried
through the libraries' own loading code; when they cannot be had (offline machine, unknown
weights) the model is built from its known configuration with random init and a warning.

``weights`` may also be the path of a local encoder state dict (``.pt``/``.pth``/``.bin`` or
``.safetensors``: an smp encoder's ``state_dict()``, a whole smp model's, or a timm model's for
``tu-`` encoders), loaded into the encoder; a SegFormer's local Hugging Face folder goes in
``encoder``. The model's ``weights_loaded`` says what it got: the weights' name (``imagenet``),
``random-init``, or the resolved path, which checkpoints and trial records carry on.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import torch
import torch.nn.functional as F
from torch import nn

from trainables.errors import ConfigError

logger = logging.getLogger(__name__)

HF_ARCHS = ("segformer",)
RANDOM_INIT = "random-init"  # what weights_loaded says when no pretrained weights were loaded
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# SegFormer MiT backbones (Xie et al. 2021, Table 1), so the model can be built offline.
MIT_CONFIGS = {
    "b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], decoder_hidden_size=256),
    "b1": dict(hidden_sizes=[64, 128, 320, 512], depths=[2, 2, 2, 2], decoder_hidden_size=256),
    "b2": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3], decoder_hidden_size=768),
    "b3": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 18, 3], decoder_hidden_size=768),
    "b4": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 8, 27, 3], decoder_hidden_size=768),
    "b5": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 6, 40, 3], decoder_hidden_size=768),
}


def smp_archs() -> dict[str, type]:
    import segmentation_models_pytorch as smp

    return {cls.__name__.lower(): cls for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()}


def arch_names() -> list[str]:
    return sorted({cls.__name__ for cls in smp_archs().values()}) + list(HF_ARCHS)


def is_hf_arch(arch: str) -> bool:
    """``segformer`` is the Hugging Face model; smp's own class name ``Segformer`` stays smp's."""
    return arch.lower() in HF_ARCHS and arch != "Segformer"


def _mit_variant(encoder: str) -> str | None:
    name = encoder.lower().rsplit("/", 1)[-1]
    for variant in MIT_CONFIGS:
        if name in (f"mit-{variant}", f"mit_{variant}") or name.startswith(f"segformer-{variant}"):
            return variant
    return None


def weights_file(weights) -> Path | None:
    """``model.weights`` as a local state dict file: a path (it has a directory part or a weights
    suffix); None for a weights name such as ``imagenet`` (even where a folder of that name
    exists) or for no weights."""
    if not weights or weights == RANDOM_INIT or not isinstance(weights, (str, os.PathLike)):
        return None
    text = str(weights)
    path = Path(text).expanduser()
    return path if "/" in text or os.sep in text or path.suffix in WEIGHT_SUFFIXES else None


def is_local_folder(encoder: str) -> bool:
    """A Hugging Face model saved on disk (``save_pretrained``/``huggingface-cli download --local-dir``)."""
    return (Path(encoder).expanduser() / "config.json").is_file()


def model_problem(arch: str, encoder: str) -> str | None:
    """Why ``(arch, encoder)`` cannot be built, in the user's words; None when it can."""
    if is_hf_arch(arch):
        if _mit_variant(encoder) is None and "/" not in encoder and not is_local_folder(encoder):
            return f"segformer needs a Hugging Face name such as nvidia/mit-b0 .. nvidia/mit-b5, got {encoder!r}"
        return None
    if arch.lower() not in smp_archs():
        return f"unknown architecture {arch!r}; options: {', '.join(arch_names())}"
    import segmentation_models_pytorch as smp

    if encoder.startswith("tu-"):
        import timm

        return None if timm.is_model(encoder[3:]) else f"timm has no model {encoder[3:]!r} (encoder {encoder!r})"
    if encoder not in smp.encoders.get_encoder_names():
        return f"smp does not know encoder {encoder!r}; use one of smp's encoders or 'tu-<timm model>'"
    return None


def hub_address() -> tuple[str, int]:
    """Host and port of the Hugging Face hub the libraries download from (``HF_ENDPOINT``, a mirror, or
    huggingface.co)."""
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)


def _offline_by_user() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE",
                                                                                      "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the hub answers now. Asked for every pretrained model (a trial's), not once per process: a
    worker process runs many trials (``resources.reuse_actors``), and one timeout must not make all of
    its later trials start from random init."""
    if _offline_by_user():
        return False
    try:
        socket.create_connection(hub_address(), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline_unless_reachable():
    """While a pretrained model is built: the hub in offline mode if it does not answer now (no slow
    retries; weights already in the cache still load), and the process's own setting back afterwards."""
    if hub_reachable():
        yield
        return
    try:
        import huggingface_hub.constants as hub_constants
    except ImportError:
        hub_constants = None
    env, constant = os.environ.get("HF_HUB_OFFLINE"), getattr(hub_constants, "HF_HUB_OFFLINE", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = constant


class HFSegmentation(nn.Module):
    """A transformers semantic-segmentation model returning logits upsampled to the input size."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def encoder(self) -> nn.Module:
        return self.net.segformer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(pixel_values=x).logits
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _loaded(model: nn.Module, weights: str) -> nn.Module:
    model.weights_loaded = weights
    return model


def _build_segformer(encoder: str, num_classes: int, weights: str | None, kwargs: dict) -> nn.Module:
    """``from_pretrained`` of a hub name or of a local folder; ``weights_loaded`` says which it got."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    local = is_local_folder(encoder)
    if weights:
        rng = torch.get_rng_state()
        try:
            with contextlib.nullcontext() if local else hub_offline_unless_reachable():
                net = SegformerForSemanticSegmentation.from_pretrained(
                    encoder, num_labels=num_classes, ignore_mismatched_sizes=True, **kwargs)
            return _loaded(HFSegmentation(net), str(Path(encoder).expanduser().resolve()) if local else str(weights))
        except (OSError, ValueError) as exc:
            logger.warning("PRETRAINED WEIGHTS UNAVAILABLE for %s (%s); building it with RANDOM INIT",
                           encoder, str(exc).splitlines()[0])
            torch.set_rng_state(rng)
    if local:  # its own shape, from the folder's config.json (no weights read)
        config = SegformerConfig.from_pretrained(encoder, num_labels=num_classes, **kwargs)
        return _loaded(HFSegmentation(SegformerForSemanticSegmentation(config)), RANDOM_INIT)
    variant = _mit_variant(encoder)
    if variant is None:
        raise ConfigError("config", "model.encoder", f"no offline configuration known for {encoder!r}")
    config = SegformerConfig(num_labels=num_classes, **MIT_CONFIGS[variant], **kwargs)
    return _loaded(HFSegmentation(SegformerForSemanticSegmentation(config)), RANDOM_INIT)


def _build_smp(arch: str, encoder: str, num_classes: int, weights: str | None, kwargs: dict) -> nn.Module:
    cls = smp_archs()[arch.lower()]
    if not weights:
        return _loaded(_random_smp(cls, arch, encoder, num_classes, kwargs), RANDOM_INIT)
    rng = torch.get_rng_state()  # a failed attempt must not change the random init that follows
    try:
        with hub_offline_unless_reachable():
            model = cls(encoder_name=encoder, encoder_weights=weights, classes=num_classes, **kwargs)
        return _loaded(model, str(weights))
    except Exception as exc:  # smp raises hub, HTTP, key and value errors for missing weights
        torch.set_rng_state(rng)
        model = _random_smp(cls, arch, encoder, num_classes, kwargs, exc)  # bad kwargs: their one line, no warning
        logger.warning("PRETRAINED WEIGHTS UNAVAILABLE for %s/%s=%s (%s: %s); building it with RANDOM INIT",
                       arch, encoder, weights, type(exc).__name__, str(exc).splitlines()[0][:200])
        return _loaded(model, RANDOM_INIT)


def _random_smp(cls: type, arch: str, encoder: str, num_classes: int, kwargs: dict,
                earlier: Exception | None = None) -> nn.Module:
    """The model with random init; arguments smp refuses are the user's model.kwargs, in one line.
    After a failed attempt with weights (``earlier``), smp may say only the argument's name (a
    KeyError): the first attempt's message then says more."""
    try:
        return cls(encoder_name=encoder, encoder_weights=None, classes=num_classes, **kwargs)
    except (TypeError, ValueError, KeyError) as exc:
        why = earlier if isinstance(exc, KeyError) and isinstance(earlier, (TypeError, ValueError)) else exc
        raise ConfigError("config", "model.kwargs", f"{arch}/{encoder} refuses {kwargs}: {why}") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``torch.save``d state dict (or a checkpoint dict holding one) or a safetensors file."""
    if not path.is_file():
        raise ConfigError(path, "model.weights", "weights file not found (give an encoder state dict: .pt, .pth, "
                                                 ".bin or .safetensors)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise several kinds for damaged or foreign files
        raise ConfigError(path, "model.weights", f"cannot read weights ({type(exc).__name__}: "
                                                 f"{str(exc).splitlines()[0][:200]})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(path, "model.weights", "not a state dict (a mapping of names to tensors)")
    return state


def _aligned(state: dict[str, torch.Tensor], expected: dict) -> dict[str, torch.Tensor]:
    """``state`` with the key prefix that matches the encoder best: as saved, without a whole
    model's ``encoder.`` (or DDP's ``module.``), or with ``model.`` (a timm model's state dict
    for smp's timm-universal encoder)."""
    variants = [state, {f"model.{k}": v for k, v in state.items()}]
    for prefix in ("module.", "encoder.", "module.encoder."):
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        variants += [stripped, {f"model.{k}": v for k, v in stripped.items()}]
    return max(variants, key=lambda s: len(expected.keys() & s.keys()))


def load_encoder_weights(model: nn.Module, path: Path) -> None:
    """Load a local state dict into ``model.encoder``: every encoder tensor must be there with its
    shape (extra entries, such as a classifier head, are left out)."""
    encoder = model.encoder
    expected = encoder.state_dict()
    state = _aligned(read_state_dict(path), expected)
    missing = [k for k in expected if k not in state]
    if missing:
        raise ConfigError(path, "model.weights", f"not a state dict of this encoder: {len(missing)} of its "
                                                 f"{len(expected)} tensors are missing, e.g. {missing[0]!r} "
                                                 f"(the file has e.g. {next(iter(state), None)!r})")
    wrong = [k for k in expected if state[k].shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise ConfigError(path, "model.weights", f"{len(wrong)} tensors have other shapes than the encoder's, e.g. "
                                                 f"{k!r}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}")
    encoder.load_state_dict({k: state[k] for k in expected})


def _encoder_output(encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor] | None:
    try:
        with torch.no_grad():
            return [f.clone() for f in encoder(x)]
    except Exception:  # an encoder that needs other input sizes: leave it as it is
        return None


def trim_unused_encoder(model: nn.Module) -> list[str]:
    """Drop encoder modules that a forward pass never calls; returns their names.

    smp builds the whole backbone and, with ``encoder_depth`` < 5, skips its last stages in
    ``forward`` (ResNet's ``layer4`` is 2/3 of resnet18's weights): they would be trained by no
    one, yet saved in every checkpoint, copied by Tune and loaded by every ensemble member. Found
    by forward hooks, replaced by ``nn.Identity`` only if the encoder's output is then unchanged.
    """
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        return []
    called: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, _args: called.add(id(mod))) for m in encoder.modules()]
    was_training = encoder.training
    encoder.eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    try:
        before = _encoder_output(encoder, x)
    finally:
        for hook in hooks:
            hook.remove()
    dropped: dict[str, nn.Module] = {}
    if before is not None:
        for name, module in encoder.named_modules():
            if not name or any(name.startswith(f"{d}.") for d in dropped) or id(module) in called:
                continue
            if any(id(m) in called for m in module.modules()) or next(module.parameters(), None) is None:
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = encoder.get_submodule(parent_name) if parent_name else encoder
            dropped[name] = module
            setattr(parent, attr, nn.Identity())
    after = _encoder_output(encoder, x) if dropped else before
    if dropped and (after is None or len(after) != len(before)
                    or not all(torch.equal(a, b) for a, b in zip(after, before))):
        for name, module in dropped.items():  # something used those weights after all: put them back
            parent_name, _, attr = name.rpartition(".")
            setattr(encoder.get_submodule(parent_name) if parent_name else encoder, attr, module)
        dropped = {}
    encoder.train(was_training)
    if dropped:
        logger.debug("encoder modules never called, dropped: %s", ", ".join(dropped))
    return list(dropped)


def build_model(arch: str, encoder: str, num_classes: int, weights: str | None = "imagenet",
                kwargs: dict | None = None) -> nn.Module:
    problem = model_problem(arch, encoder)
    if problem:
        raise ConfigError("config", "model", problem)
    kwargs = dict(kwargs or {})
    if weights == RANDOM_INIT:  # a checkpoint's config records random init this way
        weights = None
    local = weights_file(weights)
    if local is not None:
        weights = None  # built with random init, then the file's tensors go into the encoder
    if is_hf_arch(arch):
        model = _build_segformer(encoder, num_classes, weights, kwargs)
    else:
        model = _build_smp(arch, encoder, num_classes, weights, kwargs)
    if local is not None:
        load_encoder_weights(model, local)  # before trimming: the file holds the whole encoder
        model.weights_loaded = str(local.resolve())
    if not is_hf_arch(arch):
        model.trimmed_modules = [f"encoder.{name}" for name in trim_unused_encoder(model)]
    return model


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(encoder parameters, decoder/head parameters) for the encoder learning-rate split."""
    encoder = getattr(model, "encoder", None)
    enc_ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    enc = [p for p in model.parameters() if id(p) in enc_ids and p.requires_grad]
    rest = [p for p in model.parameters() if id(p) not in enc_ids and p.requires_grad]
    return enc, rest
