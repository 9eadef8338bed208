"""The hard threshold gate of TAPS with a straight-through gradient.

Forward: ``I_tau(s) = 1 if s >= tau else 0``. Backward: ``d gate / d s = 1``, so the score of
layer i receives ``dL/ds_i = <dL/dw_i, dw_i>``: it grows when the delta helps the loss.
"""

from __future__ import annotations

import torch


def hard_gate(score: torch.Tensor, tau: float) -> torch.Tensor:
    """Return the 0/1 gate of ``score`` with straight-through gradient (same dtype as score)."""
    hard = (score >= tau).to(score.dtype)
    # hard + score - score.detach(): value is exactly `hard`, gradient w.r.t. score is 1.
    return hard + (score - score.detach())


def gate_is_on(score: torch.Tensor, tau: float) -> bool:
    """The gate's value as a Python bool (for pruning and reports)."""
    return bool(score.detach() >= tau)
