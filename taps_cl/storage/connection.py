"""The connection side of :class:`~taps_cl.storage.store.TaskStore`: opening (create or not,
read-only or not), read sessions and retried write transactions, with every database failure
turned into a :class:`~taps_cl.errors.StoreError`."""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from taps_cl.errors import StoreError, StoreReadOnlyError
from taps_cl.storage.database import (
    check_location,
    create_engines,
    ensure_schema,
    resolve_url,
    sqlite_path,
    writable,
)
from taps_cl.storage.failures import translated
from taps_cl.storage.listing import ListingCache, bump_generation

T = TypeVar("T")
_RETRIES = 12
# PostgreSQL: serialization failure, deadlock, unique and foreign-key races between writers.
_PG_TRANSIENT = {"40001", "40P01", "23505", "23503"}


class StoreConnection:
    """Engines, sessions and transactions of one store URL (see ``TaskStore``)."""

    def __init__(
        self,
        url: str | os.PathLike | URL | None = None,
        *,
        create: bool = True,
        readonly: bool | None = False,
    ) -> None:
        where = str(url) if url is not None else "(default store)"
        with translated(where):
            self._url = resolve_url(url)
        self._read_engine = self._write_engine = None
        self._listing = ListingCache()  # task listings, valid while the generation stands
        try:
            with translated(self.url):
                self._open(create, readonly)
        except BaseException:
            self.close()
            raise

    def _open(self, create: bool, readonly: bool | None) -> None:
        path = sqlite_path(self._url)
        check_location(self._url, create=create and not readonly)
        if readonly is None:  # auto: read-only where SQLite could not write beside the file
            readonly = path is not None and not writable(path)
        self.readonly = bool(readonly)
        self._read_engine, self._write_engine = create_engines(self._url, readonly=self.readonly)
        self._dialect = self._write_engine.dialect.name
        self._reader = sessionmaker(self._read_engine, expire_on_commit=False)
        self._writer = sessionmaker(self._write_engine, expire_on_commit=False)
        self.schema_revision = ensure_schema(
            self._read_engine, self._write_engine, self.url, self.readonly
        )

    @property
    def url(self) -> str:
        """The store's URL with any password hidden."""
        return self._url.render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"TaskStore({self.url!r})"

    def close(self) -> None:
        if self._write_engine is not None:
            self._write_engine.dispose()

    @contextlib.contextmanager
    def _read(self) -> Iterator[Session]:
        """A read-only session; database failures become :class:`StoreError`."""
        with translated(self.url), self._reader() as session:
            yield session

    def __enter__(self) -> StoreConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, work: Callable[[Session], T]) -> T:
        """Run ``work`` in one write transaction; retry the whole of it on transient conflicts.
        The transaction ends by bumping the store generation (:mod:`taps_cl.storage.listing`)."""
        if self.readonly:
            raise StoreReadOnlyError(
                f"task store {self.url} is open read-only; open it with write access to change it"
            )
        for attempt in range(_RETRIES):
            try:
                with translated(self.url), self._writer.begin() as session:
                    result = work(session)
                    bump_generation(session)
                    return result
            except StoreError as err:
                cause = err.__cause__
                if not isinstance(cause, DBAPIError) or attempt + 1 == _RETRIES:
                    raise
                if not self._transient(cause):
                    raise
                time.sleep(min(0.02 * 2**attempt, 1.0) * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")

    def _transient(self, err: DBAPIError) -> bool:
        if self._dialect == "sqlite":
            text = str(err.orig).lower()
            return "locked" in text or "busy" in text
        return getattr(err.orig, "sqlstate", None) in _PG_TRANSIENT
