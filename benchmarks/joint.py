"""Joint vs incremental TAPS on the offline suite, and joint throughput on 1 vs 2 CPU processes.

Part 1 trains the offline suite (Fashion-MNIST, digits, LFW faces; capped) on the real
``efficientnet_lite0`` base three ways, each into a fresh store: incremental (``add_task`` per
task), joint with the base frozen, joint with the base trained (a new stored base). Per mode:
test accuracy and adapted layers per task, patch bytes, total bytes in the store, wall time.

Part 2 runs the same joint step (3 tasks, same global batch) under ``torchrun`` with 1 and 2
processes (gloo, CPU) and reports images/s of the last epoch, so start-up is not counted. The
hardware budget is fixed: 1 process x 2 threads vs 2 processes x 1 thread (and 1 x 1 for scale).

Part 0 (``--split-only`` runs just this) is the same-budget check of joint against incremental:
the 1,797 digits split into two tasks (classes 0-4 and 5-9) at 32 px, 3 epochs, trained one
after another and then together, with the same seed and configs. Both go through the same loop
(:func:`taps_cl.training.fit_tasks`); tasks share no trainable parameter and each task clips its own
gradient, so only the data order of tasks of different lengths can differ.

Run: ``python benchmarks/joint.py [--max-train 400 --size 48 --epochs 2]`` (a few minutes on 2
cores). Prints tables and writes ``benchmarks/results/joint.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an install

from benchmarks.harness import RESULTS, ROOT, parser, print_table, save, write_json


def _engine(store: str, args: argparse.Namespace):
    from taps_cl.config import TAPSConfig, TrainConfig
    from taps_cl.engine import Engine

    train = TrainConfig(
        epochs=args.epochs, batch_size=args.batch, image_size=args.size, lr=args.lr, device="cpu"
    )
    return Engine("efficientnet_lite0", store=store, train=train, config=TAPSConfig(lam=args.lam))


def run_mode(mode: str, suite: list, args: argparse.Namespace, tmp: Path) -> dict:
    engine = _engine(f"sqlite:///{tmp / f'{mode}.db'}", args)
    train = {t.name: t.train for t in suite}
    test = {t.name: t.test for t in suite}
    start = time.perf_counter()
    if mode == "incremental":
        recs = [
            engine.add_task(t.train, name=t.name, eval_dataset=t.test, quiet=True) for t in suite
        ]
    else:
        recs = engine.add_tasks(
            train, eval_datasets=test, train_base=(mode == "joint+base"), quiet=True
        )
    wall = time.perf_counter() - start
    stats = engine.store.stats()
    return {
        "mode": mode,
        "wall_seconds": wall,
        "store_blob_bytes": stats.blob_bytes,
        "patch_bytes": sum(r.nbytes for r in recs),
        "tasks": {
            r.name: {
                "accuracy": r.accuracy,
                "active_layers": len(r.active_layers),
                "num_layers": r.num_layers,
                "patch_bytes": r.nbytes,
            }
            for r in recs
        },
    }


def digits_split(args: argparse.Namespace, tmp: Path) -> dict:
    """Joint vs incremental on digits split in two tasks, at the same epochs and seed."""
    from taps_cl.config import TAPSConfig, TrainConfig
    from taps_cl.engine import Engine
    from taps_cl.scenarios import get_task

    spec = get_task("digits")
    tasks, evals = {}, {}
    for name, classes in (("digits_lo", range(0, 5)), ("digits_hi", range(5, 10))):
        parts = []
        for ds in (spec.train, spec.test):
            x, y = ds.tensors
            keep = torch.isin(y, torch.tensor(list(classes)))
            parts.append((x[keep], y[keep] - classes.start))
        tasks[name], evals[name] = parts
    train = TrainConfig(epochs=3, batch_size=32, image_size=32, device="cpu")
    out = {}
    for mode in ("incremental", "joint"):
        engine = Engine(
            "efficientnet_lite0",
            store=f"sqlite:///{tmp / f'split_{mode}.db'}",
            train=train,
            config=TAPSConfig(),
        )
        start = time.perf_counter()
        recs = engine.add_tasks(tasks, eval_datasets=evals, joint=mode == "joint", quiet=True)
        out[mode] = {
            "accuracy": {r.name: r.accuracy for r in recs},
            "mean_accuracy": sum(r.accuracy for r in recs) / len(recs),
            "wall_seconds": time.perf_counter() - start,
        }
    out["settings"] = {"image_size": 32, "epochs": 3, "batch_size": 32, "tasks": list(tasks)}
    out["joint_minus_incremental"] = (
        out["joint"]["mean_accuracy"] - out["incremental"]["mean_accuracy"]
    )
    return out


def worker(args: argparse.Namespace) -> None:
    """One rank of the throughput run (started by torchrun)."""
    from torch.utils.data import TensorDataset

    from taps_cl.bases import load_base
    from taps_cl.config import TAPSConfig, TrainConfig
    from taps_cl.joint import JointConfig, distributed_session, fit_joint
    from taps_cl.taps.model import TAPSModel

    torch.set_num_threads(args.threads)
    with distributed_session() as (rank, world):
        model = TAPSModel(load_base("efficientnet_lite0").module, TAPSConfig())
        g = torch.Generator().manual_seed(0)
        tasks = {}
        for i, classes in enumerate((10, 10, 2)):
            model.add_task(f"t{i}", classes)
            n = args.batch * args.steps
            x = torch.randn(n, 3, args.size, args.size, generator=g)
            tasks[f"t{i}"] = TensorDataset(x, torch.randint(0, classes, (n,), generator=g))
        train = TrainConfig(epochs=2, batch_size=args.batch, device="cpu")
        res = fit_joint(model, tasks, train, joint=JointConfig(epoch_length=args.steps), quiet=True)
    if rank == 0:
        last = res.history[-1]
        out = {"processes": world, "threads": args.threads, "global_batch_per_step": 3 * args.batch}
        out["images_per_second"] = last["examples"] / last["seconds"]
        write_json(args.worker_out, out)


def throughput(args: argparse.Namespace, tmp: Path) -> list[dict]:
    results = []
    for procs, threads in ((1, 1), (1, 2), (2, 1)):
        out = tmp / f"tp_{procs}_{threads}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", str(procs), __file__, "--worker", "--threads", str(threads)]
        cmd += ["--size", str(args.size), "--batch", str(args.tp_batch)]
        cmd += ["--steps", str(args.tp_steps), "--worker-out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        results.append(json.loads(out.read_text()))
    return results


def _print(modes: list[dict], tput: list[dict]) -> None:
    from taps_cl.cli.tables import fmt_bytes, fmt_pct

    rows = []
    for m in modes:
        for name, t in m["tasks"].items():
            layers = f"{t['active_layers']}/{t['num_layers']}"
            rows.append(
                (m["mode"], name, fmt_pct(t["accuracy"]), layers, fmt_bytes(t["patch_bytes"]))
            )
        rows.append((m["mode"], "ALL", "", "", fmt_bytes(m["patch_bytes"])))
    print_table(["mode", "task", "accuracy", "layers", "patch bytes"], rows)
    rows = [
        (m["mode"], f"{m['wall_seconds']:.0f} s", fmt_bytes(m["store_blob_bytes"])) for m in modes
    ]
    print_table(["mode", "wall time", "store bytes (all blobs)"], rows)
    rows = [(t["processes"], t["threads"], f"{t['images_per_second']:.1f}") for t in tput]
    print_table(["processes", "threads each", "images/s"], rows)


def _print_split(split: dict) -> None:
    from taps_cl.cli.tables import fmt_pct

    names = split["settings"]["tasks"]
    rows = [
        (m, *(fmt_pct(split[m]["accuracy"][n]) for n in names), fmt_pct(split[m]["mean_accuracy"]))
        for m in ("incremental", "joint")
    ]
    print_table(["digits split, 32 px, 3 epochs", *names, "mean"], rows)
    print(f"joint - incremental (mean): {100 * split['joint_minus_incremental']:+.2f} points")


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, out=RESULTS / "joint.json")
    p.add_argument("--max-train", type=int, default=400)
    p.add_argument("--max-test", type=int, default=200)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tp-batch", type=int, default=16, help="per task and step (throughput)")
    p.add_argument("--tp-steps", type=int, default=6, help="steps per epoch (throughput)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--split-only", action="store_true", help="only the digits-split check")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(args.threads)
    from taps_cl.scenarios import offline_suite

    modes = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        split = digits_split(args, tmp)
        _print_split(split)
        if args.split_only:
            save(args, {"digits_split": split}, merge=True)
            return
        if not args.skip_accuracy:
            suite = offline_suite(max_train=args.max_train, max_test=args.max_test)
            modes = [run_mode(m, suite, args, tmp) for m in ("incremental", "joint", "joint+base")]
        tput = throughput(args, tmp)
    by = {(t["processes"], t["threads"]): t["images_per_second"] for t in tput}
    result = {
        "digits_split": split,
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
        "modes": modes,
        "throughput": tput,
        "ratio_2proc_over_1proc_same_cores": by[(2, 1)] / by[(1, 2)],
        "ratio_2proc_over_1proc_1thread": by[(2, 1)] / by[(1, 1)],
    }
    _print(modes, tput)
    print(f"2 processes / 1 process (2 threads): {result['ratio_2proc_over_1proc_same_cores']:.2f}")
    print(f"2 processes / 1 process (1 thread):  {result['ratio_2proc_over_1proc_1thread']:.2f}")
    save(args, result)


if __name__ == "__main__":
    main()
