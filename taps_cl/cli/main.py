"""`taps-cl`: a thin command line over the library (the parser is in :mod:`taps_cl.cli.parser`).

Bad input exits with code 2 and a one-line message (no traceback). Library messages go through
the ``taps_cl`` logger, which :func:`main` prints to stderr (warnings only with ``--quiet``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from taps_cl.cli.options import joint_config, taps_config, train_config
from taps_cl.cli.parser import build_parser
from taps_cl.cli.serve import cmd_serve
from taps_cl.cli.tables import fmt_bytes, fmt_pct, table
from taps_cl.config import DEFAULT_BASE, environment
from taps_cl.errors import TAPSError

# Commands that only read the store: they never create one, and open it read-only when
# SQLite could not write beside the file (a read-only file or directory).
READ_COMMANDS = frozenset({"tasks", "show", "predict", "export", "gates", "route-stats"})


def _store(args: argparse.Namespace):
    from taps_cl.storage import TaskStore

    if args.command in READ_COMMANDS:
        return TaskStore(args.store, create=False, readonly=None)
    return TaskStore(args.store)


def _engine(args: argparse.Namespace, **kw):
    from taps_cl.bases import load_base
    from taps_cl.engine import Engine

    base = args.base or environment().base
    return Engine(
        load_base(base, arch=args.arch) if args.arch else base,
        store=_store(args),
        tracking=getattr(args, "tracking", None) or environment().tracking,
        device=args.device,
        **kw,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from taps_cl.cli.demo import run_demo

    result = run_demo(
        args.store or "taps_cl_demo.db",
        image_size=args.image_size,
        scale=args.scale,
        base=args.base or DEFAULT_BASE,
        fresh=not args.keep,
        quiet=args.quiet,
        tracking=args.tracking or environment().tracking,
    )
    return 0 if all(result.unchanged.values()) else 1


def _data(spec: str, part: str, args: argparse.Namespace):
    """A builtin task name (see `taps-cl add-task --help`) or an ImageFolder path."""
    from taps_cl.scenarios import get_task, task_names

    if spec in task_names():
        task = get_task(spec, max_train=args.max_train, max_test=args.max_test)
        return getattr(task, part), task.class_names
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"--data {spec!r}: no such path and no builtin task {task_names()}")
    if (path / part).is_dir():
        path = path / part
    return str(path), None


def cmd_add_task(args: argparse.Namespace) -> int:
    train_data, class_names = _data(args.data, "train", args)
    eval_data = None
    if args.eval_data:
        eval_data, _ = _data(args.eval_data, "test", args)
    elif args.data in _builtin_names():
        eval_data, _ = _data(args.data, "test", args)
    engine = _engine(args)
    rec = engine.add_task(
        train_data,
        name=args.name,
        eval_dataset=eval_data,
        class_names=class_names,
        config=taps_config(args),
        train=train_config(args),
        quiet=args.quiet,
    )
    from taps_cl.cli.demo import task_table

    print(task_table([rec], engine.base.num_parameters))
    return 0


def _task_sources(args: argparse.Namespace) -> tuple[dict, dict]:
    """``--data`` specs -> (name -> train data, name -> eval data); names are the builtin task
    names or the folders' names."""
    from taps_cl.taps.patch import validate_task_name

    datasets: dict = {}
    evals: dict = {}
    for spec in args.data:
        path = Path(spec)
        builtin = spec in _builtin_names()
        name = (
            spec if builtin else "".join(c if c.isalnum() or c in "_-" else "_" for c in path.name)
        )
        try:
            validate_task_name(name)
        except ValueError as err:
            raise ValueError(f"--data {spec!r}: rename the folder: {err}") from err
        if name in datasets:
            raise ValueError(f"--data {spec!r}: task name {name!r} given twice")
        datasets[name], _ = _data(spec, "train", args)
        if builtin or (path / "test").is_dir():
            evals[name], _ = _data(spec, "test", args)
    return datasets, evals


def cmd_add_tasks(args: argparse.Namespace) -> int:
    """Several tasks at once; with --joint trained together (under torchrun: DDP, and only
    rank 0 writes to the store or prints)."""
    from taps_cl.joint import distributed_session

    ratios = dict(_ratio(r) for r in args.ratio or [])
    sampling = joint_config(args, ratios or None)
    datasets, evals = _task_sources(args)
    train = train_config(args)
    with distributed_session() as (rank, _):
        if rank != 0:
            args.store, args.tracking = "sqlite://", None  # only rank 0 writes anywhere
        engine = _engine(args)
        recs = engine.add_tasks(
            datasets,
            joint=args.joint,
            train_base=args.train_base,
            config=taps_config(args),
            train=train,
            eval_datasets=evals,
            sampling=sampling,
            quiet=args.quiet,
        )
    if rank == 0:
        from taps_cl.cli.demo import task_table

        print(task_table(recs, engine.base.num_parameters))
        if args.train_base and recs:
            print(f"new base {recs[0].base_fingerprint} (stored; the tasks above belong to it)")
    return 0


def _ratio(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if sep and name:
            return name, float(value)
    except ValueError:
        pass
    raise ValueError(f"--ratio {text!r}: use TASK=FACTOR, e.g. digits=2")


def _builtin_names() -> list[str]:
    from taps_cl.scenarios import task_names

    return task_names()


def cmd_tasks(args: argparse.Namespace) -> int:
    store = _store(args)
    tasks = store.list_tasks()
    if args.json:
        _print_json([dataclasses.asdict(t) for t in tasks])
        return 0
    rows = [
        (
            r.name,
            f"v{r.current_version}",
            r.num_versions,
            r.num_classes,
            f"{r.num_parameters:,}",
            fmt_bytes(r.nbytes),
            r.base_name,
            "yes" if r.routable else "no",
            r.updated_at.strftime("%Y-%m-%d %H:%M"),
        )
        for r in tasks
    ]
    if not rows:
        print(f"no tasks in {store.url}")
        return 0
    headers = ["task", "current", "versions", "classes", "params", "bytes", "base", "routable",
               "updated"]  # fmt: skip
    print(table(headers, rows))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    versions = _store(args).versions(args.name)
    if args.json:
        _print_json({"name": args.name, "versions": [dataclasses.asdict(v) for v in versions]})
        return 0
    rows = [
        (
            f"v{v.version}",
            fmt_pct(v.metrics.get("accuracy")),
            f"{len(v.active_layers)}/{v.num_layers}",
            f"{v.num_parameters:,}",
            fmt_bytes(v.patch_bytes),
            fmt_bytes(v.route_bytes),
            fmt_bytes(v.nbytes),
            fmt_bytes(v.added_bytes),
            v.created_at.strftime("%Y-%m-%d %H:%M") if v.created_at else "-",
        )
        for v in versions
    ]
    print(f"task {args.name!r}: {versions[-1].num_classes} classes")
    headers = ["version", "accuracy", "layers", "params", "patch", "routing stats", "stored",
               "new bytes", "created"]  # fmt: skip
    print(table(headers, rows))
    print("adapted layers (latest): " + (", ".join(versions[-1].active_layers) or "none"))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """With ``--task`` (or the old form ``predict NAME FILES...``) classify with that task;
    without, route each file to a task (task-free) and print its task too."""
    files, name = list(args.files), args.task
    if name is None and len(files) > 1 and not Path(files[0]).exists() and _task_name(files[0]):
        name, files = files[0], files[1:]  # the positional form of earlier releases
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise ValueError(f"no such file: {missing[0]}")
    engine = _engine(args)
    if name is None:
        tasks = args.tasks.split(",") if args.tasks else None
        routed = engine.route(files, tasks=tasks, method=args.method)
        rows = [
            {
                "file": path,
                "task": routed.tasks[i],
                "label": routed.class_names[i] or str(int(routed.labels[i])),
                "index": int(routed.labels[i]),
                "confidence": float(routed.confidence[i]),
            }
            for i, path in enumerate(files)
        ]
        return _print_rows(rows, ("file", "task", "label", "confidence"), args.json)
    logits = engine.predict(name, files, logits=True, version=args.version)
    names = engine.class_names(name, args.version)
    rows = []
    for path, row in zip(files, logits, strict=True):
        k = int(row.argmax())
        label = names[k] if names else str(k)
        rows.append({"file": path, "task": name, "label": label, "index": k,
                     "probability": float(row.softmax(0)[k])})  # fmt: skip
    return _print_rows(rows, ("file", "label", "probability"), args.json)


def _print_rows(rows: list[dict], columns: Sequence[str], as_json: bool) -> int:
    """Tab-separated ``columns`` of each row (floats to 3 places), or all of it as JSON."""
    if as_json:
        _print_json(rows)
        return 0
    for row in rows:
        cells = (f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns)
        print("\t".join(cells))
    return 0


def _print_json(value: Any) -> None:
    def plain(obj: Any) -> Any:
        if isinstance(obj, datetime):
            return obj.isoformat()
        raise TypeError(f"not JSON serialisable: {type(obj).__name__}")

    print(json.dumps(value, indent=2, default=plain))


def _task_name(text: str) -> bool:
    from taps_cl.taps.patch import TASK_NAME_RE

    return bool(TASK_NAME_RE.match(text))


def cmd_route_stats(args: argparse.Namespace) -> int:
    """Make a stored version routable: its route statistics from its training data."""
    data, _ = _data(args.data, "train", args)
    rec = _engine(args).add_route_stats(args.name, data, args.version, replace=args.replace)
    print(f"{args.name!r} v{rec.version} is routable")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    removed = _store(args).delete(args.name, args.version)
    print(f"removed {args.name!r} versions {removed}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.merged:
        if args.path:
            raise ValueError("give either PATH (the task file) or --merged DIR, not both")
        out = _engine(args).save_pretrained(args.name, args.merged, version=args.version)
        print(f"wrote {out} (load with timm.create_model('local-dir:{out}', pretrained=True))")
        return 0
    if not args.path:
        raise ValueError("export needs PATH (a .safetensors task file) or --merged DIR")
    store = _store(args)
    path = store.export(args.name, args.path, args.version, allow_symlink=args.follow_symlinks)
    print(f"wrote {path}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    if not Path(args.path).is_file():
        raise ValueError(f"no such file: {args.path}")
    rec = _store(args).import_file(args.path, allow_new_base=args.allow_new_base)
    print(f"imported {rec.name!r} as version {rec.version}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from taps_cl.tracking import compare

    report = compare(args.experiment, args.out, tracking_uri=args.tracking)
    print(report.table)
    for path in report.figures:
        print(f"figure: {path}")
    print(f"table:  {report.csv_path}")
    return 0


def cmd_gates(args: argparse.Namespace) -> int:
    from taps_cl.tracking import gates_figure

    png, text = gates_figure(_store(args), args.out)
    print(text)
    print(f"figure: {png}")
    return 0


# Library keyword arguments -> the flags a shell user types instead.
_FLAGS = {"allow_new_base": "--allow-new-base", "arch": "--arch"}
_KWARG_RE = re.compile(r"\b(" + "|".join(_FLAGS) + r")=('[^']*'|\S*)")


def _flag_names(text: str) -> str:
    """``allow_new_base=True`` -> ``--allow-new-base``; ``arch='x'`` -> ``--arch x``."""

    def flag(m: re.Match) -> str:
        value = m.group(2).strip("'")
        if value in ("True", ""):
            return _FLAGS[m.group(1)]
        return f"{_FLAGS[m.group(1)]} {value}"

    return _KWARG_RE.sub(flag, text)


def _fail(err: BaseException) -> int:
    text = str(err).strip()
    message = text.splitlines()[0] if text else type(err).__name__
    print(f"taps-cl: error: {_flag_names(message)}", file=sys.stderr)
    return 2


def _configure_logging(quiet: bool) -> None:
    """The ``taps_cl`` logger to stderr, one plain line per message."""
    log = logging.getLogger("taps_cl")
    if not any(getattr(h, "taps_cl_cli", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.taps_cl_cli = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)


COMMANDS = {
    "demo": cmd_demo,
    "add-task": cmd_add_task,
    "add-tasks": cmd_add_tasks,
    "joint": cmd_add_tasks,
    "tasks": cmd_tasks,
    "show": cmd_show,
    "predict": cmd_predict,
    "route-stats": cmd_route_stats,
    "remove": cmd_remove,
    "export": cmd_export,
    "import": cmd_import,
    "compare": cmd_compare,
    "gates": cmd_gates,
    "serve": cmd_serve,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Every taps_cl error, bad input and OS error (no permission, no space,
    missing file) is one line on stderr and exit 2; Ctrl-C is one line and exit 130."""
    try:
        args = build_parser().parse_args(argv)
        _configure_logging(getattr(args, "quiet", False))
        return int(COMMANDS[args.command](args) or 0)
    except (TAPSError, OSError, ValueError, TypeError, KeyError) as err:
        if isinstance(err, BrokenPipeError):  # e.g. `taps-cl gates | head`
            sys.stderr.close()
            return 0
        return _fail(err)
    except KeyboardInterrupt:
        print("taps-cl: interrupted; nothing was committed for an unfinished task", file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
