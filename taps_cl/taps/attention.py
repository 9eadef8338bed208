"""Gated ``nn.MultiheadAttention``: per-task deltas on its input and output projections.

``nn.MultiheadAttention`` never calls its projections: it reads ``self.in_proj_weight`` (or
``q/k/v_proj_weight`` when query, key and value sizes differ) and ``self.out_proj.weight``
and hands them to ``F.multi_head_attention_forward`` or a fused kernel. So
:class:`TaskAdaptiveAttention` gates them where they are read:

- ``out_proj`` becomes a :class:`TaskAdaptiveLayer`, whose ``weight`` *is* the active task's
  effective weight (transparent wrapper), so the MHA's own forward reads the gated weight;
- each input projection gets a :class:`ProjectionGate`, and the MHA's own forward runs through
  ``torch.func.functional_call`` with the effective input weights.

Each gated projection is one TAPS layer with its own score, named ``<mha>.in_proj_weight`` (or
``<mha>.q_proj_weight`` ...) and ``<mha>.out_proj``. ``nn.TransformerEncoderLayer``'s fast path
reads the same attributes from the wrapper, which answers them for the active task.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

from taps_cl.taps.layer import GatedWeight, TaskAdaptiveLayer
from taps_cl.taps.wrap import Transparent


class ProjectionGate(GatedWeight):
    """The gated delta of one input-projection parameter of a ``nn.MultiheadAttention``."""

    def __init__(
        self,
        owner: nn.MultiheadAttention,
        attr: str,
        tau: float,
        score_init: float,
        **delta: object,
    ) -> None:
        super().__init__(tau, score_init, **delta)  # delta: kind, dtype (GatedWeight)
        # Kept out of _modules: the owner is registered once, under the attention wrapper.
        self.__dict__["_owner"] = owner
        self.weight_attr = attr

    @property
    def base_weight(self) -> torch.Tensor:
        return getattr(self.__dict__["_owner"], self.weight_attr)


class TaskAdaptiveAttention(Transparent):
    """Wraps one ``nn.MultiheadAttention``; gates its input and output projections per task."""

    def __init__(
        self,
        base_layer: nn.MultiheadAttention,
        tau: float,
        score_init: float = 0.15,
        **delta: object,
    ) -> None:
        if not isinstance(base_layer, nn.MultiheadAttention):
            raise TypeError(f"expected nn.MultiheadAttention, got {type(base_layer).__name__}")
        nn.Module.__init__(self)  # not super(): the next class is the wrapped MHA type
        base_layer.out_proj = TaskAdaptiveLayer(base_layer.out_proj, tau, score_init, **delta)
        self.base_layer = base_layer
        if base_layer._qkv_same_embed_dim:
            names = ["in_proj_weight"]
        else:
            names = ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        self.projections = nn.ModuleDict(
            {n: ProjectionGate(base_layer, n, tau, score_init, **delta) for n in names}
        )

    def gated_layers(self) -> dict[str, str]:
        """Layer name (relative to this module) -> path of its :class:`GatedWeight`."""
        layers = {n: f"projections.{n}" for n in self.projections}
        layers["out_proj"] = "base_layer.out_proj"
        return layers

    def _passthrough_target(self) -> nn.Module:
        return self._modules["base_layer"]

    def _passthrough(self, name: str) -> object:
        projections = self._modules.get("projections")
        if projections is not None and name in projections:
            return projections[name].active_weight()
        return getattr(self._passthrough_target(), name)

    def forward(self, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        weights = {n: g.active_weight() for n, g in self.projections.items() if g.applies()}
        if not weights:
            return self.base_layer(*args, **kwargs)
        return functional_call(self.base_layer, weights, args, kwargs)

    def plain(self, name: str | None) -> nn.Module:
        out_proj = self.base_layer.out_proj
        plain = copy.deepcopy(self.base_layer, {id(out_proj): out_proj.plain(name)})
        for attr, gate in self.projections.items():
            if name is not None and gate.is_active(name):
                with torch.no_grad():
                    weight = gate.effective_weight(name).detach().clone()
                setattr(plain, attr, nn.Parameter(weight))
        return plain

    def extra_repr(self) -> str:
        return f"gated={list(self.gated_layers())}"
