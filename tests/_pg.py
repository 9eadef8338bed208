"""A throwaway PostgreSQL cluster for tests: Debian's ``initdb``/``pg_ctl`` on a temporary
directory, listening on 127.0.0.1 and a free port, fsync off, trust auth, stopped at the end.

PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
``postgres`` system user (or ``nobody``), with the temporary directory chowned to it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

_TOOLS = ("initdb", "pg_ctl", "postgres")


def find_pg_bindir() -> Path | None:
    """The newest directory holding initdb, pg_ctl and postgres (Debian keeps them off PATH)."""

    def version(path: str) -> tuple[int, ...]:
        part = Path(path).parent.name
        return tuple(int(x) for x in part.split(".") if x.isdigit()) or (0,)

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for cand in candidates:
        if all(os.access(Path(cand) / tool, os.X_OK) for tool in _TOOLS):
            return Path(cand)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_user() -> pwd.struct_passwd | None:
    """Who runs the server: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists")


class PgCluster:
    """Start with :meth:`start`, get a fresh empty store URL with :meth:`new_store_url`."""

    user = "taps"
    dbname = "taps_cl_tests"

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="taps_cl_pg_"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self._db_created = False
        self._account = _server_user()

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        kw: dict = {}
        if self._account is not None:
            acct = self._account
            kw = {"user": acct.pw_uid, "group": acct.pw_gid, "extra_groups": []}
        env = {"PATH": "/usr/bin:/bin", "HOME": str(self.root), "LC_ALL": "C", "LANG": "C"}
        result = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(
                f"{args[0]} failed ({result.returncode}): {result.stderr or result.stdout}\n{log}"
            )
        return result

    def start(self) -> PgCluster:
        if self._account is not None:
            os.chown(self.root, self._account.pw_uid, self._account.pw_gid)
        os.chmod(self.root, 0o700)
        self._run(
            "initdb", "-D", str(self.data), "-U", self.user, "-A", "trust",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        for attempt in range(3):  # the free port may be taken between probe and bind
            self.port = _free_port()
            opts = (
                f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                f"-c unix_socket_directories={self.root} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off"
            )
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts,
                          "-w", "-t", "60", "start")  # fmt: skip
                return self
            except RuntimeError:
                if attempt == 2:
                    raise
                time.sleep(0.5)
        return self

    def _execute(self, sql: str, dbname: str) -> None:
        import psycopg

        conninfo = f"host=127.0.0.1 port={self.port} user={self.user} dbname={dbname}"
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(sql)

    def new_store_url(self) -> str:
        """A SQLAlchemy URL (psycopg 3) whose tables land in a new, empty schema.

        Schemas rather than databases: CREATE DATABASE copies a template (slow, and many
        small files to delete at the end); a schema costs nothing.
        """
        if not self._db_created:
            self._execute(f'CREATE DATABASE "{self.dbname}"', "postgres")
            self._db_created = True
        schema = f"s_{uuid.uuid4().hex[:16]}"
        self._execute(f'CREATE SCHEMA "{schema}"', self.dbname)  # our own hex name, no input
        return (
            f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{self.dbname}"
            f"?options=-csearch_path%3D{schema}"
        )

    def stop(self) -> None:
        try:
            if self.port:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            # Deleting the cluster's files can take seconds on a slow disk; nothing waits on it.
            subprocess.Popen(["rm", "-rf", str(self.root)], start_new_session=True)
