"""Engines, the default store location, and schema creation/upgrade through Alembic.

SQLite: WAL journal (readers never block the writer), a busy timeout, foreign keys on, and
``BEGIN IMMEDIATE`` for write transactions so that two writers queue on the database lock
instead of failing half-way. PostgreSQL: reads run in REPEATABLE READ (one snapshot per
read), writes in READ COMMITTED with row locks and retries (see ``store.py``).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import Engine, StaticPool, create_engine, event, text
from sqlalchemy.engine import URL, make_url

from taps_cl.config import environment
from taps_cl.errors import StoreError, StoreUnavailableError, StoreVersionError

ENV_VAR = "TAPS_CL_STORE"
BUSY_TIMEOUT_S = 60.0
MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "taps_cl_schema_version"  # not "alembic_version": a shared database may have one
_PG_MIGRATION_LOCK = 0x7A95C1  # pg_advisory_xact_lock key: one process migrates at a time
_WRITE = "taps_cl_write"


def default_store_path() -> Path:
    """``$XDG_DATA_HOME/taps_cl/tasks.db``, i.e. ``~/.local/share/taps_cl/tasks.db`` by default.

    A data directory, not a cache: trained tasks are not something to regenerate on a whim.
    """
    return environment().data_home / "taps_cl" / "tasks.db"


def resolve_url(url: str | os.PathLike | URL | None) -> URL:
    """An SQLAlchemy URL from ``url``, env ``TAPS_CL_STORE``, or the default SQLite file.

    A plain path (no ``://``) means an SQLite file; ``postgresql://`` means psycopg 3.
    """
    if url is None:
        url = environment().store or default_store_path()
    if isinstance(url, os.PathLike) or (isinstance(url, str) and "://" not in url):
        url = f"sqlite:///{Path(url).expanduser().absolute()}"
    if not isinstance(url, str | URL):
        raise TypeError(f"store url must be a str, path or sqlalchemy URL, got {type(url)}")
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def create_engines(url: URL, *, readonly: bool = False) -> tuple[Engine, Engine]:
    """(read engine, write engine) sharing one connection pool."""
    if url.get_backend_name() == "sqlite":
        return _sqlite_engines(url, readonly)
    engine = create_engine(url, pool_pre_ping=True)
    if readonly:
        engine = engine.execution_options(postgresql_readonly=True)
    return engine.execution_options(isolation_level="REPEATABLE READ"), engine


def sqlite_path(url: URL) -> Path | None:
    """The database file of an SQLite URL (None for in-memory databases and other backends)."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def writable(path: Path) -> bool:
    """Whether SQLite may write ``path`` and its journal files beside it."""
    parent_ok = os.access(path.parent, os.W_OK | os.X_OK)
    return parent_ok and (not path.exists() or os.access(path, os.W_OK))


def check_location(url: URL, *, create: bool) -> None:
    """Refuse an SQLite path that is a directory, or that does not exist unless ``create``
    (then its directory is made). A typo in ``--store`` must not create anything."""
    path = sqlite_path(url)
    if path is None:
        return
    if path.is_dir():
        raise StoreUnavailableError(f"store path {path} is a directory; give a database file")
    if path.exists():
        return
    if not create:
        where = "" if path.parent.is_dir() else f" (directory {path.parent} does not exist)"
        raise StoreUnavailableError(
            f"no task store at {path}{where}; check --store / TAPS_CL_STORE, or create one "
            "with a command that writes (e.g. add-task)"
        )
    if path.parent.exists() and not path.parent.is_dir():
        raise StoreUnavailableError(f"cannot create store {path}: {path.parent} is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)


def _sqlite_engines(url: URL, readonly: bool) -> tuple[Engine, Engine]:
    memory = sqlite_path(url) is None
    if memory:
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    elif readonly:
        # mode=ro writes nothing; in a directory nobody may write, SQLite could not even create
        # the WAL index beside the file, so the file is opened as immutable (read as it is).
        path = Path(url.database)
        query = {"mode": "ro", "uri": "true"} | ({} if writable(path) else {"immutable": "1"})
        ro = URL.create("sqlite", database=f"file:{quote(str(path))}", query=query)
        engine = create_engine(ro, connect_args={"timeout": BUSY_TIMEOUT_S})
    else:
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # noqa: ANN001
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        if not memory and not readonly:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA secure_delete=ON")  # deleted blobs are zeroed, not left behind
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # noqa: ANN001
        immediate = conn.get_execution_options().get(_WRITE)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine, engine.execution_options(**{_WRITE: True})


def _alembic_config(connection=None):  # noqa: ANN001, ANN202
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def _current_heads(connection) -> tuple[str, ...]:  # noqa: ANN001
    from alembic.runtime.migration import MigrationContext

    ctx = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return tuple(ctx.get_current_heads())


def checkpoint(engine: Engine) -> None:
    """Fold the SQLite WAL into the database and truncate it (after a delete: the WAL would
    otherwise keep the deleted bytes until the next automatic checkpoint)."""
    if engine.dialect.name == "sqlite" and sqlite_path(engine.url) is not None:
        with engine.connect() as conn:  # on the raw connection: outside any transaction
            conn.connection.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def ensure_schema(
    read_engine: Engine, write_engine: Engine, where: str, readonly: bool = False
) -> str:
    """Create or upgrade the schema to this code's head revision; return that revision.

    Raises :class:`StoreVersionError` if the store carries a revision this code does not know
    (written by a newer taps_cl): upgrading taps_cl is the fix, never a downgrade of the data.
    """
    from alembic import command
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config())
    head = script.get_current_head()
    known = {rev.revision for rev in script.walk_revisions()}
    with read_engine.connect() as conn:
        current = _current_heads(conn)
    _check_known(current, known, head, where)
    if current == (head,):
        return head
    if readonly:
        state = f"schema revision {current[0]!r}" if current else "no taps_cl schema"
        raise StoreError(
            f"task store {where} has {state} and needs an upgrade to {head!r}, which a "
            "read-only open cannot do; open it once with write access (e.g. taps-cl remove "
            "or add-task), or ask its owner to"
        )
    with write_engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        current = _current_heads(conn)  # another process may have migrated meanwhile
        _check_known(current, known, head, where)
        if current != (head,):
            command.upgrade(_alembic_config(conn), "head")
    return head


def _check_known(current: tuple[str, ...], known: set[str], head: str, where: str) -> None:
    unknown = [rev for rev in current if rev not in known]
    if unknown:
        raise StoreVersionError(
            f"task store {where} has schema revision {unknown[0]!r}, newer than this taps_cl "
            f"understands (latest known: {head!r}); upgrade taps_cl to open it"
        )
