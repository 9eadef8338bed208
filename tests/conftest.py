"""Shared pytest setup: deterministic threads, the CI rule for optional system pieces, and the
task-store fixtures (one throwaway PostgreSQL cluster per session)."""

from __future__ import annotations

import os

import pytest
import torch

from taps_cl.storage import TaskStore
from tests._pg import PgCluster, find_pg_bindir

torch.set_num_threads(min(2, os.cpu_count() or 1))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip with ``reason`` outside CI; fail in CI, where every optional piece must be present."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def _private_data_home(tmp_path_factory):
    """Keep the user's home out of the tests: the default store (``$XDG_DATA_HOME/taps_cl``),
    which ``taps_cl.configure()`` without arguments opens, lives in a session temp dir, and a
    ``TAPS_CL_STORE`` set in the caller's shell is ignored."""
    saved = {k: os.environ.get(k) for k in ("XDG_DATA_HOME", "TAPS_CL_STORE")}
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("xdg_data"))
    os.environ.pop("TAPS_CL_STORE", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def pg_cluster():
    bindir = find_pg_bindir()
    if bindir is None:
        reason = "PostgreSQL server binaries (initdb/pg_ctl) not found: apt-get install postgresql"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)
    cluster = PgCluster(bindir).start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tasks.db'}"
    return request.getfixturevalue("pg_cluster").new_store_url()


@pytest.fixture
def store(store_url):
    with TaskStore(store_url) as s:
        yield s
