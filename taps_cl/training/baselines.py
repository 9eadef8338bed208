"""Reference points TAPS is judged against, trained with the same loop budget as ``fit_task``.

- ``"linear"`` (feature extractor): frozen base, new head only. Cheapest, no forgetting, weakest.
- ``"finetune"``: every weight trainable, new head. One full model copy per task.
- ``"lastk"``: the last ``last_k`` gateable layers (conv/linear weights, in model order, head
  excluded), every norm (affine + running statistics) and the head: the natural "adapter" to
  compare TAPS with at the same parameter count (:func:`lastk_parameters` sizes it).

The same objective without the penalty (:func:`~taps_cl.training.step.task_loss`), the same
optimizer, clipping and schedule (:class:`~taps_cl.training.step.Stepper`), the same batching and
data order (:class:`~taps_cl.training.batching.TaskStream`) and epochs as TAPS (``TrainConfig``), so
a comparison differs only in *what* is trained.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from taps_cl.config import TrainConfig
from taps_cl.taps.layer import gateable_weight_attr
from taps_cl.taps.model import find_head, set_child
from taps_cl.taps.modules import is_norm
from taps_cl.training.batching import TaskStream, make_loader
from taps_cl.training.loop import Stepper, make_optimizer, make_schedule, task_loss
from taps_cl.training.runtime import Runtime, seed_everything

MODES = ("linear", "finetune", "lastk")


@dataclass
class BaselineResult:
    mode: str
    accuracy: float | None
    task_parameters: int  # parameters a deployment must store for this task
    nbytes: int
    seconds: float
    model: nn.Module


def fit_baseline(
    base: nn.Module,
    num_classes: int,
    train_data: Any,
    eval_data: Any = None,
    config: TrainConfig | None = None,
    mode: str = "finetune",
    head: str | None = None,
    last_k: int = 0,
) -> BaselineResult:
    """Train a copy of ``base`` with a new ``num_classes`` head; ``base`` is untouched."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    config = config or TrainConfig()
    seed_everything(config.seed)
    model, head_module = _with_new_head(base, num_classes, head, config.seed)
    trainable, stored = _trainable(model, head_module, mode, last_k)
    model.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    accuracy, seconds = train_plain(model, trainable, train_data, eval_data, config, mode)
    # lastk also stores its norms' running statistics, as a TAPS patch does
    n_params = sum(p.numel() for p in (stored if mode == "lastk" else trainable))
    nbytes = sum(t.numel() * t.element_size() for t in stored)
    return BaselineResult(mode, accuracy, n_params, nbytes, seconds, model)


def train_plain(
    model: nn.Module,
    trainable: list[nn.Parameter],
    train_data: Any,
    eval_data: Any,
    config: TrainConfig,
    what: str = "baseline",
) -> tuple[float | None, float]:
    """Train ``trainable`` of a plain classifier with the shared objective, step and batching
    (any adapter, e.g. a peft model); returns (eval accuracy or None, training seconds)."""
    runtime = Runtime.of(config)
    model.to(runtime.device)
    stream = TaskStream(train_data, config.batch_size, config.seed, config, runtime)
    groups = [{"params": trainable, "lr": config.lr_for(None), "weight_decay": config.weight_decay}]
    opt = make_optimizer(groups, config)
    total = len(stream) * config.epochs
    stepper = Stepper(opt, make_schedule(opt, config, total), config, runtime, what=what)
    start = time.perf_counter()
    for _ in range(config.epochs):
        model.train(what != "linear")  # a feature extractor keeps the base's BN statistics
        for _ in range(len(stream)):
            x, y = stream.next()
            with runtime.autocast():
                logits = model(runtime.to_device(x))
            stepper.step(task_loss(logits, y.to(runtime.device)))
    seconds = time.perf_counter() - start
    model.eval()
    accuracy = accuracy_of(model, eval_data, config) if eval_data is not None else None
    return accuracy, seconds


def _trainable(model: nn.Module, head: nn.Module, mode: str, last_k: int):
    """(trainable parameters, tensors a deployment stores) of a baseline mode."""
    if mode == "linear":
        return list(head.parameters()), list(head.parameters())
    if mode == "finetune":
        return list(model.parameters()), list(model.state_dict().values())
    weights = _gateable_weights(model, head)
    if not 0 <= last_k <= len(weights):
        raise ValueError(f"last_k must be in [0, {len(weights)}], got {last_k}")
    norms = [m for m in model.modules() if is_norm(m)]
    trainable = weights[len(weights) - last_k :] + list(head.parameters())
    trainable += [p for m in norms for p in m.parameters()]
    buffers = [b for m in norms for b in m.buffers() if b.is_floating_point()]
    return trainable, trainable + buffers


def _gateable_weights(model: nn.Module, head: nn.Module) -> list[nn.Parameter]:
    inside_head = {id(m) for m in head.modules()}
    out = []
    for module in model.modules():
        attr = gateable_weight_attr(module)
        if attr is not None and id(module) not in inside_head:
            out.append(getattr(module, attr))
    return out


def lastk_parameters(base: nn.Module, num_classes: int, head: str | None = None) -> list[int]:
    """Task parameters of ``"lastk"`` for k = 0, 1, 2, ... (to match another method's size)."""
    model, head_module = _with_new_head(base, num_classes, head, 0)
    weights = _gateable_weights(model, head_module)
    fixed = sum(t.numel() for t in _trainable(model, head_module, "lastk", 0)[1])
    sizes = [fixed]
    for w in reversed(weights):
        sizes.append(sizes[-1] + w.numel())
    return sizes


def _with_new_head(base: nn.Module, num_classes: int, head: str | None, seed: int):
    model = copy.deepcopy(base)
    name = find_head(model, head)
    old = model.get_submodule(name)
    torch.manual_seed(seed)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    set_child(model, name, new)
    return model, new


@torch.no_grad()
def accuracy_of(model: nn.Module, data: Any, config: TrainConfig | None = None) -> float:
    """Top-1 accuracy of a plain classifier on preprocessed ``(x, y)`` data."""
    config = config or TrainConfig()
    runtime = Runtime.of(config)
    model.eval()
    correct = total = 0
    for x, y in make_loader(data, config, runtime):
        with runtime.autocast():
            pred = model(runtime.to_device(x)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    if total == 0:
        raise ValueError("evaluation data is empty")
    return correct / total
