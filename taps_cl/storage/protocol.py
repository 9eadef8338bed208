"""TaskStoreAPI: what taps_cl asks of a task store, and nothing more.

The engine, the serving side, run commits, the CLI, tracking's gate picture and the Avalanche
strategy talk to a store only through these members, so a second backend (say, patch blobs in
object storage with the metadata in SQL) is one class that implements them; the SQL
:class:`~taps_cl.storage.store.TaskStore` is the one taps_cl ships. Every method keeps the
contract documented on ``TaskStore``: versions are immutable and numbered 1, 2, ... per task,
a write is one transaction (visible whole or not at all), reads verify what they return, and
unknown names raise :class:`~taps_cl.errors.UnknownTaskError` /
:class:`~taps_cl.errors.UnknownBaseError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from taps_cl.routing.stats import RouteStats
from taps_cl.storage.records import (
    BaseRecord,
    RouteStatsRecord,
    StoredTask,
    StoreStats,
    VersionRecord,
)
from taps_cl.taps.patch import TaskPatch


@runtime_checkable
class TaskStoreAPI(Protocol):
    """A versioned store of task patches (see the module docstring); ``isinstance`` checks
    that an object has every member."""

    readonly: bool  # True: every write raises StoreReadOnlyError

    @property
    def url(self) -> str:
        """Where the store lives, safe to print (no password)."""

    # -- bases -------------------------------------------------------------------------------

    def register_base(
        self,
        fingerprint: str,
        name: str,
        source: str = "",
        num_parameters: int | None = None,
        *,
        layout: Mapping[str, Any] | None = None,
    ) -> BaseRecord: ...

    def base(self, fingerprint: str) -> BaseRecord: ...

    def base_layout(self, fingerprint: str) -> dict[str, Any] | None: ...

    def set_base_layout(self, fingerprint: str, layout: Mapping[str, Any]) -> None: ...

    def load_base_weights(self, fingerprint: str) -> dict[str, torch.Tensor]: ...

    # -- versions ----------------------------------------------------------------------------

    def commit(
        self,
        patch: TaskPatch,
        *,
        metrics: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> int: ...

    def commit_many(
        self,
        patches: Iterable[TaskPatch],
        *,
        metrics: Mapping[str, Mapping[str, Any]] | None = None,
        config: Mapping[str, Any] | None = None,
        base_weights: tuple[str, Mapping[str, torch.Tensor], str | None, str] | None = None,
    ) -> list[int]: ...

    def load(self, name: str, version: int | None = None, *, base: str | None = None) -> TaskPatch:
        """The patch of ``name`` at ``version`` (default: current); the caller owns it (the
        server folds its tensors into a module in place)."""

    def list_tasks(self, *, base: str | None = None) -> list[StoredTask]: ...

    def versions(self, name: str, *, base: str | None = None) -> list[VersionRecord]: ...

    def delete(
        self, name: str, version: int | None = None, *, base: str | None = None
    ) -> list[int]: ...

    def stats(self) -> StoreStats: ...

    # -- routing -----------------------------------------------------------------------------

    def route_stats(
        self, name: str, version: int | None = None, *, base: str | None = None
    ) -> RouteStats: ...

    def add_route_stats(
        self,
        name: str,
        stats: RouteStats,
        version: int | None = None,
        *,
        base: str | None = None,
        replace: bool = False,
    ) -> VersionRecord: ...

    # -- files -------------------------------------------------------------------------------

    def export(
        self,
        name: str,
        path: str | os.PathLike,
        version: int | None = None,
        *,
        base: str | None = None,
        allow_symlink: bool = False,
    ) -> Path: ...

    def import_file(
        self,
        path: str | os.PathLike,
        *,
        allow_new_base: bool = False,
        layout: Mapping[str, Any] | None = None,
    ) -> VersionRecord: ...


@runtime_checkable
class BulkRouteStats(Protocol):
    """An optional extra of a store: the route statistics of many versions in a few queries
    (a server building a router over every routable task reads them all). Stores without it
    are read one version at a time through :meth:`TaskStoreAPI.route_stats`."""

    def route_stats_many(
        self, versions: Mapping[str, int], *, base: str
    ) -> dict[str, RouteStatsRecord]:
        """Task name -> its statistics and config at the given version, of tasks on ``base``."""


def missing_members(store: object) -> list[str]:
    """The :class:`TaskStoreAPI` members ``store`` lacks (for an error that names them)."""
    members = [n for n in vars(TaskStoreAPI) if not n.startswith("_")]
    members += list(TaskStoreAPI.__annotations__)
    return sorted({n for n in members if not hasattr(store, n)})
