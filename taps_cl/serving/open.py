"""A :class:`TaskServer` opened from a :class:`~taps_cl.serving.spec.ServedStore` alone:
the base loaded by its spec and checked against the recorded fingerprint, the store opened
read-only (no request can write it), no engine.
"""

from __future__ import annotations

import copy

from taps_cl.bases import fingerprint, load_base
from taps_cl.config import TAPSConfig
from taps_cl.errors import BaseMismatchError
from taps_cl.serving.server import TaskServer
from taps_cl.serving.spec import ServedStore
from taps_cl.storage import TaskStore
from taps_cl.taps.model import TAPSModel
from taps_cl.training.runtime import resolve_device

__all__ = ["open_served"]


def open_served(spec: ServedStore, store: str) -> TaskServer:
    """The server for ``spec`` over ``store`` (a URL or SQLite path), opened read-only."""
    base = load_base(spec.base, **({"arch": spec.arch} if spec.arch else {}))
    base.module.requires_grad_(False).eval()
    fp = fingerprint(base.module)
    if fp != spec.fingerprint:
        raise BaseMismatchError(
            f"base {spec.base!r} has fingerprint {fp[:12]}, the model was made for "
            f"{spec.fingerprint[:12]}: its weights changed since the model was saved"
        )
    opened = TaskStore(store, create=False, readonly=True)

    def new_model() -> TAPSModel:
        return TAPSModel(
            copy.deepcopy(base.module), TAPSConfig(), head=spec.head, base_fingerprint=fp
        )

    return TaskServer(
        fingerprint=fp,
        preprocessing=base.preprocessing,
        store=opened,
        device=resolve_device(spec.device),
        new_model=new_model,
        max_loaded=spec.max_loaded,
        version_ttl=spec.version_ttl,
    )
