"""TAPS as an Avalanche strategy.

Each training experience is one task: the strategy creates the task on the frozen base (zero
deltas, scores, norm copies, a new head), trains only those parameters with
``cross_entropy + lam * penalty``, and after the experience finalises it (layers whose gate is off
lose their delta) and, given a store, commits the patch. Nothing an earlier task uses is ever
trained again, so accuracy on earlier experiences cannot change.

The method lives in :mod:`taps_cl.taps`; this file is the glue: which task is trained when, its
optimizer (the same :func:`taps_cl.training.step.build_optimizer` and score-rate rule as the
trainer), the step (the trainer's own :class:`taps_cl.training.step.Stepper`: divergence check,
clipping, schedule), the batching rule (:func:`taps_cl.training.batching.drop_last`), the
closed-form head before and after an experience's training (:mod:`taps_cl.training.heads`,
``TAPSConfig.head_init``/``head_refit``), and the commit. The loss is
:class:`~taps_cl.strategies.plugin.TAPSLossPlugin`; routing by task label is
:class:`~taps_cl.strategies.multitask.TAPSRouter`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from avalanche.core import BasePlugin
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.utils.data import DataLoader

from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.routing import METHODS
from taps_cl.strategies.classinc import MODES, ClassIncremental, RouteStatsPlugin
from taps_cl.strategies.experiences import (
    detect_mode,
    experience_classes,
    experience_num_classes,
    experience_task_labels,
    stream_classes,
)
from taps_cl.strategies.multitask import TAPSRouter
from taps_cl.strategies.plugin import TAPSLossPlugin, steps_per_epoch
from taps_cl.taps.model import TAPSModel
from taps_cl.taps.patch import TaskPatch
from taps_cl.training.batching import drop_last
from taps_cl.training.heads import broadcast_heads, fit_head
from taps_cl.training.loop import (
    Stepper,
    auto_score_lr,
    build_optimizer,
    make_schedule,
    task_groups,
)
from taps_cl.training.runtime import Runtime

# Builds one experience's optimizer from that task's parameter groups (torch's format).
OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


def _train_config(train: TrainConfig | None, given: dict[str, Any]) -> TrainConfig:
    """``train`` (default ``TrainConfig()``) with the arguments that were given (not None)."""
    train = train or TrainConfig()
    if not isinstance(train, TrainConfig):
        raise TypeError(f"train must be a TrainConfig, got {type(train).__name__}")
    chosen = {k: v for k, v in given.items() if v is not None}
    return TrainConfig.from_dict({**train.to_dict(), **chosen})


class TAPS(SupervisedTemplate):
    """Task Adaptive Parameter Sharing: one frozen base, one gated patch per experience.

    Use it like any Avalanche strategy (``train(exp)``, ``eval(stream)``, evaluator, loggers).

    ``mode="task"`` (task-incremental): each training experience holds one task label, trained
    once; the model's output for a sample is its task's logits. Evaluating an experience whose
    task was never trained raises :class:`~taps_cl.errors.UnknownTaskError`.

    ``mode="class"`` (class-incremental, e.g. ``nc_benchmark(..., task_labels=False)``): each
    training experience becomes a new task ``exp<i>`` over its own classes; outputs are logits
    over the global class space, each input routed to one trained task by ``route_method``
    (:meth:`taps_cl.routing.TaskRouter.route`, default ``"lda"``) on base features; see
    :mod:`taps_cl.strategies.classinc`. Evaluating before any training raises
    :class:`~taps_cl.errors.UnknownTaskError`; afterwards every experience (trained or not) is
    routed among the trained tasks.

    ``mode="auto"`` (default) picks ``"task"`` when the experiences of the training stream hold
    one distinct task label each, else ``"class"``, at the first training experience.

    ``model`` is a plain base ``nn.Module`` (its classifier found as in :func:`find_head`, or
    named by ``head=``), a :class:`TAPSModel` (e.g. with tasks loaded from patches) or a
    :class:`TAPSRouter`. ``tasks`` (task label -> number of classes) creates every task's
    parameters up front, which distributed training needs: Avalanche's DDP helper does not
    synchronise parameters created after wrapping.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        lam: float | None = None,
        tau: float | None = None,
        size: int | str | None = None,
        lr: float | None = None,
        score_lr: float | None = None,
        weight_decay: float | None = None,
        optimizer: str | OptimizerFactory | None = None,
        schedule: str | None = None,
        max_grad_norm: float | None = None,
        train_mb_size: int | None = None,
        train_epochs: int | None = None,
        eval_mb_size: int | None = None,
        device: str | torch.device = "cpu",
        plugins: Sequence[BasePlugin] | None = None,
        evaluator: EvaluationPlugin | Callable[[], EvaluationPlugin] = default_evaluator,
        eval_every: int = -1,
        peval_mode: str = "epoch",
        store: Any = None,
        head: str | None = None,
        config: TAPSConfig | None = None,
        train: TrainConfig | None = None,
        task_names: Mapping[int, str] | None = None,
        tasks: Mapping[int, int] | None = None,
        seed: int | None = None,
        mode: str = "auto",
        route_method: str = "lda",
        **base_kwargs: Any,
    ) -> None:
        """Arguments left at ``None`` come from ``train`` (default ``TrainConfig()``; e.g.
        ``TrainConfig(max_grad_norm=None)`` disables clipping). ``optimizer``: a name or a
        factory ``param_groups -> Optimizer`` called at every experience with that task's
        groups. ``size``: :attr:`TAPSConfig.size` (``"paper"``: the penalty selects).
        ``peval_mode`` and ``**base_kwargs`` go to ``SupervisedTemplate``."""
        router = _as_router(model, config, {"lam": lam, "tau": tau, "size": size}, head, task_names)
        self.mode = _initial_mode(router, mode, route_method, tasks)  # "auto" until decided
        self.route_method, self.router = route_method, router
        self.optimizer_factory = optimizer if callable(optimizer) else None
        given = dict(epochs=train_epochs, batch_size=train_mb_size, lr=lr, score_lr=score_lr,
                     weight_decay=weight_decay, schedule=schedule, seed=seed,
                     max_grad_norm=max_grad_norm, optimizer=_named(optimizer))  # fmt: skip
        self.train_config = _train_config(train, given)
        self._init_tasks(store, tasks)
        super().__init__(
            model=router,
            optimizer=None,  # built per experience over that task's parameters only
            criterion=TAPSLossPlugin(router),
            train_mb_size=self.train_config.batch_size,
            train_epochs=self.train_config.epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=[*(plugins or []), RouteStatsPlugin(router)],
            evaluator=evaluator,
            eval_every=eval_every,
            peval_mode=peval_mode,
            **base_kwargs,
        )

    def _init_tasks(self, store: Any, tasks: Mapping[int, int] | None) -> None:
        """Tasks created up front (``tasks``: label -> classes), the store, the results."""
        if store is not None and not callable(getattr(store, "commit", None)):
            raise TypeError(f"store must have a commit(patch, ...) method, got {type(store)}")
        for label, num_classes in (tasks or {}).items():
            seed = self.train_config.seed + int(label)
            self.router.add_task(int(label), int(num_classes), seed=seed)
        self.store = store
        # task label (class-incremental: experience id) -> finalised patch / store version
        self.patches: dict[int, TaskPatch] = {}
        self.versions: dict[int, int] = {}
        self.score_lr: float | None = None  # score learning rate of the current/last task
        self._stepper: Stepper | None = None

    @property
    def taps_model(self) -> TAPSModel:
        return self.router.taps

    # -- per-experience setup ----------------------------------------------------------------

    def make_train_dataloader(self, **kwargs: Any) -> None:
        # The trainer's batching rule: drop a last minibatch of one sample (train-mode BN).
        if drop_last(len(self.adapted_dataset), self.train_mb_size):
            kwargs.setdefault("drop_last", True)
        super().make_train_dataloader(**kwargs)

    def _resolve_mode(self) -> str:
        """``"task"`` or ``"class"``; ``"auto"`` decides once, at the first training experience,
        from the task labels of the experience's stream (see :func:`detect_mode`)."""
        if self.mode == "auto":
            self.mode = detect_mode(self.experience)
            if self.mode == "class":
                self.router.classinc = ClassIncremental(self.route_method)
        if self.mode == "class" and self.router.classinc.width == 0:
            self.router.classinc.see(stream_classes(self.experience))
        return self.mode

    def model_adaptation(self, model: nn.Module | None = None) -> nn.Module:
        if self.is_training and self._resolve_mode() == "class":
            exp_id = int(self.experience.current_experience)
            self.router.begin_class_task(
                f"exp{exp_id}", experience_classes(self.experience), seed=self.train_config.seed
            )
            self.router.training_label = exp_id
            model = super().model_adaptation(model).to(self.device)
            self._closed_form_head(self.taps_model.config.head_init == "ridge")
            return model
        model = super().model_adaptation(model)
        if self.is_training:
            labels = experience_task_labels(self.experience)
            if len(labels) != 1:
                raise ValueError(
                    f"a TAPS training experience must hold one task, got task labels {labels}"
                )
            num_classes = experience_num_classes(self.experience)
            self.router.begin_training(labels[0], num_classes, seed=self.train_config.seed)
            model = model.to(self.device)
            self._closed_form_head(self.taps_model.config.head_init == "ridge")
        return model

    def _closed_form_head(self, wanted: bool) -> None:
        """Set the task being trained's head in closed form on the experience's data (eval
        transforms, in order; class-incremental labels mapped to the task's own), as
        :func:`taps_cl.training.fit_tasks` does: before training (``head_init``) and after it
        (``head_refit``)."""
        name = self.router.training_task
        if not wanted or name is None:
            return
        dataset = self.adapted_dataset.eval()
        loader = DataLoader(
            dataset,
            batch_size=max(self.train_mb_size, 64),
            shuffle=False,
            collate_fn=getattr(dataset, "collate_fn", None),
        )
        ci = self.router.classinc

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for mb in loader:
                x, y = mb[0].to(self.device), mb[1]
                yield x, (ci.local_targets(name, y) if ci is not None else y)

        fit_head(self.taps_model, name, batches())
        broadcast_heads(self.taps_model, [name])

    def make_optimizer(self, **kwargs: Any) -> None:
        """One optimizer per experience over the trained task's parameters (deltas, norms and
        head at ``lr``, scores at ``score_lr``), exactly as :func:`taps_cl.training.fit_task`."""
        name = self.router.training_task
        if name is None:  # Avalanche's first call comes before the task exists
            return
        taps = self.router.taps
        per_epoch = steps_per_epoch(self)
        total = per_epoch * self.train_epochs
        warmup = int(taps.config.warmup_epochs * per_epoch)
        self.score_lr = self.train_config.score_lr or auto_score_lr(
            taps.config, self.train_config, total - warmup, taps.num_layers
        )
        if taps.config.budgeted:
            self.score_lr = 0.0  # scores only measure importance until the gates are chosen
        if self.optimizer_factory is not None:
            groups = task_groups(taps, name, self.train_config, self.score_lr)
            self.optimizer = self.optimizer_factory(groups)
            if not isinstance(self.optimizer, torch.optim.Optimizer):
                raise TypeError(
                    "optimizer= factory must return a torch.optim.Optimizer, got "
                    f"{type(self.optimizer).__name__}"
                )
        else:
            self.optimizer = build_optimizer(taps, name, self.train_config, self.score_lr)
        schedule = make_schedule(self.optimizer, self.train_config, total)
        runtime = Runtime.create(str(self.device), amp=False)
        self._stepper = Stepper(self.optimizer, schedule, self.train_config, runtime, what=name)

    def backward(self) -> None:
        """The trainer's backward: divergence check, then backward (Avalanche's plugins run
        before and after it as usual)."""
        self._stepper.backward(self.loss)

    def optimizer_step(self) -> None:
        """The trainer's update: per-task clipping, optimizer step, schedule step."""
        self._stepper.update()

    # -- after an experience -----------------------------------------------------------------

    def _after_training_exp(self, **kwargs: Any) -> None:
        # Finalise before the plugins run, so that the periodic evaluation and every metric see
        # the task exactly as it will stay.
        label = self.router.training_label
        if label is not None:
            self._finish_task(label)
        super()._after_training_exp(**kwargs)

    def _finish_task(self, label: int) -> None:
        name = self.router.training_task
        self.router.taps.settle_task(name)  # the stored form: the head meets its features
        self._closed_form_head(self.taps_model.config.head_refit)  # on the trained features
        patch = self.router.taps.finalize_task(name)
        if self.router.classinc is not None:  # the patch carries its route statistics
            stats = self.router.classinc.finish(name)
            patch = dataclasses.replace(patch, tensors={**patch.tensors, **stats.to_tensors()})
        self.patches[label] = patch
        self.router.training_label = None
        self.router.training_task = None
        self.optimizer = None
        self._stepper = None
        if self.store is not None:
            metrics = {
                "train_loss": float(self.loss.detach().sum()),
                "active_layers": float(len(patch.active_layers)),
                "num_layers": float(patch.num_layers),
                "task_parameters": float(patch.num_parameters),
                "score_lr": float(self.score_lr or 0.0),
            }
            config = {
                "taps": self.router.taps.config.to_dict(),
                "train": self.train_config.to_dict(),
                "strategy": "avalanche",
                "task_label": label,
            }
            self.versions[label] = self.store.commit(patch, metrics=metrics, config=config)


def _initial_mode(
    router: TAPSRouter, mode: str, route_method: str, tasks: Mapping[int, int] | None
) -> str:
    """Validate ``mode``/``route_method``; set up class-incremental state for ``"class"``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if route_method not in METHODS:
        raise ValueError(f"route_method must be one of {METHODS}, got {route_method!r}")
    if mode == "class" and tasks:
        raise ValueError("tasks= pre-creates task-incremental tasks; not with mode='class'")
    if router.classinc is not None:  # a router already trained class-incrementally
        if mode == "task":
            raise ValueError("the model is class-incremental (router.classinc); use mode='class'")
        return "class"
    if mode == "class":
        router.classinc = ClassIncremental(route_method)
    return mode


def _named(optimizer: str | OptimizerFactory | None) -> str | None:
    """The optimizer's name for ``TrainConfig`` (a factory builds its own, so None)."""
    return None if callable(optimizer) else optimizer


def _as_router(
    model: nn.Module,
    config: TAPSConfig | None,
    given: Mapping[str, Any],
    head: str | None,
    task_names: Mapping[int, str] | None,
) -> TAPSRouter:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    overrides = {k: v for k, v in given.items() if v is not None}
    if isinstance(model, (TAPSRouter, TAPSModel)):
        if config is not None or overrides or head is not None:
            raise ValueError(
                "model is already a TAPSModel: set lam/tau/size/config on it, not on the strategy"
            )
        if isinstance(model, TAPSRouter):
            if task_names:
                model.task_names.update({int(k): v for k, v in task_names.items()})
            return model
        return TAPSRouter(model, task_names)
    config = config or TAPSConfig()
    config = dataclasses.replace(config, **overrides)  # re-validated in __post_init__
    return TAPSRouter(TAPSModel(model, config, head=head), task_names)
