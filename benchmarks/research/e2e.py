"""End-to-end accuracy: a router's task choice x the within-task prediction of (i) the closed-form
ridge head, (ii) TAPS patches from part b (their saved test logits).

    PYTHONPATH=. python benchmarks/research/e2e.py --stream fmnist5 --variants rand3,ridge3_noT
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from taps_cl.routing.closedform import ridge_head
from taps_cl.routing.compactstats import compress, full_stats
from taps_cl.routing.ldaroute import LDARouter
from taps_cl.routing.ranpac import RandomProjection, RanPACRouter

HERE = Path(__file__).parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stream", default="fmnist5")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--variants", default="rand3,ridge3_noT")
    args = p.parse_args()
    torch.set_num_threads(1)
    exps = torch.load(HERE / f"feats_{args.stream}_{args.size}.pt")
    z = torch.cat([e["z_test"] for e in exps]).double()
    true = torch.cat([torch.full((len(e["y_test"]),), j) for j, e in enumerate(exps)])
    data = [(e["z_train"], e["y_train"] - int(e["y_train"].min())) for e in exps]
    ytest = [e["y_test"] - int(e["y_train"].min()) for e in exps]
    ks = [int(y.max()) + 1 for _, y in data]
    lda_full, lda_k16 = LDARouter(), LDARouter()
    proj = RandomProjection(z.shape[1], 2000, seed=0)
    ran = RanPACRouter(proj, rank=None)
    for j, ((zt, y), k) in enumerate(zip(data, ks)):
        full = full_stats(zt, y, k)
        lda_full.add(f"e{j}", full)
        lda_k16.add(f"e{j}", compress(full, 16))
        ran.add_data(f"e{j}", zt, y, k)
    routers = {"lda full (today)": lda_full, "lda compact k16": lda_k16, "ranpac M=2000": ran}
    within = {"closed-form ridge": torch.cat([
        ridge_head(zt, y, k).logits(e["z_test"]).argmax(1) == yt
        for (zt, y), k, e, yt in zip(data, ks, exps, ytest)])}
    for v in args.variants.split(","):
        path = HERE / f"patchlogits_{args.stream}_{args.size}_{v}.pt"
        if path.exists():
            logits = torch.load(path)
            within[f"patch {v}"] = torch.cat([lg.argmax(1) == yt for lg, yt in zip(logits, ytest)])
    print(f"{args.stream} {args.size}px: within-task " + ", ".join(
        f"{k} {float(v.double().mean()):.3f}" for k, v in within.items()))
    print("| router | task id | " + " | ".join(f"e2e {k}" for k in within) + " |")
    for name, r in routers.items():
        right = r.task_scores(z).argmax(1) == true
        cells = " | ".join(f"{float((right & w).double().mean()):.3f}" for w in within.values())
        print(f"| {name} | {float(right.double().mean()):.3f} | {cells} |")


if __name__ == "__main__":
    main()
