"""Row modules: one TAPS wrapper's work for a batch whose rows belong to different tasks.

Each replaces one wrapper in a :class:`~taps_cl.taps.mixed.MixedTaskModel` and reads the batch's
:class:`~taps_cl.taps.rowplan.RowPlan` (slot = a task's position in the mixed model):

- :class:`RowLayer` (a gated conv/linear): where one computation has every row (one adapting
  task, or none), that task's ``W + dW`` (the merged layer) or the base. From
  ``plan.gather_from`` distinct computations on, the gathered kernels of
  :mod:`~taps_cl.taps.rowkernels` (op count flat in the number of tasks: low-rank factors by
  task, or each row's ``W + dW`` in one grouped conv / batched matmul). Otherwise, and on layers
  without a gathered form: the base once on every row plus each task's delta on its own rows
  (``kind.apply_rows``). A layer whose output is not known to be linear in its weight (e.g. a
  weight-standardised conv) runs ``W + dW`` on each adapting task's rows.
- :class:`RowNorm`: eval-mode batch norms are ``x * s + t`` per channel, ``s`` and ``t``
  precomputed per slot when the mixed model is built: one gather and one fused multiply-add
  (then the norm's activation, for timm's ``BatchNormAct2d``); other batch norms fold the rows
  into channels (``[N, C, ...]`` as ``[1, N*C, ...]``) and run their own forward once;
  ``nn.LayerNorm``/``nn.GroupNorm`` normalise once and apply each row's affine; any other norm
  runs each task's copy on its rows.
- :class:`RowHead`: each task's head on its rows, padded with ``-inf`` to the widest head
  (plain linear heads: one gathered batched matmul over stacked heads from ``gather_from``
  tasks on).
- :class:`RowAttention`: gated ``nn.MultiheadAttention`` runs one plain (merged) copy per group
  of rows that compute alike (tasks without a delta there share the base's).

Rows are dim 0 of every input. A row module answers what its base module answers (``eps``,
``batch_first``, ``weight.dtype`` ...): the base's values, never a task's, so a parent that
computes with its children's weights instead of calling them would compute the base there
(torch's fused ``TransformerEncoderLayer`` kernel is such a parent; the mixed model keeps torch
off it).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from taps_cl.taps.rowkernels import (
    GATHER_MAX_NUMEL,
    PAD_MAX,
    LowRankRows,
    WeightRows,
    run,
    stacked,
)
from taps_cl.taps.rowplan import RowPlan, current_plan, put, take
from taps_cl.taps.swap import call_with

# Layers whose forward is linear in the weight (it pads, strides, groups, never transforms the
# weight), by the class that defines the forward they run. Extend: register_linear_in_weight.
_LINEAR_FORWARDS = {
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.conv.Conv1d",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.conv.Conv3d",
    "timm.layers.conv2d_same.Conv2dSame",  # pads the input "same", then F.conv2d
}
_PER_TASK = ("weight", "bias", "running_mean", "running_var")
_NORM_STATE = {*_PER_TASK, "num_batches_tracked"}
# Norms computing ``normalise(x) * weight + bias`` over trailing dims (LayerNorm) or channels.
_AFFINE_FORWARDS = {
    "torch.nn.modules.normalization.LayerNorm",
    "torch.nn.modules.normalization.GroupNorm",
    "timm.layers.norm.LayerNorm",  # F.layer_norm (or its fused twin) on the trailing dims
}

# Batch norms whose eval forward is ``x * s + t`` per channel, then what the forward applies
# after it (timm's BatchNormAct2d: its drop and act, stateless as ``_norm_mode`` checks).
_SCALE_FORWARDS = {
    "torch.nn.modules.batchnorm._BatchNorm": lambda norm, out: out,
    "timm.layers.norm_act.BatchNormAct2d": lambda norm, out: norm.act(norm.drop(out)),
}


def _forward_owner(module: nn.Module) -> str:
    owner = next(k for k in type(module).__mro__ if "forward" in vars(k))
    return f"{owner.__module__}.{owner.__qualname__}"


def register_linear_in_weight(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: ``cls.forward`` is linear in the weight, so a mixed-task batch adds
    each task's delta product to one base pass (else it runs ``W + dW`` per task group)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and "forward" in vars(cls)):
        raise TypeError(f"register_linear_in_weight needs a module class with a forward: {cls!r}")
    _LINEAR_FORWARDS.add(f"{cls.__module__}.{cls.__qualname__}")
    return cls


def linear_in_weight(module: nn.Module) -> bool:
    return _forward_owner(module) in _LINEAR_FORWARDS


class _Rows(nn.Module):
    """A row module: answers what its ``base`` answers (the base's values, never a task's)."""

    def __getattr__(self, name: str) -> object:
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name.startswith("__") or "_modules" not in self.__dict__:
                raise
        return getattr(self._modules["base"], name)


class RowLayer(_Rows):
    """A gated layer over mixed rows. ``deltas[slot]``: ``(kind, parts)`` from
    :meth:`~taps_cl.taps.layer.GatedWeight.row_delta`, or for a layer not linear in its
    weight the task's effective weight ``W + dW``; None where the task uses the base weight."""

    def __init__(self, base: nn.Module, attr: str, deltas: Sequence[object]) -> None:
        super().__init__()
        self.base = base
        self.attr = attr
        self.linear = linear_in_weight(base)
        self._deltas = list(deltas)
        self._keys = tuple(None if d is None else s for s, d in enumerate(self._deltas))
        adapted = any(d is not None for d in self._deltas)
        self._rows = stacked(base, attr, self._deltas) if self.linear and adapted else None

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        plan = current_plan()
        plan.check(x, f"{type(self.base).__name__} input")
        keys = plan.keys(self._keys)
        if len(keys) == 1:  # one computation for every row: the base's or one task's W + dW
            (key,) = keys
            weight = None if key is None else self._weight(key)
            if not args and not kwargs:
                return run(self.base, x, self.attr, weight)
            swap = {} if weight is None else {self.attr: weight}
            return call_with(self.base, swap, (x, *args), kwargs)
        rows = self._rows
        if rows is not None and len(keys) >= plan.gather_from and not (args or kwargs):
            out = rows.apply(self.base, x, plan.index) if isinstance(rows, WeightRows) else None
            if out is not None:
                return out  # one op, whatever the tasks
            if isinstance(rows, LowRankRows) and len(plan.present) * plan.segments()[2] <= (
                PAD_MAX * plan.n
            ):
                return rows.apply(self.base, x, plan)
        return self._grouped(plan, x, args, kwargs)

    def _grouped(self, plan: RowPlan, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """One op per task on its rows (few tasks, or layers without a gathered form)."""
        groups = plan.by(self._keys)
        if not self.linear:
            out = None
            for slot, rows in groups:
                swap = {} if slot is None else {self.attr: self._deltas[slot]}
                part = call_with(self.base, swap, (take(x, rows), *args), kwargs)
                out = put(out, rows, part, plan.n)
            return out
        y = self.base(x, *args, **kwargs) if args or kwargs else run(self.base, x, self.attr, None)
        delta = None  # the tasks' delta products, each on its rows (zero elsewhere)
        for slot, rows in groups:
            if slot is not None:
                kind, parts = self._deltas[slot]
                part = kind.apply_rows(self.base, take(x, rows), parts, self.attr)
                if delta is None:
                    delta = part.new_zeros((plan.n, *part.shape[1:]))
                delta.index_copy_(0, rows, part)  # (a CPU index_add_ is many times slower)
        return y if delta is None else y.add_(delta)

    def _weight(self, slot: int) -> torch.Tensor:
        """The task's ``W + dW``: the very sum its merged module holds (dense: same bits)."""
        if not self.linear:
            return self._deltas[slot]
        if isinstance(self._rows, WeightRows):
            return self._rows.weights[slot]
        kind, parts = self._deltas[slot]
        w = getattr(self.base, self.attr)
        return w + (parts["delta"] if "delta" in parts else kind.from_stored(parts, w))


class RowNorm(_Rows):
    """Per-task norms over mixed rows (see the module docstring for the three ways)."""

    def __init__(self, base: nn.Module, copies: Sequence[nn.Module]) -> None:
        super().__init__()
        self.base = base
        unique = list({id(c): c for c in copies}.values())
        self.copies = nn.ModuleList(unique)
        self._keys = tuple(next(i for i, u in enumerate(unique) if u is c) for c in copies)
        self.mode = _norm_mode(base, unique)
        self._stack = {}
        if self.mode != "groups":
            state = [dict(c.state_dict(keep_vars=True)) for c in copies]
            for key in _PER_TASK:
                if state[0].get(key) is not None:
                    self._stack[key] = torch.stack([s[key].detach() for s in state])
        if self.mode == "scale":  # eval batch norm is y = x * s + t: s, t per slot, once
            var = self._stack["running_var"]
            eps = torch.tensor([c.eps for c in copies], dtype=var.dtype, device=var.device)
            scale = 1 / torch.sqrt(var + eps[:, None])
            if "weight" in self._stack:
                scale = scale * self._stack["weight"]
            shift = -self._stack["running_mean"] * scale
            self._stack = {"scale": scale, "shift": shift + self._stack.get("bias", 0)}

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        plan = current_plan()
        plan.check(x, f"{type(self.base).__name__} input")
        keys = plan.keys(self._keys)
        if len(keys) == 1:  # one norm for every row: exactly that norm
            return self.copies[next(iter(keys))](x, *args, **kwargs)
        if self.mode == "scale":
            shape = (plan.n, -1, *(1,) * (x.dim() - 2))
            scale, shift = (self._stack[k].index_select(0, plan.index) for k in ("scale", "shift"))
            out = torch.addcmul(shift.view(shape), x, scale.view(shape))
            return _SCALE_FORWARDS[_forward_owner(self.base)](self.base, out)
        if self.mode == "fold":
            n, c = x.shape[:2]
            swap = {k: v.index_select(0, plan.index).reshape(-1) for k, v in self._stack.items()}
            out = call_with(self.base, swap, (x.reshape(1, n * c, *x.shape[2:]), *args))
            return out.reshape(x.shape)
        if self.mode == "affine":
            out = call_with(self.base, {"weight": None, "bias": None}, (x, *args), kwargs)
            return self._affine(out, plan.index)
        out = None
        for key, rows in plan.by(self._keys):
            out = put(out, rows, self.copies[key](take(x, rows), *args, **kwargs), plan.n)
        return out

    def _affine(self, normed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Each row's task affine on the normalised rows (LayerNorm: the last dims, GroupNorm:
        the channels)."""
        w = self._stack["weight"].index_select(0, index)
        if isinstance(self.base, nn.GroupNorm):
            shape = (*w.shape, *(1,) * (normed.dim() - 2))
        else:
            shape = (w.shape[0], *(1,) * (normed.dim() - w.dim()), *w.shape[1:])
        out = normed * w.view(shape)
        if "bias" in self._stack:
            out = out + self._stack["bias"].index_select(0, index).view(shape)
        return out


def _norm_mode(base: nn.Module, copies: Sequence[nn.Module]) -> str:
    """How :class:`RowNorm` mixes rows: "fold" for eval batch norms whose state is only the
    per-channel statistics and affine (and whose other parts, e.g. an activation, hold
    nothing), "affine" for plain LayerNorm/GroupNorm with affine weights, else "groups"."""
    modules = [base, *copies]
    plain_state = all(
        set(m.state_dict()) <= _NORM_STATE
        and not any(list(s.parameters()) or list(s.buffers()) for s in m.children())
        for m in modules
    )
    if not plain_state or any(m.training for m in modules):
        return "groups"
    if isinstance(base, _BatchNorm) and base.track_running_stats and base.running_mean is not None:
        return "scale" if _forward_owner(base) in _SCALE_FORWARDS else "fold"
    owner = _forward_owner(base)
    if owner in _AFFINE_FORWARDS and all(getattr(m, "weight", None) is not None for m in modules):
        return "affine"
    return "groups"


class RowHead(_Rows):
    """Each task's classifier on its rows; logits padded with ``-inf`` to the widest head.
    Plain ``nn.Linear`` heads are also stacked (zero weights, ``-inf`` biases past a head's
    classes) for one gathered batched matmul over many tasks."""

    def __init__(self, base: nn.Module, heads: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.base = base
        self.heads = nn.ModuleList(heads)
        self.width = max(h.out_features for h in heads)
        self._w = self._b = None
        if all(type(h) is nn.Linear for h in heads):
            w = heads[0].weight.detach()
            self._w = w.new_zeros(len(heads), self.width, w.shape[1])
            self._b = w.new_full((len(heads), self.width), float("-inf"))
            for slot, h in enumerate(heads):
                self._w[slot, : h.out_features] = h.weight.detach()
                self._b[slot, : h.out_features] = 0 if h.bias is None else h.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = current_plan()
        plan.check(x, "classifier input")
        gather = self._w is not None and len(plan.present) >= plan.gather_from
        if gather and plan.n * self._w[0].numel() <= GATHER_MAX_NUMEL:
            w, b = self._w.index_select(0, plan.index), self._b.index_select(0, plan.index)
            flat = x.reshape(plan.n, -1, x.shape[-1])
            out = torch.baddbmm(b.unsqueeze(1), flat, w.transpose(1, 2))
            return out.view(*x.shape[:-1], self.width)
        out = None
        for slot, rows in plan.groups:
            logits = self.heads[slot](take(x, rows))
            if logits.shape[-1] < self.width:
                pad = (0, self.width - logits.shape[-1])
                logits = nn.functional.pad(logits, pad, value=float("-inf"))
            out = put(out, rows, logits, plan.n)
        return out


class RowAttention(_Rows):
    """Gated ``nn.MultiheadAttention`` (batch first) over mixed rows: one plain copy per
    group of rows computing alike. ``plains[slot]``: the task's plain module (tasks without a
    delta in it share the base's, so their rows run together)."""

    def __init__(self, base: nn.MultiheadAttention, plains: Sequence[nn.Module]) -> None:
        super().__init__()
        self.base = base
        unique = list({id(p): p for p in plains}.values())
        self.plains = nn.ModuleList(unique)
        self._keys: tuple[Hashable, ...] = tuple(
            next(i for i, u in enumerate(unique) if u is p) for p in plains
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        plan = current_plan()
        plan.check(query, "attention query")
        out = weights = None
        for k, rows in plan.by(self._keys):
            q, kk, v = _take_same((query, key, value), rows)
            mask = attn_mask
            if mask is not None and mask.dim() == 3 and rows is not None:  # [N * heads, L, S]
                mask = mask.unflatten(0, (plan.n, -1)).index_select(0, rows).flatten(0, 1)
            o, w = self.plains[k](
                q, kk, v,
                key_padding_mask=take(key_padding_mask, rows),
                need_weights=need_weights,
                attn_mask=mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )  # fmt: skip
            out = put(out, rows, o, plan.n)
            weights = None if w is None else put(weights, rows, w, plan.n)
        return out, weights


def _take_same(tensors: tuple[torch.Tensor, ...], rows: torch.Tensor | None) -> list:
    """Rows of each tensor, keeping ``query is key`` identities (self-attention fast paths)."""
    done: dict[int, torch.Tensor] = {}
    for t in tensors:
        if id(t) not in done:
            done[id(t)] = take(t, rows)
    return [done[id(t)] for t in tensors]
