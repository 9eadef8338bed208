"""The `taps-cl` command line: happy path on a small random timm base, and bad input (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from taps_cl.cli import main
from taps_cl.storage import TaskStore

BASE = ["--base", "timm-random:test_efficientnet", "--quiet"]


def _folder(root: Path, classes: int = 2, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            img = (rng.random((20, 20, 3)) * 80 + 80 * c).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i}.png")
    return root


def run(*argv: str) -> int:
    return main(list(argv))


def test_add_list_show_predict_export_import_remove(tmp_path, capsys):
    store = str(tmp_path / "s.db")
    data = _folder(tmp_path / "imgs")
    common = ["--store", store, *BASE]
    assert run("add-task", "shapes", "--data", str(data), "--epochs", "1",
               "--image-size", "32", *common) == 0  # fmt: skip
    assert "shapes" in capsys.readouterr().out
    assert run("tasks", "--store", store) == 0
    assert "shapes" in capsys.readouterr().out
    assert run("show", "shapes", "--store", store) == 0
    assert "v1" in capsys.readouterr().out
    files = sorted(str(p) for p in data.glob("class1/*.png"))[:2]
    assert run("predict", "shapes", *files, *common) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[1] in ("class0", "class1")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert run("predict", "shapes", str(broken), *common) == 2
    err = capsys.readouterr().err.strip()
    assert "broken.png" in err and "not a readable image" in err and "\n" not in err
    out = tmp_path / "shapes.safetensors"
    assert run("export", "shapes", str(out), "--store", store) == 0
    other = str(tmp_path / "other.db")
    assert run("import", str(out), "--store", other) == 2  # unknown base: clear refusal
    assert "never seen" in capsys.readouterr().err
    assert run("import", str(out), "--store", other, "--allow-new-base") == 0
    assert [t.name for t in TaskStore(other).list_tasks()] == ["shapes"]
    assert run("remove", "shapes", "--store", store) == 0
    assert TaskStore(store).list_tasks() == []


@pytest.mark.parametrize(
    "argv,message",
    [
        (["add-task", "x", "--data", "/no/such/dir"], "no such path"),
        (["show", "nope"], "nope"),
        (["remove", "nope"], "nope"),
        (["export", "nope", "out.safetensors"], "nope"),
        (["import", "/no/such.safetensors"], "no such file"),
        (["add-task", "bad name", "--data", "digits"], "invalid task name"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    store = str(tmp_path / "s.db")
    TaskStore(store).close()  # an empty store: read commands refuse a missing one (own test)
    assert run(*argv, "--store", store, *(BASE if argv[0] == "add-task" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("taps-cl: error:") and message in err and "\n" not in err
    assert TaskStore(store).list_tasks() == []


def test_single_class_folder_is_refused_and_store_unchanged(tmp_path, capsys):
    store = str(tmp_path / "s.db")
    data = _folder(tmp_path / "one", classes=1)
    assert run("add-task", "one", "--data", str(data), "--store", store, *BASE) == 2
    assert "class" in capsys.readouterr().err
    assert TaskStore(store).list_tasks() == []


def test_entry_point_runs_as_a_process(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "taps_cl", "show", "nope", "--store", str(tmp_path / "s.db")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "taps-cl: error:" in done.stderr


def test_training_options_come_from_the_config_dataclasses(tmp_path):
    import dataclasses

    from taps_cl.cli import build_parser
    from taps_cl.cli.options import JOINT_FIELDS, TAPS_FIELDS, TRAIN_FIELDS
    from taps_cl.config import JointConfig, TAPSConfig, TrainConfig

    sub = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    for command in ("add-task", "add-tasks", "joint"):
        helps = {a.dest: a.help for a in sub[command]._actions}  # noqa: SLF001
        tables = [(TrainConfig, TRAIN_FIELDS), (TAPSConfig, TAPS_FIELDS)]
        if command != "add-task":
            tables.append((JointConfig, JOINT_FIELDS))
        for cls, names in tables:
            defaults = {f.name: f.default for f in dataclasses.fields(cls)}
            for name in names:
                assert helps[name].endswith(f"(default: {defaults[name]})"), (command, name)
    store = str(tmp_path / "s.db")
    data = _folder(tmp_path / "imgs")
    argv = ["add-task", "t", "--data", str(data), "--epochs", "1", "--image-size", "24"]
    assert run(*argv, "--lam", "0.25", "--seed", "3", "--max-grad-norm", "none",
               "--store", store, *BASE) == 0  # fmt: skip
    config = TaskStore(store).versions("t")[0].config
    assert config["taps"]["lam"] == 0.25 and config["taps"]["tau"] == TAPSConfig.tau
    assert config["train"]["seed"] == 3 and config["train"]["max_grad_norm"] is None
    assert config["train"]["batch_size"] == TrainConfig.batch_size  # not given: the default
    assert run(*argv, "--optimizer", "adam", "--store", store, *BASE) == 2  # validated


def test_version_help_defaults_and_unused_options(capsys):
    from taps_cl import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 64)" in text and "(default: 1.0)" in text
    for argv in (["tasks", "--base", "bogus"], ["show", "x", "--device", "cpu"],
                 ["remove", "x", "--quiet"], ["import", "f", "--base", "b"]):  # fmt: skip
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 2, argv
        assert "unrecognized arguments" in capsys.readouterr().err


def test_json_output_and_flag_names_in_messages(tmp_path, capsys):
    import json

    store = str(tmp_path / "s.db")
    data = _folder(tmp_path / "imgs")
    common = ["--store", store, *BASE]
    assert run("add-task", "shapes", "--data", str(data), "--epochs", "1",
               "--image-size", "32", *common) == 0  # fmt: skip
    capsys.readouterr()
    assert run("tasks", "--store", store, "--json") == 0
    tasks = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in tasks] == ["shapes"] and tasks[0]["current_version"] == 1
    assert run("show", "shapes", "--store", store, "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "shapes" and shown["versions"][0]["version"] == 1
    files = sorted(str(p) for p in data.glob("class0/*.png"))[:2]
    for argv in (["--task", "shapes"], []):  # the task form and the routing form
        assert run("predict", *files, *argv, *common, "--json") == 0
        rows = json.loads(capsys.readouterr().out)
        assert [r["file"] for r in rows] == files and all(r["task"] == "shapes" for r in rows)
        assert all(r["label"] in ("class0", "class1") for r in rows)
    out = tmp_path / "shapes.safetensors"
    assert run("export", "shapes", str(out), "--store", store) == 0
    assert run("import", str(out), "--store", str(tmp_path / "other.db")) == 2
    err = capsys.readouterr().err
    assert "--allow-new-base" in err and "allow_new_base" not in err
