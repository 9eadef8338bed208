"""Part e: routing cost per image: base forward (32/64 px) vs random projection vs LDA scores.

    PYTHONPATH=. python benchmarks/research/cost.py
"""

from __future__ import annotations

import statistics
import time

import torch

from taps_cl.bases import load_base
from taps_cl.routing.ranpac import RandomProjection
from taps_cl.strategies.multihead import split_head


def median_ms(fn, repeats=7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    features, dim = split_head(load_base("efficientnet_lite0").module)
    features.eval()
    n = 64
    z = torch.randn(n, dim)
    rows = []
    with torch.no_grad():
        for px in (32, 64):
            x = torch.randn(n, 3, px, px)
            rows.append((f"base forward {px}px", median_ms(lambda x=x: features(x))))
        for m in (1000, 2000, 4000):
            proj = RandomProjection(dim, m)
            w = torch.randn(m, 10 * 5, dtype=torch.float32)
            rows.append((f"projection+ReLU+ridge M={m} (50 classes, fp32)",
                         median_ms(lambda p=proj, w=w: p(z) @ w)))
        lda = torch.randn(dim, 50, dtype=torch.float64)
        rows.append(("LDA scores (50 classes, fp64, today)", median_ms(lambda: z.double() @ lda)))
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} ms / {n} images | {1e3 * ms / n:.1f} us/image |")


if __name__ == "__main__":
    main()
