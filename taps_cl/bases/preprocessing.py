"""How raw images become a base's input, and which preprocessing a stored task version uses."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

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
