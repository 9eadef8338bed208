"""Bytes as an axis (issue 20): TAPS configurations and their reference points measured with
what a task stores *all in* (patch + routing statistics), shared by ``defaults.py`` (which
derives the default size from them) and ``transfer.py`` (the transfer table).

Every TAPS row trains through the library's own loop (:func:`taps_cl.training.fit_task`) and
reports the accuracy of the stored form. A task's routing statistics are computed after
training from its data; their size depends only on the number of classes and the feature width
(:func:`taps_cl.taps.budget.route_reserve`, exact to 64 bytes, see ``tests/test_sizes.py``), so
the rows add that instead of running the statistics pass.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from benchmarks.harness import RowCache
from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.taps.budget import route_reserve
from taps_cl.taps.model import TAPSModel
from taps_cl.training.baselines import fit_baseline
from taps_cl.training.loop import fit_task

MiB = 1024 * 1024
# label -> (TAPSConfig fields, TrainConfig.lr or None for the rule): the candidates
CANDIDATES: dict[str, tuple[dict[str, Any], float | None]] = {
    "paper": ({"size": None}, None),  # the previous default: dense float32, penalty selection
    "compact": ({}, None),  # size "compact" (1 MiB all in), low-rank int8, lr by rank (3e-3)
    "compact@lr1e-3": ({}, 1e-3),  # the rank-dependent lr, checked
    "compact-penalty": ({"size": None, "delta_rank": 32, "delta_dtype": "int8"}, None),
    "small": ({"size": "small"}, None),  # 512 KiB
    "large": ({"size": "large"}, None),  # 4 MiB
}


HELD_OUT = ("paper", "compact", "compact-penalty")  # candidates re-run on the held-out task


def taps_row(base, data, label: str, train: TrainConfig, cache: RowCache) -> dict:
    """One TAPS task of candidate ``label`` trained and finalised; bytes all in."""
    fields, lr = CANDIDATES[label]
    spec, train_ds, test_ds = data
    taps = TAPSConfig(**fields)
    train = TrainConfig.from_dict({**train.to_dict(), "lr": lr})
    key = f"taps/{spec.name}/{taps.to_json()}/{train.to_json()}/{len(train_ds)}"

    def make() -> dict:
        model = TAPSModel(copy.deepcopy(base.module), taps)
        model.add_task("t", spec.num_classes, seed=0)
        start = time.perf_counter()
        fit = fit_task(model, "t", train_ds, test_ds, train, quiet=True)
        patch = model.finalize_task("t")
        seconds = time.perf_counter() - start
        stats = route_reserve(spec.num_classes, model.heads.export_task("t")["weight"].shape[1])
        return {
            "accuracy": fit.accuracy,
            "patch_bytes": patch.nbytes,
            "route_bytes": stats,
            "bytes": patch.nbytes + stats,
            "share": patch.num_parameters / base.num_parameters,
            "layers": f"{len(patch.active_layers)}/{patch.num_layers}",
            "lr": train.lr_for(taps.rank),
            "seconds": seconds,
        }

    return {"task": spec.name, "method": label, **cache.get(key, make)}


def baseline_row(base, data, mode: str, train: TrainConfig, cache: RowCache, rank: int = 0) -> dict:
    """Full fine-tuning (``mode="finetune"``), the linear probe or a PEFT LoRA adapter of
    ``rank`` (``mode="lora"``) on one task; bytes as each would store them."""
    spec, train_ds, test_ds = data
    key = f"{mode}{rank or ''}/{spec.name}/{train.to_json()}/{len(train_ds)}"

    def make() -> dict:
        if mode == "lora":
            from benchmarks._compact import fit_lora

            r = fit_lora(base.module, spec.num_classes, train_ds, test_ds, train, rank)
            acc, nbytes, seconds = r["accuracy"], r["bytes"], r["seconds"]
        else:
            res = fit_baseline(base.module, spec.num_classes, train_ds, test_ds, train, mode=mode)
            acc, nbytes, seconds = res.accuracy, res.nbytes, res.seconds
        lr = train.lr_for(None)
        return {"accuracy": acc, "bytes": nbytes, "lr": lr, "seconds": seconds}

    label = f"lora@r{rank}" if mode == "lora" else mode
    return {"task": spec.name, "method": label, **cache.get(key, make)}


def means(rows: list[dict]) -> dict[str, dict]:
    """Method -> mean accuracy, bytes and seconds over its rows."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        out[method] = {
            k: sum(r[k] for r in mine) / len(mine) for k in ("accuracy", "bytes", "seconds")
        }
    return out


def front(summary: dict[str, dict]) -> list[str]:
    """The methods no other beats on both accuracy and bytes (the accuracy-per-byte front)."""
    return [
        m
        for m, s in summary.items()
        if not any(
            o["accuracy"] >= s["accuracy"] and o["bytes"] < s["bytes"]
            for n, o in summary.items()
            if n != m
        )
    ]
