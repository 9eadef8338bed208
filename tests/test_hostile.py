"""A careless or hostile user (issue #14): corrupted stores and files, odd paths, and
property-based checks of names, configs and datasets. Every refusal is the exact error type,
one line and exit 2 on the CLI, and leaves the store logically unchanged."""

from __future__ import annotations

import math
import os
import re
import socket
import sqlite3
import stat
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taps_cl.bases import Preprocessing
from taps_cl.cli import main
from taps_cl.config import JointConfig, TAPSConfig, TrainConfig
from taps_cl.data import prepare
from taps_cl.errors import (
    InvalidPatchError,
    StoreIntegrityError,
    StoreReadOnlyError,
    StoreUnavailableError,
    UnsafeTargetError,
)
from taps_cl.images import DataError, preprocess
from taps_cl.storage import TaskStore, read_patch_file
from taps_cl.storage.serialize import safe_target, write_patch_file
from taps_cl.taps.patch import TASK_NAME_RE, validate_task_name
from tests._store_child import BASE, make_patch

OTHER = "c" * 64
TABLES = ("bases", "tasks", "task_versions", "blobs", "version_tensors", "version_parts",
          "base_tensors", "store_state")  # fmt: skip
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def layout_of(patch, **changed_shapes) -> dict:
    """The layout a base would have for ``make_patch`` (shapes overridable per tensor)."""
    tensors = {}
    for key, t in patch.tensors.items():
        shape = list(changed_shapes.get(key, t.shape))
        if key.startswith("head."):
            shape[0] = -1
        tensors[key] = [str(t.dtype).removeprefix("torch."), shape]
    return {"v": 1, "num_layers": patch.num_layers, "tensors": tensors}


def dump(db: Path) -> list:
    """Every row of every table, in a fixed order: 'logically unchanged' means equal dumps."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return [(t, sorted(map(repr, conn.execute(f"SELECT * FROM {t}")))) for t in TABLES]


def one_line_exit_2(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("taps-cl: error:") and "\n" not in err, err
    return err


@pytest.fixture
def db(tmp_path) -> Path:
    """An SQLite store holding 'flowers' v1 on BASE (with a layout) and the base OTHER."""
    path = tmp_path / "tasks.db"
    with TaskStore(path) as s:
        s.register_base(BASE, "base-b", layout=layout_of(make_patch()))
        bigger = {"delta.conv1": (16, 3, 3, 3), "head.weight": (3, 32)}
        s.register_base(OTHER, "base-c", layout=layout_of(make_patch(), **bigger))
        s.commit(make_patch())
    return path


def _sql(db: Path, statement: str) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute(statement)


def _tampered_file(db: Path, tmp: Path, change) -> Path:  # noqa: ANN001
    """Export 'flowers', change it with ``change(patch, meta)``, rewrite it with fresh hashes."""
    good = TaskStore(db).export("flowers", tmp / "good.safetensors")
    patch, meta = read_patch_file(good)
    change(patch, meta)
    return write_patch_file(tmp / "bad.safetensors", patch, meta)


def _set_tensor(key: str, value: torch.Tensor):  # noqa: ANN202
    return lambda patch, meta: patch.tensors.__setitem__(key, value)


def _relabel(patch, meta) -> None:  # noqa: ANN001
    meta["base_fingerprint"] = OTHER


# -- corrupted stores: (case, tamper the db, argv after 'taps-cl', exact error) --------------

ROW_CASES = {  # case: (how the version is stored, the edit)
    "dtype": ("per tensor", "UPDATE version_tensors SET dtype='int32' WHERE name='delta.conv1'"),
    "shape": ("per tensor", "UPDATE version_tensors SET shape='[8, 27]' WHERE name='delta.conv1'"),
    "part": ("packed", "UPDATE version_parts SET part='route'"),
    "parts": ("packed", "DELETE FROM version_parts"),
    "config": ("packed", "UPDATE task_versions SET config=json_set(config, '$.image_size', 64)"),
    "classes": ("packed",
                'UPDATE task_versions SET num_classes=4, class_names=\'["a","b","c","d"]\''),
}  # fmt: skip


def _per_tensor(db: Path) -> None:
    """Store the versions of ``db`` per tensor, as before packing (revision 0004): down to 0003
    (which unpacks them) and up again (which leaves them as they are)."""
    from alembic import command
    from sqlalchemy import create_engine

    from taps_cl.storage.database import _alembic_config

    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "0003")
    engine.dispose()
    TaskStore(db).close()


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_tampered_rows_are_integrity_errors_naming_task_and_version(db, tmp_path, capsys, case):
    form, statement = ROW_CASES[case]
    if form == "per tensor":
        _per_tensor(db)
    _sql(db, statement)
    before = dump(db)
    with TaskStore(db) as s, pytest.raises(StoreIntegrityError, match="'flowers' version 1"):
        s.load("flowers")
    err = one_line_exit_2(capsys, "export", "flowers", str(tmp_path / "o.st"), "--store", str(db))
    assert "digest" in err and not (tmp_path / "o.st").exists()
    assert dump(db) == before


def _not_a_db(tmp: Path) -> str:
    (tmp / "junk.db").write_bytes(b"not a database, just text " * 200)
    return str(tmp / "junk.db")


def _truncated(tmp: Path) -> str:
    path = tmp / "cut.db"
    with TaskStore(path) as s:
        for i in range(4):
            s.commit(make_patch(seed=i, tensors={"delta.conv1": torch.randn(64, 64)}, num_layers=1,
                                active_layers=["conv1"]))  # fmt: skip
    path.write_bytes(path.read_bytes()[: 3 * 4096])
    return str(path)


def _closed_port_pg(tmp: Path) -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"postgresql://nobody@127.0.0.1:{port}/nowhere?connect_timeout=3"


STORE_CASES = {
    "not_a_db": (_not_a_db, StoreUnavailableError, "not an SQLite database"),
    "truncated": (_truncated, StoreIntegrityError, "malformed"),
    "directory": (lambda tmp: str(tmp), StoreUnavailableError, "is a directory"),
    "unknown_scheme": (lambda tmp: "mongo://host/db", StoreUnavailableError, "store URL"),
    "pg_unreachable": (_closed_port_pg, StoreUnavailableError, "cannot be reached"),
    "missing_dir": (lambda tmp: str(tmp / "typo" / "x.db"), StoreUnavailableError, "no task"),
}


@pytest.mark.parametrize("case", sorted(STORE_CASES))
def test_unusable_stores_raise_store_errors_and_cli_says_one_line(tmp_path, capsys, case):
    make, error, message = STORE_CASES[case]
    url = make(tmp_path)
    files_before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(error, match=message):
        TaskStore(url, create=False).list_tasks()
    for argv in (["tasks"], ["show", "flowers"], ["export", "flowers", str(tmp_path / "o")]):
        assert message in one_line_exit_2(capsys, *argv, "--store", url)
    assert sorted(p.name for p in tmp_path.rglob("*")) == files_before  # nothing created


# -- imports that do not fit the base they name ------------------------------------------------

IMPORT_CASES = {
    "wrong_shape": (_set_tensor("delta.conv1", torch.zeros(8, 3, 5, 5)), "needs [8, 3, 3"),
    "nan": (_set_tensor("head.weight", torch.full((3, 16), math.nan)), "NaN"),
    "inf_score": (_set_tensor("score.fc", torch.tensor(math.inf)), "NaN or infinite"),
    "score_not_0d": (_set_tensor("score.fc", torch.zeros(2)), "not 0-d"),
    "int_delta": (_set_tensor("delta.conv1", torch.zeros(8, 3, 3, 3, dtype=torch.int32)), "float"),
    "unknown_tensor": (_set_tensor("delta.conv9", torch.zeros(2)), "no gated layer of this base"),
    "relabelled": (_relabel, "does not fit base cccccccccccc"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(IMPORT_CASES))
def test_imports_that_do_not_fit_their_base_are_refused(db, tmp_path, capsys, case):
    change, message = IMPORT_CASES[case]
    bad = _tampered_file(db, tmp_path, change)
    before = dump(db)
    with TaskStore(db) as s, pytest.raises(InvalidPatchError, match=re.escape(message)):
        s.import_file(bad)
    assert message in one_line_exit_2(capsys, "import", str(bad), "--store", str(db))
    assert dump(db) == before


def test_a_fitting_import_still_works_and_bases_without_layout_get_value_checks(db, tmp_path):
    good = TaskStore(db).export("flowers", tmp_path / "good.safetensors")
    with TaskStore(db) as s:
        assert s.import_file(good).version == 2
    other = tmp_path / "other.db"
    nan = _tampered_file(db, tmp_path, IMPORT_CASES["nan"][0])
    with TaskStore(other) as s:
        with pytest.raises(InvalidPatchError, match="NaN"):
            s.import_file(nan, allow_new_base=True)
        assert s.list_bases() == []  # the refused file registered no base either
        assert s.import_file(good, allow_new_base=True).version == 1
        assert s.base_layout(BASE) is None  # new from a file: checked by values only


# -- export targets ----------------------------------------------------------------------------


def _symlink(tmp: Path) -> Path:
    (tmp / "real.st").write_bytes(b"keep me")
    (tmp / "link.st").symlink_to(tmp / "real.st")
    return tmp / "link.st"


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "fifo")
    return tmp / "fifo"


def _dir(tmp: Path) -> Path:
    (tmp / "d").mkdir()
    return tmp / "d"


@pytest.mark.parametrize(
    "make,message",
    [(_symlink, "is a symlink"), (_fifo, "is a FIFO"), (_dir, "is a directory"),
     (lambda tmp: tmp / "no" / "x.st", "does not exist")],
)  # fmt: skip
def test_export_refuses_unsafe_targets(db, tmp_path, capsys, make, message):
    target = make(tmp_path)
    kind = os.lstat(target).st_mode if os.path.lexists(target) else None
    before = dump(db)
    with pytest.raises(UnsafeTargetError, match=message):
        TaskStore(db).export("flowers", target)
    assert message in one_line_exit_2(capsys, "export", "flowers", str(target), "--store", str(db))
    assert (os.lstat(target).st_mode if os.path.lexists(target) else None) == kind
    assert dump(db) == before
    if make is _symlink:
        assert (tmp_path / "real.st").read_bytes() == b"keep me"


@pytest.mark.parametrize("mode", [stat.S_IFCHR | 0o666, stat.S_IFBLK | 0o660, stat.S_IFSOCK])
def test_export_refuses_device_nodes_without_touching_one(tmp_path, monkeypatch, mode):
    target = tmp_path / "dev"
    target.write_bytes(b"")
    real = os.lstat
    monkeypatch.setattr(os, "lstat", lambda p: os.stat_result((mode, *real(p)[1:])))
    with pytest.raises(UnsafeTargetError, match="device|socket"):
        safe_target(target)


def test_export_follows_symlinks_only_when_asked_and_writes_0644(db, tmp_path):
    link = _symlink(tmp_path)
    old = os.umask(0o027)
    try:
        TaskStore(db).export("flowers", link, allow_symlink=True)
    finally:
        os.umask(old)
    assert link.is_symlink() and read_patch_file(link)[0].name == "flowers"
    assert stat.S_IMODE(os.stat(tmp_path / "real.st").st_mode) == 0o640
    plain = TaskStore(db).export("flowers", tmp_path / "plain.st")
    assert stat.S_IMODE(os.stat(plain).st_mode) == 0o644 & ~os.umask(os.umask(0))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# -- read-only stores, no accidental creation, secure delete ---------------------------------


def test_read_only_store_can_be_listed_and_loaded_without_writing(db, tmp_path, monkeypatch):
    ro_dir = tmp_path / "ro"
    ro_dir.mkdir()
    (ro_dir / "tasks.db").write_bytes(db.read_bytes())  # the fixture's store is closed: no WAL
    for module in ("connection", "database"):  # as for a non-root user in a read-only dir
        monkeypatch.setattr(f"taps_cl.storage.{module}.writable", lambda path: False)
    with TaskStore(ro_dir / "tasks.db", create=False, readonly=None) as s:
        assert s.readonly and [t.name for t in s.list_tasks()] == ["flowers"]
        assert s.load("flowers").version == 1
        with pytest.raises(StoreReadOnlyError, match="read-only"):
            s.delete("flowers")
    assert sorted(p.name for p in ro_dir.iterdir()) == ["tasks.db"]  # no -wal, no -shm


def test_read_commands_never_create_a_store(tmp_path, capsys):
    for argv in (["tasks"], ["gates", "--out", str(tmp_path / "g.png")]):
        one_line_exit_2(capsys, *argv, "--store", str(tmp_path / "typo" / "x.db"))
    assert list(tmp_path.iterdir()) == []


def test_deleted_tensor_bytes_leave_the_database_files(tmp_path):
    pattern = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(5))
    secret = pattern.to(torch.uint8).view(torch.float32)  # 4 KiB of random bytes
    patch = make_patch(tensors={"delta.conv1": secret, "score.conv1": torch.tensor(0.5)},
                       num_layers=1, active_layers=["conv1"])  # fmt: skip
    needle = secret.numpy().tobytes()[1000:1200]
    path = tmp_path / "tasks.db"

    def found() -> bool:
        files = [path, path.with_name("tasks.db-wal")]
        return any(needle in f.read_bytes() for f in files if f.exists())

    with TaskStore(path) as s:  # stays open, as an engine would
        s.commit(patch)
        assert found()
        s.delete("flowers")
        assert not found()


# -- small holes -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, -1, True, 1.0])
def test_version_zero_negative_or_bool_is_a_value_error(db, version):
    with TaskStore(db) as s, pytest.raises(ValueError, match="version must be an int >= 1"):
        s.load("flowers", version)


def test_corrupt_image_and_empty_tensor_are_clear_data_errors(tmp_path):
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(DataError, match="photo.png.*not a readable image"):
        preprocess([str(bad)], Preprocessing(input_size=16))
    for empty in (torch.empty(0, 3, 8, 8), torch.empty(3, 0, 8)):
        with pytest.raises(DataError, match="empty image tensor"):
            preprocess(empty, Preprocessing(input_size=16))


@given(st.text(max_size=70))
@HYP
def test_task_names_are_checked_whole(name):
    try:
        assert validate_task_name(name) == name
    except ValueError:
        assert not TASK_NAME_RE.fullmatch(name)
    else:
        assert "\n" not in name and name[0].isascii() and name[0].isalpha() and len(name) <= 64


def test_trailing_newline_is_not_a_task_name():
    for name in ("ab\n", "ab\r", "a b", "", "1ab", "ä"):
        with pytest.raises(ValueError, match="invalid task name"):
            validate_task_name(name)


ODD_NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.integers(-5, 5),
    st.none(), st.text(max_size=3),
)  # fmt: skip


@given(
    field=st.sampled_from(
        [(TAPSConfig, "lam"), (TAPSConfig, "tau"), (TAPSConfig, "warmup_epochs"),
         (TAPSConfig, "task_norms"), (TrainConfig, "lr"), (TrainConfig, "epochs"),
         (TrainConfig, "image_size"), (TrainConfig, "max_grad_norm"), (TrainConfig, "amp"),
         (TrainConfig, "score_lr"), (JointConfig, "base_lr"), (JointConfig, "epoch_length")]
    ),
    value=ODD_NUMBERS,
)  # fmt: skip
@HYP
def test_configs_accept_only_real_finite_values(field, value):
    cls, name = field
    try:
        config = cls(**{name: value})
    except (ValueError, TypeError):
        return
    stored = getattr(config, name)
    if isinstance(stored, float):
        assert math.isfinite(stored)
    if name in ("task_norms", "amp"):
        assert isinstance(stored, bool)
    elif stored is not None and not isinstance(stored, str):
        assert not isinstance(stored, bool)
    assert cls.from_json(config.to_json()) == config


@given(
    n=st.integers(0, 6),
    shape=st.sampled_from([(3, 8, 8), (1, 8, 8), (8, 8), (8, 8, 3), (2, 8, 8), (3, 0, 8)]),
    dtype=st.sampled_from([torch.uint8, torch.float32, torch.int64, torch.bool]),
    fill=st.sampled_from([0.5, math.nan, math.inf, -1.0, 300.0]),
    labels=st.lists(st.integers(-2, 4), min_size=0, max_size=7),
)
@HYP
def test_prepare_either_refuses_clearly_or_yields_valid_data(n, shape, dtype, fill, labels):
    x = (
        torch.full((n, *shape), fill).to(dtype)
        if dtype != torch.float32
        else torch.full((n, *shape), fill)
    )
    y = torch.tensor(labels[:n] + [0] * max(0, n - len(labels)), dtype=torch.int64)
    try:
        data = prepare((x, y), preprocessing=Preprocessing(input_size=8))
    except (ValueError, TypeError) as err:
        assert str(err).strip() and "\n" not in str(err).strip()
        return
    assert len(data) == n >= 1 and data.num_classes >= 1
    img, label = data.dataset[0]
    assert torch.isfinite(img).all() and 0 <= int(label) < data.num_classes
