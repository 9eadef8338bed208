"""Plain read-only records the store returns (detached from any database session)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from taps_cl.routing.stats import RouteStats


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; the store only ever writes UTC."""
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class BaseRecord:
    fingerprint: str  # sha256 of the base's state_dict (taps_cl.bases.fingerprint)
    name: str  # human name, e.g. "efficientnet_lite0"
    source: str  # where the weights came from
    num_parameters: int | None  # parameter count, if known
    has_weights: bool  # whether the store holds the base's weights (save_base_weights)
    created_at: datetime


@dataclass(frozen=True)
class StoredTask:
    name: str  # task name
    base_fingerprint: str  # base the task was trained on
    base_name: str  # that base's human name
    current_version: int  # highest existing version (what load() returns by default)
    num_versions: int  # versions currently stored
    num_classes: int  # classes of the current version
    class_names: list[str] | None  # class names of the current version
    num_parameters: int  # task-specific parameters of the current version
    nbytes: int  # bytes of the current version's tensors
    created_at: datetime  # when the task was first committed
    updated_at: datetime  # when the current version was committed
    routable: bool = False  # the current version carries route statistics (task-free routing)


@dataclass(frozen=True)
class VersionRecord:
    name: str  # task name
    version: int  # 1, 2, ... (numbers of deleted versions are never reused)
    base_fingerprint: str
    num_classes: int
    num_layers: int  # gated layers in the model
    active_layers: list[str]  # layers whose gate is on (that carry a delta)
    num_parameters: int  # task-specific parameters
    nbytes: int  # bytes of all the version's tensors
    added_bytes: int  # bytes of new blobs it added (the rest was deduplicated)
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    routable: bool = False  # carries route statistics (task-free routing)
    route_bytes: int = 0  # of nbytes: its routing statistics

    @property
    def patch_bytes(self) -> int:
        """Bytes of the patch (nbytes without routing statistics)."""
        return self.nbytes - self.route_bytes


@dataclass(frozen=True)
class StoreStats:
    bases: int
    tasks: int
    versions: int
    tensors: int  # (version or base, tensor) references, packed tensors included
    blobs: int  # distinct stored blobs (a tensor, or a packed part of versions)
    blob_bytes: int  # bytes actually stored
    logical_bytes: int  # bytes all references would take without dedup
    dedup_saved_bytes: int  # logical_bytes - blob_bytes


@dataclass(frozen=True)
class RouteStatsRecord:
    """What a router needs of one routable version (``TaskStore.route_stats_many``)."""

    name: str  # task name
    version: int
    stats: RouteStats  # its routing statistics
    config: dict[str, Any]  # its config (the preprocessing its inputs need)
