"""Cache preprocessed images and frozen-base features of the class-incremental streams.

    python benchmarks/research/extract.py --size 32        # writes benchmarks/research/feats_<stream>_<size>[_nocrop].pt
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from taps_cl.bases import load_base
from taps_cl.scenarios.classinc import class_incremental_from_suite
from taps_cl.scenarios.suite import digits, offline_suite, split_fashion_mnist
from taps_cl.strategies.multihead import split_head

HERE = Path(__file__).parent


def suites(seed: int = 0) -> dict:
    return {
        "fmnist5": (split_fashion_mnist(5, max_train=300, max_test=200, seed=seed), None),
        "digits5": ([digits(seed=seed)], 2),
        # the benchmark's --fast cap (96 per experience): the short-run regime of the issue
        "fmnist5s": (split_fashion_mnist(5, max_train=96, max_test=200, seed=seed), None),
        "multi": (offline_suite(max_train=500, max_test=200, seed=seed), None),
    }


def tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=False)
    xs, ys = zip(*((x, y) for x, y, *_ in loader), strict=True)
    return torch.cat(xs), torch.cat(ys).long()


@torch.no_grad()
def embed(features, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([features(x[i : i + 256]) for i in range(0, len(x), 256)])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--streams", default="fmnist5,digits5,multi")
    args = p.parse_args()
    torch.set_num_threads(1)
    base = load_base("efficientnet_lite0")
    features, _ = split_head(base.module)
    features.eval()
    print("preprocessing", base.preprocessing)
    preps = {"": base.preprocessing, "_nocrop": dataclasses.replace(base.preprocessing, crop_pct=1.0)}
    for name, (suite, per) in suites().items():
        if name not in args.streams.split(","):
            continue
        for tag, prep in preps.items():
            start = time.perf_counter()
            bench = class_incremental_from_suite(suite, prep, args.size, per)
            exps = []
            for tr, te in zip(bench.train_stream, bench.test_stream, strict=True):
                xa, ya = tensors(tr.dataset)
                xb, yb = tensors(te.dataset)
                item = {"y_train": ya, "y_test": yb, "z_train": embed(features, xa),
                        "z_test": embed(features, xb)}
                if not tag:
                    item.update(x_train=xa, x_test=xb)
                exps.append(item)
            out = HERE / f"feats_{name}_{args.size}{tag}.pt"
            torch.save(exps, out)
            sizes = [(len(e["y_train"]), len(e["y_test"])) for e in exps]
            print(f"{out.name}: {sizes} in {time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
