"""Avalanche's own strategies (Naive, EWC, LwF, PackNet, Replay, Cumulative) on the same base
as TAPS, multi-head, for task-incremental comparisons.

Every baseline shares the base's feature extractor across tasks and gives each task its own
linear head, all created up front (no head appears mid-run, none is invented for an unseen task).
PackNet needs two more things Avalanche's ``PackNetModel.wrap`` lacks for timm bases: convolutions
that keep their own ``forward`` (timm's ``Conv2dSame`` pads in ``forward``; PackNet's wrapper calls
``_conv_forward`` and would drop that padding), and norms (PackNet refuses BatchNorm; we keep the
pre-trained norms frozen in eval mode, so they are shared by all tasks and never drift).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from avalanche.models import MultiTaskModule
from avalanche.models.packnet import PackNetModel, PackNetModule, WeightAndBiasPackNetModule
from avalanche.training import EWC, LwF, Naive, PackNet, Replay
from avalanche.training.supervised import Cumulative
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.func import functional_call

from taps_cl.errors import UnknownTaskError
from taps_cl.strategies.multitask import PAD_LOGIT, experience_task_labels
from taps_cl.taps.layer import gateable_weight_attr
from taps_cl.taps.model import find_head
from taps_cl.taps.modules import is_norm

BASELINES = ("naive", "ewc", "lwf", "packnet", "replay", "cumulative")


def split_head(base: nn.Module, head: str | None = None) -> tuple[nn.Module, int]:
    """A deep copy of ``base`` with its classifier replaced by ``nn.Identity``, and the number of
    features the classifier received."""
    features = copy.deepcopy(base)
    name = find_head(features, head)
    in_features = features.get_submodule(name).in_features
    parent, _, child = name.rpartition(".")
    setattr(features.get_submodule(parent) if parent else features, child, nn.Identity())
    return features, in_features


def _heads(in_features: int, num_classes: Mapping[int, int], seed: int) -> nn.ModuleDict:
    if not num_classes:
        raise ValueError("num_classes must map at least one task label to its class count")
    torch.manual_seed(seed)
    return nn.ModuleDict({str(t): nn.Linear(in_features, int(n)) for t, n in num_classes.items()})


class MultiHeadNet(MultiTaskModule):
    """Shared features + one head per task label, all heads created at construction."""

    def __init__(
        self,
        base: nn.Module,
        num_classes: Mapping[int, int],
        head: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.features, in_features = split_head(base, head)
        self.features.requires_grad_(True)
        self.heads = _heads(in_features, num_classes, seed)
        self.max_class_label = max(int(n) for n in num_classes.values())

    def adaptation(self, experience: Any) -> None:
        unknown = [t for t in experience_task_labels(experience) if str(t) not in self.heads]
        if unknown:
            raise UnknownTaskError(f"no head for task labels {unknown}; known: {list(self.heads)}")
        super().adaptation(experience)

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor | int | None) -> torch.Tensor:
        if task_labels is None:
            return self.forward_all_tasks(x)
        z = self.features(x)  # once per minibatch, shared by every task in it
        if isinstance(task_labels, int):
            return self.heads[str(task_labels)](z)
        labels = task_labels.to(x.device).long()
        unique = torch.unique(labels).tolist()
        if len(unique) == 1:
            return self.heads[str(unique[0])](z)
        width = max(self.heads[str(t)].out_features for t in unique)
        out = z.new_full((x.shape[0], width), PAD_LOGIT)
        for t in unique:
            mask = labels == t
            logits = self.heads[str(t)](z[mask])
            out[mask, : logits.shape[1]] = logits.to(out.dtype)
        return out

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.heads[str(task_label)](self.features(x))


# -- PackNet -------------------------------------------------------------------------------------


class _PnLayer(WeightAndBiasPackNetModule):
    """PackNet masking for any gateable layer, running the layer's own forward."""

    def __init__(self, wrappee: nn.Module) -> None:
        super().__init__(wrappee)
        # Avalanche tests ``wrappee.weight`` here instead of the bias; bias-free convs then crash.
        self.has_bias = isinstance(getattr(wrappee, "bias", None), nn.Parameter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.wrappee, {"weight": self.available_weights()}, (x,))


class _FrozenNorm(PackNetModule):
    """A pre-trained norm shared by all tasks: frozen, always in eval mode."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> _FrozenNorm:
        self.training = mode
        self.norm.eval()  # running statistics updated by a later task would be forgetting
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def _prune(self, prune_proportion: float) -> None:
        pass

    def _freeze_pruned(self) -> None:
        pass

    def _activate_task(self, task_id: int) -> None:
        pass


def _packnet_layers(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if gateable_weight_attr(child) == "weight":
            setattr(module, name, _PnLayer(child))
        elif is_norm(child):
            setattr(module, name, _FrozenNorm(child))
        else:
            _packnet_layers(child)


class PackNetMultiHead(PackNetModel):
    """PackNet over the base's features, with one (unpruned) head per task."""

    def __init__(
        self,
        base: nn.Module,
        num_classes: Mapping[int, int],
        head: str | None = None,
        seed: int = 0,
    ) -> None:
        features, in_features = split_head(base, head)
        features.requires_grad_(True)
        _packnet_layers(features)
        super().__init__(features)
        self.heads = _heads(in_features, num_classes, seed)
        self.max_class_label = max(int(n) for n in num_classes.values())

    def forward(self, x: torch.Tensor, task_id: torch.Tensor | int) -> torch.Tensor:
        labels = torch.as_tensor(task_id).reshape(-1)
        task = int(labels[0])
        if not bool((labels == task).all()):
            raise ValueError("PackNet needs single-task minibatches")
        self.activate_task(min(task, self.task_count))
        return self.heads[str(task)](self.wrappee(x))


# -- strategies ----------------------------------------------------------------------------------


def packnet_epochs(train_epochs: int) -> int:
    """PackNet's epochs per experience: the budget, or 2 if the budget is 1 (prune + fine-tune
    cannot fit in one epoch; callers should report the extra epoch)."""
    return max(2, train_epochs)


def build_baseline(
    name: str,
    base: nn.Module,
    num_classes: Mapping[int, int],
    *,
    lr: float = 1e-3,
    train_epochs: int = 1,
    train_mb_size: int = 32,
    eval_mb_size: int = 64,
    device: str | torch.device = "cpu",
    evaluator: Any = None,
    mem_size: int = 200,
    seed: int = 0,
) -> SupervisedTemplate:
    """An Avalanche strategy ``name`` (see ``BASELINES``) on a deep copy of ``base``."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")
    net_cls = PackNetMultiHead if name == "packnet" else MultiHeadNet
    model = net_cls(base, num_classes, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    common = dict(
        model=model,
        optimizer=torch.optim.Adam(params, lr=lr),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=train_mb_size,
        train_epochs=train_epochs,
        eval_mb_size=eval_mb_size,
        device=device,
        evaluator=evaluator,
    )
    makers: dict[str, Callable[[], SupervisedTemplate]] = {
        "naive": lambda: Naive(**common),
        "ewc": lambda: EWC(ewc_lambda=100.0, **common),
        "lwf": lambda: LwF(alpha=1.0, temperature=2.0, **common),
        # PackNet prunes after its first epochs, then fine-tunes the kept weights for the last
        # one; it needs at least two epochs (see ``packnet_epochs``).
        "packnet": lambda: PackNet(
            post_prune_epochs=1,
            prune_proportion=0.5,
            **{**common, "train_epochs": packnet_epochs(train_epochs)},
        ),
        "replay": lambda: Replay(mem_size=mem_size, **common),
        "cumulative": lambda: Cumulative(**common),
    }
    return makers[name]()
