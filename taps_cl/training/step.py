"""The objective and the step every loop of taps_cl shares (see :mod:`taps_cl.training.loop`).

- :func:`task_loss` is a task's objective: cross-entropy, plus ``lam * penalty(scores)`` once the
  warm-up (``TAPSConfig.warmup_epochs``) is over. The baselines use it without the penalty and the
  Avalanche strategy's criterion plugin calls it too.
- :class:`Stepper` takes a step: divergence check (agreed by every rank), loss scaling for
  float16 autocast, gradient clipping *per task* (one task's large gradient must not shrink
  another's step), optimizer step, schedule step.
- :func:`task_groups`, :func:`make_optimizer`, :func:`make_schedule` and :func:`auto_score_lr`
  build the same optimizer and schedule for every caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.errors import TrainingDivergedError
from taps_cl.taps.model import TAPSModel
from taps_cl.training.runtime import Runtime, all_reduce_


def task_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    model: TAPSModel | None = None,
    task: str | None = None,
    penalty_on: bool = False,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (computed in float32), plus ``lam * penalty(task)`` when
    ``penalty_on`` (after the warm-up) and ``model.config.lam > 0``."""
    loss = F.cross_entropy(logits.float(), targets)
    if penalty_on and model is not None and model.config.lam > 0:
        loss = loss + model.config.lam * model.penalty(task)
    return loss


class Stepper:
    """One optimisation step, the same for every loop here (and Avalanche's): see module doc.

    ``backward`` and ``update`` are the two halves of :meth:`step`, for templates (Avalanche)
    that call plugins between them. ``clip_groups`` are clipped separately (default: one group
    of every parameter of the optimizer).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        config: TrainConfig,
        runtime: Runtime,
        clip_groups: Sequence[Sequence[nn.Parameter]] | None = None,
        what: str = "training",
    ) -> None:
        self.optimizer, self.scheduler, self.config = optimizer, scheduler, config
        self.what = what
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.scales_loss)
        if clip_groups is None:
            clip_groups = [[p for g in optimizer.param_groups for p in g["params"]]]
        self.clip_groups = [list(g) for g in clip_groups if g]
        self.steps = 0

    def backward(self, loss: torch.Tensor) -> None:
        check = all_reduce_(loss.detach().float().clone())  # every rank stops together
        if not torch.isfinite(check):
            raise TrainingDivergedError(
                f"{self.what}: loss is {float(check)} at step {self.steps}; lower lr (now "
                f"{self.config.lr or 'auto'}) or check the data; earlier tasks are unchanged."
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

    def update(self) -> None:
        if self.config.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            for group in self.clip_groups:
                torch.nn.utils.clip_grad_norm_(group, self.config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1

    def step(self, loss: torch.Tensor) -> None:
        self.backward(loss)
        self.update()


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


def make_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer every loop uses over ``groups`` (empty groups dropped)."""
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9)
    return torch.optim.AdamW(groups)


def task_groups(
    model: TAPSModel, name: str, config: TrainConfig, score_lr: float
) -> list[dict[str, Any]]:
    """A task's optimizer groups: deltas and head at ``lr`` with weight decay, norms at ``lr``
    without, scores at ``score_lr`` without."""
    groups = model.param_groups(name)
    wd, lr = config.weight_decay, config.lr_for(model.config.rank)
    return [
        {"params": groups["delta"], "lr": lr, "weight_decay": wd},
        {"params": groups["head"], "lr": lr, "weight_decay": wd},
        {"params": groups["norm"], "lr": lr, "weight_decay": 0.0},
        {"params": groups["score"], "lr": score_lr, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: TAPSModel, name: str, config: TrainConfig, score_lr: float
) -> torch.optim.Optimizer:
    """The optimizer of one task (see :func:`task_groups`)."""
    return make_optimizer(task_groups(model, name, config, score_lr), config)


def make_schedule(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total: int | Sequence[int]
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning-rate schedule (cosine or constant) over ``total`` steps, or over
    ``total[i]`` steps for parameter group i (tasks of one run that train for different lengths
    each follow their own schedule)."""
    totals = [total] * len(optimizer.param_groups) if isinstance(total, int) else list(total)
    if len(totals) != len(optimizer.param_groups):
        raise ValueError(f"{len(totals)} schedule lengths for {len(optimizer.param_groups)} groups")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [_factor(config, t) for t in totals])


def _factor(config: TrainConfig, total: int):
    if config.schedule == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))
