"""A stored task as a standalone timm model, in timm's Hugging Face layout.

:func:`save_timm_pretrained` writes ``config.json`` + ``model.safetensors``
(``timm.models.save_for_hf``) for a task's merged module (what a
:class:`~taps_cl.serving.TaskServer` serves), with the task's classes and the preprocessing it
was trained with; it is handed the module, preprocessing and input size, never the engine.
``Engine.save_pretrained`` calls it, so that

    model = timm.create_model("local-dir:DIR", pretrained=True)

builds the same network with the same weights (and ``timm.data.resolve_model_data_config(model)``
gives the task's input size, mean, std, interpolation and crop) without taps_cl installed.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

from torch import nn

from taps_cl.bases import Preprocessing

log = logging.getLogger(__name__)


def data_config(prep: Preprocessing, image_size: int) -> dict:
    """timm's data config for a task trained at ``image_size`` with ``prep``."""
    return {
        "input_size": (prep.channels, image_size, image_size),
        "mean": tuple(prep.mean),
        "std": tuple(prep.std),
        "interpolation": prep.interpolation,
        "crop_pct": prep.crop_pct,
        "crop_mode": prep.crop_mode,
    }


def save_timm_pretrained(
    module: nn.Module, directory: str | os.PathLike, prep: Preprocessing, image_size: int
) -> Path:
    """Write a merged timm ``module`` (``num_classes``/``pretrained_cfg`` already describing
    the task) to ``directory`` in timm's Hugging Face layout."""
    from timm.models import save_for_hf

    if not isinstance(getattr(module, "pretrained_cfg", None), dict):
        raise ValueError(
            f"save_pretrained writes timm's layout, but the base ({type(module).__name__}) is "
            "not a timm model; save engine.model(name).state_dict() with safetensors instead"
        )
    module = copy.deepcopy(module)
    cfg = data_config(prep, image_size)
    source = {k: v for k, v in module.pretrained_cfg.items() if k != "pool_size"}
    module.pretrained_cfg = {**source, **cfg}  # the task's preprocessing, not the source's
    out = Path(directory)
    save_for_hf(
        module,
        str(out),
        model_config={"label_names": module.pretrained_cfg.get("label_names")},
        safe_serialization=True,
        data_config=cfg,
    )
    log.info("wrote %s (config.json + model.safetensors)", out)
    return out
