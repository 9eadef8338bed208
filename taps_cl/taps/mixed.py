"""Mixed-task forward: one pass over a batch whose rows belong to different tasks.

The per-task path (``model(x, task=...)``, :func:`~taps_cl.taps.merge.shared_merged`) runs the
whole network once per task. Language-model servers apply many LoRA adapters to one batch by
running the base weights once and each adapter on its own rows (vLLM's ``punica_wrapper``);
:class:`MixedTaskModel` does the same for TAPS: a copy of the base's module tree (sharing every
tensor) where each TAPS wrapper is a row module (:mod:`taps_cl.taps.rows`), and a
:class:`~taps_cl.taps.rowplan.RowPlan` per call says which rows are whose. Layers no task in the
batch adapts run once, as the base.

It is a different float computation from each task's merged module (``W x + dW x`` instead of
``(W + dW) x``; folded norms): outputs agree to float rounding, not bit for bit (the tolerance
is stated and tested in ``tests/test_mixed.py``). Zero forgetting, bit for bit, stays the
property of the per-task path.

The tree holds the tasks' tensors as they were when it was built: build it after loading the
tasks and drop it after removing one. It keeps no per-call state, so threads may share it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from taps_cl.errors import UnknownTaskError
from taps_cl.taps.attention import TaskAdaptiveAttention
from taps_cl.taps.layer import TaskAdaptiveLayer
from taps_cl.taps.merge import _clone, _wrappers
from taps_cl.taps.model import TAPSModel
from taps_cl.taps.modules import TaskHeads, TaskNorm
from taps_cl.taps.prefix import Resume, replayable, replaying
from taps_cl.taps.rowkernels import GATHER_FROM
from taps_cl.taps.rowplan import RowPlan, planned
from taps_cl.taps.rows import RowAttention, RowHead, RowLayer, RowNorm, linear_in_weight

__all__ = ["MixedTaskModel", "mixed_logits"]


class MixedTaskModel(nn.Module):
    """Frozen tasks ``tasks`` of ``model`` in one forward: ``mixed(x, rows)`` gives row ``i``
    the logits of task ``rows[i]``, padded with ``-inf`` to the widest head (softmax, argmax
    and top-k need no unpadding; :meth:`unpad` trims them per row)."""

    def __init__(
        self, model: TAPSModel, tasks: Sequence[str], gather_from: int = GATHER_FROM
    ) -> None:
        super().__init__()
        self.gather_from = gather_from  # see taps_cl.taps.rowkernels.GATHER_FROM
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"a mixed model needs distinct task names, got {tasks!r}")
        for name in tasks:
            if not model.is_frozen(name):  # raises UnknownTaskError for an unknown name
                raise ValueError(f"task {name!r} is still training: finalize it first")
        self.tasks = tuple(tasks)
        self._slot = {name: i for i, name in enumerate(tasks)}
        self.num_classes = {name: model.num_classes(name) for name in tasks}
        replace = {id(w): _row_module(w, self.tasks) for w in _wrappers(model)}
        self.tree = _clone(model.base, replace).requires_grad_(False).eval()
        # path -> slots of the tasks holding something there (the row modules' paths), so a
        # forward resumed from a routing pass knows where its tasks' first own module is
        paths = {id(m): p for p, m in model.base.named_modules()}
        self.specific = {paths[id(w)]: _slots(w, self.tasks) for w in _wrappers(model)}
        self.specific = {p: s for p, s in self.specific.items() if s}
        replayable(self.tree, skip=self.specific)
        for module in self.tree.modules():
            if isinstance(module, nn.TransformerEncoderLayer):
                # Its fused eval kernel reads the children's weights instead of calling them;
                # a forward pre-hook keeps torch on the path that calls them (torch's own rule).
                module.register_forward_pre_hook(_calls_children)

    def row_index(self, rows: Sequence[str] | torch.Tensor, n: int) -> torch.Tensor:
        """Each row's slot (position in :attr:`tasks`) from task names or slot indices."""
        if isinstance(rows, str):
            raise TypeError("rows must name a task per row (a list), not one string")
        if isinstance(rows, torch.Tensor):
            index = rows.to(torch.int64).flatten()
        else:
            unknown = sorted({r for r in rows if r not in self._slot})
            if unknown:
                raise UnknownTaskError(
                    f"rows name tasks {unknown[:5]} this mixed model lacks; it has {self.tasks}"
                )
            index = torch.tensor([self._slot[r] for r in rows], dtype=torch.int64)
        if index.numel() != n:
            raise ValueError(f"{index.numel()} row tasks for a batch of {n} inputs")
        return index

    @torch.no_grad()
    def forward(
        self,
        x: torch.Tensor,
        rows: Sequence[str] | torch.Tensor,
        resume: Resume | None = None,
    ) -> torch.Tensor:
        """``resume``: the routing pass ``x`` (or those of its rows) went through; modules
        before the first one of the batch's tasks return its outputs instead of computing
        (:mod:`taps_cl.taps.prefix`; the same result, bit for bit)."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] == 0:
            raise ValueError("a mixed forward needs a batch tensor with at least one row")
        index = self.row_index(rows, x.shape[0]).to(x.device)
        plan = RowPlan(index, len(self.tasks), self.gather_from)
        specific: list[str] = []
        if resume is not None:
            present = set(index.unique().tolist())
            specific = [p for p, slots in self.specific.items() if slots & present]
        with planned(plan), replaying(self.tree, x, resume, specific, tuple(self.specific)):
            out = self.tree(x)
        return out if isinstance(out, torch.Tensor) else out.logits  # Hugging Face output

    def unpad(self, logits: torch.Tensor, rows: Sequence[str]) -> list[torch.Tensor]:
        """Row ``i``'s logits over its own task's classes only."""
        return [logits[i, : self.num_classes[r]] for i, r in enumerate(rows)]

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}"


def mixed_logits(model: TAPSModel, x: torch.Tensor, rows: Sequence[str]) -> torch.Tensor:
    """One-off :class:`MixedTaskModel` over the tasks ``rows`` name (padded logits); keep a
    ``MixedTaskModel`` to serve many batches over the same tasks."""
    if isinstance(rows, str):
        raise TypeError("rows must name a task per row (a list), not one string")
    return MixedTaskModel(model, sorted(set(rows)))(x, rows)


def _calls_children(module: nn.Module, args: tuple) -> None:
    return None


def _row_module(wrapper: nn.Module, tasks: tuple[str, ...]) -> nn.Module:
    """The row module replacing one TAPS wrapper (its base module where no task differs)."""
    if isinstance(wrapper, TaskAdaptiveLayer):
        return _row_layer(wrapper, tasks)
    if isinstance(wrapper, TaskNorm):
        if not any(t in wrapper.tasks for t in tasks):
            return _clone(wrapper.base, {})
        own = dict(wrapper.tasks.items())  # (a ModuleDict has no .get)
        copies = [own.get(t, wrapper.base) for t in tasks]
        clones = {id(c): _clone(c, {}) for c in copies}
        return RowNorm(_clone(wrapper.base, {}), [clones[id(c)] for c in copies])
    if isinstance(wrapper, TaskHeads):
        heads = [_clone(wrapper.tasks[t], {}) for t in tasks]
        return RowHead(_clone(wrapper.base, {}), heads)
    if isinstance(wrapper, TaskAdaptiveAttention):
        return _row_attention(wrapper, tasks)
    raise TypeError(f"no mixed-task form of {type(wrapper).__name__}")


def _slots(wrapper: nn.Module, tasks: tuple[str, ...]) -> frozenset[int]:
    """Slots of the tasks that hold something in ``wrapper`` (where their rows differ from
    the base's)."""
    if isinstance(wrapper, TaskHeads):
        return frozenset(range(len(tasks)))
    if isinstance(wrapper, TaskNorm):
        return frozenset(i for i, t in enumerate(tasks) if t in wrapper.tasks)
    if isinstance(wrapper, TaskAdaptiveAttention):
        gates = [*wrapper.projections.values(), wrapper.base_layer.out_proj]
        return frozenset(i for i, t in enumerate(tasks) if any(g.is_active(t) for g in gates))
    return frozenset(i for i, t in enumerate(tasks) if wrapper.is_active(t))


def _row_layer(layer: TaskAdaptiveLayer, tasks: tuple[str, ...]) -> nn.Module:
    base = _clone(layer.base_layer, {})
    if linear_in_weight(layer.base_layer):
        deltas: list[object] = [layer.row_delta(t) for t in tasks]
    else:  # W + dW on the task's rows: exactly the merged module's weight
        deltas = [layer.effective_weight(t).detach() if layer.is_active(t) else None for t in tasks]
    if all(d is None for d in deltas):
        # the base itself, as in the routing pass: a resumed forward (taps/prefix.py) may then
        # replay it, bit for bit (a RowLayer here would only crop kernels that overhang tiny
        # inputs, a different float computation)
        return base
    return RowLayer(base, layer.weight_attr, deltas)


def _row_attention(attn: TaskAdaptiveAttention, tasks: tuple[str, ...]) -> nn.Module:
    if not attn.base_layer.batch_first:
        raise ValueError(
            "a mixed-task forward needs batch-first attention (nn.MultiheadAttention("
            "batch_first=True)): rows are dim 0 of every input"
        )
    gates = [*attn.projections.values(), attn.base_layer.out_proj]
    adapted = [any(g.is_active(t) for g in gates) for t in tasks]
    shared = attn.plain(None).requires_grad_(False).eval()
    if not any(adapted):
        return shared
    plains = [
        attn.plain(t).requires_grad_(False).eval() if a else shared
        for t, a in zip(tasks, adapted, strict=True)
    ]
    return RowAttention(shared, plains)
