"""The demo: the real ImageNet-pretrained EfficientNet-Lite0, three real offline tasks added one
after another into an embedded SQLite store, a table, then a reload check in a fresh engine.

Sizes are chosen to finish well under 10 minutes on 2 CPU cores: 64x64 inputs, Fashion-MNIST
capped at 2,000 train / 1,000 test images, all of digits (1,347 / 450) and LFW faces (150 / 50).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from taps_cl.cli.tables import fmt_bytes, fmt_pct, table
from taps_cl.config import DEFAULT_BASE, TrainConfig
from taps_cl.engine import Engine
from taps_cl.scenarios import get_task

log = logging.getLogger(__name__)

DEMO_TASKS = {
    # task -> (suite kwargs, epochs)
    # Fashion-MNIST: Debian's files, else torchvision's under $TAPS_CL_DATA, else a download
    "fashion_mnist": ({"max_train": 2000, "max_test": 1000, "download": True}, 3),
    "digits": ({}, 3),
    "lfw_faces": ({}, 6),
}


@dataclass
class DemoResult:
    records: list
    unchanged: dict[str, bool]
    seconds: float
    store: str


def run_demo(
    store: str | Path = "taps_cl_demo.db",
    *,
    image_size: int = 64,
    scale: float = 1.0,
    base: str = DEFAULT_BASE,
    fresh: bool = True,
    quiet: bool = False,
    tracking: str | None = None,
) -> DemoResult:
    """Run the demo; ``scale`` shrinks data caps and epochs (tests use a small scale). Progress
    goes to the ``taps_cl`` logger, the result table to stdout."""
    start = time.perf_counter()
    url = _store_url(store, fresh)
    engine = Engine(base, store=url, tracking=tracking, experiment="taps_cl_demo")
    log.info(
        f"base: {engine.base.name} ({engine.base.num_parameters:,} parameters, "
        f"{engine.base.source})"
    )
    log.info(
        f"store: {engine.store.url}   input: {image_size}x{image_size}   device: {engine.device}"
    )
    records, expected, tests = [], {}, {}
    for name, (caps, epochs) in DEMO_TASKS.items():
        spec = _scaled_task(name, caps, scale)
        train = TrainConfig(epochs=max(1, round(epochs * scale)), image_size=image_size)
        log.info(
            f"adding task {name}: {len(spec.train)} train / {len(spec.test)} test images, "
            f"{spec.num_classes} classes, {train.epochs} epoch(s)"
        )
        rec = engine.add_task(
            spec.train,
            name=name,
            eval_dataset=spec.test,
            class_names=spec.class_names,
            train=train,
            quiet=quiet,
        )
        records.append(rec)
        tests[name] = spec.test.images
        expected[name] = engine.predict(name, tests[name], logits=True)
    print(f"\n{task_table(records, engine.base.num_parameters)}\n")
    fresh_engine = Engine(base, store=url)
    unchanged = {
        name: torch.equal(fresh_engine.predict(name, tests[name], logits=True), logits)
        for name, logits in expected.items()
    }
    for name, ok in unchanged.items():
        status = "unchanged" if ok else "CHANGED"
        (log.info if ok else log.warning)(
            f"reloaded {name!r} from the store in a fresh engine: predictions {status}"
        )
    seconds = time.perf_counter() - start
    log.info(f"demo finished in {seconds:.0f} s; inspect with: taps-cl tasks --store {url}")
    return DemoResult(records, unchanged, seconds, url)


def task_table(records: list, base_parameters: int) -> str:
    rows = [
        (
            r.name,
            f"v{r.version}",
            fmt_pct(r.accuracy),
            r.layers_adapted,
            f"{r.task_parameters:,}",
            fmt_pct(r.parameter_share),
            fmt_bytes(r.patch_bytes),
            fmt_bytes(r.route_bytes),
            fmt_bytes(r.nbytes),
            f"{r.train_seconds:.0f} s",
        )
        for r in records
    ]
    headers = ["task", "version", "accuracy", "layers adapted", "task params", "% of base",
               "patch", "routing stats", "stored", "train time"]  # fmt: skip
    return table(headers, rows)


def _scaled_task(name: str, caps: dict, scale: float):
    if scale >= 1.0:
        return get_task(name, **caps)
    extra = {k: v for k, v in caps.items() if k == "download"}
    spec = get_task(name, **extra)
    n_train = max(spec.num_classes * 4, int(len(spec.train) * scale))
    n_test = max(spec.num_classes * 2, int(len(spec.test) * scale))
    if caps:
        n_train = min(n_train, int(caps["max_train"] * scale) or n_train)
        n_test = min(n_test, int(caps["max_test"] * scale) or n_test)
    return get_task(name, max_train=n_train, max_test=n_test, **extra)


def _store_url(store: str | Path, fresh: bool) -> str:
    text = str(store)
    if "://" in text:
        return text
    path = Path(text).resolve()
    if fresh:
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
    return f"sqlite:///{path}"
