"""taps_cl.engine: the :class:`Engine` facade over one frozen base, a task store and tracking.

- :mod:`~taps_cl.engine.core`: :class:`Engine` (construction, training, housekeeping)
- :mod:`~taps_cl.engine.inference`: its read-only methods (predict, route, merged modules)
- :mod:`~taps_cl.engine.taskrun`: :class:`TaskRun`, one training run from fitted model to
  committed and tracked versions, and the :class:`TaskRecord` it returns

May import every part below it: foundation, method, routing math, training, storage, serving,
tracking. Must never import: integrations (strategies, scenarios) or the CLI.
"""

from taps_cl.engine.core import Engine, Routed
from taps_cl.engine.taskrun import TaskRecord, TaskRun

__all__ = ["Engine", "Routed", "TaskRecord", "TaskRun"]
