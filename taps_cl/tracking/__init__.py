"""taps_cl.tracking: MLflow tracking of taps_cl and of Avalanche strategies.

- :class:`MLflowLogger`: Avalanche logger (every metric value, strategy params, accuracy matrix)
- :func:`log_strategy_result`: one run per benchmark strategy, with the standard metric names
- :func:`log_task_run`: one run per ``add_task`` (params, per-epoch metrics, gate picture)
- :func:`compare`: table, CSV and figures over the strategy runs of an experiment
- :func:`gates_figure`: tasks x layers on/off picture of a task store (TAPS Figure 3)
- :func:`log_routed_model`: the routed many-task pyfunc model of a store (snapshot or live)

Attributes load lazily, so ``import taps_cl.tracking`` costs neither MLflow nor Avalanche until
something is used. The tracking URI defaults to env ``MLFLOW_TRACKING_URI``, else ``./mlflow.db``.

May import: the foundation, the method, the storage protocol and records (the gate picture
reads a store) and serving (the routed model it logs). Must never import: the engine,
integrations or the CLI; it is handed what it logs (patches, metrics, configs, a store),
never the engine.
"""

from __future__ import annotations

import importlib
from typing import Any

from taps_cl.tracking.names import (
    AVG_FORGETTING,
    BWT,
    FINAL_AVG_ACCURACY,
    PARAMS_PER_TASK,
    STORED_BYTES,
    SUMMARY_METRICS,
    TASK_ID_ACCURACY,
    WALL_TIME_S,
    acc_exp,
    forgetting_exp,
    sanitize_key,
)

_LAZY = {
    "MLflowLogger": "taps_cl.tracking.logger",
    "log_strategy_result": "taps_cl.tracking.runs",
    "log_task_run": "taps_cl.tracking.runs",
    "compare": "taps_cl.tracking.report",
    "CompareReport": "taps_cl.tracking.report",
    "gates_figure": "taps_cl.tracking.gates",
    "resolve_tracking_uri": "taps_cl.tracking.client",
    "UnknownExperimentError": "taps_cl.tracking.client",
    "summarize": "taps_cl.tracking.matrix",
    "log_routed_model": "taps_cl.tracking.routed_model",
    "RoutedModelInfo": "taps_cl.tracking.routed_model",
}

__all__ = [
    "AVG_FORGETTING",
    "BWT",
    "FINAL_AVG_ACCURACY",
    "PARAMS_PER_TASK",
    "STORED_BYTES",
    "SUMMARY_METRICS",
    "TASK_ID_ACCURACY",
    "WALL_TIME_S",
    "acc_exp",
    "forgetting_exp",
    "sanitize_key",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'taps_cl.tracking' has no attribute {name!r}")
