"""The routed, many-task MLflow ``pyfunc`` model: one base, a task store, one endpoint.

An image goes in (with or without its task's name); the task, the class, its name, a confidence
and the task version that answered come out (:mod:`~taps_cl.serving.answers`). The model is
MLflow "models from code": its ``python_model`` is the file :data:`MODEL_CODE`, so loading it
unpickles nothing; everything it needs is in its JSON ``model_config`` (:class:`ServedStore`)
and, for a snapshot, one artifact (a SQLite task store holding the chosen versions).

- **snapshot**: the store artifact is opened read-only; answers never change.
- **live**: ``store`` is a URL (e.g. PostgreSQL) opened read-only; a version committed later is
  served within ``version_ttl`` seconds, without a redeploy.

Errors a request causes (:class:`~taps_cl.serving.requests.RequestError`, unknown tasks, bad
parameters) become ``MlflowException(INVALID_PARAMETER_VALUE)``, which MLflow's scoring server
answers with a 400; the server keeps serving.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from taps_cl.serving.answers import ANSWER_COLUMNS, answer_rows
from taps_cl.serving.open import open_served
from taps_cl.serving.requests import RequestLimits, decode_rows
from taps_cl.serving.route import DEFAULT_METHOD
from taps_cl.serving.spec import ServedStore

__all__ = ["MODEL_CODE", "RoutedModel", "ServedStore", "input_example", "save_routed_model"]

MODEL_CODE = str(Path(__file__).with_name("mlflow_model.py"))  # the models-from-code file
STORE_ARTIFACT = "store"  # artifact key of a snapshot's SQLite store
log = logging.getLogger("taps_cl.serving")


class RoutedModel(mlflow.pyfunc.PythonModel):
    """The pyfunc model: load the base and open the store read-only once, answer rows."""

    def load_context(self, context: Any) -> None:
        spec = ServedStore.from_dict(dict(context.model_config or {}))
        store = spec.store or (context.artifacts or {}).get(STORE_ARTIFACT)
        if store is None:
            raise ValueError("a routed model needs model_config 'store' or a 'store' artifact")
        self.spec = spec
        self.limits = RequestLimits.from_dict(spec.limits)
        self.server = open_served(spec, store)

    def predict(self, context, model_input, params=None):  # noqa: ANN001 - see below
        """One row per image: task, label, class_name, confidence, version (a DataFrame).
        Not annotated: MLflow reads ``predict``'s hints as the model's schema, and the
        signature (:func:`signature`) is the schema here."""
        import pandas as pd

        start = time.perf_counter()
        try:
            method = _method(params, self.spec.method)
            rows = decode_rows(model_input, self.limits)
            answers = answer_rows(self.server, rows, method, self.spec.versions)
        except (ValueError, TypeError) as err:  # the request's fault: a 400
            log.info("refused request: %s", _one_line(err))
            raise MlflowException(_one_line(err), error_code=INVALID_PARAMETER_VALUE) from None
        except Exception as err:  # ours: a 500 with one line (details in the server log)
            log.exception("request failed")
            raise MlflowException(_one_line(err), error_code=INTERNAL_ERROR) from None
        ms = (time.perf_counter() - start) * 1e3
        log.info("answered %d images in %.1f ms", len(answers), ms)
        columns = {c: [getattr(a, c) for a in answers] for c in ANSWER_COLUMNS}
        # object columns: a missing class name stays None (null in JSON), never NaN
        return pd.DataFrame({c: pd.Series(v, dtype=object) for c, v in columns.items()})


def _method(params: dict[str, Any] | None, default: str) -> str:
    method = (params or {}).get("method") or default
    if not isinstance(method, str):
        raise ValueError(f"params.method must be a routing method name, got {method!r}")
    return method


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else type(err).__name__
    return text[:500]


def input_example() -> dict[str, list]:
    """A one-row request: a small grey PNG, base64-encoded, routed (no task name)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 128, 128)).save(buf, format="PNG")
    return {"image": [base64.b64encode(buf.getvalue()).decode("ascii")], "task": [None]}


def signature() -> Any:
    """Rows of ``image`` (base64 str or a nested-list array) and an optional ``task``; one
    answer per row; ``params.method`` picks the routing method."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec(AnyType(), "image"), ColSpec(AnyType(), "task", required=False)])
    outputs = Schema(
        [
            ColSpec("string", "task"),
            ColSpec("long", "label"),
            ColSpec("string", "class_name", required=False),
            ColSpec("double", "confidence"),
            ColSpec("long", "version"),
        ]
    )
    params = ParamSchema([ParamSpec("method", "string", DEFAULT_METHOD)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def pip_requirements() -> list[str]:
    """Pinned to this environment (``--env-manager local`` serves from it as is)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("taps_cl", "mlflow", "torch", "timm", "pillow")]


def save_routed_model(
    path: str | Path, spec: ServedStore, artifacts: dict[str, str] | None = None
) -> Path:
    """Write the routed model to the directory ``path`` (what ``taps-cl serve`` loads and what
    :func:`taps_cl.tracking.log_routed_model` logs)."""
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=MODEL_CODE,
        model_config=spec.to_dict(),
        artifacts=artifacts,
        signature=signature(),
        input_example=input_example(),
        pip_requirements=pip_requirements(),
    )
    return Path(path)
