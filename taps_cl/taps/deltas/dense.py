"""The paper's delta: one full tensor per task and weight, zero at start.

It is also what every kind computes with once settled (the decoded stored value), and what a
layer keeps where another kind does not apply (e.g. low-rank factors no smaller than the weight).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from taps_cl.taps.deltas.kind import DeltaKind, Shape, register_delta_kind

if TYPE_CHECKING:
    from taps_cl.config import TAPSConfig


@register_delta_kind
class Dense(DeltaKind):
    name = "dense"
    params = ("delta",)
    stored = ("delta",)

    @classmethod
    def from_config(cls, config: TAPSConfig) -> Dense:
        if config.delta_rank is not None:
            raise ValueError(
                f"delta_rank={config.delta_rank} asks for low-rank deltas but delta_kind is "
                "'dense'; drop one of them"
            )
        return cls()

    def init(self, weight: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        return {"delta": torch.zeros_like(weight)}

    def value(self, params: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        return params["delta"]

    def to_stored(
        self, params: Mapping[str, torch.Tensor], weight: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return {"delta": params["delta"]}

    @classmethod
    def expected(cls, shape: torch.Size, given: Mapping[str, Shape]) -> dict[str, Shape]:
        return {"delta": tuple(shape)}

    @classmethod
    def from_stored(cls, stored: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        return stored["delta"]  # the decoded tensor itself: float32 stores are never copied
