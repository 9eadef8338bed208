"""TAPSModel: inject task-adaptive layers into any ``nn.Module`` and manage tasks on it.

The base is frozen and wrapped in place (:mod:`taps_cl.taps.inject`): every gateable layer
becomes a :class:`TaskAdaptiveLayer`, every ``nn.MultiheadAttention`` a
:class:`TaskAdaptiveAttention`, every norm a :class:`TaskNorm`, the classifier a
:class:`TaskHeads`. With no active task the model computes exactly what the base computes.
Everything that holds per-task state is a :class:`TaskModule`; adding, removing and switching
tasks are loops over them (:class:`~taps_cl.taps.taskset.TaskSet`), and so are
settling, freezing, exporting and loading a task (here).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterator

import torch
from torch import nn

from taps_cl.bases import fingerprint
from taps_cl.config import TAPSConfig
from taps_cl.errors import BaseMismatchError
from taps_cl.taps.budget import check_budget, enforce_budget, task_size
from taps_cl.taps.deltas import delta_keys
from taps_cl.taps.inject import find_head, inject, set_child
from taps_cl.taps.layer import GatedWeight
from taps_cl.taps.modules import TaskHeads, TaskNorm, is_norm
from taps_cl.taps.patch import TaskPatch, parameter_kinds
from taps_cl.taps.penalty import sparsity_penalty
from taps_cl.taps.task import TaskModule
from taps_cl.taps.taskset import TaskSet
from taps_cl.taps.wrap import Transparent

__all__ = ["TAPSModel", "describe_task", "find_head", "set_child"]


class TAPSModel(TaskSet):
    """A frozen base shared by many tasks, each with gated deltas, its own norms and head."""

    def __init__(
        self,
        base: nn.Module,
        config: TAPSConfig | None = None,
        head: str | None = None,
        base_fingerprint: str | None = None,
    ) -> None:
        super().__init__()
        self.config = config or TAPSConfig()
        self.base_fingerprint = base_fingerprint or fingerprint(base)
        base.requires_grad_(False)
        self.base_parameters = sum(p.numel() for p in base.parameters())  # before wrapping
        self.head_name = find_head(base, head)
        self.base = base
        self.heads = TaskHeads(base.get_submodule(self.head_name))
        set_child(base, self.head_name, self.heads)
        # layer name -> path of its GatedWeight; paths of the wrapped norms
        self._layer_paths, self.norm_names = inject(base, self.config, skip=self.head_name)
        self.layer_names: list[str] = list(self._layer_paths)
        self.num_layers = len(self.layer_names)
        self._closed = _outside(self.layer_names, self.config.layers)
        self.base.eval()

    # -- structure ---------------------------------------------------------------------------

    def layers(self) -> Iterator[tuple[str, GatedWeight]]:
        """Gated layers (one score each) by layer name, in model order."""
        for name in self.layer_names:
            yield name, self.base.get_submodule(self._layer_paths[name])

    def norms(self) -> Iterator[tuple[str, TaskNorm]]:
        for name in self.norm_names:
            yield name, self.base.get_submodule(name)

    def task_modules(self) -> Iterator[tuple[str, TaskModule]]:
        """Every module holding per-task state, with the name its patch tensors use."""
        yield self.head_name, self.heads
        yield from self.layers()
        yield from self.norms()

    # -- tasks -------------------------------------------------------------------------------

    def _check_new_task(self, name: str) -> None:
        check_budget(self, name)  # a budget the task cannot meet (below its head, norms, scores)
        for where, layer in self.layers():
            if where in self._closed:  # config.layers leaves it out: closed for good
                layer.close(name)
                layer.score[name].requires_grad_(False)

    def forward(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        if task is None:
            return _logits(self.base(x))
        with self.using(task):
            return _logits(self.base(x))

    def train(self, mode: bool = True) -> TAPSModel:
        # The frozen base stays in eval; only per-task modules of trainable tasks follow mode
        # (TaskNorm/TaskHeads handle that). Dropout and friends inside the base follow mode.
        # Without per-task norms the base's own norms are shared by every task, so they must
        # never update running statistics.
        super().train(mode)
        if not self.config.task_norms:
            for module in self.base.modules():
                if is_norm(module):
                    module.eval()
        return self

    # -- optimisation ------------------------------------------------------------------------

    def param_groups(self, name: str) -> dict[str, list[nn.Parameter]]:
        """The task's trainable parameters by kind: ``delta``, ``score``, ``norm``, ``head``."""
        self.task_info(name)
        groups: dict[str, list[nn.Parameter]] = {"delta": [], "score": [], "norm": [], "head": []}
        for _, layer in self.layers():
            groups["delta"] += layer.trainable_deltas(name)
            groups["score"].append(layer.score[name])
        for _, norm in self.norms():
            groups["norm"] += list(norm.tasks[name].parameters())
        groups["head"] += list(self.heads.tasks[name].parameters())
        return groups

    def trainable_parameters(self, name: str) -> list[nn.Parameter]:
        return [p for group in self.param_groups(name).values() for p in group]

    def penalty(self, name: str) -> torch.Tensor:
        """The task's sparsity penalty (kind from ``config.penalty``), differentiable in scores."""
        self.task_info(name)
        scores, sizes = [], []
        for _, layer in self.layers():
            scores.append(layer.score[name])
            sizes.append(layer.stored_size())
        return sparsity_penalty(scores, sizes, self.config.penalty)

    def gates(self, name: str) -> dict[str, bool]:
        """Layer name -> whether the task adapts that layer (gate on and delta kept)."""
        self.task_info(name)
        return {n: layer.is_active(name) for n, layer in self.layers()}

    def scores(self, name: str) -> dict[str, float]:
        self.task_info(name)
        return {n: float(layer.score[name].detach()) for n, layer in self.layers()}

    def parameter_share(self, name: str) -> float:
        """The share of the base's parameters the task's patch holds with its current gates."""
        return task_size(self, name) / max(1, self.base_parameters)

    # -- patches -----------------------------------------------------------------------------

    def settle_task(self, name: str) -> list[str]:
        """Make the task compute exactly what its patch will hold, before finalising: close the
        least important gates if it is over its ``budget``, prune closed gates and round the
        kept deltas to ``delta_dtype``. Evaluate after this to report the stored form's
        accuracy. Idempotent; training the task again undoes it (:meth:`unsettle_task`).
        Returns the layers the budget closed."""
        if self.is_frozen(name):
            return []
        closed = enforce_budget(self, name)
        for _, layer in self.layers():
            layer.settle(name)
        return closed

    def unsettle_task(self, name: str) -> None:
        if not self.is_frozen(name):
            for _, layer in self.layers():
                layer.unsettle(name)

    def finalize_task(self, name: str) -> TaskPatch:
        """Settle the task (budget, pruning, stored dtype), freeze it, return its patch."""
        info = self.task_info(name)
        self.settle_task(name)
        for _, module in self.task_modules():
            module.freeze(name)  # gated weights prune closed gates first (unless already final)
        info.frozen = True
        return self.export_patch(name)

    def export_patch(self, name: str) -> TaskPatch:
        """The task's state as a :class:`TaskPatch` (deltas only for layers whose gate is on)."""
        info = self.task_info(name)
        tensors: dict[str, torch.Tensor] = {}
        for where, module in self.task_modules():
            for key, value in module.export_task(name).items():
                tensors[module.patch_key(where, key)] = _export(value)
        return TaskPatch(
            name=name,
            num_classes=info.num_classes,
            class_names=info.class_names,
            tensors=tensors,
            active_layers=[n for n, on in self.gates(name).items() if on],
            num_layers=self.num_layers,
            base_fingerprint=self.base_fingerprint,
            config=self.config.to_dict(),
        )

    def load_patch(self, patch: TaskPatch, name: str | None = None) -> None:
        """Add a frozen task from ``patch`` (optionally under another name). The patch's kept
        deltas apply as they are: its outputs do not depend on this model's ``tau``."""
        if patch.base_fingerprint != self.base_fingerprint:
            raise BaseMismatchError(
                f"patch {patch.name!r} was trained on base {patch.base_fingerprint[:12]}, "
                f"this model's base is {self.base_fingerprint[:12]}; load the matching base"
            )
        if patch.num_layers != self.num_layers:
            raise ValueError(
                f"patch has {patch.num_layers} gated layers, model has {self.num_layers}"
            )
        _check_patch_layers(self, patch)
        name = name or patch.name
        self.add_task(name, patch.num_classes, patch.class_names)
        try:
            _fill_task(self, name, patch)
        except Exception:
            self.remove_task(name)
            raise
        self.task_info(name).frozen = True  # before freeze(): keep exactly the patch's deltas
        for _, module in self.task_modules():
            module.freeze(name)

    def merged(self, name: str | None) -> nn.Module:
        """A standalone copy of the base for task ``name``: deltas folded into the weights, the
        task's norms and head in place; its forward contains no TAPS code. Eval mode, frozen.
        ``name=None`` gives the plain base (its current weights, norms and original head)."""
        if name is not None:
            self.task_info(name)
        memo: dict[int, object] = {}
        done: list[str] = []
        for path, module in self.base.named_modules():
            if isinstance(module, Transparent) and not any(path.startswith(d) for d in done):
                memo[id(module)] = module.plain(name)
                done.append(path + ".")
        out = copy.deepcopy(self.base, memo)
        if name is not None:
            describe_task(out, self.num_classes(name), self.class_names(name))
        return out.requires_grad_(False).eval()


def _logits(out: object) -> torch.Tensor:
    """The logits of a base's output: a tensor, or a Hugging Face ``ModelOutput.logits``."""
    return out if isinstance(out, torch.Tensor) else out.logits


def describe_task(module: nn.Module, num_classes: int, class_names: list[str] | None) -> None:
    """Class metadata of a merged task where timm (``num_classes``, ``pretrained_cfg``) and
    Hugging Face (``config.num_labels``/``id2label``) models keep it; what it changes is the
    module's own (new dict, copied config), never shared with the base."""
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    if isinstance(getattr(module, "pretrained_cfg", None), dict):
        module.num_classes = num_classes
        cfg = {k: v for k, v in module.pretrained_cfg.items() if k != "label_descriptions"}
        module.pretrained_cfg = {**cfg, "num_classes": num_classes, "label_names": names}
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "id2label"):
        config = module.config = copy.deepcopy(config)  # never the base's own config object
        config.id2label = dict(enumerate(names))
        config.label2id = {n: i for i, n in enumerate(names)}


def _export(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _outside(names: list[str], patterns: list[str] | None) -> frozenset[str]:
    """The layers no pattern of ``TAPSConfig.layers`` matches (none when it is None)."""
    if patterns is None:
        return frozenset()
    unmatched = [p for p in patterns if not fnmatch.filter(names, p)]
    if unmatched:
        raise ValueError(
            f"TAPSConfig.layers patterns {unmatched} match no gated layer of this model; its "
            f"layers are named like {names[:3]} ... {names[-2:]}"
        )
    return frozenset(n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in patterns))


def _check_patch_layers(model: TAPSModel, patch: TaskPatch) -> None:
    layers = set(model.layer_names)
    unknown = [k for kind in (*delta_keys(), "score") for k in patch.kind(kind) if k not in layers]
    if unknown:
        raise ValueError(f"patch {patch.name!r} names layers this model lacks: {unknown[:5]}")
    missing = [k for k in layers if k not in patch.kind("score")]
    if missing:
        raise ValueError(f"patch {patch.name!r} lacks scores for layers {missing[:5]}")


def _fill_task(model: TAPSModel, name: str, patch: TaskPatch) -> None:
    """Hand each module the patch tensors it owns; refuse model tensors no module owns (other
    kinds, such as the task's ``route.*`` statistics, are the router's, not the model's)."""
    used: set[str] = set()
    for where, module in model.task_modules():
        own = {}
        for key in module.task_keys(name):
            patch_key = module.patch_key(where, key)
            if patch_key in patch.tensors:
                own[key] = patch.tensors[patch_key]
                used.add(patch_key)
        module.load_task(name, own)
    kinds = parameter_kinds()
    model_keys = {k for k in patch.tensors if k.split(".", 1)[0] in kinds}
    unused = sorted(model_keys - used)
    if unused:
        raise ValueError(f"patch {patch.name!r} holds tensors this model lacks: {unused[:5]}")
