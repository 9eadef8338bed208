"""Database and file-system failures -> :class:`~taps_cl.errors.StoreError` subclasses whose
one-line message says what failed and how to fix it (no ``sqlalchemy.exc`` leaks out)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

from taps_cl.errors import (
    StoreError,
    StoreIntegrityError,
    StoreReadOnlyError,
    StoreUnavailableError,
    TAPSError,
)

# (substring of the driver's message, error class, what it means and how to fix it)
_KNOWN = (
    ("file is not a database", StoreUnavailableError,
     "is not a taps_cl task store (not an SQLite database); check the path"),
    ("malformed", StoreIntegrityError,
     "is damaged (malformed or truncated database); restore it from a backup"),
    ("unable to open database file", StoreUnavailableError,
     "cannot be opened; check that it is a file in an existing directory you may read"),
    ("readonly database", StoreReadOnlyError,
     "is read-only here; open it read-only or fix its (or its directory's) permissions"),
    ("disk i/o error", StoreUnavailableError,
     "could not be read or written (disk I/O error); check the disk and the file"),
    ("database or disk is full", StoreUnavailableError, "could not be written: the disk is full"),
    ("no such table", StoreIntegrityError,
     "lacks taps_cl tables (not a taps_cl store, or damaged); check the path"),
    ("no such column", StoreIntegrityError,
     "lacks taps_cl columns (damaged, or edited by hand); restore it from a backup"),
    ("connection refused", StoreUnavailableError,
     "cannot be reached (connection refused); check that the server runs and the URL"),
    ("could not translate host name", StoreUnavailableError,
     "cannot be reached (unknown host); check the URL"),
    ("password authentication failed", StoreUnavailableError,
     "refused the login; check the user and password in the URL"),
    ("does not exist", StoreUnavailableError, "does not exist on the server; check the URL"),
)  # fmt: skip


def first_line(err: BaseException) -> str:
    text = str(getattr(err, "orig", None) or err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def store_error(err: BaseException, where: str) -> StoreError:
    """The :class:`StoreError` that explains ``err`` (raised while using store ``where``)."""
    if isinstance(err, NoSuchModuleError | ArgumentError):
        return StoreUnavailableError(
            f"store URL {where}: {first_line(err)}; use a file path, sqlite:///PATH or "
            "postgresql://USER@HOST/DB"
        )
    if isinstance(err, ModuleNotFoundError):
        return StoreUnavailableError(
            f"store {where} needs the missing module {err.name!r}; for PostgreSQL install "
            "taps_cl[postgres] (psycopg 3)"
        )
    if isinstance(err, OSError):
        return StoreUnavailableError(f"store {where}: {err}")
    text = first_line(err)
    for needle, cls, meaning in _KNOWN:
        if needle in text.lower():
            return cls(f"task store {where} {meaning} ({text})")
    if isinstance(err, DBAPIError) and getattr(err, "connection_invalidated", False):
        return StoreUnavailableError(f"lost the connection to task store {where}: {text}")
    return StoreError(f"task store {where} failed: {type(err).__name__}: {text}")


@contextlib.contextmanager
def translated(where: str) -> Iterator[None]:
    """Run a block, turning database and file-system failures into :class:`StoreError`."""
    try:
        yield
    except TAPSError:
        raise
    except (SQLAlchemyError, sqlite3.Error, OSError, ModuleNotFoundError) as err:
        raise store_error(err, where) from err
