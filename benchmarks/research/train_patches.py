"""Train one TAPS patch per experience (ridge scale-1 init + ridge refit, 3 epochs, 32 px) and run
EVERY patch on EVERY train and test image: the cross-task runs that shortlist re-scoring needs.

    PYTHONPATH=. python benchmarks/research/train_patches.py --stream fmnist5
Reads the cached images of /work/wt-route/benchmarks/research/feats_<stream>_32.pt. Writes
benchmarks/research/patches_<stream>/exp<j>.pt (TaskPatch files) and benchmarks/research/cross_<stream>.pt: a dict with
``train``/``test`` lists (one per patch) of ``{"h": penultimate [N, d] fp32, "logits": [N, C_p]}``
over the concatenation of all experiences' images, plus labels, experience index and timings.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from taps_cl.bases import load_base
from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.routing.closedform import ridge_head
from taps_cl.taps.model import TAPSModel
from taps_cl.training.loop import fit_task

HERE = Path(__file__).parent
CACHE = Path("/work/wt-route/scratch")


@torch.no_grad()
def run_patch(model: TAPSModel, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (the head's input) and logits of task ``name`` in eval mode."""
    got: list[torch.Tensor] = []
    handle = model.heads.register_forward_pre_hook(lambda m, a: got.append(a[0].detach()))
    try:
        model.eval()
        logits = torch.cat([model(x[i : i + 128], task=name) for i in range(0, len(x), 128)])
    finally:
        handle.remove()
    return torch.cat(got).float(), logits.float()


def set_head(model: TAPSModel, name: str, head) -> None:
    w, b = head.scaled()
    with torch.no_grad():
        model.heads.tasks[name].weight.copy_(w)
        model.heads.tasks[name].bias.copy_(b)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stream", default="fmnist5")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    exps = torch.load(CACHE / f"feats_{args.stream}_{args.size}.pt")
    base = load_base("efficientnet_lite0").module
    model = TAPSModel(copy.deepcopy(base), TAPSConfig(lam=1.0, warmup_epochs=1.0))
    config = TrainConfig(epochs=args.epochs, batch_size=16, lr=3e-3, image_size=args.size, seed=0)
    out_dir = HERE / f"patches_{args.stream}"
    out_dir.mkdir(exist_ok=True)
    names, offsets, start = [], [], time.perf_counter()
    for j, e in enumerate(exps):
        lo = int(e["y_train"].min())
        offsets.append(lo)
        ya = e["y_train"] - lo
        k = int(ya.max()) + 1
        name = f"exp{j}"
        names.append(name)
        model.add_task(name, k, seed=0)
        set_head(model, name, ridge_head(e["z_train"], ya, k, temperature=False))
        fit_task(model, name, TensorDataset(e["x_train"], ya), None, config, quiet=True)
        h, _ = run_patch(model, name, e["x_train"])
        set_head(model, name, ridge_head(h, ya, k, temperature=False))  # refit, scale 1
        model.finalize_task(name).save(out_dir / f"{name}.pt")
        print(f"{name} trained ({time.perf_counter() - start:.0f}s)", flush=True)
    train_s = time.perf_counter() - start
    xs = {s: torch.cat([e[f"x_{s}"] for e in exps]) for s in ("train", "test")}
    out = {"names": names, "offsets": offsets, "train_seconds": train_s}
    for split in ("train", "test"):
        out[f"y_{split}"] = torch.cat([e[f"y_{split}"] - lo for e, lo in zip(exps, offsets)])
        out[f"exp_{split}"] = torch.cat(
            [torch.full((len(e[f"y_{split}"]),), j) for j, e in enumerate(exps)]
        )
        t0 = time.perf_counter()
        runs = []
        for name in names:
            h, lg = run_patch(model, name, xs[split])
            runs.append({"h": h, "logits": lg})
        out[split] = runs
        out[f"{split}_cross_seconds"] = time.perf_counter() - t0
        print(f"cross {split}: {out[f'{split}_cross_seconds']:.0f}s", flush=True)
    torch.save(out, HERE / f"cross_{args.stream}.pt")


if __name__ == "__main__":
    main()
