"""fit_joint: one optimizer step over every task's minibatch (and, optionally, the base)."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from taps_cl.config import TrainConfig
from taps_cl.errors import TrainingDivergedError
from taps_cl.joint.distributed import broadcast_state, world
from taps_cl.joint.sampling import JointConfig, TaskStream, epoch_steps, task_batch_sizes
from taps_cl.runtime import Runtime, seed_everything
from taps_cl.taps.model import TAPSModel
from taps_cl.train import FitResult, auto_score_lr, build_optimizer, evaluate, make_schedule


@dataclass
class JointResult:
    """What one joint fit produced: a :class:`FitResult` per task plus the run's totals."""

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


class _JointLoss(nn.Module):
    """What DDP wraps: one forward runs every task and returns the summed loss."""

    def __init__(self, model: TAPSModel, runtime: Runtime) -> None:
        super().__init__()
        self.model = model
        self.runtime = runtime

    def forward(
        self, batches: dict[str, tuple[torch.Tensor, torch.Tensor]], penalty: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = torch.zeros((), device=self.runtime.device)
        stats = {}
        for name, (x, y) in batches.items():
            with self.runtime.autocast():
                logits = self.model(x, task=name)
            loss = F.cross_entropy(logits.float(), y)
            stats[name] = torch.stack(
                [loss.detach() * len(y), (logits.detach().argmax(1) == y).sum().float()]
            )
            if penalty and self.model.config.lam > 0:
                loss = loss + self.model.config.lam * self.model.penalty(name)
            total = total + loss
        return total, stats


def base_parameters(model: TAPSModel) -> list[nn.Parameter]:
    """The shared base weights: every parameter of the base that no task owns, minus the base
    norms and head kept for the no-task path (tasks use their own copies, not these)."""
    owned: set[int] = {id(p) for p in model.heads.parameters()}
    for _, layer in model.layers():
        owned |= {id(p) for p in (*layer.delta.parameters(), *layer.score.parameters())}
    for _, norm in model.norms():
        owned |= {id(p) for p in norm.parameters()}
    return [p for p in model.base.parameters() if id(p) not in owned]


def _optimizer(
    model: TAPSModel,
    names: Sequence[str],
    train: TrainConfig,
    score_lr: float,
    base: list[nn.Parameter],
    base_lr: float,
) -> torch.optim.Optimizer:
    """One optimizer: each task's groups exactly as :func:`build_optimizer` lays them out, plus
    (train_base) one group for the shared base weights."""
    optimizer = build_optimizer(model, names[0], train, score_lr)
    for name in names[1:]:
        for group in build_optimizer(model, name, train, score_lr).param_groups:
            optimizer.add_param_group(group)
    if base:
        optimizer.add_param_group(
            {"params": base, "lr": base_lr, "weight_decay": train.weight_decay}
        )
    return optimizer


def _check_tasks(model: TAPSModel, names: Sequence[str], train_base: bool) -> None:
    if not names:
        raise ValueError("fit_joint needs at least one task")
    for name in names:
        if model.is_frozen(name):
            raise ValueError(f"task {name!r} is finalised; add a new task (or version) to retrain")
    others = [t for t in model.tasks if t not in names]
    if train_base and others:
        raise ValueError(
            f"train_base=True would change the base under tasks {others}; train on a model "
            "holding only the joint run's tasks"
        )


def fit_joint(
    model: TAPSModel,
    tasks: Mapping[str, Any],
    config: TrainConfig | None = None,
    *,
    joint: JointConfig | None = None,
    train_base: bool = False,
    eval_data: Mapping[str, Any] | None = None,
    quiet: bool = False,
) -> JointResult:
    """Train the tasks ``tasks`` (name -> preprocessed ``(x, y)`` data; each already added to
    ``model``) together; see the module docstring. Under an initialised process group the
    run is data-parallel (DDP) and every rank ends with identical parameters.

    With ``train_base=True`` the base weights change in place: build the new base with
    :func:`trained_base` and export patches only after setting ``model.base_fingerprint``.
    """
    config, joint = config or TrainConfig(), joint or JointConfig()
    names = list(tasks)
    _check_tasks(model, names, train_base)
    rank, world_size = world()
    runtime = Runtime.create(config.device, config.amp, config.amp_cpu)
    seed_everything(config.seed)
    sizes = task_batch_sizes(names, config, joint, world_size)
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    streams = {
        n: TaskStream(tasks[n], sizes[n], config.seed + i, config, runtime)
        for i, n in enumerate(names)
    }
    if any(len(s) == 0 for s in streams.values()):
        raise ValueError(f"training data is empty for {[n for n, s in streams.items() if not s]}")
    steps = epoch_steps(streams, joint)
    total, warmup = steps * config.epochs, int(model.config.warmup_epochs * steps)
    score_lr = config.score_lr or auto_score_lr(
        model.config, config, total - warmup, model.num_layers
    )
    base = base_parameters(model) if train_base else []
    for p in base:
        p.requires_grad_(True)
    optimizer = _optimizer(model, names, config, score_lr, base, joint.base_lr or config.lr)
    loop = _Loop(model, runtime, optimizer, make_schedule(optimizer, config, total), config)
    loop.wrap(world_size)
    result = JointResult(
        fits={n: FitResult(n, num_layers=model.num_layers, score_lr=score_lr) for n in names},
        world_size=world_size,
        train_base=train_base,
    )
    try:
        _train(loop, streams, steps, warmup, eval_data or {}, result, quiet or rank != 0)
    finally:
        for p in base:
            p.requires_grad_(False)
    broadcast_state(model, world_size)
    model.eval()
    for name, fit in result.fits.items():
        fit.active_layers = [k for k, on in model.gates(name).items() if on]
        fit.steps, fit.seconds = result.steps, result.seconds
    return result


class _Loop:
    """The parts of one joint run a step needs, with the (optionally DDP-wrapped) module."""

    def __init__(self, model, runtime, optimizer, scheduler, config: TrainConfig) -> None:
        self.model, self.runtime, self.config = model, runtime, config
        self.optimizer, self.scheduler = optimizer, scheduler
        self.module: nn.Module = _JointLoss(model, runtime)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def wrap(self, world_size: int) -> None:
        if world_size == 1:
            return
        from torch.nn.parallel import DistributedDataParallel as DDP

        cuda = self.runtime.device.type == "cuda"
        ids = [torch.cuda.current_device()] if cuda else None
        # Every per-task parameter already exists here: parameters created after the wrap
        # would not be synchronised. find_unused_parameters: a model may hold gated layers
        # (or, with train_base, base weights) its forward never reaches; the graph walk it
        # costs is small next to the convolutions.
        self.module = DDP(self.module, device_ids=ids, find_unused_parameters=True)

    def step(self, batches: dict, penalty: bool, step: int) -> dict[str, torch.Tensor]:
        loss, stats = self.module(batches, penalty)
        check = loss.detach().clone()
        if world()[1] > 1:
            dist.all_reduce(check)  # every rank sees a NaN anywhere, so all stop together
        if not torch.isfinite(check):
            raise TrainingDivergedError(
                f"joint tasks {list(batches)}: loss is {float(check)} at step {step}; lower lr "
                f"(now {self.config.lr}) or check the data; nothing was stored."
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return stats


def _train(loop: _Loop, streams, steps: int, warmup: int, eval_data, result, quiet) -> None:
    runtime, config = loop.runtime, loop.config
    bar = tqdm(total=steps * config.epochs, desc="joint", disable=quiet or not sys.stderr.isatty())
    for epoch in range(config.epochs):
        loop.model.train()
        sums = {n: torch.zeros(3, device=runtime.device) for n in streams}
        start, seen = time.perf_counter(), result.examples
        for _ in range(steps):
            batches = {}
            for name, stream in streams.items():
                x, y = stream.next()
                batches[name] = (
                    runtime.to_device(x),
                    y.to(runtime.device, non_blocking=runtime.pin_memory),
                )
            on = result.steps >= warmup
            stats = loop.step(batches, on, result.steps)
            for name, s in stats.items():
                sums[name] += torch.cat([s, s.new_tensor([len(batches[name][1])])])
            result.steps += 1
            result.examples += sum(len(b[1]) for b in batches.values()) * result.world_size
            bar.update(1)
        seconds = time.perf_counter() - start
        result.seconds += seconds
        row = _epoch_stats(loop.model, sums, eval_data, config, epoch, result)
        result.history.append({**row, "seconds": seconds, "examples": result.examples - seen})
    bar.close()


def _epoch_stats(model, sums, eval_data, config, epoch, result) -> dict[str, float]:
    if result.world_size > 1:
        for s in sums.values():
            dist.all_reduce(s)
    row: dict[str, float] = {"epoch": epoch + 1}
    for name, (loss, correct, seen) in ((n, s.tolist()) for n, s in sums.items()):
        stats = {"loss": loss / seen, "train_accuracy": correct / seen, "epoch": epoch + 1}
        if name in eval_data:
            stats["eval_accuracy"] = evaluate(model, name, eval_data[name], config)["accuracy"]
            result.fits[name].accuracy = stats["eval_accuracy"]
        stats["active_layers"] = sum(model.gates(name).values())
        result.fits[name].history.append(stats)
        row.update({f"{name}/{k}": v for k, v in stats.items() if k != "epoch"})
    row["loss"] = sum(row[f"{n}/loss"] for n in sums)
    return row
