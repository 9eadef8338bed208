"""Joint mode: train several tasks at once on one base (optionally the base too), on 1..N processes.

Every step draws one minibatch from *every* task (each task's loader cycles on its own, so tasks
of different sizes mix), runs each task's forward through its own gates, norms and head, sums
the task losses plus each task's sparsity penalty and takes ONE optimizer step. With the base
frozen (``train_base=False``) the result is, in kind, what incremental training gives: one patch
per task on the unchanged base. With ``train_base=True`` the shared weights are trained too (the
paper's joint multi-task variant): what tasks have in common moves into the base, so fewer
layers need task deltas. The trained weights then form a *new* base with its own fingerprint;
deltas are relative to it, and tasks of the old base are untouched.

Distributed: under ``torchrun`` (env ``WORLD_SIZE`` > 1) the process group is initialised from
the env (NCCL on GPUs, gloo on CPU), each task gets a ``DistributedSampler`` and one DDP module
runs all tasks' forwards. Every per-task parameter exists before the DDP wrap. All ranks end
with bit-identical state (rank 0's is broadcast); only rank 0 writes to the store.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from taps_cl.bases import Base, fingerprint
from taps_cl.config import TrainConfig, _JSONConfig
from taps_cl.data import DataError
from taps_cl.errors import BaseMismatchError, TAPSError, TrainingDivergedError
from taps_cl.runtime import Runtime, seed_everything
from taps_cl.taps.model import TAPSModel
from taps_cl.taps.patch import TaskPatch, validate_task_name
from taps_cl.train import FitResult, _schedule, auto_score_lr, build_optimizer, evaluate

EPOCH_LENGTHS = ("max", "min")


@dataclass
class JointConfig(_JSONConfig):
    """How a joint run samples its tasks (training itself is set by :class:`TrainConfig`)."""

    epoch_length: int | str = "max"  # steps per epoch: "max"/"min" over the tasks' batches, or N
    ratios: dict[str, float] | None = None  # task -> multiple of batch_size per step (default 1)
    base_lr: float | None = None  # lr of the shared base weights (train_base); None = lr

    def __post_init__(self) -> None:
        e = self.epoch_length
        if isinstance(e, bool) or not (e in EPOCH_LENGTHS or (isinstance(e, int) and e >= 1)):
            raise ValueError(f"epoch_length must be 'max', 'min' or an int >= 1, got {e!r}")
        if self.ratios is not None:
            if not isinstance(self.ratios, Mapping):
                raise TypeError(f"ratios must be a dict task -> float, got {type(self.ratios)}")
            bad = {k: v for k, v in self.ratios.items() if not float(v) > 0}
            if bad:
                raise ValueError(f"ratios must be > 0, got {bad}")
            self.ratios = {str(k): float(v) for k, v in self.ratios.items()}
        if self.base_lr is not None and not self.base_lr > 0:
            raise ValueError(f"base_lr must be None or > 0, got {self.base_lr}")


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


# -- distributed -----------------------------------------------------------------------------


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> bool:
    """Initialise the process group from torchrun's env (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ...) when it says ``WORLD_SIZE`` > 1; return whether this call created it.
    On CUDA each rank takes GPU ``LOCAL_RANK``, so ``"cuda"`` means that rank's own device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
    return True


@contextlib.contextmanager
def distributed_session() -> Iterator[tuple[int, int]]:
    """``with distributed_session() as (rank, world):`` a process group for the block when run
    under torchrun (destroyed at the end if this block created it); (0, 1) otherwise."""
    created = init_distributed()
    try:
        yield world()
    finally:
        if created:
            dist.destroy_process_group()


def _broadcast_state(model: nn.Module, world_size: int) -> None:
    """Average floating buffers (BN statistics differ per rank after the last step), then copy
    rank 0's parameters and buffers everywhere: every rank ends bit-identical."""
    if world_size == 1:
        return
    with torch.no_grad():
        for buf in model.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf.div_(world_size)
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)


# -- sampling --------------------------------------------------------------------------------


def task_batch_sizes(
    names: Sequence[str], train: TrainConfig, joint: JointConfig, world_size: int = 1
) -> dict[str, int]:
    """Global minibatch size of each task per step: ``batch_size * ratio`` (rounded, >= 1),
    which must split evenly over the ranks so the global batch is the same for any N."""
    ratios = joint.ratios or {}
    unknown = sorted(set(ratios) - set(names))
    if unknown:
        raise ValueError(f"ratios name tasks not in this run: {unknown}; tasks: {list(names)}")
    sizes = {n: max(1, round(train.batch_size * ratios.get(n, 1.0))) for n in names}
    bad = {n: b for n, b in sizes.items() if b % world_size}
    if bad:
        raise ValueError(
            f"per-task batch sizes {bad} do not divide over {world_size} processes; pick "
            f"batch_size/ratios giving multiples of {world_size}"
        )
    return sizes


class _TaskStream:
    """One task's minibatches, forever: a new shuffled pass starts whenever one ends."""

    def __init__(self, data: Any, batch: int, seed: int, train: TrainConfig, runtime: Runtime):
        rank, world_size = world()
        dataset = getattr(data, "dataset", data)
        self.sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
        local = batch // world_size
        self.loader = DataLoader(
            dataset,
            batch_size=local,
            sampler=self.sampler,
            num_workers=train.num_workers,
            pin_memory=runtime.pin_memory,
            persistent_workers=train.num_workers > 0,
            # Full batches only when there is enough data: a batch of one breaks train-mode BN.
            drop_last=len(self.sampler) >= local,
        )
        self.passes = 0
        self._it = iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self._it)
        except StopIteration:
            self.passes += 1
            self.sampler.set_epoch(self.passes)
            self._it = iter(self.loader)
            return next(self._it)


def _epoch_steps(streams: Mapping[str, _TaskStream], joint: JointConfig) -> int:
    lengths = [len(s) for s in streams.values()]
    if joint.epoch_length == "max":
        return max(lengths)
    if joint.epoch_length == "min":
        return min(lengths)
    return int(joint.epoch_length)


# -- the joint module and its optimizer ------------------------------------------------------


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


# -- fit -------------------------------------------------------------------------------------


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
        n: _TaskStream(tasks[n], sizes[n], config.seed + i, config, runtime)
        for i, n in enumerate(names)
    }
    if any(len(s) == 0 for s in streams.values()):
        raise ValueError(f"training data is empty for {[n for n, s in streams.items() if not s]}")
    steps = _epoch_steps(streams, joint)
    total, warmup = steps * config.epochs, int(model.config.warmup_epochs * steps)
    score_lr = config.score_lr or auto_score_lr(
        model.config, config, total - warmup, model.num_layers
    )
    base = base_parameters(model) if train_base else []
    for p in base:
        p.requires_grad_(True)
    optimizer = _optimizer(model, names, config, score_lr, base, joint.base_lr or config.lr)
    loop = _Loop(model, runtime, optimizer, _schedule(optimizer, config, total), config)
    loop.wrap(world_size, find_unused=bool(base))
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
    _broadcast_state(model, world_size)
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

    def wrap(self, world_size: int, find_unused: bool) -> None:
        if world_size == 1:
            return
        from torch.nn.parallel import DistributedDataParallel as DDP

        cuda = self.runtime.device.type == "cuda"
        ids = [torch.cuda.current_device()] if cuda else None
        # Every per-task parameter already exists here: parameters created after the wrap
        # would not be synchronised. Base weights outside the forward need find_unused.
        self.module = DDP(self.module, device_ids=ids, find_unused_parameters=find_unused)

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


# -- results: the new base, patches, stores --------------------------------------------------


def trained_base(model: TAPSModel, template: nn.Module) -> nn.Module:
    """A plain copy of ``template`` (the original base architecture) holding ``model``'s
    current base weights: wrapped layers' ``base_layer``, the base norms and the original head
    (which training leaves alone), and every non-wrapped module. CPU, eval mode, frozen."""
    prefixes = [(f"{n}.base_layer.", f"{n}.") for n in model.layer_names]
    prefixes += [(f"{n}.base.", f"{n}.") for n in (*model.norm_names, model.head_name)]
    task_keys = [f"{n}.{k}." for n in model.layer_names for k in ("delta", "score")]
    task_keys += [f"{n}.tasks." for n in (*model.norm_names, model.head_name)]
    state = {}
    for key, value in model.base.state_dict().items():
        if any(key.startswith(p) for p in task_keys):
            continue
        for wrapped, plain in prefixes:
            if key.startswith(wrapped):
                key = plain + key[len(wrapped) :]
                break
        state[key] = value.detach().to("cpu").contiguous()
    new = copy.deepcopy(template).cpu()
    new.load_state_dict(state, strict=True)
    return new.requires_grad_(False).eval()


def export_joint(
    model: TAPSModel, names: Sequence[str], template: nn.Module, train_base: bool
) -> tuple[list[TaskPatch], nn.Module | None]:
    """Finalise every task; with ``train_base`` first build the new base and point the model
    (hence every patch) at its fingerprint, since deltas are relative to the trained weights."""
    new_base = None
    if train_base:
        new_base = trained_base(model, template)
        model.base_fingerprint = fingerprint(new_base)
    return [model.finalize_task(n) for n in names], new_base


def stored_base(store: Any, fp: str, like: Base) -> Base:
    """The base kept in ``store`` under fingerprint ``fp`` (e.g. by a ``train_base`` run),
    built on the architecture and preprocessing of ``like``."""
    state = store.load_base_weights(fp)
    module = copy.deepcopy(like.module).cpu()
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise BaseMismatchError(
            f"stored base {fp[:12]} does not fit the architecture of {like.name!r}: {err}"
        ) from err
    if fingerprint(module) != fp:
        raise BaseMismatchError(f"stored base {fp[:12]} changes when loaded into {like.name!r}")
    record = store.base(fp)
    return Base(module.requires_grad_(False).eval(), record.name, record.source, like.preprocessing)


def commit_joint(
    store: Any,
    patches: Sequence[TaskPatch],
    *,
    metrics: Mapping[str, Mapping[str, Any]],
    config: Mapping[str, Any],
    new_base: tuple[nn.Module, str, str] | None = None,
) -> list[int]:
    """Rank 0 stores the new base's weights (if any), then commits every patch in one
    transaction; the version numbers (or the failure) reach every rank.

    ``new_base`` is ``(module, name, source)``. The weights go first: if the patch commit then
    fails, the store keeps an unused base but never a task whose base it cannot load."""
    rank, world_size = world()
    versions, error = [0] * len(patches), None
    if rank == 0:
        try:
            if new_base is not None:
                module, name, source = new_base
                fp = patches[0].base_fingerprint
                store.save_base_weights(fp, module.state_dict(), name=name, source=source)
            versions = store.commit_many(patches, metrics=metrics, config=config)
        except Exception as err:  # re-raised below, after the other ranks heard of it
            error = err
    if world_size > 1:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        status = torch.tensor([0 if error else 1, *versions], dtype=torch.long, device=device)
        dist.broadcast(status, 0)
        if rank != 0 and not status[0]:
            raise TAPSError("rank 0 failed to commit the joint tasks; nothing was stored")
        versions = [int(v) for v in status[1:]]
    if error is not None:
        raise error
    return versions


def prepare_all(
    datasets: Mapping[str, Any],
    eval_datasets: Mapping[str, Any] | None,
    prepare: Callable[..., Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate every task name and dataset (and eval dataset) before anything trains; an
    error names the task it is about."""
    if not isinstance(datasets, Mapping) or not datasets:
        raise TypeError("datasets must be a non-empty dict: task name -> dataset")
    eval_datasets = dict(eval_datasets or {})
    unknown = sorted(set(eval_datasets) - set(datasets))
    if unknown:
        raise ValueError(f"eval_datasets names tasks not being trained: {unknown}")
    data, evals = {}, {}
    for name, dataset in datasets.items():
        validate_task_name(name)
        try:
            data[name] = prepare(dataset)
            if eval_datasets.get(name) is not None:
                d = data[name]
                evals[name] = prepare(
                    eval_datasets[name], num_classes=d.num_classes, class_names=d.class_names
                )
        except DataError as err:
            raise DataError(f"task {name!r}: {err}") from err
        except (ValueError, TypeError) as err:
            raise type(err)(f"task {name!r}: {err}") from err
    return data, evals


def run_config(result: JointResult, joint: JointConfig | None) -> dict[str, Any]:
    """What a joint run adds to each committed version's config (JSON)."""
    return {
        "joint": {
            "tasks": list(result.fits),
            "sampling": (joint or JointConfig()).to_dict(),
            "train_base": result.train_base,
            "world_size": result.world_size,
        }
    }


def run_metrics(result: JointResult) -> dict[str, Any]:
    """Run-wide metrics stored with every task of a joint run."""
    return {
        "joint_steps": result.steps,
        "joint_examples": result.examples,
        "joint_seconds": result.seconds,
        "joint_images_per_second": result.images_per_second,
    }


def new_base_label(base: Base, old_fingerprint: str, names: Sequence[str]) -> tuple[str, str]:
    """(name, source) recorded for the base a ``train_base`` run creates."""
    name = f"{base.name}+joint({','.join(names)})"
    if len(name) > 200:
        name = f"{base.name[:150]}+joint({len(names)} tasks)"
    return name, f"joint training of {list(names)} from base {old_fingerprint} ({base.source})"
