"""Task-store latency and bytes for real EfficientNet-Lite0 patches (SQLite file store).

Builds TAPS patches on the packaged ImageNet EfficientNet-Lite0 base with small random deltas
and a fraction of gates switched off (as trained TAPS tasks look), then measures commit and
load latency, bytes per task against a full model copy, export/import, dedup savings when a
task is re-trained with most layers unchanged, and storing the whole base's weights.

    python benchmarks/store.py [--active 0.25] [--repeats 3] [--out PATH]

Prints a table and writes JSON (default ``benchmarks/results/store.json``).
"""

from __future__ import annotations

import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an install

from benchmarks.harness import RESULTS, median_seconds, parser, print_table, save, timed
from taps_cl.bases import load_base
from taps_cl.storage import TaskStore
from taps_cl.taps.model import TAPSModel
from taps_cl.taps.patch import TaskPatch


def make_task(model: TAPSModel, name: str, active: float, seed: int) -> TaskPatch:
    """Add ``name`` with N(0, 1e-3) deltas and a random ``active`` fraction of gates on."""
    g = torch.Generator().manual_seed(seed)
    model.add_task(name, 10, seed=seed)
    on = torch.rand(model.num_layers, generator=g) < active
    with torch.no_grad():
        for i, (_, layer) in enumerate(model.layers()):
            delta = layer.delta[name]
            delta.copy_(torch.randn(delta.shape, generator=g) * 1e-3)
            layer.score[name].fill_(0.5 if on[i] else 0.0)  # tau = 0.1
        for _, norm in model.norms():  # trained tasks own their norms: make them differ
            for value in norm.tasks[name].state_dict().values():
                if value.is_floating_point():
                    value.add_(torch.randn(value.shape, generator=g) * 1e-2)
    return model.finalize_task(name)


def retrained(patch: TaskPatch, changed_layers: int, seed: int) -> TaskPatch:
    """The same task re-trained: new deltas in a few layers and a new head, rest unchanged."""
    g = torch.Generator().manual_seed(seed)
    tensors = dict(patch.tensors)
    for layer in patch.active_layers[-changed_layers:]:
        key = f"delta.{layer}"
        tensors[key] = tensors[key] + torch.randn(tensors[key].shape, generator=g) * 1e-4
    for key in ("head.weight", "head.bias"):
        tensors[key] = tensors[key] + torch.randn(tensors[key].shape, generator=g) * 1e-3
    return TaskPatch(**{**patch.__dict__, "tensors": tensors, "version": None})


def _commit_and_load(store: TaskStore, patches: list[TaskPatch], full_bytes: int) -> dict:
    commits = [timed(lambda p=p: store.commit(p, metrics={"acc": 0.0}))[1] for p in patches]
    added = [v.added_bytes for p in patches for v in store.versions(p.name)]
    load = median_seconds(lambda: store.load("task0"), 5)
    loaded = store.load("task0").tensors
    if not all(torch.equal(loaded[k], v) for k, v in patches[0].tensors.items()):
        raise RuntimeError("task0 came back from the store with other tensors than committed")
    return {
        "stored_bytes_per_task": added,
        "stored_vs_full_copy": statistics.mean(added) / full_bytes,
        "commit_s": commits,
        "commit_median_s": statistics.median(commits),
        "load_median_s": load,
    }


def _export_import(store: TaskStore, tmp: Path) -> dict:
    path, t_export = timed(lambda: store.export("task0", tmp / "task0.safetensors"))
    with TaskStore(tmp / "other.db") as other:
        _, t_import = timed(lambda: other.import_file(path, allow_new_base=True))
    return {"export_s": t_export, "export_file_bytes": path.stat().st_size, "import_s": t_import}


def _retrain_and_base(store: TaskStore, patch: TaskPatch, fp: str, state: dict, name: str) -> dict:
    before = store.stats()
    _, t_retrain = timed(lambda: store.commit(retrained(patch, 2, seed=99)))
    v2 = store.versions("task0")[-1]
    after = store.stats()
    _, t_save_base = timed(lambda: store.save_base_weights(fp, state, name=name))
    _, t_load_base = timed(lambda: store.load_base_weights(fp))
    with_base = store.stats()
    return {
        "retrain_commit_s": t_retrain,
        "retrain_patch_bytes": v2.nbytes,
        "retrain_added_bytes": v2.added_bytes,
        "retrain_dedup_saved_bytes": after.dedup_saved_bytes - before.dedup_saved_bytes,
        "save_base_weights_s": t_save_base,
        "load_base_weights_s": t_load_base,
        "base_weights_added_bytes": with_base.blob_bytes - after.blob_bytes,
        "store_stats": after.__dict__,
    }


def run(active: float, repeats: int) -> dict:
    base = load_base("efficientnet_lite0")
    num_params = base.num_parameters  # before TAPS adds task parameters to the module
    full_bytes = sum(t.numel() * t.element_size() for t in base.module.state_dict().values())
    state = {k: v.clone() for k, v in base.module.state_dict().items()}
    model = TAPSModel(base.module)
    fp = model.base_fingerprint
    patches = [make_task(model, f"task{i}", active, seed=i) for i in range(repeats)]
    tmp = Path(tempfile.mkdtemp(prefix="taps_cl_bench_"))
    store = TaskStore(tmp / "tasks.db")
    store.register_base(fp, base.name, base.source, num_params)
    result = {
        "base": base.name,
        "base_parameters": num_params,
        "full_model_bytes": full_bytes,
        "gated_layers": patches[0].num_layers,
        "active_fraction_target": active,
        "active_layers_per_task": [len(p.active_layers) for p in patches],
        "patch_bytes": [p.nbytes for p in patches],
        "patch_parameters": [p.num_parameters for p in patches],
        **_commit_and_load(store, patches, full_bytes),
        **_export_import(store, tmp),
        **_retrain_and_base(store, patches[0], fp, state, base.name),
    }
    store.close()
    return {
        **result,
        "sqlite_file_bytes": sum(f.stat().st_size for f in tmp.glob("tasks.db*")),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }


def summary_rows(r: dict) -> list[tuple[str, str]]:
    mb = 1e6
    rows = [
        ("base", f"{r['base']} ({r['base_parameters'] / 1e6:.2f} M params)"),
        ("full model copy", f"{r['full_model_bytes'] / mb:.2f} MB"),
        ("active layers / task", f"{r['active_layers_per_task']} of {r['gated_layers']}"),
        ("patch bytes / task", ", ".join(f"{b / mb:.2f} MB" for b in r["patch_bytes"])),
        ("stored bytes / task", ", ".join(f"{b / mb:.2f} MB" for b in r["stored_bytes_per_task"])),
        ("stored / full copy", f"{100 * r['stored_vs_full_copy']:.1f} %"),
        ("commit latency (median)", f"{1e3 * r['commit_median_s']:.0f} ms"),
        ("load latency (median, sha-checked)", f"{1e3 * r['load_median_s']:.0f} ms"),
        ("export / import", f"{1e3 * r['export_s']:.0f} ms / {1e3 * r['import_s']:.0f} ms"),
        ("export file", f"{r['export_file_bytes'] / mb:.2f} MB"),
        ("re-train (2 layers + head changed)", f"{1e3 * r['retrain_commit_s']:.0f} ms"),
        (
            "  new version: logical / added",
            f"{r['retrain_patch_bytes'] / mb:.2f} MB / {r['retrain_added_bytes'] / mb:.3f} MB",
        ),  # fmt: skip
        ("  dedup saved", f"{r['retrain_dedup_saved_bytes'] / mb:.2f} MB"),
        (
            "save / load base weights",
            f"{1e3 * r['save_base_weights_s']:.0f} ms / "
            f"{1e3 * r['load_base_weights_s']:.0f} ms, "
            f"+{r['base_weights_added_bytes'] / mb:.2f} MB",
        ),  # fmt: skip
        ("sqlite file", f"{r['sqlite_file_bytes'] / mb:.2f} MB"),
    ]
    return rows


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, out=RESULTS / "store.json")
    p.add_argument("--active", type=float, default=0.25, help="fraction of gates left on")
    p.add_argument("--repeats", type=int, default=3, help="tasks committed (commit timing)")
    args = p.parse_args(argv)
    if not 0 < args.active <= 1 or args.repeats < 1:
        p.error("--active must be in (0, 1] and --repeats >= 1")
    result = run(args.active, args.repeats)
    print_table(["measure", "value"], summary_rows(result))
    print(f"\nwrote {save(args, result)}")


if __name__ == "__main__":
    main()
