"""Serving costs on the real base (EfficientNet-Lite0, offline weights) and real images.

Measured in one run, interleaved where two sides are compared, medians reported:
- cold load of a stored task (first predict on a fresh engine, minus its forward) and the store
  read alone (target: load <= read + 25 ms)
- warm switch between two loaded tasks, predict latency for 1 and 32 images, and the ratio
  predict / (merged forward + preprocessing) (target <= 1.05)
- throughput (images/s) with 1, 2 and 4 threads predicting 2 tasks (target: never below 1)

Two tasks are trained quickly (1 epoch at 32 px on sklearn digits). The machine is shared, so
the load average is recorded beside the numbers.
Run: ``python benchmarks/serving.py [--repeats 30 --threads 2]``.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an install

from benchmarks.harness import (
    RESULTS,
    interleaved_medians,
    median_seconds,
    parser,
    print_table,
    save,
    timed,
)
from taps_cl.config import TrainConfig
from taps_cl.data import preprocess
from taps_cl.engine import Engine
from taps_cl.scenarios import get_task

NAMES = ("digits_a", "digits_b")


def _train(store: str, size: int) -> tuple[Engine, torch.Tensor]:
    engine = Engine("efficientnet_lite0", store=store, device="cpu")
    spec = get_task("digits", max_train=200)
    train = TrainConfig(epochs=1, batch_size=32, image_size=size, device="cpu")
    data = (spec.train.images, spec.train.targets)
    for i, name in enumerate(NAMES):
        cfg = TrainConfig.from_dict({**train.to_dict(), "seed": i})
        engine.add_task(data, name=name, train=cfg, quiet=True)
    return engine, spec.test.images[:32]


def _cold(store: str, x: torch.Tensor, repeats: int) -> dict:
    """First predict on fresh engines minus a warm predict; and the store read alone."""
    loads, reads = [], []
    for _ in range(repeats):
        engine = Engine("efficientnet_lite0", store=store, device="cpu")
        engine.server.model  # noqa: B018 - the loader model is built once per engine, not per load
        engine.server.current_version(NAMES[0])
        _, first = timed(lambda e=engine: e.predict(NAMES[0], x[:1]))
        warm = median_seconds(lambda e=engine: e.predict(NAMES[0], x[:1]), 3)
        loads.append(first - warm)
        reads.append(timed(lambda e=engine: e.store.load(NAMES[0], base=e.fingerprint))[1])
    load, read = 1e3 * statistics.median(loads), 1e3 * statistics.median(reads)
    return {"load_ms": load, "store_read_ms": read, "load_beyond_read_ms": load - read}


def _latency(engine: Engine, x: torch.Tensor, repeats: int) -> dict:
    prep = engine.base.preprocessing
    out = {}
    for n in (1, 32):
        xs = x[:n]
        merged = engine.server.served(NAMES[0]).module
        size = engine.image_size(NAMES[0])

        def plain(xs=xs, merged=merged, size=size) -> None:
            with torch.no_grad():
                merged(preprocess(xs, prep, size))

        fns = {"predict": lambda xs=xs: engine.predict(NAMES[0], xs), "plain": plain}
        t = {k: 1e3 * v for k, v in interleaved_medians(fns, repeats).items()}
        out[n] = {
            "predict_ms": t["predict"],
            "merged_forward_plus_preprocess_ms": t["plain"],
            "ratio": t["predict"] / t["plain"],
        }

    def both() -> None:
        for name in NAMES:
            engine.predict(name, x[:1])

    switch = 1e3 * median_seconds(both, repeats) / 2
    return {"latency": out, "warm_switch_predict_1_ms": switch}


def _throughput(engine: Engine, x: torch.Tensor, seconds: float) -> dict:
    out = {}
    for threads in (1, 2, 4):
        counts = [0] * threads
        stop = time.perf_counter() + seconds

        def work(i: int, counts=counts, stop=stop) -> None:
            k = 0
            while time.perf_counter() < stop:
                engine.predict(NAMES[(i + k) % 2], x)
                counts[i] += len(x)
                k += 1

        pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        out[threads] = sum(counts) / seconds
    return {"images_per_s": out, "vs_one_thread": {k: v / out[1] for k, v in out.items()}}


def summary_rows(r: dict) -> list[tuple[str, str]]:
    cold, lat, tput = r["cold"], r["latency"], r["throughput_32"]["images_per_s"]
    rows = [
        ("cold load / store read", f"{cold['load_ms']:.1f} / {cold['store_read_ms']:.1f} ms"),
        ("warm switch (predict 1 image)", f"{r['warm_switch_predict_1_ms']:.1f} ms"),
    ]
    for n, v in lat.items():
        rows.append((f"predict {n} / merged forward + preprocess",
                     f"{v['predict_ms']:.1f} / {v['merged_forward_plus_preprocess_ms']:.1f} ms "
                     f"= {v['ratio']:.3f}"))  # fmt: skip
    rows += [(f"images/s, {k} thread(s)", f"{v:.0f}") for k, v in tput.items()]
    return rows


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, out=RESULTS / "serving.json")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{Path(tmp) / 'tasks.db'}"
        engine, x = _train(store, args.size)
        load_before = os.getloadavg()
        result = {
            "cold": _cold(store, x, max(5, args.repeats // 3)),
            **_latency(engine, x, args.repeats),
            "throughput_32": _throughput(engine, x, args.seconds),
        }
        patch = engine.load_patch(NAMES[0])
    result["patch"] = {"active_layers": len(patch.active_layers), "bytes": patch.nbytes}
    result["settings"] = {**vars(args), "cpus": os.cpu_count(), "torch": torch.__version__}
    result["loadavg_before_after"] = [load_before, os.getloadavg()]
    print_table(["measure", "value"], summary_rows(result))
    print(f"wrote {save(args, result)}")


if __name__ == "__main__":
    main()
