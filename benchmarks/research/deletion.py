"""Part d: deletion on real features (fmnist5, 32 px): router after delete vs never added.

    PYTHONPATH=. python benchmarks/research/deletion.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from taps_cl.routing.compactstats import compress, full_stats
from taps_cl.routing.ldaroute import LDARouter
from taps_cl.routing.ranpac import RandomProjection, RanPACRouter

HERE = Path(__file__).parent


def main() -> None:
    torch.set_num_threads(1)
    exps = torch.load(HERE / "feats_fmnist5_32.pt")
    z = torch.cat([e["z_test"] for e in exps]).double()
    data = []
    for e in exps:
        lo = int(e["y_train"].min())
        data.append((e["z_train"], e["y_train"] - lo))
    lda_stats = [compress(full_stats(zt, y, 2), 16) for zt, y in data]
    proj = RandomProjection(z.shape[1], 2000, seed=0)
    makers = {
        "lda_compact_k16": (lambda: LDARouter(), lda_stats),
        "ranpac2000_compact_k16": (
            lambda: RanPACRouter(proj, rank=16),
            [compress(full_stats(proj(zt), y, 2), 16) for zt, y in data],
        ),
    }
    for name, (make, stats) in makers.items():
        router, never = make(), make()
        for i, s in enumerate(stats):
            router.add(f"exp{i}", s)
            if i != 2:
                never.add(f"exp{i}", s)
        router.task_scores(z)
        router.remove("exp2")
        a, b = router.task_scores(z), never.task_scores(z)
        same = float((a.argmax(1) == b.argmax(1)).double().mean())
        rel = float((a - b).abs().max() / b.abs().max())
        print(f"| {name} | max |score diff| {float((a - b).abs().max()):.2e} (rel {rel:.1e}) "
              f"| same decision {same:.4f} |")


if __name__ == "__main__":
    main()
