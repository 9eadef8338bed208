"""fit_joint: several tasks in one run of the training loop, optionally training the base too."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from taps_cl.config import JointConfig, TrainConfig
from taps_cl.joint.distributed import broadcast_state
from taps_cl.joint.sampling import task_batch_sizes
from taps_cl.joint.shared_base import base_parameters
from taps_cl.taps.model import TAPSModel
from taps_cl.training.loop import RunResult, fit_tasks
from taps_cl.training.runtime import world

JointResult = RunResult  # the result of a joint run is the loop's own


def fit_joint(
    model: TAPSModel,
    tasks: Mapping[str, Any],
    config: TrainConfig | None = None,
    *,
    joint: JointConfig | None = None,
    train_base: bool = False,
    eval_data: Mapping[str, Any] | None = None,
    quiet: bool = False,
) -> RunResult:
    """Train ``tasks`` (name -> preprocessed ``(x, y)`` data; each already added to ``model``)
    together with :func:`taps_cl.training.fit_tasks`; ``joint`` sets per-task batch ratios and the
    epoch length. Under an initialised process group the run is data-parallel (DDP) and every
    rank ends with identical parameters.

    With ``train_base=True`` the base weights change in place: build the new base with
    :func:`trained_base` and export patches only after setting ``model.base_fingerprint``.
    """
    config, joint = config or TrainConfig(), joint or JointConfig()
    names = list(tasks)
    others = [t for t in model.tasks if t not in names]
    if train_base and others:
        raise ValueError(
            f"train_base=True would change the base under tasks {others}; train on a model "
            "holding only the joint run's tasks"
        )
    length = joint.epoch_length or ("max" if train_base else "own")
    if train_base and length == "own":
        raise ValueError(
            "train_base=True needs every task in every step (a task that stopped early would "
            "hold deltas for a base that kept moving): use epoch_length 'max', 'min' or N"
        )
    world_size = world()[1]
    sizes = task_batch_sizes(names, config, joint, world_size)
    base = base_parameters(model) if train_base else []
    base_lr = joint.base_lr or config.lr_for(None)  # the base's weights are dense
    extra = [{"params": base, "lr": base_lr, "weight_decay": config.weight_decay}]
    for p in base:
        p.requires_grad_(True)
    try:
        result = fit_tasks(
            model,
            tasks,
            config,
            batch_sizes=sizes,
            epoch_length=length,
            extra_groups=extra if base else (),
            eval_data=eval_data,
            quiet=quiet,
        )
    finally:
        for p in base:
            p.requires_grad_(False)
    result.train_base = train_base
    broadcast_state(model, world_size)
    return result
