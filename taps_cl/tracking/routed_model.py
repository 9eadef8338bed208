"""Log (and register) the routed, many-task model of a store as an MLflow ``pyfunc`` model.

- ``mode="snapshot"``: the chosen task versions (patches with their route statistics) are
  copied into a SQLite store logged as the model's artifact; the registry version pins exactly
  those versions (its tags name them). Reproducible: answers never change.
- ``mode="live"``: the model keeps the store's URL (e.g. PostgreSQL) and opens it read-only
  when it loads; a version committed later is served within ``version_ttl`` seconds, with no
  redeploy. A URL with a password is refused: the URL is written into the logged model, so
  give the password through ``PGPASSWORD`` or ``~/.pgpass`` instead.

Either way the model is "models from code" (:mod:`taps_cl.serving.pyfunc`): loading it with
``mlflow.pyfunc.load_model`` or serving it with ``mlflow models serve`` unpickles nothing.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.engine import make_url

import taps_cl.tracking.client as tc
from taps_cl.serving.pyfunc import STORE_ARTIFACT, save_routed_model
from taps_cl.serving.snapshot import chosen_versions, snapshot_store
from taps_cl.serving.spec import ServedStore
from taps_cl.storage import TaskStoreAPI

__all__ = ["MODES", "RoutedModelInfo", "log_routed_model"]

MODES = ("snapshot", "live")
ROUTED_ARTIFACT = "routed_model"  # runs:/<run>/routed_model


@dataclass(frozen=True)
class RoutedModelInfo:
    """Where the logged routed model is and what it serves."""

    run_id: str
    model_uri: str  # runs:/<run_id>/routed_model (what mlflow.pyfunc.load_model takes)
    mode: str
    versions: dict[str, int]  # snapshot: the pinned task versions; live: those at logging time
    registered_version: str | None  # the registry version, when registered


def log_routed_model(
    store: TaskStoreAPI,
    spec: ServedStore,
    *,
    mode: str = "snapshot",
    tasks: Iterable[str] | Mapping[str, int] | None = None,
    uri: str | None = None,
    experiment: str = "taps_cl",
    registered_name: str | None = None,
) -> RoutedModelInfo:
    """Log the routed model of ``store``'s tasks on ``spec.fingerprint`` in one new run.

    ``spec`` names the base and the serving options; in live mode ``spec.store`` is the URL the
    model opens (default: ``store.url``). ``tasks``: which tasks (or task -> version) a
    snapshot holds (default: every task at its current version). ``registered_name``:
    also register the model there (one registry version per call).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "live" and tasks is not None:
        raise ValueError("tasks= picks a snapshot's versions; a live model serves every task")
    chosen = chosen_versions(store, spec.fingerprint, tasks)
    client, run_id = _start(uri, experiment, f"routed-{mode}")
    status = "FAILED"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path, artifacts = Path(tmp) / ROUTED_ARTIFACT, None
            if mode == "snapshot":
                snap = snapshot_store(store, spec.fingerprint, chosen, Path(tmp) / "tasks.db")
                spec = dataclasses.replace(spec, store=None, versions=chosen)
                artifacts = {STORE_ARTIFACT: str(snap)}
            else:
                spec = dataclasses.replace(spec, store=_live_url(spec.store or store.url))
            save_routed_model(path, spec, artifacts)
            client.log_artifacts(run_id, str(path), ROUTED_ARTIFACT)
        tc.log_params(client, run_id, {"mode": mode, "base": spec.base, **_pins(chosen)})
        registered = _register(client, run_id, registered_name, mode, spec, chosen)
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    model_uri = f"runs:/{run_id}/{ROUTED_ARTIFACT}"
    return RoutedModelInfo(run_id, model_uri, mode, chosen, registered)


def _start(uri: str | None, experiment: str, run_name: str) -> tuple[MlflowClient, str]:
    uri = tc.resolve_tracking_uri(uri)
    client = MlflowClient(uri)
    exp_id = tc.get_or_create_experiment(client, experiment, uri)
    tags = {tc.KIND_TAG: "routed_model", **tc.context_tags()}
    return client, client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id


def _pins(chosen: Mapping[str, int]) -> dict[str, int]:
    return {f"task.{name}.version": version for name, version in chosen.items()}


def _live_url(url: str) -> str:
    if make_url(url).password:
        raise ValueError(
            "the store URL holds a password and would be written into the logged model; "
            "give it through PGPASSWORD or ~/.pgpass instead"
        )
    return url


def _register(
    client: MlflowClient,
    run_id: str,
    name: str | None,
    mode: str,
    spec: ServedStore,
    chosen: Mapping[str, int],
) -> str | None:
    """A registry version of the run's routed model; its tags pin the task versions."""
    if name is None:
        return None
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags={"taps_cl.kind": "routed_model"})
    tags = {
        "taps_cl.mode": mode,
        "taps_cl.base_fingerprint": spec.fingerprint,
        **{f"taps_cl.task.{n}": str(v) for n, v in chosen.items()},
    }
    source = f"runs:/{run_id}/{ROUTED_ARTIFACT}"
    return str(client.create_model_version(name, source, run_id=run_id, tags=tags).version)
