"""taps_cl: Task Adaptive Parameter Sharing for continual learning on one frozen base.

    import taps_cl
    taps_cl.configure(base="efficientnet_lite0", store="sqlite:///tasks.db")  # optional
    rec = taps_cl.add_task(train_set, name="flowers", eval_dataset=test_set)
    model = taps_cl.default_engine().model("flowers")  # merged, plain nn.Module

Defaults come from ``TAPS_CL_BASE``, ``TAPS_CL_STORE`` and ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from taps_cl.config import TAPSConfig, TrainConfig, __version__, environment
from taps_cl.errors import (
    BaseMismatchError,
    StoreIntegrityError,
    TAPSError,
    UnknownTaskError,
)
from taps_cl.taps.patch import TaskPatch

if TYPE_CHECKING:
    from taps_cl.engine import Engine, TaskRecord
    from taps_cl.serving import Routed
    from taps_cl.taps.model import TAPSModel

# Library messages go to the "taps_cl" logger; applications (and `taps-cl`) decide where.
logging.getLogger(__name__).addHandler(logging.NullHandler())

_lock = threading.Lock()
_settings: dict[str, Any] = {}
_engine: Engine | None = None


def configure(
    base: Any = None,
    store: Any = None,
    tracking: str | None = None,
    device: str | None = None,
    **engine_kwargs: Any,
) -> Engine:
    """Set the default engine's base, store, tracking URI and device (None = env or default)."""
    global _engine
    with _lock:
        _settings.clear()
        _settings.update(base=base, store=store, tracking=tracking, device=device, **engine_kwargs)
        _engine = None
    return default_engine()


def default_engine() -> Engine:
    """The process-wide engine, created on first use from :func:`configure` or the environment."""
    global _engine
    from taps_cl.engine import Engine

    with _lock:
        if _engine is None:
            s = dict(_settings)
            _engine = Engine(
                s.pop("base", None),
                store=s.pop("store", None),
                tracking=s.pop("tracking", None) or environment().tracking,
                device=s.pop("device", None) or "auto",
                **s,
            )
        return _engine


def add_task(dataset: Any, **kwargs: Any) -> TaskRecord:
    """Train and commit a task on the default engine (see :meth:`Engine.add_task`)."""
    return default_engine().add_task(dataset, **kwargs)


def route(inputs: Any, **kwargs: Any) -> Routed:
    """Task-free prediction on the default engine (see :meth:`Engine.route`)."""
    return default_engine().route(inputs, **kwargs)


def __getattr__(name: str) -> Any:
    # Heavy classes load lazily so `import taps_cl` stays cheap.
    if name in ("Engine", "TaskRecord"):
        from taps_cl import engine

        return getattr(engine, name)
    if name == "Routed":
        from taps_cl.serving import Routed

        return Routed
    if name == "TAPSModel":
        from taps_cl.taps.model import TAPSModel

        return TAPSModel
    if name in ("fit_joint", "JointConfig"):
        from taps_cl import joint

        return getattr(joint, name)
    if name == "TaskStore":
        from taps_cl.storage import TaskStore

        return TaskStore
    raise AttributeError(f"module 'taps_cl' has no attribute {name!r}")


__all__ = [
    "BaseMismatchError",
    "Engine",
    "JointConfig",
    "StoreIntegrityError",
    "TAPSConfig",
    "TAPSError",
    "Routed",
    "TAPSModel",
    "TaskPatch",
    "TaskRecord",
    "TaskStore",
    "TrainConfig",
    "UnknownTaskError",
    "__version__",
    "add_task",
    "configure",
    "default_engine",
    "fit_joint",
    "route",
]
