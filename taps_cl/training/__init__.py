"""Training: the one loop (:mod:`~taps_cl.training.loop`), the objective and step it shares with
joint mode, the baselines and the Avalanche strategy (:mod:`~taps_cl.training.step`), the one
batching rule (:mod:`~taps_cl.training.batching`), the closed-form heads a task starts and ends
with (:mod:`~taps_cl.training.heads`) and the device/precision decisions
(:mod:`~taps_cl.training.runtime`).

May import: the foundation (config, errors, bases, images, data), the method (:mod:`taps_cl.taps`)
and the routing math (:mod:`taps_cl.routing`). Must never import storage, serving, tracking, the
engine, the integrations (strategies, scenarios) or the CLI: a loop that trains a task knows
nothing of where the task is kept or served.
"""

from taps_cl.training.loop import FitResult, RunResult, evaluate, fit_task, fit_tasks

__all__ = ["FitResult", "RunResult", "evaluate", "fit_task", "fit_tasks"]
