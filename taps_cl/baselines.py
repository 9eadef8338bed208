"""Reference points TAPS is judged against, trained with the same loop budget as ``fit_task``.

- ``"linear"`` (feature extractor): frozen base, new head only. Cheapest, no forgetting, weakest.
- ``"finetune"``: every weight trainable, new head. One full model copy per task.

The same objective without the penalty (:func:`~taps_cl.train.task_loss`), the same optimizer,
clipping and schedule (:class:`~taps_cl.train.Stepper`), the same batching and data order
(:class:`~taps_cl.batching.TaskStream`) and epochs as TAPS (``TrainConfig``), so a comparison
differs only in *what* is trained.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from taps_cl.batching import TaskStream, make_loader
from taps_cl.config import TrainConfig
from taps_cl.runtime import Runtime, seed_everything
from taps_cl.taps.model import find_head, set_child
from taps_cl.train import Stepper, make_optimizer, make_schedule, task_loss

MODES = ("linear", "finetune")


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
) -> BaselineResult:
    """Train a copy of ``base`` with a new ``num_classes`` head; ``base`` is untouched."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    config = config or TrainConfig()
    runtime = Runtime.of(config)
    seed_everything(config.seed)
    model, head_module = _with_new_head(base, num_classes, head, config.seed)
    trainable = list(head_module.parameters()) if mode == "linear" else list(model.parameters())
    model.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    model.to(runtime.device)
    stream = TaskStream(train_data, config.batch_size, config.seed, config, runtime)
    groups = [{"params": trainable, "lr": config.lr, "weight_decay": config.weight_decay}]
    opt = make_optimizer(groups, config)
    total = len(stream) * config.epochs
    stepper = Stepper(opt, make_schedule(opt, config, total), config, runtime, what=mode)
    start = time.perf_counter()
    for _ in range(config.epochs):
        model.train(mode == "finetune")  # a feature extractor keeps the base's BN statistics
        for _ in range(len(stream)):
            x, y = stream.next()
            with runtime.autocast():
                logits = model(runtime.to_device(x))
            stepper.step(task_loss(logits, y.to(runtime.device)))
    seconds = time.perf_counter() - start
    model.eval()
    accuracy = accuracy_of(model, eval_data, config) if eval_data is not None else None
    stored = trainable if mode == "linear" else list(model.state_dict().values())
    n_params = sum(p.numel() for p in trainable)
    nbytes = sum(t.numel() * t.element_size() for t in stored)
    return BaselineResult(mode, accuracy, n_params, nbytes, seconds, model)


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
