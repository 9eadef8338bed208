"""Metric names every strategy run uses, so MLflow's compare view lines runs up column by column.

Accuracies are fractions in [0, 1]. With ``A[i][j]`` the accuracy on experience ``j`` after
training up to experience ``i`` (the accuracy matrix; T rows):

- ``acc_exp{j}`` at step ``i``: ``A[i][j]`` (one metric history per experience = one column)
- ``final_avg_accuracy`` at step ``i``: mean of ``A[i][j]`` over the experiences seen, ``j <= i``
- ``forgetting_exp{j}`` at step ``i``: ``max(A[k][j] for j <= k < i) - A[i][j]`` for ``j < i``
- ``avg_forgetting`` at step ``i``: mean of ``forgetting_exp{j}`` over ``j < i``
- ``bwt`` at step ``i``: mean of ``A[i][j] - A[j][j]`` over ``j < i`` (backward transfer)
- ``params_per_task``, ``stored_bytes``, ``wall_time_s``: cost of the strategy
- ``task_id_accuracy`` at step ``i``: class-incremental routing only, the share of evaluated
  samples routed to the task that owns their class (``TaskIdentification_Stream`` of
  :mod:`taps_cl.strategies.metrics`)

A run's latest value (the one MLflow shows in tables) is the value at the last step: the final one.
"""

from __future__ import annotations

import hashlib
import numbers
import re

FINAL_AVG_ACCURACY = "final_avg_accuracy"
AVG_FORGETTING = "avg_forgetting"
BWT = "bwt"
PARAMS_PER_TASK = "params_per_task"  # task-specific parameters added per task (mean)
STORED_BYTES = "stored_bytes"  # bytes stored for all tasks (patches, buffers, model copies)
WALL_TIME_S = "wall_time_s"  # wall-clock seconds of the whole train + eval loop
TASK_ID_ACCURACY = "task_id_accuracy"  # share of samples routed to their class's task (routing)
SUMMARY_METRICS = (
    FINAL_AVG_ACCURACY,
    AVG_FORGETTING,
    BWT,
    PARAMS_PER_TASK,
    STORED_BYTES,
    WALL_TIME_S,
)

# Per-task runs (log_task_run): recommended keys of the ``metrics`` argument.
ACCURACY = "accuracy"  # final eval accuracy of the task
ACTIVE_LAYERS = "active_layers"  # gated layers the task adapts
NUM_LAYERS = "num_layers"  # gated layers of the model
TASK_PARAMETERS = "task_parameters"  # task-specific parameters of the stored patch
TASK_BYTES = "task_bytes"  # bytes the version stores: patch + routing statistics
PATCH_BYTES = "patch_bytes"  # of task_bytes: the patch (deltas, scores, norms, head)
ROUTE_BYTES = "route_bytes"  # of task_bytes: the routing statistics
TRAIN_TIME_S = "train_time_s"  # seconds of training

ACC_EXP_RE = re.compile(r"^acc_exp(\d+)$")
FORGETTING_EXP_RE = re.compile(r"^forgetting_exp(\d+)$")
MAX_KEY = 250  # MLflow's limit on metric and param keys
_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def acc_exp(j: int) -> str:
    """Key of column ``j`` of the accuracy matrix (logged with step = training experience)."""
    return f"acc_exp{int(j)}"


def forgetting_exp(j: int) -> str:
    return f"forgetting_exp{int(j)}"


def sanitize_key(name: str) -> str:
    """A valid MLflow metric/param key for ``name``, the same one every time.

    MLflow keys may hold ASCII letters, digits, ``_ - . /``, spaces (and ``:`` except on
    Windows) and must not look like an unnormalised path. The mapping:

    1. every other character (``:``, ``[``, ``=``, ``%``, non-ASCII, ...) becomes ``_``;
    2. ``/`` is kept (MLflow groups charts by the part before the first ``/``), but empty path
       segments (``a//b``, leading or trailing ``/``) are dropped and ``.``/``..`` segments
       become ``_``;
    3. keys longer than 250 characters keep their first 237 and end with ``_`` + 12 hex
       characters of the SHA-1 of the original name, so distinct long names stay distinct.

    Avalanche's names such as ``Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000`` are
    already valid and come out unchanged.
    """
    if not isinstance(name, str):
        raise TypeError(f"metric name must be a str, got {type(name).__name__}")
    parts = [p for p in _BAD.sub("_", name).split("/") if p]
    key = "/".join("_" if p in (".", "..") else p for p in parts) or "_"
    if len(key) > MAX_KEY:
        digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:12]
        key = f"{key[: MAX_KEY - 13]}_{digest}"
    return key


def is_number(value: object) -> bool:
    """Real numbers MLflow can store as a metric (bools are flags, not metrics)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
