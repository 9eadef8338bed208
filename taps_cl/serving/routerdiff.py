"""Which cached router a new set of task versions should be derived from, and what changes.

A server caches one router per set of routable ``(task, version)`` pairs. When the set changes
(a task added or deleted, a new version), deriving the new router from the cached one that
differs least (:meth:`~taps_cl.routing.TaskRouter.derive`: its pooled sum plus or minus the
changed tasks' terms) reads and adds only the changed tasks; a set that shares too little with
every cached one is built from scratch. Routers of versions that are no longer current are
dropped from the cache as soon as a newer set is built, and so is the all-tasks set a new task
extends, so memory holds one router per live set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from taps_cl.storage import StoredTask

# derive when at most this fraction of the new set's tasks changed; otherwise build afresh
DERIVE_FRACTION = 0.5


def changes(old: Mapping[str, int], new: Mapping[str, int]) -> tuple[dict[str, int], list[str]]:
    """(task -> version to add or replace, tasks to remove) that turn ``old`` into ``new``."""
    added = {n: v for n, v in new.items() if old.get(n) != v}
    removed = sorted(n for n in old if n not in new)
    return added, removed


def closest(cached: Sequence[Mapping[str, int]], new: Mapping[str, int]) -> int | None:
    """Index of the cached set that differs least from ``new``, if deriving from it is
    cheaper than a fresh build (at most :data:`DERIVE_FRACTION` of ``new`` changes)."""
    best, best_size = None, None
    for i, old in enumerate(cached):
        added, removed = changes(old, new)
        size = len(added) + len(removed)
        if size <= DERIVE_FRACTION * len(new) and (best_size is None or size < best_size):
            best, best_size = i, size
    return best


def superseded(
    old: tuple[tuple[str, int], ...],
    new: tuple[tuple[str, int], ...],
    tasks: Sequence[str] | None,
    records: Mapping[str, StoredTask],
) -> bool:
    """Whether the cached set ``old`` can go once ``new`` is cached: it names a version that is
    no longer current, or ``new`` is the set of all routable tasks (``tasks`` None) and ``old``
    a part of it (the all-tasks set before a task was added)."""
    if any(name not in records or records[name].current_version != v for name, v in old):
        return True
    return tasks is None and old != new and set(old) < set(new)
