"""Fit one task: learn which layers to specialise (gates) and how (deltas), plus norms and head.

Loss = cross-entropy + lam * penalty(scores), the penalty switched on after
``TAPSConfig.warmup_epochs``. One optimizer holds four groups (deltas, norms, head, scores); the
scores get their own learning rate because they decide *which* layers adapt (see auto_score_lr).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.errors import TrainingDivergedError
from taps_cl.runtime import Runtime, seed_everything
from taps_cl.taps.model import TAPSModel


@dataclass
class FitResult:
    """What one fit produced: per-epoch history and the final gate state."""

    name: str
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch
    accuracy: float | None = None  # final eval accuracy (None without eval data)
    active_layers: list[str] = field(default_factory=list)
    num_layers: int = 0
    steps: int = 0
    seconds: float = 0.0
    score_lr: float = 0.0


def auto_score_lr(taps: TAPSConfig, train: TrainConfig, steps: int, num_layers: int) -> float:
    """The score learning rate when ``TrainConfig.score_lr`` is None.

    A gate closes when its score falls from ``score_init`` to ``tau``. We choose the rate so that
    a score under steady penalty pressure could cross that gap about four times within the steps
    that have the penalty on: fast enough that gates really close in a short run, slow enough
    that one noisy batch cannot close a useful layer. With Adam(W) a parameter moves about one
    lr per step whatever its gradient scale, so lr = 4 * gap / steps. With SGD it moves
    lr * lam / num_layers per step (the uniform penalty's gradient), so that factor is divided out.
    """
    gap = max(taps.score_init - taps.tau, 1e-3)
    lr = 4.0 * gap / max(1, steps)
    if train.optimizer == "sgd" and taps.lam > 0:
        lr *= num_layers / taps.lam
    return lr


def make_loader(
    data: Any, config: TrainConfig, runtime: Runtime, shuffle: bool, gen=None
) -> DataLoader:
    """The DataLoader every training loop here uses (TAPS, baselines, joint), so that a
    comparison differs only in what is trained, not in batching or data order."""
    dataset: Dataset = getattr(data, "dataset", data)
    drop_last = (
        shuffle and len(dataset) > config.batch_size and len(dataset) % config.batch_size == 1
    )
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=shuffle,
        generator=gen,
        num_workers=config.num_workers,
        pin_memory=runtime.pin_memory,
        drop_last=drop_last,  # a last batch of one sample breaks BatchNorm in train mode
    )


def build_optimizer(
    model: TAPSModel, name: str, config: TrainConfig, score_lr: float
) -> torch.optim.Optimizer:
    groups = model.param_groups(name)
    wd = config.weight_decay
    param_groups = [
        {"params": groups["delta"], "lr": config.lr, "weight_decay": wd},
        {"params": groups["head"], "lr": config.lr, "weight_decay": wd},
        {"params": groups["norm"], "lr": config.lr, "weight_decay": 0.0},
        {"params": groups["score"], "lr": score_lr, "weight_decay": 0.0},
    ]
    param_groups = [g for g in param_groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(param_groups, momentum=0.9)
    return torch.optim.AdamW(param_groups)


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, total: int):
    """Per-step learning-rate schedule over ``total`` steps (cosine or constant)."""
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))
    )


@torch.no_grad()
def evaluate(
    model: TAPSModel, name: str, data: Any, config: TrainConfig | None = None
) -> dict[str, float]:
    """Accuracy and mean loss of task ``name`` on ``data`` (a Dataset of preprocessed (x, y))."""
    config = config or TrainConfig()
    runtime = Runtime.create(config.device, config.amp, config.amp_cpu)
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for x, y in make_loader(data, config, runtime, shuffle=False):
        x, y = runtime.to_device(x), y.to(runtime.device)
        with runtime.autocast():
            logits = model(x, task=name)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    if total == 0:
        raise ValueError("evaluation data is empty")
    return {"accuracy": correct / total, "loss": loss_sum / total, "n": float(total)}


def fit_task(
    model: TAPSModel,
    name: str,
    train_data: Any,
    eval_data: Any = None,
    config: TrainConfig | None = None,
    *,
    quiet: bool = False,
) -> FitResult:
    """Train task ``name`` (already added to ``model``) on preprocessed ``(x, y)`` data.

    Earlier tasks are never touched: only ``model.param_groups(name)`` is optimised, and the
    base and frozen tasks stay in eval mode. A NaN/inf loss raises ``TrainingDivergedError``.
    """
    config = config or TrainConfig()
    if model.is_frozen(name):
        raise ValueError(f"task {name!r} is finalised; add a new task (or version) to retrain")
    runtime = Runtime.create(config.device, config.amp, config.amp_cpu)
    gen = seed_everything(config.seed)
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    loader = make_loader(train_data, config, runtime, shuffle=True, gen=gen)
    if len(loader) == 0:
        raise ValueError("training data is empty")
    total = len(loader) * config.epochs
    warmup = int(model.config.warmup_epochs * len(loader))
    score_lr = config.score_lr or auto_score_lr(
        model.config, config, total - warmup, model.num_layers
    )
    optimizer = build_optimizer(model, name, config, score_lr)
    scheduler = make_schedule(optimizer, config, total)
    result = FitResult(name=name, num_layers=model.num_layers, score_lr=score_lr)
    start = time.perf_counter()
    bar = tqdm(total=total, desc=f"task {name}", disable=quiet or not sys.stderr.isatty())
    for epoch in range(config.epochs):
        stats = _train_epoch(
            model, name, loader, optimizer, scheduler, config, runtime, warmup, result, bar
        )
        if eval_data is not None:
            stats["eval_accuracy"] = evaluate(model, name, eval_data, config)["accuracy"]
        stats["epoch"] = epoch + 1
        stats["active_layers"] = sum(model.gates(name).values())
        result.history.append(stats)
        bar.set_postfix(
            loss=f"{stats['loss']:.3f}", layers=f"{stats['active_layers']}/{model.num_layers}"
        )
    bar.close()
    model.eval()
    result.seconds = time.perf_counter() - start
    result.active_layers = [k for k, on in model.gates(name).items() if on]
    if eval_data is not None:
        result.accuracy = result.history[-1]["eval_accuracy"]
    return result


def _train_epoch(model, name, loader, optimizer, scheduler, config, runtime, warmup, result, bar):
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = runtime.to_device(x), y.to(runtime.device, non_blocking=runtime.pin_memory)
        with runtime.autocast():
            logits = model(x, task=name)
        loss = F.cross_entropy(logits.float(), y)
        if result.steps >= warmup and model.config.lam > 0:
            loss = loss + model.config.lam * model.penalty(name)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"task {name!r}: loss is {float(loss.detach())} at step {result.steps}; lower lr "
                f"(now {config.lr}) or check the data; earlier tasks are unchanged."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        result.steps += 1
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(y)
        bar.update(1)
    return {"loss": loss_sum / seen, "train_accuracy": correct / seen}
