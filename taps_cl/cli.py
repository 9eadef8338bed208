"""`taps-cl`: a thin command line over the library.

Bad input exits with code 2 and a one-line message (no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from taps_cl.cli_options import add_training_options, joint_config, taps_config, train_config
from taps_cl.config import DEFAULT_BASE, environment
from taps_cl.errors import TAPSError
from taps_cl.report import fmt_bytes, fmt_pct, table

# Commands that only read the store: they never create one, and open it read-only when
# SQLite could not write beside the file (a read-only file or directory).
READ_COMMANDS = frozenset({"tasks", "show", "predict", "export", "gates", "route-stats"})


def _store(args: argparse.Namespace):
    from taps_cl.storage import TaskStore

    if args.command in READ_COMMANDS:
        return TaskStore(args.store, create=False, readonly=None)
    return TaskStore(args.store)


def _engine(args: argparse.Namespace, **kw):
    from taps_cl.engine import Engine

    return Engine(
        args.base,
        store=_store(args),
        tracking=getattr(args, "tracking", None) or environment().tracking,
        device=args.device,
        **kw,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from taps_cl.demo import run_demo

    result = run_demo(
        args.store or "taps_cl_demo.db",
        image_size=args.image_size,
        scale=args.scale,
        base=args.base or DEFAULT_BASE,
        fresh=not args.keep,
        quiet=args.quiet,
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
    from taps_cl.demo import task_table

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
        from taps_cl.demo import task_table

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
        for r in store.list_tasks()
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
    rows = [
        (
            f"v{v.version}",
            fmt_pct(v.metrics.get("accuracy")),
            f"{len(v.active_layers)}/{v.num_layers}",
            f"{v.num_parameters:,}",
            fmt_bytes(v.nbytes),
            fmt_bytes(v.added_bytes),
            v.created_at.strftime("%Y-%m-%d %H:%M") if v.created_at else "-",
        )
        for v in versions
    ]
    print(f"task {args.name!r}: {versions[-1].num_classes} classes")
    headers = ["version", "accuracy", "layers", "params", "bytes", "new bytes", "created"]
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
        for i, path in enumerate(files):
            label = routed.class_names[i] or str(int(routed.labels[i]))
            print(f"{path}\t{routed.tasks[i]}\t{label}\t{float(routed.confidence[i]):.3f}")
        return 0
    logits = engine.predict(name, files, logits=True, version=args.version)
    names = engine.class_names(name, args.version)
    for path, row in zip(files, logits, strict=True):
        k = int(row.argmax())
        label = names[k] if names else str(k)
        prob = float(row.softmax(0)[k])
        print(f"{path}\t{label}\t{prob:.3f}")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", help="SQLAlchemy URL or SQLite path (default: $TAPS_CL_STORE)")
    common.add_argument("--base", help="base model (default: $TAPS_CL_BASE or efficientnet_lite0)")
    common.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    p = argparse.ArgumentParser(prog="taps-cl", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    _add = sub.add_parser

    def add_parser(name: str, **kw: str) -> argparse.ArgumentParser:
        return _add(name, parents=[common], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    s = sub.add_parser("demo", help="three real tasks on the real base, then a reload check")
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--scale", type=float, default=1.0, help="shrink data and epochs (<1)")
    s.add_argument("--keep", action="store_true", help="keep an existing demo store")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("add-task", help="train a task and commit it as a new version")
    s.add_argument("name")
    s.add_argument("--data", required=True, help="builtin task name or ImageFolder path")
    s.add_argument("--eval-data", help="builtin or ImageFolder path for evaluation")
    add_training_options(s)
    s.add_argument("--max-train", type=int, default=None)
    s.add_argument("--max-test", type=int, default=None)
    s.add_argument("--tracking", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    s.set_defaults(func=cmd_add_task)

    for name, joint in (("add-tasks", False), ("joint", True)):
        s = sub.add_parser(
            name,
            help="train several tasks (jointly with --joint; `joint` = add-tasks --joint); "
            "run under torchrun for DDP",
        )
        s.add_argument(
            "--data",
            action="append",
            required=True,
            help="builtin task name or ImageFolder path; repeat per task",
        )
        s.add_argument(
            "--joint",
            action="store_true",
            default=joint,
            help="train all tasks together and commit them in one transaction",
        )
        s.add_argument(
            "--train-base",
            action="store_true",
            help="also train the shared base weights into a new stored base",
        )
        add_training_options(s, joint=True)
        s.add_argument("--ratio", action="append", help="TASK=FACTOR: that task's batch share")
        s.add_argument("--max-train", type=int, default=None)
        s.add_argument("--max-test", type=int, default=None)
        s.add_argument("--tracking", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
        s.set_defaults(func=cmd_add_tasks)

    sub.add_parser("tasks", help="list tasks in the store").set_defaults(func=cmd_tasks)
    s = sub.add_parser("show", help="versions and gates of one task")
    s.add_argument("name")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("predict", help="classify image files with a task, or route them")
    s.add_argument("files", nargs="+", help="image files ([NAME] FILES... also works)")
    s.add_argument("--task", help="task to use (default: route each file to a task)")
    s.add_argument("--version", type=_version, help="with --task")
    s.add_argument("--tasks", help="when routing: comma-separated candidate tasks")
    s.add_argument("--method", help="when routing: lda (default), ncm, combined, energy")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("route-stats", help="make a stored task routable from its train data")
    s.add_argument("name")
    s.add_argument("--data", required=True, help="builtin task name or ImageFolder path")
    s.add_argument("--version", type=_version)
    s.add_argument("--replace", action="store_true", help="replace existing statistics")
    s.add_argument("--max-train", type=int, default=None)
    s.set_defaults(func=cmd_route_stats, max_test=None)

    s = sub.add_parser("remove", help="delete a task (or one version)")
    s.add_argument("name")
    s.add_argument("--version", type=_version)
    s.set_defaults(func=cmd_remove)

    s = sub.add_parser("export", help="write a task version to one .safetensors file")
    s.add_argument("name")
    s.add_argument("path")
    s.add_argument("--version", type=_version)
    s.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="if PATH is a symlink, replace the file it points to (default: refuse)",
    )
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("import", help="import a task file into the store")
    s.add_argument("path")
    s.add_argument("--allow-new-base", action="store_true")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("compare", help="compare strategies logged to an MLflow experiment")
    s.add_argument("--experiment", required=True)
    s.add_argument("--out", default="compare_out")
    s.add_argument("--tracking", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("gates", help="tasks x layers gate heatmap of the store")
    s.add_argument("--out", default="gates.png")
    s.set_defaults(func=cmd_gates)
    return p


def _version(text: str) -> int:
    """``--version N``: a version number >= 1 (0 must not mean "current")."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"version must be an integer >= 1, got {text!r}")
    return int(text)


def _fail(err: BaseException) -> int:
    text = str(err).strip()
    message = text.splitlines()[0] if text else type(err).__name__
    print(f"taps-cl: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Every taps_cl error, bad input and OS error (no permission, no space,
    missing file) is one line on stderr and exit 2; Ctrl-C is one line and exit 130."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except (TAPSError, OSError, ValueError, TypeError, KeyError) as err:
        if isinstance(err, BrokenPipeError):  # e.g. `taps-cl gates | head`
            sys.stderr.close()
            return 0
        return _fail(err)
    except KeyboardInterrupt:
        print("taps-cl: interrupted; nothing was committed for an unfinished task", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
