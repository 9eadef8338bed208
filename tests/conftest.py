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
