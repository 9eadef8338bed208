"""Row kernels: a gated layer's work on a mixed-task batch in a fixed number of ops.

Punica's BGMV kernel (and vLLM's ``punica_wrapper``) applies each row's own LoRA adapter to its
row in one launch: the factors are gathered per row and multiplied batch-wise, so the cost of a
batch does not depend on how many adapters it holds. The same for a TAPS layer, from tensors
stacked per slot (a task's position in the mixed model) once, when the mixed model is built:

- :class:`LowRankRows` (a ``nn.Linear`` or a pointwise conv whose tasks keep low-rank deltas):
  the base op once, then ``y += B_row (A_row x)`` for every row at once (two gathers and two
  batched matmuls; ranks zero-padded, zero factors where a task keeps no delta).
- :class:`WeightRows` (any other ``nn.Linear``/``nn.Conv2d``, e.g. depthwise or ``k x k`` convs
  with dense deltas): each slot's ``W + dW`` stacked; one gather and one op, the rows folded
  into the channels of a grouped conv (``[N, C, H, W]`` as ``[1, N*C, H, W]``, ``groups * N``)
  or a batched matmul. No base pass: the row's effective weight is its merged weight.

Few tasks on a layer run cheaper one op per task (see :data:`GATHER_FROM`).

:func:`conv2d` also crops a convolution's kernel to the taps that can reach the input: at small
spatial sizes (a 5x5 depthwise conv on 1x1 inputs) the padded taps only ever multiply zeros,
and the cropped conv gives the same sums without the slow generic kernel they would take.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from taps_cl.taps.rowplan import RowPlan
from taps_cl.taps.swap import call_with

# From this many distinct computations in a layer (tasks with their own delta there, plus the
# base for tasks without one) the gathered kernels run; fewer run one op per task on its rows.
# Measured in benchmarks/mixed.py; override per model: MixedTaskModel(..., gather_from=k).
GATHER_FROM = 2
# Largest gathered per-row tensor of one call (numbers, N rows times a row's share): above it
# the copy costs more than the per-task ops it saves.
GATHER_MAX_NUMEL = 1 << 20
# Low-rank rows laid out by task are padded to the largest task's rows: at most this many
# times the batch (else one op per task).
PAD_MAX = 2
# Largest per-slot stack a layer keeps (numbers); a larger layer runs one op per task.
STACK_MAX_NUMEL = 1 << 24
# Largest stack of effective weights a low-rank layer keeps besides its factors (numbers).
WEIGHT_STACK_MAX_NUMEL = 1 << 21


def plain_conv2d(layer: nn.Module) -> bool:
    """A module running torch's own ``Conv2d.forward`` with zero padding (``F.conv2d``)."""
    return type(layer).forward is nn.Conv2d.forward and layer.padding_mode == "zeros"


def _tf_same(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """timm's ``Conv2dSame`` input padding (TensorFlow "same", extra pixel right/bottom)."""
    pads = []
    for i in (1, 0):  # F.pad takes the last dim first
        size, k, s, d = x.shape[-2 + i], conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        pad = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads += [pad // 2, pad - pad // 2]
    return F.pad(x, pads)


# Conv classes whose forward is torch's conv of ``self.weight``, ``self.bias``, ``self.groups``
# on an input they pad first, by that padding: rows fold into groups and kernels crop there too.
_PADDING_FORWARDS = {"timm.layers.conv2d_same.Conv2dSame": _tf_same}


def _padding(layer: nn.Module):
    owner = next(k for k in type(layer).__mro__ if "forward" in vars(k))
    return _PADDING_FORWARDS.get(f"{owner.__module__}.{owner.__qualname__}")


def folding_conv2d(layer: nn.Module) -> bool:
    """A conv whose rows fold into groups: a plain one, or one of ``_PADDING_FORWARDS``."""
    return plain_conv2d(layer) or (isinstance(layer, nn.Conv2d) and _padding(layer) is not None)


def plain_linear(layer: nn.Module) -> bool:
    return type(layer).forward is nn.Linear.forward


def _pointwise(conv: nn.Conv2d) -> bool:
    return (
        conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.groups == 1
        and (conv.padding == "valid" or conv.padding == (0, 0))
    )


def _taps(size: int, k: int, s: int, p: int, d: int) -> tuple[int, int, int] | None:
    """(first tap, last tap + 1, new padding) of the taps reaching an input of ``size``, or
    None if all do or the cropped conv would not keep the output size."""
    out = (size + 2 * p - d * (k - 1) - 1) // s + 1
    used = [j for j in range(k) if any(0 <= i * s + j * d - p < size for i in range(out))]
    if not used or (used[0] == 0 and used[-1] == k - 1):
        return None
    lo, hi = used[0], used[-1] + 1
    pad = p - lo * d
    if pad < 0 or (size + 2 * pad - d * (hi - lo - 1) - 1) // s + 1 != out:
        return None
    return lo, hi, pad


def _crop(conv: nn.Conv2d, size: tuple[int, int], w: torch.Tensor) -> tuple[tuple, tuple]:
    """``(slices, padding)``: the kernel taps of a plain ``conv`` with weights ``w`` that reach
    an input of ``size``, and the padding that keeps the output the same."""
    padding = conv.padding
    if isinstance(padding, str):
        return (slice(None), slice(None)), padding
    dims = [
        _taps(size[i], w.shape[-2 + i], conv.stride[i], padding[i], conv.dilation[i])
        for i in range(2)
    ]
    slices = tuple(slice(*d[:2]) if d else slice(None) for d in dims)
    return slices, tuple(d[2] if d else p for d, p in zip(dims, padding, strict=True))


def conv2d(
    conv: nn.Conv2d,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    padding: tuple | None = None,
) -> torch.Tensor:
    """``F.conv2d`` with ``conv``'s stride, padding and dilation, the kernel cropped to the
    taps that reach ``x`` (exactly the uncropped conv where none is cropped). ``padding``
    given: ``weight`` is cropped already and ``padding`` is its padding."""
    if padding is None and not plain_conv2d(conv):  # e.g. Conv2dSame: pads, then none
        x, padding = _padding(conv)(conv, x), (0, 0)
    if padding is None:
        slices, padding = _crop(conv, x.shape[-2:], weight)
        weight = weight[(..., *slices)]
    if (
        weight.shape[-2:] == (1, 1)
        and padding == (0, 0)
        and weight.shape[0] == groups == x.shape[1]
    ):
        # A one-tap depthwise conv is a per-channel scale: (a grouped conv with as many
        # groups as the folded rows' channels takes a slow generic kernel)
        out = x[..., :: conv.stride[0], :: conv.stride[1]] * weight.view(1, -1, 1, 1)
        return out if bias is None else out.add_(bias.view(1, -1, 1, 1))
    if x.shape[0] == 1 and groups == x.shape[1] == weight.shape[0] > 1:  # folded depthwise
        return _depthwise_folded(conv, x, weight, bias, padding)
    return F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, groups)


def _depthwise_folded(conv, x, weight, bias, padding) -> torch.Tensor:
    """A depthwise conv over rows folded into channels at a tiny spatial size (a grouped conv
    with that many groups takes a slow generic kernel): one multiply-add per kernel tap."""
    if isinstance(padding, str) or x.shape[-1] * x.shape[-2] > 4:
        return F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, x.shape[1])
    (ph, pw), (sh, sw), (dh, dw) = padding, conv.stride, conv.dilation
    xp = F.pad(x, (pw, pw, ph, ph))
    kh, kw = weight.shape[-2:]
    ho = (xp.shape[-2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[-1] - dw * (kw - 1) - 1) // sw + 1
    w = weight.view(1, -1, kh, kw)
    out = None
    for i in range(kh):
        for j in range(kw):
            patch = xp[..., i * dh : i * dh + sh * (ho - 1) + 1 : sh,
                       j * dw : j * dw + sw * (wo - 1) + 1 : sw]  # fmt: skip
            tap = w[..., i : i + 1, j : j + 1]
            out = patch * tap if out is None else out.addcmul_(patch, tap)
    return out if bias is None else out.add_(bias.view(1, -1, 1, 1))


def run(layer: nn.Module, x: torch.Tensor, attr: str, weight: torch.Tensor | None) -> torch.Tensor:
    """``layer(x)`` with ``weight`` as its weight (None: its own), cropped where it is a plain
    conv."""
    if folding_conv2d(layer) and attr == "weight":
        w = layer.weight if weight is None else weight
        return conv2d(layer, x, w, layer.bias, layer.groups)
    if weight is None:
        return layer(x)
    return call_with(layer, {attr: weight}, (x,))


class LowRankRows:
    """Stacked low-rank factors ``a`` ``[S, r, in]`` and ``b`` ``[S, out, r]`` of a linear or
    pointwise conv, computed the way Punica's SGMV does: rows laid out by task (``[K, m, in]``,
    zero-padded to the largest task's ``m`` rows), then batched matmuls over the ``K`` tasks
    of the batch. Where the rows' pixels are many and the weight small (early conv layers) the
    factors cost more than the weight: there each slot's ``W + dW`` (``weights``, stacked once
    if small enough) runs in one batched matmul instead of the base plus ``B (A x)``."""

    def __init__(
        self, a: torch.Tensor, b: torch.Tensor, conv: bool, weights: torch.Tensor | None
    ) -> None:
        self.a, self.b, self.conv, self.weights = a, b, conv, weights
        self.row_numel = a[0].numel() + b[0].numel()

    def apply(self, layer: nn.Module, x: torch.Tensor, plan: RowPlan) -> torch.Tensor:
        present, pos, m = plan.segments()
        k, n = len(plan.present), plan.n
        if self.conv:  # [N, C, *pixels]: each row's pixels are its rows of the matmul
            rows = x.reshape(n, x.shape[1], -1).transpose(1, 2)
        else:
            rows = x.reshape(n, -1, x.shape[-1])
        padded = rows.new_zeros((k * m, *rows.shape[1:])).index_copy_(0, pos, rows)
        padded = padded.view(k, -1, rows.shape[-1])
        w = self.weights
        if w is not None and k * w[0].numel() < n * rows.shape[1] * self.row_numel:
            w = w if k == w.shape[0] else w.index_select(0, present)
            out = torch.bmm(padded, w.transpose(1, 2)).view(k * m, rows.shape[1], -1)
            out = out.index_select(0, pos)
            out = out if layer.bias is None else out.add_(layer.bias)
            if self.conv:
                return out.transpose(1, 2).reshape(n, -1, *x.shape[2:])
            return out.view(*x.shape[:-1], -1)
        a, b = self.a, self.b
        if k < a.shape[0]:  # (every slot present: the stacks as they are, no copy)
            a, b = a.index_select(0, present), b.index_select(0, present)
        y = run(layer, x, "weight", None)
        h = torch.bmm(padded, a.transpose(1, 2))
        d = torch.bmm(h, b.transpose(1, 2)).view(k * m, rows.shape[1], -1).index_select(0, pos)
        return y.add_((d.transpose(1, 2) if self.conv else d).reshape(y.shape))


class WeightRows:
    """Each slot's effective weight stacked ``[S, *W.shape]`` for a plain linear or conv: one
    gathered op computes every row with its own task's weight (and the layer's bias)."""

    def __init__(self, layer: nn.Module, weights: torch.Tensor) -> None:
        self.weights = weights
        self.row_numel = weights[0].numel()
        self.conv = isinstance(layer, nn.Conv2d)
        self.matmul = not self.conv or (plain_conv2d(layer) and _pointwise(layer))

    def apply(self, layer: nn.Module, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
        """The rows' outputs, or None where the gathered weights would exceed
        :data:`GATHER_MAX_NUMEL` (the caller runs one op per task then)."""
        w, padding = self.weights, None
        if self.conv and not self.matmul and plain_conv2d(layer):  # gather only reaching taps
            slices, padding = _crop(layer, x.shape[-2:], w)
            w = w[(..., *slices)]
        if index.numel() * w[0].numel() > GATHER_MAX_NUMEL:
            return None
        w = w.index_select(0, index)
        n, bias = x.shape[0], layer.bias
        if self.conv and self.matmul:  # a pointwise conv: one batched matmul
            out = torch.bmm(w.flatten(2), x.reshape(n, x.shape[1], -1))
            out = out if bias is None else out.add_(bias.view(1, -1, 1))
            return out.view(n, w.shape[1], *x.shape[2:])
        if self.conv:
            folded = x.reshape(1, n * x.shape[1], *x.shape[2:])
            b = None if bias is None else bias.repeat(n)
            out = conv2d(layer, folded, w.flatten(0, 1), b, layer.groups * n, padding)
            return out.view(n, w.shape[1], *out.shape[2:])
        out = torch.bmm(x.reshape(n, -1, x.shape[-1]), w.transpose(1, 2))
        out = out if bias is None else out.add_(bias)
        return out.view(*x.shape[:-1], w.shape[1])


def stacked(
    layer: nn.Module, attr: str, deltas: Sequence[object]
) -> LowRankRows | WeightRows | None:
    """The gathered form of a gated layer's per-slot deltas (``(kind, parts)`` or None), or
    None where the layer runs one op per task (another layer type, a too large stack)."""
    if attr != "weight" or not (plain_linear(layer) or folding_conv2d(layer)):
        return None
    w = layer.weight.detach()
    parts = [None if d is None else d[1] for d in deltas]
    matmul = plain_linear(layer) or (plain_conv2d(layer) and _pointwise(layer))
    if matmul and all(p is None or "lora_a" in p for p in parts):
        rank = max(p["lora_a"].shape[0] for p in parts if p is not None)
        if len(parts) * rank * (w[0].numel() + w.shape[0]) > STACK_MAX_NUMEL:
            return None
        a = w.new_zeros(len(parts), rank, w[0].numel())
        b = w.new_zeros(len(parts), w.shape[0], rank)
        for slot, p in enumerate(parts):
            if p is not None:
                r = p["lora_a"].shape[0]
                a[slot, :r], b[slot, :, :r] = p["lora_a"], p["lora_b"]
        weights = None
        if len(parts) * w.numel() <= WEIGHT_STACK_MAX_NUMEL:
            weights = w.flatten(1).unsqueeze(0).repeat(len(parts), 1, 1)
            for slot, d in enumerate(deltas):
                if d is not None:
                    weights[slot] += d[0].from_stored(d[1], w).flatten(1)
        return LowRankRows(a, b, not plain_linear(layer), weights)
    if len(parts) * w.numel() > STACK_MAX_NUMEL:
        return None
    weights = w.unsqueeze(0).repeat(len(parts), *(1,) * w.dim())
    for slot, d in enumerate(deltas):
        if d is not None:
            kind, p = d
            weights[slot] = w + (p["delta"] if "delta" in p else kind.from_stored(p, w))
    return WeightRows(layer, weights)
