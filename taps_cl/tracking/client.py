"""Thin helpers over ``mlflow.tracking.MlflowClient``: where runs go and how values are written.

Everything here uses the explicit client (never ``mlflow.set_tracking_uri``), so taps_cl never
changes the global MLflow state of the program that imports it.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from taps_cl.errors import TAPSError
from taps_cl.tracking.names import sanitize_key

ENV_VAR = "MLFLOW_TRACKING_URI"
DEFAULT_DB = "mlflow.db"  # in the current directory, as MLflow 3's own default
KIND_TAG = "taps_cl.kind"  # "strategy", "task" or "summary": what a run holds
_MAX_PARAM = 6000  # MLflow's limit on a param value
_MAX_TAG = 8000  # ... and on a tag value
_BATCH = 900  # metrics per log_batch call (MLflow allows 1000 entities)


class UnknownExperimentError(TAPSError, ValueError):
    """An MLflow experiment name that the tracking store does not hold."""


def resolve_tracking_uri(uri: str | os.PathLike | None = None) -> str:
    """The tracking URI to use: ``uri``, else the program's ``mlflow.set_tracking_uri(...)``,
    else env ``MLFLOW_TRACKING_URI``, else the embedded SQLite file ``./mlflow.db`` (made
    absolute, so a later ``chdir`` cannot move it; MLflow 3's own default file).

    A plain path (no ``scheme://``) means a SQLite file: MLflow 3 refuses plain file stores
    unless told, and SQLite needs no server.
    """
    if uri is None:
        # MLflow's own default would switch to ./mlruns when that folder exists; we do not.
        uri = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
        uri = uri or str(Path.cwd() / DEFAULT_DB)
    if not isinstance(uri, (str, os.PathLike)):
        raise TypeError(f"tracking_uri must be a str or path, got {type(uri).__name__}")
    uri = os.fspath(uri)
    if not uri:
        raise ValueError("tracking_uri is empty; pass a URI such as sqlite:///mlflow.db")
    if "://" in uri or uri.startswith("databricks"):
        return uri
    return f"sqlite:///{Path(uri).expanduser().resolve()}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores or in-memory)."""
    if not uri.startswith("sqlite:///") or uri.rstrip("/").endswith(":memory:"):
        return None
    return Path(uri[len("sqlite:///") :])


def slug(text: str) -> str:
    """A file-name-safe version of ``text`` (experiment and task names in paths)."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", text).strip("._") or "unnamed"


def get_or_create_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if missing.

    For SQLite stores the artifacts of new experiments go to ``mlartifacts/<name>`` beside the
    database file, not to ``./mlruns`` of whatever directory the process happens to run in.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"experiment must be a non-empty str, got {name!r}")
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    db = sqlite_path(uri)
    location = (db.parent / "mlartifacts" / slug(name)).as_uri() if db else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def find_experiment(client: MlflowClient, name: str) -> str:
    """The id of an existing experiment (:class:`UnknownExperimentError` if there is none)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UnknownExperimentError(f"no MLflow experiment named {name!r}; known: {names}")
    return found.experiment_id


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def param_text(value: Any) -> str:
    """A param value as MLflow shows it: str as is, everything else as JSON, cut to the limit."""
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    return text if len(text) <= _MAX_PARAM else text[: _MAX_PARAM - 3] + "..."


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Log (nested) ``params``; keys are sanitised like metric keys."""
    items = [Param(sanitize_key(k), param_text(v)) for k, v in flatten(params).items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def log_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    items = [
        RunTag(k, (v if isinstance(v, str) else json.dumps(v))[:_MAX_TAG]) for k, v in tags.items()
    ]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, tags=items[start : start + 100])


def log_metrics(client: MlflowClient, run_id: str, values: Iterable[tuple[str, float, int]]) -> int:
    """Log ``(key, value, step)`` triples in batches; return how many were logged."""
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, int(s)) for k, v, s in values]
    for start in range(0, len(items), _BATCH):
        client.log_batch(run_id, metrics=items[start : start + _BATCH])
    return len(items)


def json_safe(value: Any) -> Any:
    """NaN/inf become ``null`` so that artifacts are strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    return value


def context_tags() -> dict[str, str]:
    """MLflow's standard run context (``mlflow.user``, ``mlflow.source.name``/``type``,
    ``mlflow.source.git.commit`` when the program runs from a git checkout) and the taps_cl
    version, as ``mlflow.start_run`` would set them."""
    from mlflow.tracking.context.registry import resolve_tags

    from taps_cl.config import __version__

    return {**resolve_tags(), "taps_cl.package_version": __version__}


MODEL_ARTIFACT = "model"  # where a run's merged model lives (runs:/<run>/model)


def register_model(
    client: MlflowClient,
    run_id: str,
    name: str,
    model: Any,
    tags: Mapping[str, str],
    input_shape: tuple[int, int, int],
) -> str:
    """Log ``model`` (the merged ``nn.Module``, inputs ``[N, *input_shape]``) as the run's
    ``mlflow.pytorch`` model and register it under ``name``; ``tags`` go on the new registry
    version. Returns that version. The format is MLflow's default ``pt2`` (an exported graph,
    no pickle), with a signature whose batch size is free."""
    import tempfile

    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    example = np.zeros((2, *input_shape), dtype=np.float32)
    with torch.no_grad():
        classes = int(model(torch.from_numpy(example)).shape[-1])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]),
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_ARTIFACT
        # explicit requirements: inferring them imports the model in a subprocess (slow)
        mlflow.pytorch.save_model(
            model,
            str(path),
            signature=signature,
            input_example=example,
            pip_requirements=[f"torch=={torch.__version__}", "timm"],
        )
        client.log_artifacts(run_id, str(path), MODEL_ARTIFACT)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags={"taps_cl.task": name})
    source = f"runs:/{run_id}/{MODEL_ARTIFACT}"
    version = client.create_model_version(name, source, run_id=run_id, tags=dict(tags))
    return str(version.version)
