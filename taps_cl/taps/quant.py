"""How a finalised task's delta tensors are stored: float32, bfloat16 or int8.

``encode(t, dtype)`` gives the stored form (``{"": tensor}``, plus ``{"scale": s}`` for int8) and
``decode`` gives back the float32 value the frozen task computes with. A task is *settled* with
exactly ``decode(encode(t))``, and a task loaded from a store calls the same ``decode`` on the
same bytes, so both compute bit for bit the same outputs (the zero-forgetting invariant).

int8 is symmetric per output channel (dim 0): ``scale_c = max_j |t_cj| / 127``,
``q = round(t / scale_c)``, so ``|t - q * scale_c| <= scale_c / 2`` in every channel (a channel
of zeros gets scale 0 and decodes to zeros).
"""

from __future__ import annotations

import torch

DELTA_DTYPES = ("float32", "bfloat16", "int8")
_QMAX = 127.0


def encode(t: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """The stored form of ``t`` (float): ``{"": values}`` and, for int8, ``{"scale": scales}``."""
    t = t.detach().float().cpu().contiguous()
    if dtype == "float32":
        return {"": t.clone()}
    if dtype == "bfloat16":
        return {"": t.to(torch.bfloat16)}
    if dtype == "int8":
        rows = t.reshape(t.shape[0], -1)
        scale = rows.abs().amax(dim=1) / _QMAX
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(rows / safe[:, None]).clamp_(-_QMAX, _QMAX).to(torch.int8)
        return {"": q.reshape(t.shape).contiguous(), "scale": scale}
    raise ValueError(f"delta_dtype must be one of {DELTA_DTYPES}, got {dtype!r}")


def decode(values: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 value of a stored tensor (its dtype says how it was stored)."""
    if values.dtype == torch.int8:
        if scale is None:
            raise ValueError("an int8 delta needs its per-channel scale ('scale.*' tensor)")
        shape = (-1,) + (1,) * (values.dim() - 1)
        return values.to(torch.float32) * scale.to(torch.float32).reshape(shape)
    return values.to(torch.float32)
