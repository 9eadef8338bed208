"""The store generation and the task listing cached on it.

Every write transaction bumps ``store_state.generation`` as its last statement
(:func:`bump_generation`, called by the connection's write wrapper), so it commits with the
rows it describes: commits, imports, deletes, added route statistics and base changes alike.
A listing reads the generation and, in the same read transaction (one snapshot), the listing
itself only when the generation moved: with nothing changed, ``list_tasks`` costs one
single-row query whatever the number of tasks. Another process's commit moves the generation
in the database, so the next call sees it; threads share the cache under a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from taps_cl.storage.models import StoreStateRow
from taps_cl.storage.records import StoredTask

_ROW = 1  # the one row of store_state


def bump_generation(session: Session) -> None:
    """Move the generation on, inside the caller's write transaction (recreating the row if
    someone deleted it)."""
    moved = session.execute(
        update(StoreStateRow)
        .where(StoreStateRow.id == _ROW)
        .values(generation=StoreStateRow.generation + 1),
        execution_options={"synchronize_session": False},
    )
    if moved.rowcount == 0:
        session.execute(insert(StoreStateRow).values(id=_ROW, generation=1))


def read_generation(session: Session) -> int | None:
    """The store's generation (None if its row is missing: nothing may then be cached)."""
    return session.scalar(select(StoreStateRow.generation).where(StoreStateRow.id == _ROW))


class ListingCache:
    """Task listings by base filter, each kept with the generation it was read at."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: dict[str | None, tuple[int, tuple[StoredTask, ...]]] = {}

    def tasks(
        self,
        session: Session,
        base: str | None,
        read: Callable[[Session, str | None], list[StoredTask]],
    ) -> list[StoredTask]:
        """The listing of ``base`` (None: every base): the cached one while the generation
        stands, else ``read(session, base)`` in the same snapshot as the generation. The list
        is new per call; its records are shared between calls (frozen; treat as read-only)."""
        generation = read_generation(session)
        with self._lock:
            hit = self._tasks.get(base)
        if hit is not None and generation is not None and hit[0] == generation:
            return list(hit[1])
        records = read(session, base)
        if generation is not None:
            with self._lock:
                old = self._tasks.get(base)
                if old is None or old[0] <= generation:  # never replace a newer listing
                    self._tasks[base] = (generation, tuple(records))
        return records
