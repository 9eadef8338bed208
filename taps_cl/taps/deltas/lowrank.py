"""Low-rank deltas as peft's LoRA makes them: ``(lora_b @ lora_a).view(w.shape) * alpha / rank``.

``lora_b`` starts at zero (identity at start), ``lora_a`` kaiming-uniform; a convolution's
``lora_a`` is ``rank x (in/groups * kh * kw)``. A weight whose factors would not be smaller than
itself (e.g. a depthwise 3x3 conv) keeps a dense delta. The stored factors have the scaling
folded into ``lora_b``, so a stored low-rank delta needs no config to be read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from taps_cl.taps.deltas.kind import DeltaKind, Shape, delta_op, register_delta_kind

if TYPE_CHECKING:
    from taps_cl.config import TAPSConfig


@register_delta_kind
class LowRank(DeltaKind):
    name = "lowrank"
    params = ("lora_a", "lora_b")
    stored = ("lora_a", "lora_b")

    def __init__(self, rank: int, alpha: float | None = None) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"a low-rank delta needs a rank >= 1 (delta_rank), got {rank!r}")
        self.rank, self.alpha = rank, alpha

    @classmethod
    def from_config(cls, config: TAPSConfig) -> LowRank:
        if config.rank is None:
            raise ValueError("delta_kind 'lowrank' needs delta_rank (an int >= 1) or a size")
        return cls(config.rank, config.delta_alpha)

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def applies(self, shape: torch.Size) -> bool:
        return self.rank * (math.prod(shape[1:]) + shape[0]) < math.prod(shape)

    def init(self, weight: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        # peft's init (kaiming-uniform A, zero B), seeded so a task inits alike anywhere.
        gen = torch.Generator().manual_seed(seed * 1_000_003 + weight.numel())
        bound = 1.0 / weight[0].numel() ** 0.5
        a = torch.empty(self.rank, weight[0].numel()).uniform_(-bound, bound, generator=gen)
        return {"lora_a": a.to(weight), "lora_b": weight.new_zeros(weight.shape[0], self.rank)}

    def value(self, params: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        product = params["lora_b"] @ params["lora_a"]
        return product.view(weight.shape) * self.scaling

    def to_stored(
        self, params: Mapping[str, torch.Tensor], weight: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return {"lora_a": params["lora_a"], "lora_b": params["lora_b"] * self.scaling}

    def shapes(self, shape: torch.Size) -> dict[str, Shape]:
        return {"lora_a": (self.rank, math.prod(shape[1:])), "lora_b": (shape[0], self.rank)}

    @classmethod
    def expected(cls, shape: torch.Size, given: Mapping[str, Shape]) -> dict[str, Shape]:
        a = given.get("lora_a", ())
        rank = a[0] if len(a) == 2 else -1  # the rank both factors must agree on
        return {"lora_a": (rank, math.prod(shape[1:])), "lora_b": (shape[0], rank)}

    @classmethod
    def from_stored(cls, stored: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        return (stored["lora_b"] @ stored["lora_a"]).view(weight.shape)

    @classmethod
    def row_parts(
        cls, stored: Mapping[str, torch.Tensor], dense: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return {"lora_a": stored["lora_a"], "lora_b": stored["lora_b"]}

    @classmethod
    def apply_rows(
        cls,
        layer: nn.Module,
        x: torch.Tensor,
        parts: Mapping[str, torch.Tensor],
        attr: str = "weight",
    ) -> torch.Tensor:
        """The two thin factors as peft's LoRA runs them: the layer's own op into ``rank``
        channels (a conv's ``kxk``, a linear's ``x A^T``), then ``lora_b`` mixes channels
        (a ``1x1`` conv, ``h B^T``). A grouped conv or another layer type: the dense delta."""
        a, b = parts["lora_a"], parts["lora_b"]
        w = getattr(layer, attr)
        conv = isinstance(layer, _ConvNd) and layer.groups == 1 and not layer.transposed
        if not (conv or isinstance(layer, nn.Linear)):
            return super().apply_rows(layer, x, {"delta": (b @ a).view(w.shape)}, attr)
        h = delta_op(layer, x, a.view(a.shape[0], *w.shape[1:]), attr)
        if not conv:
            return torch.nn.functional.linear(h, b)
        return (b @ h.flatten(2)).view(h.shape[0], b.shape[0], *h.shape[2:])

    def __repr__(self) -> str:
        return f"LowRank(rank={self.rank}, alpha={self.alpha})"
