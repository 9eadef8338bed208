"""Scale: one EfficientNet-Lite0 base carrying 10, 100 and 1,000 stored tasks (SQLite, PostgreSQL).

Two real compact tasks are trained quickly (digits and Fashion-MNIST at 32 px, 1 epoch, the release
default ``TAPSConfig()``, ``size="compact"``: about 1 MiB per task all in); the rest are perturbed
copies of the first (``benchmarks/_synthetic.py``: jittered tensors, route statistics of other
classes) imported through the public path (``Engine.import_task`` of patch files). The store grows
10 -> 100 -> 1,000 and at each size we measure: store bytes against N x bytes per task, ``tasks()``
and ``versions()``, cold load p50/p99, warm predict, router build and adding one task to it, routed
batches of 64 (end to end from 1 and 2 real tasks; in parts for 8 and 32 tasks), resident memory of
a fresh server with ``max_loaded=16`` and task identification of the real tasks among all.

PostgreSQL runs on a throwaway cluster (``tests/_pg.py``) when its binaries are installed.

    python benchmarks/scale.py [--fast] [--sizes 10 100 1000] [--no-pg]

Prints a table, writes ``benchmarks/results/scale.json`` and a plot ``scale.png`` beside it.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an install

from safetensors.torch import load_file, save_file

from benchmarks import _scale_measure as m
from benchmarks._synthetic import perturbed
from benchmarks.harness import RESULTS, parser, print_table, save, timed
from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.data import preprocess
from taps_cl.routing import RouteStats
from taps_cl.scenarios import get_task
from taps_cl.taps.patch import TaskPatch

REAL = ("digits", "fashion_mnist")
CONFIG = TAPSConfig()  # the release default: what a user's add_task() stores


def train_real(url: str, size: int, max_train: int) -> dict:
    """Train the real tasks into ``url``; name -> its test (x, y)."""
    engine = m.open_engine(url)
    tests = {}
    for i, name in enumerate(REAL):
        spec = get_task(name, max_train=max_train, max_test=128)
        train = TrainConfig(epochs=1, batch_size=32, image_size=size, device="cpu", seed=i)
        data = (spec.train.images, spec.train.targets)
        engine.add_task(data, name=name, config=CONFIG, train=train, quiet=True)
        tests[name] = (_resized(spec.test.images, size), spec.test.targets)
    return tests


def _resized(x: torch.Tensor, size: int) -> torch.Tensor:
    """Raw test images at one common side, so that batches can mix the real tasks."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear")


def write_copies(real: TaskPatch, count: int, folder: Path) -> list[Path]:
    """``count`` perturbed copies of ``real`` as patch files."""
    folder.mkdir(parents=True, exist_ok=True)
    return [
        perturbed(real, f"syn{i:04d}", seed=i).save(folder / f"syn{i:04d}.safetensors")
        for i in range(count)
    ]


def grow(url: str, files: list[Path]) -> float:
    """Import ``files`` through ``Engine.import_task``; median seconds per import."""
    engine = m.open_engine(url)
    times = sorted(timed(lambda f=f: engine.import_task(f))[1] for f in files)
    return times[len(times) // 2] if times else 0.0


def measure(url: str, n: int, tests: dict, images: Path) -> dict:
    """What is measured once per store: bytes, cold loads, router costs, parts of routed
    batches over 8 and 32 tasks, task identification and a fresh server's memory."""
    engine = m.open_engine(url)
    names = [r.name for r in engine.tasks()]
    if len(names) != n:
        raise RuntimeError(f"expected {n} tasks in the store, found {len(names)}")
    per_task = engine.load_patch("syn0000").nbytes
    xs = {k: v[0] for k, v in tests.items()}
    prep = engine.routing.candidates(None).preps[REAL[0]]
    z = engine.server.features(preprocess(xs[REAL[0]][:64], prep, prep.input_size))
    extra_stats = RouteStats.from_tensors(perturbed(engine.load_patch(REAL[0]), "x", 99).tensors)
    out = {"tasks": n, "bytes_per_task": per_task, "store_bytes": m.store_bytes(engine, url)}
    out["store_vs_n_x_bytes"] = out["store_bytes"] / (n * per_task)
    out.update(m.cold_loads(url, names, samples=40, seed=n))
    out.update(m.router_costs(engine, ("extra", extra_stats), z))
    for k in (8, 32):
        if n >= k:
            out.update(m.routed_components(m.open_engine(url, max_loaded=40), xs[REAL[1]], k, 5))
    out.update(m.task_id(engine, tests))
    out.update(m.rss_child(url, str(images), loads=32))
    return out


def run_backend(urls: dict[int, str], files: dict, tests: dict, args, images: Path) -> list:
    """One store per size (the real files, then copies, imported); per store what is measured
    once, then the latencies of every store interleaved (the machine's load hits all alike)."""
    rows = {}
    for n, url in urls.items():
        engine = m.open_engine(url)
        for path in files["real"]:
            engine.import_task(path)
        import_s = grow(url, files["copies"][: n - len(REAL)])
        rows[n] = {**measure(url, n, tests, images), "import_median_ms": 1e3 * import_s}
        print(f"  N={n}: " + ", ".join(f"{k}={_short(v)}" for k, v in rows[n].items()), flush=True)
    engines = {n: m.open_engine(url) for n, url in urls.items()}
    xs = {k: v[0] for k, v in tests.items()}
    for n, latency in m.latencies(engines, REAL[0], xs, args.repeats).items():
        rows[n].update(latency)
    return list(rows.values())


def _short(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def prepare(work: Path, args) -> tuple[dict, dict, Path]:
    """The real tasks' patch files and test images (trained once into ``work``, reused by
    later runs with the same ``--workdir``), the copies' files and the RSS images."""
    real_dir, tests_file = work / "real", work / "tests.safetensors"
    if not tests_file.exists():
        url = f"sqlite:///{work / 'train.db'}"
        tests = train_real(url, args.size, args.max_train)
        engine = m.open_engine(url)
        real_dir.mkdir(exist_ok=True)
        for n in REAL:
            engine.export_task(n, real_dir / f"{n}.safetensors")
        flat = {f"{n}.{i}": t.contiguous() for n, xy in tests.items() for i, t in enumerate(xy)}
        save_file(flat, str(tests_file))
    flat = load_file(str(tests_file))
    tests = {n: (flat[f"{n}.0"], flat[f"{n}.1"]) for n in REAL}
    real = [real_dir / f"{n}.safetensors" for n in REAL]
    copies = write_copies(TaskPatch.load(real[0]), max(args.sizes) - len(REAL), work / "copies")
    images = work / "images.safetensors"
    save_file({"x": torch.cat([t[0][:32] for t in tests.values()]).contiguous()}, str(images))
    return {"real": real, "copies": copies}, tests, images


# -- table, plot ----------------------------------------------------------------------------


def _parts(k: int) -> tuple[str, ...]:
    return tuple(f"route64_{k}tasks_{part}_ms" for part in ("features", "scores", "forwards"))


ROWS = [
    ("store bytes / (N x bytes per task)", "store_vs_n_x_bytes", "{:.3f}"),
    ("tasks() ms: interleaved / back to back", ("tasks_ms", "tasks_back_to_back_ms"), "{:.2f}"),
    ("versions() ms", "versions_ms", "{:.1f}"),
    ("cold load p50 / p99 ms", ("cold_load_p50_ms", "cold_load_p99_ms"), "{:.0f}"),
    ("warm predict (1 image) ms: list re-read / cached",
     ("warm_predict_1_ms", "warm_predict_cached_1_ms"), "{:.1f}"),
    ("route stats read (all tasks, bulk) ms", "route_stats_read_ms", "{:.0f}"),
    ("router build ms", "router_build_ms", "{:.0f}"),
    ("add one task: pool / ready ms",
     ("router_add_one_pool_ms", "router_add_one_ready_ms"), "{:.0f}"),
    ("add one task, every row solved / remove one ms",
     ("router_add_one_exact_ms", "router_remove_one_ready_ms"), "{:.0f}"),
    ("router MB", "router_bytes", "mb"),
    ("route 64 from 1 / 2 tasks ms", ("route64_1task_ms", "route64_2tasks_ms"), "{:.0f}"),
    ("64 over 8: features / scores / forwards ms", _parts(8), "{:.0f}"),
    ("64 over 32: features / scores / forwards ms", _parts(32), "{:.0f}"),
    ("RSS, max_loaded=16 (served 32) MB", "rss_served_mb", "{:.0f}"),
    ("task id of the real tasks", "task_id_mean", "{:.3f}"),
    ("import one file (median) ms", "import_median_ms", "{:.0f}"),
]  # fmt: skip


def _cell(row: dict, keys: str | tuple, fmt: str) -> str:
    keys = keys if isinstance(keys, tuple) else (keys,)
    if any(k not in row for k in keys):
        return "-"
    if fmt == "mb":
        return " / ".join(f"{row[k] / 1e6:.1f}" for k in keys)
    return " / ".join(fmt.format(row[k]) for k in keys)


def print_results(results: dict) -> None:
    for backend, rows in results.items():
        print(f"\n{backend}")
        headers = ["measure"] + [f"N={r['tasks']}" for r in rows]
        print_table(headers, [[label] + [_cell(r, k, f) for r in rows] for label, k, f in ROWS])


def plot(results: dict, path: Path) -> Path | None:
    """Cost against N (log-log), one line per measure and backend; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    keys = ["tasks_ms", "cold_load_p99_ms", "warm_predict_1_ms", "router_build_ms",
            "router_add_one_ready_ms", "route64_1task_ms"]  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for backend, rows in results.items():
        for key in keys:
            style = "-" if backend == "sqlite" else "--"
            ax.plot([r["tasks"] for r in rows], [r[key] for r in rows], style, marker="o",
                    label=f"{key} ({backend})")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="stored tasks N", ylabel="ms")
    ax.set_title("Cost against the number of stored tasks (EfficientNet-Lite0)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, out=RESULTS / "scale.json")
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--fast", action="store_true", help="N = 10, 50 only")
    p.add_argument("--no-pg", action="store_true", help="SQLite only")
    p.add_argument("--size", type=int, default=32, help="training image size")
    p.add_argument("--max-train", type=int, default=300)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--workdir", default=None, help="keep the trained real tasks here (reused)")
    args = p.parse_args(argv)
    if args.fast:
        args.sizes = [10, 50]
    torch.set_num_threads(args.threads)
    if sorted(args.sizes) != args.sizes or args.sizes[0] < 2 * len(REAL) + 2:
        p.error("--sizes must be increasing and at least 6")
    results, notes = {}, []
    with tempfile.TemporaryDirectory(prefix="taps_cl_scale_") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        files, tests, images = prepare(work, args)
        urls = {n: f"sqlite:///{Path(tmp) / f'tasks{n}.db'}" for n in args.sizes}
        print("sqlite", flush=True)
        results["sqlite"] = run_backend(urls, files, tests, args, images)
        cluster = None if args.no_pg else _pg_cluster(notes)
        if cluster is not None:
            try:
                print("postgresql", flush=True)
                pg = {n: cluster.new_store_url() for n in args.sizes}
                results["postgresql"] = run_backend(pg, files, tests, args, images)
            finally:
                cluster.stop()
    print_results(results)
    for note in notes:
        print(note)
    out = Path(args.out)
    figure = plot(results, out.with_suffix(".png"))
    payload = {
        "results": results,
        "notes": notes,
        "plot": None if figure is None else figure.name,
        "settings": {**vars(args), "config": CONFIG.to_dict(), "real_tasks": list(REAL)},
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "threads": torch.get_num_threads(),
        "loadavg_end": os.getloadavg(),
        "torch": torch.__version__,
    }
    print(f"wrote {save(args, payload)}")


def _pg_cluster(notes: list[str]):
    """A started throwaway PostgreSQL cluster, or None with a note saying why not."""
    from tests._pg import PgCluster, find_pg_bindir

    bindir = find_pg_bindir()
    if bindir is None:
        notes.append("PostgreSQL skipped: no initdb/pg_ctl/postgres binaries found")
        print(notes[-1])
        return None
    try:
        return PgCluster(bindir).start()
    except (RuntimeError, OSError) as err:
        notes.append(f"PostgreSQL skipped: the throwaway cluster did not start ({err})")
        print(notes[-1])
        return None


if __name__ == "__main__":
    main()
