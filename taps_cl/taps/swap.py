"""Run a module's own forward with some of its tensors replaced, safely from many threads.

``torch.func.functional_call`` swaps the tensors *on the module itself* for the duration of the
call, so two threads calling it on one shared module (a mixed-task model serving concurrent
requests) see each other's tensors. :func:`call_with` swaps them on a private shallow copy
instead: the module's forward (its padding, "same" convs, fused activations ...) runs as it is,
and the shared module is never written.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["call_with"]


def call_with(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor | None],
    args: tuple = (),
    kwargs: Mapping[str, object] | None = None,
) -> object:
    """``module(*args, **kwargs)`` with its own parameters or buffers ``tensors`` (top-level
    names, e.g. ``{"weight": w, "bias": None}``) in place of its own, on a private copy."""
    own = object.__new__(type(module))
    own.__dict__ = dict(module.__dict__)
    params, buffers = dict(module._parameters), dict(module._buffers)
    for name, value in tensors.items():
        if name in params:
            params[name] = value
        elif name in buffers:
            buffers[name] = value
        else:
            raise ValueError(f"{type(module).__name__} has no parameter or buffer {name!r}")
    own._parameters, own._buffers = params, buffers
    return own(*args, **(kwargs or {}))
