"""More patch-space in-distribution scores, AUROC own-task vs other-task test images per patch:
max cosine to class means, Mahalanobis inside the top-16 within-class subspace only, raw energy
(T=1), and the same cosine score on base features for reference.

    PYTHONPATH=..:. python diag2.py --stream fmnist5
"""
from __future__ import annotations

import argparse

import torch

from diag import auroc
from rescore import CACHE, HERE


def cosine_score(h_tr, ytr, k, h):
    m = torch.stack([h_tr[ytr == c].double().mean(0) for c in range(k)])
    m = torch.nn.functional.normalize(m, dim=1)
    return (torch.nn.functional.normalize(h.double(), dim=1) @ m.T).max(1).values


def subspace_score(h_tr, ytr, k, h, r=16):
    m = torch.stack([h_tr[ytr == c].double().mean(0) for c in range(k)])
    xc = h_tr.double() - m[ytr]
    evals, evecs = torch.linalg.eigh(xc.T @ xc / max(1, len(ytr) - k))
    v, lam = evecs[:, -r:], evals[-r:].clamp(min=1e-9)
    d = ((h.double()[:, None, :] - m[None]) @ v) ** 2 / lam  # [n, C, r]
    return -d.sum(-1).min(1).values


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stream", default="fmnist5")
    args = p.parse_args()
    torch.set_num_threads(1)
    cross = torch.load(HERE / f"cross_{args.stream}.pt")
    exps = torch.load(CACHE / f"feats_{args.stream}_32.pt")
    z_te = torch.cat([e["z_test"] for e in exps])
    for q, name in enumerate(cross["names"]):
        own_tr, own_te = cross["exp_train"] == q, cross["exp_test"] == q
        ytr = cross["y_train"][own_tr]
        k = int(ytr.max()) + 1
        h_tr, h = cross["train"][q]["h"][own_tr], cross["test"][q]["h"]
        res = {
            "base_cos": cosine_score(exps[q]["z_train"], ytr, k, z_te),
            "base_sub16": subspace_score(exps[q]["z_train"], ytr, k, z_te),
            "patch_cos": cosine_score(h_tr, ytr, k, h),
            "patch_sub16": subspace_score(h_tr, ytr, k, h),
            "patch_energy_T1": torch.logsumexp(cross["test"][q]["logits"].double(), 1),
            "patch_maxlogit": cross["test"][q]["logits"].double().max(1).values,
        }
        print(name, " ".join(f"{k}={auroc(s[own_te], s[~own_te]):.3f}" for k, s in res.items()))


if __name__ == "__main__":
    main()
