"""Part b: closed-form head init inside TAPS training; within-task accuracy, true task given.

    python benchmarks/research/taps_init.py --stream fmnist5 --size 32 --variants rand3,ridge3,...
Writes benchmarks/research/taps_init_<stream>_<size>.json (one entry per variant: per-task accuracies,
accuracy at step 0 in eval mode, seconds) and saves each trained task's test logits for the
end-to-end routing table (benchmarks/research/patchlogits_<stream>_<size>_<variant>.pt).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import taps_cl.train as train_mod
from taps_cl.bases import load_base
from taps_cl.routing.closedform import class_moments, lda_head, ridge_head
from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.taps.model import TAPSModel
from taps_cl.taps.modules import TaskNorm
from taps_cl.train import evaluate, fit_task

HERE = Path(__file__).parent
# name: (init, epochs, head lr multiplier, penalty warm-up epochs[, lr])
VARIANTS = {
    "ridge3_lr1e-3": ("ridge", 3, 1.0, 1.0, 1e-3),
    "rand3_lr1e-3": ("random", 3, 1.0, 1.0, 1e-3),
    "ridge3_lr3e-4": ("ridge", 3, 1.0, 1.0, 3e-4),
    "ridge3_hlr0": ("ridge", 3, 1e-6, 1.0),
    "ridge1_noT": ("ridge_noT", 1, 1.0, 1.0),
    # norm_stats="reset": a task's BN running stats are the cumulative average of its batches
    "ridge3_noT_reset": ("ridge_noT", 3, 1.0, 1.0, 3e-3, "reset"),
    "rand3_reset": ("random", 3, 1.0, 1.0, 3e-3, "reset"),
    "ridge3_noT_hlr": ("ridge_noT", 3, 0.1, 1.0),
    "ridge3_noT_reset_refit": ("ridge_noT", 3, 1.0, 1.0, 3e-3, "reset,refit"),
    "rand3_reset_refit": ("random", 3, 1.0, 1.0, 3e-3, "reset,refit"),
    "ridge3_noT_refit": ("ridge_noT", 3, 1.0, 1.0, 3e-3, "refit"),
    "ridge3_noT_lr1e-3": ("ridge_noT", 3, 1.0, 1.0, 1e-3),
    # BN frozen: per-task norms stay in eval mode while training (running stats, affine trains)
    "ridge3_bnf": ("ridge", 3, 1.0, 1.0, 3e-3, "bnfrozen"),
    "ridge1_bnf": ("ridge", 1, 1.0, 1.0, 3e-3, "bnfrozen"),
    "rand3_bnf": ("random", 3, 1.0, 1.0, 3e-3, "bnfrozen"),
    "lda3_bnf": ("lda", 3, 1.0, 1.0, 3e-3, "bnfrozen"),
    # refit: after training, the head is re-fitted in closed form on the patched features
    "rand3_refit": ("random", 3, 1.0, 1.0, 3e-3, "refit"),
    "ridge3_refit": ("ridge", 3, 1.0, 1.0, 3e-3, "refit"),
    "ridge3_bnf_refit": ("ridge", 3, 1.0, 1.0, 3e-3, "bnfrozen,refit"),
    "rand1_refit": ("random", 1, 1.0, 1.0, 3e-3, "refit"),
    "rand3": ("random", 3, 1.0, 1.0),
    "rand1": ("random", 1, 1.0, 1.0),
    "ridge3": ("ridge", 3, 1.0, 1.0),
    "ridge1": ("ridge", 1, 1.0, 1.0),
    "lda3": ("lda", 3, 1.0, 1.0),
    "lda1": ("lda", 1, 1.0, 1.0),
    "ridge3_noT": ("ridge_noT", 3, 1.0, 1.0),
    "ridge3_hlr": ("ridge", 3, 0.1, 1.0),
    "ridge3_w0": ("ridge", 3, 1.0, 0.0),
    "ridge3_w3": ("ridge", 3, 1.0, 3.0),
    "rand3_w3": ("random", 3, 1.0, 3.0),
}


def head_lr_groups(mult: float):
    original = train_mod.task_groups

    def groups(model, name, config, score_lr):
        out = original(model, name, config, score_lr)
        out[1] = {**out[1], "lr": config.lr * mult}
        return out

    return groups if mult != 1.0 else original


_ORIGINAL_TRAIN = TaskNorm.train


def _frozen_train(self, mode: bool = True):
    return _ORIGINAL_TRAIN(self, False)


@torch.no_grad()
def patched_features(model: TAPSModel, name: str, x: torch.Tensor) -> torch.Tensor:
    got = []
    handle = model.heads.register_forward_pre_hook(lambda m, a: got.append(a[0].detach()))
    try:
        model.eval()
        for i in range(0, len(x), 128):
            model(x[i : i + 128], task=name)
    finally:
        handle.remove()
    return torch.cat(got)


def refit_head(model: TAPSModel, name: str, x: torch.Tensor, y: torch.Tensor, k: int) -> None:
    head = ridge_head(patched_features(model, name, x), y, k)
    w, b = head.scaled()
    with torch.no_grad():
        model.heads.tasks[name].weight.copy_(w)
        model.heads.tasks[name].bias.copy_(b)


def init_head(model: TAPSModel, name: str, init: str, z: torch.Tensor, y: torch.Tensor, k: int):
    if init == "random":
        return None
    if init.startswith("ridge"):
        head = ridge_head(z, y, k, temperature=init == "ridge")
    else:
        count, mean, scatter = class_moments(z, y, k)
        head = lda_head(count, mean, scatter)
    w, b = head.scaled()
    with torch.no_grad():
        model.heads.tasks[name].weight.copy_(w)
        model.heads.tasks[name].bias.copy_(b)
    return {"kind": head.kind, "param": head.param, "scale": head.scale}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stream", default="fmnist5")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-suffix", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    exps = torch.load(HERE / f"feats_{args.stream}_{args.size}.pt")
    base = load_base("efficientnet_lite0").module
    out_path = HERE / f"taps_init_{args.stream}_{args.size}{args.out_suffix}.json"
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    for variant in args.variants.split(","):
        init, epochs, head_mult, warmup, *rest = VARIANTS[variant]
        lr, flags = rest[:1], (rest[1] if len(rest) > 1 else "").split(",")
        TaskNorm.train = _frozen_train if "bnfrozen" in flags else _ORIGINAL_TRAIN
        model = TAPSModel(copy.deepcopy(base), TAPSConfig(
            lam=1.0, warmup_epochs=warmup, norm_stats="reset" if "reset" in flags else "base"
        ))
        train_mod.task_groups = head_lr_groups(head_mult)
        config = TrainConfig(epochs=epochs, batch_size=16, lr=(lr or [3e-3])[0], image_size=args.size, seed=0)
        row, logits, start = {"acc": [], "acc0": [], "init": []}, [], time.perf_counter()
        for j, e in enumerate(exps):
            lo = int(e["y_train"].min())
            ya, yb = e["y_train"] - lo, e["y_test"] - lo
            k = int(ya.max()) + 1
            name = f"exp{j}"
            model.add_task(name, k, seed=0)
            row["init"].append(init_head(model, name, init, e["z_train"], ya, k))
            test = TensorDataset(e["x_test"], yb)
            row["acc0"].append(evaluate(model, name, test, config)["accuracy"])
            fit_task(model, name, TensorDataset(e["x_train"], ya), None, config, quiet=True)
            if "refit" in flags:
                refit_head(model, name, e["x_train"], ya, k)
            model.eval()
            with torch.no_grad():
                lg = torch.cat([model(e["x_test"][i : i + 128], task=name)
                                for i in range(0, len(yb), 128)])
            logits.append(lg)
            row["acc"].append(float((lg.argmax(1) == yb).float().mean()))
            print(variant, name, f"step0 {row['acc0'][-1]:.3f} -> {row['acc'][-1]:.3f}", flush=True)
        sizes = [len(e["y_test"]) for e in exps]
        row["mean"] = sum(a * s for a, s in zip(row["acc"], sizes)) / sum(sizes)
        row["mean0"] = sum(a * s for a, s in zip(row["acc0"], sizes)) / sum(sizes)
        row["seconds"] = time.perf_counter() - start
        results[variant] = row
        out_path.write_text(json.dumps(results, indent=1))
        torch.save(logits, HERE / f"patchlogits_{args.stream}_{args.size}_{variant}.pt")
        print(f"== {variant}: {row['mean0']:.4f} -> {row['mean']:.4f} in {row['seconds']:.0f}s")


if __name__ == "__main__":
    main()
