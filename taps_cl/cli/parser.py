"""The `taps-cl` argument parser: one small builder per command, each giving its command only
the options it uses (``taps-cl tasks --base x`` is an error, not silently ignored)."""

from __future__ import annotations

import argparse

from taps_cl.cli.options import add_training_options
from taps_cl.cli.serve import add_serve_parser

DESCRIPTION = """`taps-cl`: a thin command line over the library.

Bad input exits with code 2 and a one-line message (no traceback)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it or there is none to show
    (``None``, a switch that is off, or an option whose default comes from its config)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def version_number(text: str) -> int:
    """``--version N``: a version number >= 1 (0 must not mean "current")."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"version must be an integer >= 1, got {text!r}")
    return int(text)


# -- option families --------------------------------------------------------------------------


def _store(s: argparse.ArgumentParser) -> None:
    s.add_argument("--store", help="SQLAlchemy URL or SQLite path (default: $TAPS_CL_STORE)")


def _base(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--base", help="base model: name, timm:NAME, or a checkpoint FILE with --arch "
        "(default: $TAPS_CL_BASE or efficientnet_lite0)",
    )  # fmt: skip
    s.add_argument(
        "--arch",
        help="timm architecture of a checkpoint --base FILE, e.g. resnet18 (or timm:NAME)",
    )
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")


def _quiet(s: argparse.ArgumentParser) -> None:
    """For commands that build models: messages (and progress bars) only when not quiet."""
    s.add_argument("--quiet", action="store_true", help="no progress bars, only warnings")


def _tracking(s: argparse.ArgumentParser) -> None:
    s.add_argument("--tracking", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")


def _json(s: argparse.ArgumentParser) -> None:
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _caps(s: argparse.ArgumentParser, test: bool = True) -> None:
    s.add_argument("--max-train", type=int, help="use at most this many training images")
    if test:
        s.add_argument("--max-test", type=int, help="use at most this many test images")


# -- commands ---------------------------------------------------------------------------------


def _training_commands(sub) -> None:
    s = sub.add_parser("add-task", help="train a task and commit it as a new version")
    s.add_argument("name")
    s.add_argument("--data", required=True, help="builtin task name or ImageFolder path")
    s.add_argument("--eval-data", help="builtin or ImageFolder path for evaluation")
    add_training_options(s)
    _caps(s)
    for add in (_store, _base, _quiet, _tracking):
        add(s)
    for name, joint in (("add-tasks", False), ("joint", True)):
        s = sub.add_parser(
            name,
            help="train several tasks (jointly with --joint; `joint` = add-tasks --joint); "
            "run under torchrun for DDP",
        )
        data_help = "builtin task name or ImageFolder path; repeat per task"
        s.add_argument("--data", action="append", required=True, help=data_help)
        joint_help = "train all tasks together and commit them in one transaction"
        s.add_argument("--joint", action="store_true", default=joint, help=joint_help)
        base_help = "also train the shared base weights into a new stored base"
        s.add_argument("--train-base", action="store_true", help=base_help)
        add_training_options(s, joint=True)
        s.add_argument("--ratio", action="append", help="TASK=FACTOR: that task's batch share")
        _caps(s)
        for add in (_store, _base, _quiet, _tracking):
            add(s)


def _read_commands(sub) -> None:
    s = sub.add_parser("tasks", help="list tasks in the store")
    _store(s)
    _json(s)
    s = sub.add_parser("show", help="versions and gates of one task")
    s.add_argument("name")
    _store(s)
    _json(s)
    s = sub.add_parser("predict", help="classify image files with a task, or route them")
    s.add_argument("files", nargs="+", help="image files ([NAME] FILES... also works)")
    s.add_argument("--task", help="task to use (default: route each file to a task)")
    s.add_argument("--version", type=version_number, help="with --task (default: current)")
    s.add_argument("--tasks", help="when routing: comma-separated candidate tasks")
    s.add_argument("--method", help="when routing: lda (default), ncm, combined, energy")
    for add in (_store, _base, _quiet, _json):
        add(s)
    s = sub.add_parser("gates", help="tasks x layers gate heatmap of the store")
    s.add_argument("--out", default="gates.png", help="PNG file to write")
    _store(s)


def _store_commands(sub) -> None:
    s = sub.add_parser("route-stats", help="make a stored task routable from its train data")
    s.add_argument("name")
    s.add_argument("--data", required=True, help="builtin task name or ImageFolder path")
    s.add_argument("--version", type=version_number, help="version (default: current)")
    s.add_argument("--replace", action="store_true", help="replace existing statistics")
    _caps(s, test=False)
    for add in (_store, _base, _quiet):
        add(s)
    s.set_defaults(max_test=None)
    s = sub.add_parser("remove", help="delete a task (or one version)")
    s.add_argument("name")
    s.add_argument("--version", type=version_number, help="only this version (default: all)")
    _store(s)
    s = sub.add_parser(
        "export",
        help="write a task version to one .safetensors file, or with --merged DIR the merged "
        "model in timm's Hugging Face layout (config.json + model.safetensors)",
    )
    s.add_argument("name")
    s.add_argument("path", nargs="?", help="the .safetensors task file to write")
    s.add_argument("--merged", metavar="DIR", help="write the merged model to this folder")
    s.add_argument("--version", type=version_number, help="version (default: current)")
    s.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="if PATH is a symlink, replace the file it points to (default: refuse)",
    )
    for add in (_store, _base, _quiet):
        add(s)
    s = sub.add_parser("import", help="import a task file into the store")
    s.add_argument("path")
    s.add_argument("--allow-new-base", action="store_true",
                   help="register the file's base if this store has never seen it")  # fmt: skip
    _store(s)


def _other_commands(sub) -> None:
    s = sub.add_parser("demo", help="three real tasks on the real base, then a reload check")
    s.add_argument("--image-size", type=int, default=64, help="input side in pixels")
    s.add_argument("--scale", type=float, default=1.0, help="shrink data and epochs (<1)")
    s.add_argument("--keep", action="store_true", help="keep an existing demo store")
    s.add_argument("--store", help="SQLAlchemy URL or SQLite path (default: taps_cl_demo.db)")
    s.add_argument("--base", help="base model (default: $TAPS_CL_BASE or efficientnet_lite0)")
    _quiet(s)
    _tracking(s)
    s = sub.add_parser("compare", help="compare strategies logged to an MLflow experiment")
    s.add_argument("--experiment", required=True, help="MLflow experiment name")
    s.add_argument("--out", default="compare_out", help="folder for the table and figures")
    _tracking(s)


def build_parser() -> argparse.ArgumentParser:
    from taps_cl import __version__

    p = argparse.ArgumentParser(prog="taps-cl", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"taps-cl {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser

    def add_parser(name: str, **kw) -> argparse.ArgumentParser:
        return add(name, formatter_class=HelpFormatter, description=kw.get("help"), **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]
    _other_commands(sub)
    _training_commands(sub)
    _read_commands(sub)
    _store_commands(sub)
    add_serve_parser(sub)
    return p
