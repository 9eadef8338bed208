"""THE training loop: one loop for one task or several, on the shared objective and step.

:func:`fit_tasks` trains any number of tasks of one :class:`TAPSModel`. Every step draws one
minibatch per active task (:class:`~taps_cl.training.batching.TaskStream`), sums the tasks'
:func:`~taps_cl.training.step.task_loss` and takes one :class:`~taps_cl.training.step.Stepper` step.
Each task keeps its own length (its epochs over its own data), warm-up, score learning rate and
learning-rate schedule, and clips its own gradient; tasks share no trainable parameter. So a task
follows exactly the trajectory it follows alone, and :func:`fit_task` is the one-task case. A joint
run may instead give every task the same number of steps (``epoch_length`` "max", "min" or N: the
shorter tasks cycle), which training the shared base needs. Each task's head starts as the
closed-form ridge probe on its features and is refit on the trained features after its last step
(:mod:`~taps_cl.training.heads`; ``TAPSConfig.head_init``/``head_refit``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from taps_cl.config import TrainConfig
from taps_cl.taps.budget import BudgetController
from taps_cl.taps.model import TAPSModel
from taps_cl.training.batching import TaskStream, epoch_steps, make_loader
from taps_cl.training.heads import fit_heads
from taps_cl.training.runtime import Runtime, all_reduce_, seed_everything, world, wrap_ddp
from taps_cl.training.step import (  # noqa: F401  (re-exported: the loop's public pieces)
    Stepper,
    auto_score_lr,
    build_optimizer,
    make_optimizer,
    make_schedule,
    task_groups,
    task_loss,
)


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
    parameter_share: float = 0.0  # share of the base's parameters the task's patch holds


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
    minibatch, summed. Returns the sum and per task ``[ce * n, correct, n]``."""

    def __init__(self, model: TAPSModel, runtime: Runtime) -> None:
        super().__init__()
        self.model, self.runtime = model, runtime

    def forward(
        self, batches: Mapping[str, tuple[torch.Tensor, torch.Tensor]], penalty_on: set[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = torch.zeros((), device=self.runtime.device)
        stats = {}
        for name, (x, y) in batches.items():
            with self.runtime.autocast():
                logits = self.model(x, task=name)
            loss = task_loss(logits, y, self.model, name, name in penalty_on)
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


@dataclass
class _TaskRun:
    """One task's part of a run: its stream, its own epoch length, length and warm-up."""

    name: str
    data: Any  # the task's training data (its closed-form head refit reads it in order)
    stream: TaskStream
    per_epoch: int  # steps per epoch of this task
    total: int  # steps this task trains
    warmup: int  # steps before its penalty switches on
    budget: BudgetController | None = None  # with TAPSConfig.budget: chooses the gates
    steps: int = 0
    sums: torch.Tensor | None = None  # [ce * n, correct, n] of its current epoch
    settled: bool = False  # settled before its last evaluation (the head refit settles it)

    @property
    def active(self) -> bool:
        return self.steps < self.total


def fit_tasks(
    model: TAPSModel,
    tasks: Mapping[str, Any],
    config: TrainConfig | None = None,
    *,
    batch_sizes: Mapping[str, int] | None = None,
    epoch_length: int | str = "own",
    extra_groups: Sequence[dict[str, Any]] = (),
    eval_data: Mapping[str, Any] | None = None,
    quiet: bool = False,
) -> RunResult:
    """Train ``tasks`` (name -> preprocessed ``(x, y)`` data; each added to ``model`` and not
    finalised) in one run; see the module docstring. ``epoch_length="own"``: each task makes
    ``config.epochs`` passes over its own data; else every task steps ``epochs * L`` times with
    ``L`` from :func:`~taps_cl.training.batching.epoch_steps`. ``batch_sizes`` are global per-task
    minibatch sizes (default ``config.batch_size``); ``extra_groups`` are more optimizer groups
    (e.g. the shared base weights of a joint run), clipped and scheduled over the whole run. Under
    an initialised process group the run is data-parallel (DDP). A NaN/inf loss raises
    :class:`TrainingDivergedError`; the base and finalised tasks are never trained.
    """
    config = config or TrainConfig()
    names = list(tasks)
    _check_trainable(model, names)
    for name in names:
        model.unsettle_task(name)  # more training of a settled task: back to its raw deltas
    runtime = Runtime.of(config)
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    if model.config.head_init == "ridge":  # before seeding: the training draws stay the same
        fit_heads(model, tasks, config)
    seed_everything(config.seed)
    runs = _task_runs(model, tasks, config, runtime, batch_sizes or {}, epoch_length)
    result = RunResult(fits={}, world_size=world()[1])
    stepper = _stepper(model, runs, config, runtime, extra_groups, result)
    loop = _Loop(model, wrap_ddp(TasksLoss(model, runtime), runtime), stepper, runtime, config)
    loop.run(runs, result, eval_data or {}, quiet or world()[0] != 0)
    model.eval()
    for name, fit in result.fits.items():
        _settle(model, name, fit, (eval_data or {}).get(name), config, runs[name].settled)
        fit.active_layers = [k for k, on in model.gates(name).items() if on]
        fit.steps, fit.seconds = runs[name].total, result.seconds
    return result


def _settle(
    model: TAPSModel, name: str, fit: FitResult, eval_data: Any, config, measured: bool
) -> None:
    """Bring the task to the form its patch will store (budget, pruning, delta dtype); if that
    can change its outputs, the reported accuracy is that of the stored form: re-measured,
    unless the task was settled before its last evaluation (``measured``, after a refit)."""
    closed = model.settle_task(name)
    fit.parameter_share = model.parameter_share(name)
    changed = closed or (not measured and model.config.stored_dtype != "float32")
    if eval_data is not None and changed:
        fit.accuracy = evaluate(model, name, eval_data, config)["accuracy"]
    if eval_data is not None and fit.history and (changed or measured):
        fit.history[-1]["stored_accuracy"] = fit.accuracy


def _check_trainable(model: TAPSModel, names: Sequence[str]) -> None:
    if not names:
        raise ValueError("nothing to train: give at least one task")
    for name in names:
        if model.is_frozen(name):
            raise ValueError(f"task {name!r} is finalised; add a new task (or version) to retrain")


def _task_runs(model, tasks, config, runtime, batch_sizes, epoch_length) -> dict[str, _TaskRun]:
    # The same seed for every task: a task draws the same minibatches alone or beside others.
    streams = {
        n: TaskStream(d, batch_sizes.get(n, config.batch_size), config.seed, config, runtime)
        for n, d in tasks.items()
    }
    empty = [n for n, s in streams.items() if len(s) == 0]
    if empty:
        raise ValueError(f"training data is empty for {empty}")
    shared = None if epoch_length == "own" else epoch_steps(streams, epoch_length)
    runs = {}
    for name, stream in streams.items():
        per_epoch = shared or len(stream)
        total = per_epoch * config.epochs
        warmup = int(model.config.warmup_epochs * per_epoch)
        budget = None
        if model.config.budgeted:  # the budget, not the penalty, closes gates
            budget, warmup = BudgetController(model, name, total), total + 1
        runs[name] = _TaskRun(name, tasks[name], stream, per_epoch, total, warmup, budget)
    return runs


def _stepper(model, runs, config, runtime, extra_groups, result) -> Stepper:
    """One optimizer over every task's groups (each with its own score lr and schedule length)
    and the extra groups (over the whole run); clipping per task."""
    run_total = max(r.total for r in runs.values())
    groups, clip = [], []
    for name, r in runs.items():
        score_lr = config.score_lr or auto_score_lr(
            model.config, config, r.total - r.warmup, model.num_layers
        )
        if r.budget is not None:
            score_lr = 0.0  # scores only measure importance (their gradient) until selection
        result.fits[name] = FitResult(name, num_layers=model.num_layers, score_lr=score_lr)
        own = [{**g, "steps": r.total} for g in task_groups(model, name, config, score_lr)]
        groups += own
        clip.append([p for g in own for p in g["params"]])
    extra = [{**g, "steps": run_total} for g in extra_groups]
    clip.append([p for g in extra for p in g["params"]])
    optimizer = make_optimizer(groups + extra, config)
    schedule = make_schedule(optimizer, config, [g["steps"] for g in optimizer.param_groups])
    what = f"task {next(iter(runs))!r}" if len(runs) == 1 else f"tasks {list(runs)}"
    return Stepper(optimizer, schedule, config, runtime, clip, what)


@dataclass
class _Loop:
    """The parts of one run of :func:`fit_tasks` that its steps share."""

    model: TAPSModel
    loss_fn: nn.Module
    stepper: Stepper
    runtime: Runtime
    config: TrainConfig

    def run(self, runs: dict[str, _TaskRun], result: RunResult, evals, quiet: bool) -> None:
        total = max(r.total for r in runs.values())
        per_epoch = max(r.per_epoch for r in runs.values())  # the run's epoch: the longest task's
        desc = f"task {next(iter(runs))}" if len(runs) == 1 else "joint"
        bar = tqdm(total=total, desc=desc, disable=quiet or not sys.stderr.isatty())
        self.model.train()
        start, seen = time.perf_counter(), 0
        for step in range(total):
            active = [r for r in runs.values() if r.active]
            seen += self.step(active, result)
            for r in active:
                if r.steps == r.total and self.model.config.head_refit:
                    self.refit(r)  # the task's last step: its head meets its final features
                if r.steps % r.per_epoch == 0:
                    self.close_epoch(r, result, evals)  # evaluate() restores train mode
            bar.update(1)
            if (step + 1) % per_epoch == 0 or step + 1 == total:
                seconds = time.perf_counter() - start
                result.seconds += seconds
                row = {"epoch": len(result.history) + 1, "seconds": seconds, "examples": seen}
                result.history.append({**row, **self.last_stats(runs, result)})
                bar.set_postfix(loss=f"{result.history[-1]['loss']:.3f}")
                start, seen = time.perf_counter(), 0
        bar.close()

    def step(self, active: list[_TaskRun], result: RunResult) -> int:
        device = self.runtime.device
        batches = {}
        for r in active:
            x, y = r.stream.next()
            y = y.to(device, non_blocking=self.runtime.pin_memory)
            batches[r.name] = (self.runtime.to_device(x), y)
        penalty_on = {r.name for r in active if r.steps >= r.warmup}
        loss, stats = self.loss_fn(batches, penalty_on)
        self.stepper.step(loss)
        for r in active:
            r.sums = stats[r.name] if r.sums is None else r.sums + stats[r.name]
            r.steps += 1
            if r.budget is not None:
                r.budget.observe(r.steps)
        result.steps += 1
        examples = sum(len(b[1]) for b in batches.values()) * result.world_size
        result.examples += examples
        return examples

    def refit(self, r: _TaskRun) -> None:
        """Refit task ``r``'s head in closed form on its trained features (eval mode), before
        its last epoch is measured: a short run ends with a head behind its features. The task
        is settled first (budget, stored dtype), so the head meets the features it will serve."""
        self.model.settle_task(r.name)
        r.settled = True
        fit_heads(self.model, {r.name: r.data}, self.config, after_training=True)

    def close_epoch(self, r: _TaskRun, result: RunResult, evals: Mapping[str, Any]) -> None:
        """One of task ``r``'s own epochs ended: record its stats (and eval accuracy)."""
        loss, correct, seen = all_reduce_(r.sums).tolist()
        r.sums = None
        fit = result.fits[r.name]
        stats = {
            "epoch": len(fit.history) + 1,
            "loss": loss / seen,
            "train_accuracy": correct / seen,
        }
        if r.name in evals:
            acc = evaluate(self.model, r.name, evals[r.name], self.config)["accuracy"]
            stats["eval_accuracy"] = fit.accuracy = acc
        stats["active_layers"] = sum(self.model.gates(r.name).values())
        fit.history.append(stats)

    @staticmethod
    def last_stats(runs: dict[str, _TaskRun], result: RunResult) -> dict[str, float]:
        row: dict[str, float] = {}
        for name in runs:
            last = result.fits[name].history[-1] if result.fits[name].history else {}
            row.update({f"{name}/{k}": v for k, v in last.items() if k != "epoch"})
        row["loss"] = sum(row.get(f"{n}/loss", 0.0) for n in runs)
        return row
