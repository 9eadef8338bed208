"""What differs between kinds of weight delta, and the generic code every kind shares.

A :class:`DeltaKind` (peft's ``LoraVariant`` is the model) says how one task's delta of one
weight is made: its trainable tensors and their init (identity at start: the delta is zero),
the dense delta they give, the float tensors a kept delta stores and the dense delta read back
from them (with the shapes they must have), and on which weights it applies. The rest is generic
and written once: per-task bookkeeping and settling (:mod:`taps_cl.taps.taskdeltas`), encoding
to float32/bfloat16/int8 per stored tensor (an int8 tensor ``<key>`` gets its ``scale.<key>``),
patch names ``<key>.<layer>``, merge folding and the store's layout checks.

Kinds are registered classes (:data:`taps_cl.registry.DELTA_KINDS`); decoding uses class
methods only, so a stored delta describes itself and loads under any config.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from taps_cl.registry import DELTA_KINDS
from taps_cl.taps.quant import decode, encode
from taps_cl.taps.swap import call_with

if TYPE_CHECKING:
    from taps_cl.config import TAPSConfig

SCALE = "scale"  # int8 scales of a stored tensor <key>.<layer>: scale.<key>.<layer>
# The other tensor kinds of a patch (taps_cl.taps.patch) and the per-task containers of the
# modules: no kind may name a tensor like these.
RESERVED = ("score", "norm", "head", "route", SCALE, "tasks")

Shape = tuple[int, ...]


class DeltaKind:
    """One kind of per-task weight delta. Subclass, set the three names, register.

    ``params`` name the trainable per-task tensors; each is an ``nn.ParameterDict`` keyed by
    task on the layer, so ``state_dict`` keys read ``<layer>.<param>.<task>``. ``stored`` name
    what a kept delta stores: patch tensors ``<key>.<layer>``. Names are unique across kinds.
    """

    name: ClassVar[str] = ""
    params: ClassVar[tuple[str, ...]] = ()
    stored: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_config(cls, config: TAPSConfig) -> DeltaKind:
        """The kind as ``config`` sets it up; ``ValueError`` if the config lacks a setting."""
        return cls()

    def applies(self, shape: torch.Size) -> bool:
        """Whether new tasks use this kind on a weight of ``shape`` (else a dense delta)."""
        return True

    def init(self, weight: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """A new task's trainable tensors by param name; their delta must be zero. Seeded, so
        a task starts alike in any process."""
        raise NotImplementedError

    def value(self, params: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        """The dense delta (``weight``'s shape) of the trainable tensors, differentiable."""
        raise NotImplementedError

    def to_stored(
        self, params: Mapping[str, torch.Tensor], weight: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The float tensors a kept delta stores, by stored key (encoded afterwards)."""
        raise NotImplementedError

    def shapes(self, shape: torch.Size) -> dict[str, Shape]:
        """The stored tensors' shapes of a new task on a weight of ``shape`` (budget sizes)."""
        return type(self).expected(shape, {})

    @classmethod
    def expected(cls, shape: torch.Size, given: Mapping[str, Shape]) -> dict[str, Shape]:
        """The shapes stored tensors must have on a weight of ``shape``; sizes a kind leaves
        free (a rank) are read from ``given``, the shapes actually stored."""
        raise NotImplementedError

    @classmethod
    def from_stored(cls, stored: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        """The dense delta of the decoded (float32, shape-checked) stored tensors."""
        raise NotImplementedError

    @classmethod
    def row_parts(
        cls, stored: Mapping[str, torch.Tensor], dense: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """What :meth:`apply_rows` computes with, from the decoded stored tensors and the dense
        delta the layer already holds. Default: the dense delta (already in memory)."""
        return {"delta": dense}

    @classmethod
    def apply_rows(
        cls,
        layer: nn.Module,
        x: torch.Tensor,
        parts: Mapping[str, torch.Tensor],
        attr: str = "weight",
    ) -> torch.Tensor:
        """The delta's share of ``layer(x)`` for a layer whose output is linear in its weight:
        ``layer``'s own op with the delta as weight and no bias (a mixed-task batch adds it
        on the task's rows after one base pass). ``parts``: what :meth:`row_parts` gave.
        Default: the dense delta of ``parts`` (a kind overrides it with a cheaper product)."""
        if "delta" in parts:
            return delta_op(layer, x, parts["delta"], attr)
        return delta_op(layer, x, cls.from_stored(parts, getattr(layer, attr)), attr)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def delta_op(
    layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, attr: str = "weight"
) -> torch.Tensor:
    """``layer``'s own forward on ``x`` with ``weight`` in place of its weight and no bias
    (its padding, stride, groups, ... apply; the weight's leading size may differ). A plain
    pointwise conv is the matrix product it computes: a few rows at a small spatial size
    would otherwise take the slow direct-convolution path."""
    if _pointwise(layer):
        out = nn.functional.linear(x.movedim(1, -1), weight.flatten(1))  # one GEMM
        return out.movedim(-1, 1)
    swap: dict[str, torch.Tensor | None] = {attr: weight}
    if isinstance(getattr(layer, "bias", None), torch.Tensor):
        swap["bias"] = None
    return call_with(layer, swap, (x,))  # thread safe: serving threads share layer


def register_delta_kind(cls: type[DeltaKind]) -> type[DeltaKind]:
    """Class decorator: register ``cls`` under ``cls.name``. Refuses a name registered twice
    and tensor names another kind (or the rest of a patch) already uses."""
    if not (isinstance(cls, type) and issubclass(cls, DeltaKind)):
        raise TypeError(f"register_delta_kind needs a DeltaKind subclass, got {cls!r}")
    if cls.name in DELTA_KINDS:
        raise ValueError(f"delta kind {cls.name!r} is already registered")
    if not cls.params or not cls.stored:
        raise ValueError(f"delta kind {cls.__name__} must name its params and stored tensors")
    names = {*cls.params, *cls.stored}
    bad = sorted(n for n in names if not isinstance(n, str) or not n.isidentifier())
    taken = {*RESERVED, *(n for other in DELTA_KINDS for n in (*other.params, *other.stored))}
    if bad or names & taken:
        raise ValueError(
            f"delta kind {cls.name!r}: tensor names must be identifiers used by no other kind "
            f"or patch tensor ({sorted(taken)}); got {sorted(names)}"
        )
    DELTA_KINDS.add(cls.name, cls)
    return cls


def kind_for(config: TAPSConfig) -> DeltaKind:
    """The kind ``config`` selects: ``delta_kind`` by name, else low-rank if ``delta_rank``
    is set, else dense (the paper's)."""
    name = config.delta_kind or ("lowrank" if config.rank is not None else "dense")
    return DELTA_KINDS.get(name).from_config(config)


def delta_keys() -> tuple[str, ...]:
    """Every registered kind's stored tensor kinds (``delta``, ``lora_a``, ...)."""
    return tuple(k for kind in DELTA_KINDS for k in kind.stored)


def stored_keys() -> tuple[str, ...]:
    """Every local key a stored delta may have: the kinds' keys and their int8 scales."""
    keys = delta_keys()
    return (*keys, *(f"{SCALE}.{k}" for k in keys))


def kind_of(keys: Iterable[str]) -> type[DeltaKind] | None:
    """The registered kind whose stored tensors ``keys`` (local keys) hold, or None."""
    keys = set(keys)
    kinds = [kind for kind in DELTA_KINDS if keys & set(kind.stored)]
    if len(kinds) > 1:
        raise ValueError(f"a delta stored as two kinds: {sorted(keys)}")
    return kinds[0] if kinds else None


def misfit(
    kind: type[DeltaKind], shape: torch.Size, given: Mapping[str, Shape]
) -> tuple[str, str] | None:
    """``(key, reason)`` of the first stored tensor (local key) that does not fit a weight of
    ``shape``, or None if all fit. ``given``: the stored shapes of the kind's tensors."""
    missing = [k for k in kind.stored if k not in given]
    if missing:
        present = next(k for k in kind.stored if k in given)
        return present, f"comes without {missing} (a {kind.name} delta stores {kind.stored})"
    want = kind.expected(shape, given)
    for key in kind.stored:
        need, got = list(want[key]), list(given[key])
        if got != need or min(need, default=1) < 1:
            return key, f"is {got}, the base needs {need}"
    return None


def stored_numbers(shapes: Mapping[str, Shape], dtype: str) -> int:
    """Numbers a delta with stored tensors of ``shapes`` stores (int8: plus a scale per row)."""
    scales = sum(s[0] for s in shapes.values() if s) if dtype == "int8" else 0
    return sum(math.prod(s) for s in shapes.values()) + scales


def stored_nbytes(shapes: Mapping[str, Shape], dtype: str) -> int:
    """Bytes a delta with stored tensors of ``shapes`` stores as ``dtype`` (int8: one byte a
    value plus a float32 scale per row)."""
    if dtype == "int8":
        return sum(math.prod(s) + 4 * (s[0] if s else 0) for s in shapes.values())
    width = 2 if dtype == "bfloat16" else 4
    return width * sum(math.prod(s) for s in shapes.values())


def encode_delta(parts: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The stored form of a kind's float tensors: each encoded on its own (int8 adds
    ``scale.<key>``), so every kind gets every dtype."""
    out = {}
    for key, value in parts.items():
        for suffix, t in encode(value, dtype).items():
            out[f"{suffix}.{key}" if suffix else key] = t
    return out


def decode_delta(stored: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The dense delta of a stored one (local keys, any registered kind, any dtype): the one
    decode that settling, loading and merging share, so all three give the same bits."""
    kind, values = decode_parts(stored, weight)
    delta = kind.from_stored(values, weight)
    if tuple(delta.shape) != tuple(weight.shape):
        raise ValueError(f"{kind.name} delta of shape {tuple(delta.shape)} for {weight.shape}")
    return delta


def _pointwise(layer: nn.Module) -> bool:
    """A torch ``ConvNd`` (its own forward, not a subclass's) that is a per-pixel matmul."""
    if type(layer).forward not in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward):
        return False
    ones = all(k == 1 for k in (*layer.kernel_size, *layer.stride))
    zero = layer.padding == "valid" or all(p == 0 for p in layer.padding)
    return ones and zero and layer.groups == 1 and layer.padding_mode == "zeros"


def decode_parts(
    stored: Mapping[str, torch.Tensor], weight: torch.Tensor
) -> tuple[type[DeltaKind], dict[str, torch.Tensor]]:
    """The kind of a stored delta (local keys, any dtype) and its stored tensors decoded to
    float32, checked against ``weight``'s shape (what :func:`decode_delta` builds on)."""
    kind = kind_of(stored)
    if kind is None:
        raise ValueError(f"no delta among stored tensors {sorted(stored)}")
    bad = misfit(
        kind, weight.shape, {k: tuple(stored[k].shape) for k in kind.stored if k in stored}
    )
    if bad:
        raise ValueError(f"{bad[0]}: {bad[1]} (weight {tuple(weight.shape)})")
    return kind, {k: decode(stored[k], stored.get(f"{SCALE}.{k}")) for k in kind.stored}
