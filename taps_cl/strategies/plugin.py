"""The TAPS training loss as an Avalanche criterion plugin.

``loss = cross_entropy + lam * TAPSModel.penalty(task)``, with the penalty off during the warm-up
(``TAPSConfig.warmup_epochs``): :func:`taps_cl.training.step.task_loss`, the trainer's own
objective, so a task trained through Avalanche is optimised for exactly the same objective.
With a budget (a ``size``, the default, or a share ``budget``) the penalty stays off and the
plugin drives the same :class:`~taps_cl.taps.budget.BudgetController` as the trainer: layer
importance after each step until the gates are chosen once.

The plugin *returns* the loss (Avalanche calls the criterion as ``criterion(output, target)``
and, because the criterion is a plugin, also gives it the training callbacks it needs to count
steps); it never edits ``strategy.loss``.
"""

from __future__ import annotations

import math

import torch
from avalanche.core import SupervisedPlugin

from taps_cl.strategies.multitask import PAD_LOGIT, TAPSRouter
from taps_cl.taps.budget import BudgetController
from taps_cl.training.loop import task_loss


class TAPSLossPlugin(SupervisedPlugin):
    """Cross-entropy plus the sparsity penalty of the task being trained."""

    def __init__(self, router: TAPSRouter) -> None:
        super().__init__()
        self.router = router
        self.task: str | None = None  # the task being trained; None outside training
        self.steps = 0  # optimisation steps taken on the current task
        self.warmup_steps = 0  # steps before the penalty switches on
        self.budget: BudgetController | None = None  # chooses the gates in budget mode
        self._evaluating = False

    @property
    def penalty_on(self) -> bool:
        """Training a task, past its warm-up (``task_loss`` itself skips ``lam == 0``)."""
        return self.task is not None and not self._evaluating and self.steps >= self.warmup_steps

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ci = self.router.classinc
        if ci is not None:  # class-incremental: outputs span the global class space
            if self.task is not None and not self._evaluating:
                output, target = ci.task_view(self.task, output, target)
            elif target.numel() and int(target.max()) >= output.shape[1]:
                output = pad_columns(output, int(target.max()) + 1)
        return task_loss(output, target, self.router.taps, self.task, self.penalty_on)

    # -- callbacks -----------------------------------------------------------------------------

    def before_training_exp(self, strategy, **kwargs) -> None:
        self.task = self.router.training_task
        self.steps = 0
        per_epoch = steps_per_epoch(strategy)
        taps = self.router.taps
        self.warmup_steps = int(taps.config.warmup_epochs * per_epoch)
        self.budget = None
        if taps.config.budgeted and self.task is not None:  # the budget closes gates
            total = per_epoch * strategy.train_epochs
            self.budget, self.warmup_steps = BudgetController(taps, self.task, total), total + 1

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self.steps += 1
        if self.budget is not None:
            self.budget.observe(self.steps)

    def after_training_exp(self, strategy, **kwargs) -> None:
        self.task, self.budget = None, None

    def before_eval(self, strategy, **kwargs) -> None:
        self._evaluating = True

    def after_eval(self, strategy, **kwargs) -> None:
        self._evaluating = False


def pad_columns(output: torch.Tensor, width: int) -> torch.Tensor:
    """``output`` widened to ``width`` columns of ``PAD_LOGIT`` (eval targets beyond it)."""
    pad = output.new_full((output.shape[0], width - output.shape[1]), PAD_LOGIT)
    return torch.cat([output, pad], dim=1)


def steps_per_epoch(strategy) -> int:
    """Minibatches per epoch of the strategy's current training dataloader."""
    try:
        return max(1, len(strategy.dataloader))
    except TypeError:  # a loader without __len__
        return max(1, math.ceil(len(strategy.adapted_dataset) / strategy.train_mb_size))
