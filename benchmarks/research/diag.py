"""Why patch evidence does not help: per-patch AUROC of own-task vs other-task test images, in the
base feature space (task Gaussian) and in the patch's own feature space (maha, energy), plus the
own-train vs own-test shift of each score (in-sample bias of the calibration).

    PYTHONPATH=. python benchmarks/research/diag.py --stream fmnist5
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rescore import CACHE, HERE, fit_temperature, gaussian_fit, gaussian_score


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    s = torch.cat([pos, neg])
    r = s.argsort().argsort().double() + 1
    return float((r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stream", default="fmnist5")
    args = p.parse_args()
    torch.set_num_threads(1)
    cross = torch.load(HERE / f"cross_{args.stream}.pt")
    exps = torch.load(CACHE / f"feats_{args.stream}_32.pt")
    z_te = torch.cat([e["z_test"] for e in exps])
    out = []
    for q, name in enumerate(cross["names"]):
        own_tr = cross["exp_train"] == q
        own_te = cross["exp_test"] == q
        ytr = cross["y_train"][own_tr]
        k = int(ytr.max()) + 1
        gb = gaussian_fit(exps[q]["z_train"], ytr, k, 16)
        base = gaussian_score(gb, z_te)
        h_tr = cross["train"][q]["h"][own_tr]
        gp = gaussian_fit(h_tr, ytr, k, 16)
        patch = gaussian_score(gp, cross["test"][q]["h"])
        patch_tr = gaussian_score(gp, h_tr)
        lg = cross["test"][q]["logits"].double()
        t = fit_temperature(cross["train"][q]["logits"][own_tr].double(), ytr)
        en = t * torch.logsumexp(lg / t, 1)
        en_tr = t * torch.logsumexp(cross["train"][q]["logits"][own_tr].double() / t, 1)
        row = {"task": name, "T": t,
               "auroc_base_gauss": auroc(base[own_te], base[~own_te]),
               "auroc_patch_maha16": auroc(patch[own_te], patch[~own_te]),
               "auroc_patch_energy": auroc(en[own_te], en[~own_te]),
               "maha_train_mean": float(patch_tr.mean()), "maha_owntest_mean": float(patch[own_te].mean()),
               "maha_other_mean": float(patch[~own_te].mean()),
               "energy_train_mean": float(en_tr.mean()), "energy_owntest_mean": float(en[own_te].mean()),
               "energy_other_mean": float(en[~own_te].mean())}
        out.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    (HERE / f"diag_{args.stream}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
