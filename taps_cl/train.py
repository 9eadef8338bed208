"""THE training loop: one objective, one step, one loop for one task or several.

- :func:`task_loss` is a task's objective: cross-entropy, plus ``lam * penalty(scores)`` once the
  warm-up (``TAPSConfig.warmup_epochs``) is over. The baselines use it without the penalty and the
  Avalanche strategy's criterion plugin calls it too.
- :class:`Stepper` takes a step: divergence check (agreed by every rank), loss scaling for
  float16 autocast, gradient clipping *per task* (one task's large gradient must not shrink
  another's step), optimizer step, schedule step.
- :func:`fit_tasks` trains any number of tasks of one :class:`TAPSModel`: every step draws one
  minibatch per task (:class:`~taps_cl.batching.TaskStream`), sums the task losses and takes one
  step. Since tasks share no trainable parameter, each task then follows exactly the trajectory
  it would follow alone; :func:`fit_task` is the one-task case.

Scores get their own learning rate because they decide *which* layers adapt (see auto_score_lr).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from taps_cl.batching import TaskStream, epoch_steps, make_loader
from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.errors import TrainingDivergedError
from taps_cl.runtime import Runtime, all_reduce_, seed_everything, world, wrap_ddp
from taps_cl.taps.model import TAPSModel


@dataclass
class FitResult:
    """What one fit produced for one task: per-epoch history and the final gate state."""

    name: str
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch
    accuracy: float | None = None  # final eval accuracy (None without eval data)
    active_layers: list[str] = field(default_factory=list)
    num_layers: int = 0
    steps: int = 0
    seconds: float = 0.0
    score_lr: float = 0.0


@dataclass
class RunResult:
    """What one run of :func:`fit_tasks` produced: a :class:`FitResult` per task and totals."""

    fits: dict[str, FitResult]
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch, all tasks
    steps: int = 0
    seconds: float = 0.0  # wall time of the training loop (evaluation excluded)
    examples: int = 0  # training examples processed, summed over tasks and ranks
    world_size: int = 1
    train_base: bool = False

    @property
    def images_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


# -- the objective and the step -------------------------------------------------------------


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
                f"{self.config.lr}) or check the data; earlier tasks are unchanged."
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
    wd = config.weight_decay
    return [
        {"params": groups["delta"], "lr": config.lr, "weight_decay": wd},
        {"params": groups["head"], "lr": config.lr, "weight_decay": wd},
        {"params": groups["norm"], "lr": config.lr, "weight_decay": 0.0},
        {"params": groups["score"], "lr": score_lr, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: TAPSModel, name: str, config: TrainConfig, score_lr: float
) -> torch.optim.Optimizer:
    """The optimizer of one task (see :func:`task_groups`)."""
    return make_optimizer(task_groups(model, name, config, score_lr), config)


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, total: int):
    """Per-step learning-rate schedule over ``total`` steps (cosine or constant)."""
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))
    )


# -- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: TAPSModel, name: str, data: Any, config: TrainConfig | None = None
) -> dict[str, float]:
    """Accuracy and mean loss of task ``name`` on ``data`` (a Dataset of preprocessed (x, y))."""
    config = config or TrainConfig()
    runtime = Runtime.of(config)
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for x, y in make_loader(data, config, runtime):
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


# -- the loop -------------------------------------------------------------------------------


class TasksLoss(nn.Module):
    """What a step differentiates (and DDP wraps): every task's :func:`task_loss` on its own
    minibatch, summed. Returns the sum and per task ``[loss * n, correct]``."""

    def __init__(self, model: TAPSModel, runtime: Runtime) -> None:
        super().__init__()
        self.model, self.runtime = model, runtime

    def forward(
        self, batches: Mapping[str, tuple[torch.Tensor, torch.Tensor]], penalty_on: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = torch.zeros((), device=self.runtime.device)
        stats = {}
        for name, (x, y) in batches.items():
            with self.runtime.autocast():
                logits = self.model(x, task=name)
            loss = task_loss(logits, y, self.model, name, penalty_on)
            ce = F.cross_entropy(logits.detach().float(), y)
            correct = (logits.detach().argmax(1) == y).sum().float()
            stats[name] = torch.stack([ce * len(y), correct, ce.new_tensor(float(len(y)))])
            total = total + loss
        return total, stats


def fit_task(
    model: TAPSModel,
    name: str,
    train_data: Any,
    eval_data: Any = None,
    config: TrainConfig | None = None,
    *,
    quiet: bool = False,
) -> FitResult:
    """Train task ``name`` (already added to ``model``) on preprocessed ``(x, y)`` data: the
    one-task case of :func:`fit_tasks`. Earlier tasks are never touched."""
    evals = {name: eval_data} if eval_data is not None else None
    return fit_tasks(model, {name: train_data}, config, eval_data=evals, quiet=quiet).fits[name]


def fit_tasks(
    model: TAPSModel,
    tasks: Mapping[str, Any],
    config: TrainConfig | None = None,
    *,
    batch_sizes: Mapping[str, int] | None = None,
    epoch_length: int | str = "max",
    extra_groups: Sequence[dict[str, Any]] = (),
    eval_data: Mapping[str, Any] | None = None,
    quiet: bool = False,
) -> RunResult:
    """Train ``tasks`` (name -> preprocessed ``(x, y)`` data; each added to ``model`` and not
    finalised) together; see the module docstring. ``batch_sizes`` are global per-task
    minibatch sizes (default ``config.batch_size``); ``extra_groups`` are more optimizer groups
    (e.g. the shared base weights of a joint run), clipped on their own. Under an initialised
    process group the run is data-parallel (DDP). A NaN/inf loss raises
    :class:`TrainingDivergedError`; the base and finalised tasks are never trained.
    """
    config = config or TrainConfig()
    names = list(tasks)
    _check_trainable(model, names)
    runtime = Runtime.of(config)
    seed_everything(config.seed)
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    sizes = {n: (batch_sizes or {}).get(n, config.batch_size) for n in names}
    # The same seed for every task: a task draws the same minibatches alone or beside others.
    streams = {n: TaskStream(tasks[n], sizes[n], config.seed, config, runtime) for n in names}
    empty = [n for n, s in streams.items() if len(s) == 0]
    if empty:
        raise ValueError(f"training data is empty for {empty}")
    steps = epoch_steps(streams, epoch_length)
    total, warmup = steps * config.epochs, int(model.config.warmup_epochs * steps)
    score_lr = config.score_lr or auto_score_lr(
        model.config, config, total - warmup, model.num_layers
    )
    per_task = [task_groups(model, n, config, score_lr) for n in names]
    optimizer = make_optimizer([g for gs in per_task for g in gs] + list(extra_groups), config)
    clip = [[p for g in gs for p in g["params"]] for gs in [*per_task, list(extra_groups)]]
    what = f"task {names[0]!r}" if len(names) == 1 else f"tasks {names}"
    schedule = make_schedule(optimizer, config, total)
    stepper = Stepper(optimizer, schedule, config, runtime, clip, what)
    result = RunResult(
        fits={n: FitResult(n, num_layers=model.num_layers, score_lr=score_lr) for n in names},
        world_size=world()[1],
    )
    loss_fn = wrap_ddp(TasksLoss(model, runtime), runtime)
    loop = _Loop(model, loss_fn, stepper, runtime, config, streams, steps, warmup)
    loop.run(result, eval_data or {}, quiet or world()[0] != 0)
    model.eval()
    for name, fit in result.fits.items():
        fit.active_layers = [k for k, on in model.gates(name).items() if on]
        fit.steps, fit.seconds = result.steps, result.seconds
    return result


def _check_trainable(model: TAPSModel, names: Sequence[str]) -> None:
    if not names:
        raise ValueError("nothing to train: give at least one task")
    for name in names:
        if model.is_frozen(name):
            raise ValueError(f"task {name!r} is finalised; add a new task (or version) to retrain")


@dataclass
class _Loop:
    """The state of one run of :func:`fit_tasks` that its epochs share."""

    model: TAPSModel
    loss_fn: nn.Module
    stepper: Stepper
    runtime: Runtime
    config: TrainConfig
    streams: dict[str, TaskStream]
    steps: int
    warmup: int

    def run(self, result: RunResult, eval_data: Mapping[str, Any], quiet: bool) -> None:
        names = list(self.streams)
        desc = f"task {names[0]}" if len(names) == 1 else "joint"
        total = self.steps * self.config.epochs
        bar = tqdm(total=total, desc=desc, disable=quiet or not sys.stderr.isatty())
        for epoch in range(self.config.epochs):
            start, seen = time.perf_counter(), result.examples
            sums = self.epoch(result, bar)
            seconds = time.perf_counter() - start
            result.seconds += seconds
            row = self.epoch_stats(sums, eval_data, epoch, result)
            result.history.append({**row, "seconds": seconds, "examples": result.examples - seen})
            bar.set_postfix(loss=f"{row['loss']:.3f}")
        bar.close()

    def epoch(self, result: RunResult, bar: tqdm) -> dict[str, torch.Tensor]:
        self.model.train()
        device = self.runtime.device
        sums = {n: torch.zeros(3, device=device) for n in self.streams}
        for _ in range(self.steps):
            batches = {}
            for name, stream in self.streams.items():
                x, y = stream.next()
                y = y.to(device, non_blocking=self.runtime.pin_memory)
                batches[name] = (self.runtime.to_device(x), y)
            loss, stats = self.loss_fn(batches, result.steps >= self.warmup)
            self.stepper.step(loss)
            for name, s in stats.items():
                sums[name] += s
            result.steps += 1
            result.examples += sum(len(b[1]) for b in batches.values()) * result.world_size
            bar.update(1)
        return sums

    def epoch_stats(self, sums, eval_data, epoch: int, result: RunResult) -> dict[str, float]:
        row: dict[str, float] = {"epoch": epoch + 1}
        for name, s in sums.items():
            loss, correct, seen = all_reduce_(s).tolist()
            stats = {"loss": loss / seen, "train_accuracy": correct / seen, "epoch": epoch + 1}
            if name in eval_data:
                acc = evaluate(self.model, name, eval_data[name], self.config)["accuracy"]
                stats["eval_accuracy"] = result.fits[name].accuracy = acc
            stats["active_layers"] = sum(self.model.gates(name).values())
            result.fits[name].history.append(stats)
            row.update({f"{name}/{k}": v for k, v in stats.items() if k != "epoch"})
        row["loss"] = sum(row[f"{n}/loss"] for n in sums)
        return row
