"""MLflowLogger: an Avalanche logger that writes every metric value into an MLflow run.

Use it like Avalanche's TensorboardLogger::

    eval_plugin = EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                   loggers=[MLflowLogger(experiment="split-fmnist")])

Besides Avalanche's own metric names (sanitised, see :func:`names.sanitize_key`) it keeps the
accuracy matrix of the test stream and logs the standard names of :mod:`names` after every
evaluation, so runs of this logger line up with ``log_strategy_result`` runs in ``compare``.
A ``TaskIdentification_Stream`` value (:func:`taps_cl.strategies.metrics.task_id_metrics`) is
also filed as ``task_id_accuracy`` at the step of the experience trained last.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import re
import time
import weakref
from collections.abc import Mapping
from typing import Any

import mlflow
import torch
from avalanche.distributed.distributed_helper import DistributedHelper
from avalanche.evaluation.metric_results import AlternativeValues
from avalanche.logging import BaseLogger
from mlflow.tracking import MlflowClient

from taps_cl.tracking import client as tc
from taps_cl.tracking import matrix as mx
from taps_cl.tracking import names
from taps_cl.tracking.names import is_number, sanitize_key

# Avalanche 0.6: ``.../test_stream/Exp000``, with ``Task000/`` before it when tasks are labelled.
ACC_EXP_NAME = re.compile(
    r"^Top1_Acc_Exp/eval_phase/(?P<stream>[^/]+)/(?:Task\d+/)?Exp(?P<exp>\d+)$"
)
# taps_cl.strategies.metrics (class-incremental TAPS), over the whole evaluated stream.
TASK_ID_NAME = re.compile(r"^TaskIdentification_Stream/eval_phase/(?P<stream>[^/]+)(?:/Task\d+)?$")


def is_main_process() -> bool:
    """Rank 0 of an initialised ``torch.distributed`` group (and Avalanche's main process)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return False
    return bool(DistributedHelper.is_main_process)


def strategy_params(strategy: Any) -> dict[str, Any]:
    """What defines a strategy run, read from the usual Avalanche template attributes."""
    out: dict[str, Any] = {"strategy": type(strategy).__name__}
    for attr in ("train_mb_size", "eval_mb_size", "train_epochs", "eval_every", "device"):
        if hasattr(strategy, attr):
            out[attr] = str(getattr(strategy, attr))
    for attr in ("model", "optimizer", "_criterion"):
        obj = getattr(strategy, attr, None)
        if obj is not None:
            out[attr.lstrip("_")] = type(obj).__name__
    optimizer = getattr(strategy, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "param_groups", None):
        group = optimizer.param_groups[0]
        out.update(
            {f"optimizer.{k}": group[k] for k in ("lr", "weight_decay", "momentum") if k in group}
        )
    plugins = [type(p).__name__ for p in getattr(strategy, "plugins", [])]
    out["plugins"] = ",".join(plugins)
    model = getattr(strategy, "model", None)
    if isinstance(model, torch.nn.Module):
        out["model.parameters"] = sum(p.numel() for p in model.parameters())
    return out


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return float(value) if is_number(value) else None


def _finish(client: MlflowClient, run_id: str) -> None:
    # At interpreter exit the store may already be unreachable; nothing useful to report then.
    with contextlib.suppress(Exception):
        client.set_terminated(run_id, "FINISHED")


class MLflowLogger(BaseLogger):
    """Avalanche logger writing into the active MLflow run, or into a run it creates.

    Args:
        tracking_uri: MLflow tracking URI; default env ``MLFLOW_TRACKING_URI``, else the SQLite
            file ``./mlflow.db``. A plain path means a SQLite file.
        experiment: experiment of a created run (ignored when a run is already active).
        run_name: name of a created run (default: the strategy's class name).
        params: extra params logged with the strategy's own.
        stream: the eval stream whose per-experience accuracies form the accuracy matrix.

    On every process except rank 0 of ``torch.distributed`` the logger does nothing, so the
    same script can build it everywhere. A run it created is ended by :meth:`close` (or at
    exit); an already active run is left for its owner to end.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "taps_cl",
        run_name: str | None = None,
        params: Mapping[str, Any] | None = None,
        stream: str = "test_stream",
    ) -> None:
        self.enabled = is_main_process()
        if self.enabled:
            super().__init__()
        if params is not None and not isinstance(params, Mapping):
            raise TypeError(f"params must be a mapping, got {type(params).__name__}")
        self.tracking_uri = tc.resolve_tracking_uri(tracking_uri)
        self.experiment = experiment
        self.run_name = run_name
        self.extra_params = dict(params or {})
        self.stream = stream
        self.run_id: str | None = None
        self.matrix: dict[int, dict[int, float]] = {}  # row i -> {experience j: accuracy}
        self._pending: dict[int, float] = {}
        self._task_id: float | None = None  # this evaluation's stream task identification
        self._owns_run = False
        self._params_logged = False
        self._in_training = False
        self._started: float | None = None
        self._client: MlflowClient | None = None

    # -- run ---------------------------------------------------------------------------------

    def _run(self, strategy: Any = None) -> str:
        if self.run_id is not None:
            return self.run_id
        active = mlflow.active_run()
        if (
            active is not None
            and tc.resolve_tracking_uri(mlflow.get_tracking_uri()) == self.tracking_uri
        ):
            self._client = MlflowClient(self.tracking_uri)
            self.run_id = active.info.run_id
            return self.run_id
        self._client = MlflowClient(self.tracking_uri)
        exp_id = tc.get_or_create_experiment(self._client, self.experiment, self.tracking_uri)
        name = self.run_name or (type(strategy).__name__ if strategy is not None else None)
        run = self._client.create_run(exp_id, run_name=name, tags={tc.KIND_TAG: "strategy"})
        self.run_id, self._owns_run = run.info.run_id, True
        # Mark the run FINISHED even if nobody calls close(); weakref avoids keeping self alive.
        self._finalizer = weakref.finalize(self, _finish, self._client, self.run_id)
        atexit.register(self._finalizer)
        return self.run_id

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def close(self, status: str = "FINISHED") -> None:
        """End the run if this logger created it (``status``: FINISHED, FAILED or KILLED)."""
        if self.enabled and self._owns_run and self.run_id is not None:
            self._finalizer.detach()
            self.client.set_terminated(self.run_id, status)
            self._owns_run = False

    def __enter__(self) -> MLflowLogger:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        self.close("FINISHED" if exc_type is None else "FAILED")

    # -- metric values -----------------------------------------------------------------------

    def log_metrics(self, metric_values: list) -> None:
        """Log one Avalanche batch of values with one MLflow call (dict values become
        ``name/key``, as in :class:`BaseLogger`)."""
        if not self.enabled or not metric_values:
            return
        batch: list[tuple[str, float, int]] = []
        for mval in metric_values:
            items = mval.value.items() if isinstance(mval.value, dict) else [(None, mval.value)]
            for key, value in items:
                name = mval.name if key is None else f"{mval.name}/{key}"
                self._collect(name, value, mval.x_plot, batch)
        if batch:
            tc.log_metrics(self.client, self._run(), batch)

    def log_single_metric(self, name: str, value: Any, x_plot: int) -> None:
        if not self.enabled:
            return
        batch: list[tuple[str, float, int]] = []
        self._collect(name, value, x_plot, batch)
        if batch:
            tc.log_metrics(self.client, self._run(), batch)

    def _collect(self, name: str, value: Any, x_plot: int, batch: list) -> None:
        if isinstance(value, AlternativeValues):
            value = value.best_supported_value(float, int, torch.Tensor)
        number = _scalar(value)
        if number is None:
            return  # images, figures, histograms: not metrics
        batch.append((sanitize_key(name), number, int(x_plot)))
        match = ACC_EXP_NAME.match(name)
        if match and match["stream"] == self.stream:
            self._pending[int(match["exp"])] = number
        match = TASK_ID_NAME.match(name)
        if match and match["stream"] == self.stream:
            self._task_id = number

    # -- Avalanche callbacks -----------------------------------------------------------------

    def before_training(self, strategy: Any, metric_values: list, **kwargs: Any) -> None:
        if not self.enabled or self._params_logged:
            return
        run_id = self._run(strategy)
        tc.log_params(self.client, run_id, {**strategy_params(strategy), **self.extra_params})
        self._params_logged = True
        self._started = time.perf_counter()

    def before_training_exp(self, strategy: Any, metric_values: list, **kwargs: Any) -> None:
        self._in_training = True  # evaluations from now on are periodic, mid-experience

    def after_training_exp(self, strategy: Any, metric_values: list, **kwargs: Any) -> None:
        self._in_training = False

    def after_eval(self, strategy: Any, metric_values: list, **kwargs: Any) -> None:
        """File this evaluation's accuracies as matrix row "trained up to the last experience"
        and log the standard names and the matrix artifacts."""
        pending, self._pending = self._pending, {}
        task_id, self._task_id = self._task_id, None
        row = int(getattr(getattr(strategy, "clock", None), "train_exp_counter", 0)) - 1
        if not self.enabled or row < 0 or not pending or self._in_training:
            return
        self.matrix.setdefault(row, {}).update(pending)
        matrix = self.accuracy_matrix()
        run_id = self._run(strategy)
        values = mx.step_metrics(matrix, rows=[len(matrix) - 1])
        if self._started is not None:  # train + eval time so far, as log_strategy_result's
            values.append((names.WALL_TIME_S, time.perf_counter() - self._started, row))
        if task_id is not None:
            values.append((names.TASK_ID_ACCURACY, task_id, row))
        tc.log_metrics(self.client, run_id, values)
        self.client.log_dict(run_id, mx.matrix_table(matrix), "accuracy_matrix.json")
        self.client.log_text(run_id, mx.matrix_csv(matrix), "accuracy_matrix.csv")

    def accuracy_matrix(self) -> mx.Matrix:
        """Rows 0..last trained experience; NaN where an experience was not evaluated."""
        if not self.matrix:
            return []
        rows = max(self.matrix) + 1
        cols = max(max(r) for r in self.matrix.values() if r) + 1
        return [[self.matrix.get(i, {}).get(j, math.nan) for j in range(cols)] for i in range(rows)]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_client", None)
        state.pop("_finalizer", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._client = None
        self._owns_run = False  # a restored copy must not end the original's run
