"""Shortlist re-scoring by the trained patches: task identification and end-to-end accuracy.

    PYTHONPATH=. python benchmarks/research/rescore.py --stream fmnist5
Needs benchmarks/research/cross_<stream>.pt (train_patches.py) and the cached base features. Prints a table
and writes benchmarks/research/rescore_<stream>.json.

Per (image, patch) scores, each normalised against the patch's own training data only:
- ``energy``: logsumexp of the patch's logits at temperature T_p (fitted by CE on own train).
- ``msp``: log max-softmax at T_p.
- ``cos``: max cosine of the patch's penultimate features to its (fp16) class means.
- ``maha<k>``: Gaussian log-likelihood of the patch's penultimate features under class-conditional
  Gaussians with a shared rank-k + diagonal covariance fitted on the task's own train features
  (compact statistics, fp16), logsumexp over classes. Calibration scores are cross-fitted (5
  folds: fit on 4/5, score the held-out 1/5), so they are not in-sample for the Gaussian.
Normalisation: ``z`` (z-score against the calibration scores) or ``p`` (conformal left-tail log
p-value against the calibration scores). Decision: router log-posterior + w * patch score over
the router's top-K tasks. w is chosen on training data only (causal protocol: the training
images of task t against tasks 0..t, router built from tasks 0..t, i.e. what is available when
task t arrives), and the test-best w is shown as a ceiling.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from taps_cl.routing.compactstats import compress, full_stats
from taps_cl.routing.ldaroute import LDARouter
from taps_cl.routing.ranpac import RandomProjection, RanPACRouter

HERE = Path(__file__).parent
CACHE = Path("/work/wt-route/scratch")
WS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, math.inf)


def gaussian_fit(h: torch.Tensor, y: torch.Tensor, k: int, rank: int, alpha: float = 0.05):
    """Compact class-conditional Gaussians (shared covariance): means, Woodbury factors."""
    c = compress(full_stats(h.double(), y, k), rank)
    n = float(c.count.sum())
    dof = max(1.0, n - k)
    diag = c.diag.double() / dof
    diag = diag + alpha * float(diag.mean())
    u = c.basis.double().T / math.sqrt(dof)  # [d, r]; Sigma = diag + u u^T
    dinv = 1.0 / diag
    core = torch.eye(u.shape[1], dtype=torch.float64) + u.T @ (dinv[:, None] * u)
    logdet = float(torch.log(diag).sum() + torch.logdet(core))
    return {"mean": c.class_means(), "dinv": dinv, "u": u, "core": core, "logdet": logdet,
            "bytes": c.nbytes}


def gaussian_score(g, h: torch.Tensor) -> torch.Tensor:
    """logsumexp over classes of log N(h; mu_c, Sigma) (equal priors), [n]."""
    x = h.double()[:, None, :] - g["mean"][None]  # [n, C, d]
    a = (x * x * g["dinv"]).sum(-1)
    b = (x * g["dinv"]) @ g["u"]  # [n, C, r]
    if b.shape[-1]:
        flat = b.reshape(b.shape[0] * b.shape[1], b.shape[2])
        sol = torch.linalg.solve(g["core"], flat.T).T.reshape(b.shape)
        a = a - (b * sol).sum(-1)
    d2 = a
    ll = -0.5 * (d2 + g["logdet"])
    return torch.logsumexp(ll, 1) - math.log(ll.shape[1])


def cosine_fit(h: torch.Tensor, y: torch.Tensor, k: int):
    """Unit class means (fp16 when stored): the max-cosine score's only statistics."""
    m = torch.stack([h[y == c].double().mean(0) for c in range(k)])
    return torch.nn.functional.normalize(m.half().double(), dim=1)


def cosine_score(m: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.normalize(h.double(), dim=1) @ m.T).max(1).values


def crossfit_cos(h, y, k, folds=5):
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    out = torch.empty(len(y), dtype=torch.float64)
    for f in range(folds):
        hold = order[f::folds]
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[hold] = False
        out[hold] = cosine_score(cosine_fit(h[keep], y[keep], k), h[hold])
    return out


def crossfit_scores(h, y, k, rank, folds=5):
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    out = torch.empty(len(y), dtype=torch.float64)
    for f in range(folds):
        hold = order[f::folds]
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[hold] = False
        out[hold] = gaussian_score(gaussian_fit(h[keep], y[keep], k, rank), h[hold])
    return out


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    grid = [10 ** (e / 10) for e in range(-20, 21)]
    ce = [float(torch.nn.functional.cross_entropy(logits / t, y)) for t in grid]
    return grid[min(range(len(grid)), key=ce.__getitem__)]


def normalise(s: torch.Tensor, cal: torch.Tensor, how: str) -> torch.Tensor:
    if how == "z":
        return (s - cal.mean()) / cal.std().clamp(min=1e-12)
    srt = torch.sort(cal).values
    below = torch.searchsorted(srt, s.contiguous(), right=True).double()
    return torch.log((1 + below) / (len(cal) + 1))


def patch_scores(cross, split: str, rank_list) -> dict[str, torch.Tensor]:
    """Raw scores [N, T] per family plus each patch's calibration scores on its own train."""
    names = cross["names"]
    own = [cross["exp_train"] == p for p in range(len(names))]
    raw: dict[str, list] = {}
    cals: dict[str, list] = {}
    for p in range(len(names)):
        tr_lg = cross["train"][p]["logits"][own[p]].double()
        ytr = cross["y_train"][own[p]]
        k = tr_lg.shape[1]
        t = fit_temperature(tr_lg, ytr)
        lg = cross[split][p]["logits"].double()
        fams = {
            "energy": (t * torch.logsumexp(lg / t, 1), t * torch.logsumexp(tr_lg / t, 1)),
            "msp": (torch.log_softmax(lg / t, 1).max(1).values,
                    torch.log_softmax(tr_lg / t, 1).max(1).values),
        }
        htr = cross["train"][p]["h"][own[p]]
        fams["cos"] = (cosine_score(cosine_fit(htr, ytr, k), cross[split][p]["h"]),
                       crossfit_cos(htr, ytr, k))
        for r in rank_list:
            g = gaussian_fit(htr, ytr, k, r)
            fams[f"maha{r}"] = (gaussian_score(g, cross[split][p]["h"]),
                                crossfit_scores(htr, ytr, k, r))
            fams[f"maha{r}"] += (g["bytes"],)
        for f, (s, cal, *_) in fams.items():
            raw.setdefault(f, []).append(s)
            cals.setdefault(f, []).append(cal)
    return {f: (torch.stack(raw[f], 1), cals[f]) for f in raw}


def normalised(scores, how: str) -> dict[str, torch.Tensor]:
    return {f: torch.stack([normalise(s[:, p], cal[p], how) for p in range(s.shape[1])], 1)
            for f, (s, cal) in scores.items()}


def decide(router_lp, patch, K: int, w: float) -> torch.Tensor:
    """argmax over the router's top-K of router log-posterior + w * patch score."""
    top = router_lp.topk(min(K, router_lp.shape[1]), 1).indices
    if math.isinf(w):
        comb = patch.clone()
    else:
        comb = router_lp + w * patch
    masked = torch.full_like(comb, -math.inf).scatter(1, top, comb.gather(1, top))
    return masked.argmax(1)


_LP_CACHE: dict = {}


def causal_train_acc(cross, z_tr, routers_by_t, train_norm, K, w) -> float:
    """Training images of task t vs tasks 0..t (router of tasks 0..t): exemplar-free choice of w."""
    right = total = 0
    for t in range(1, len(cross["names"])):
        rows = cross["exp_train"] == t
        key = (id(routers_by_t[t]), t)
        if key not in _LP_CACHE:
            _LP_CACHE[key] = torch.log_softmax(routers_by_t[t].task_scores(z_tr[rows]).double(), 1)
        lp = _LP_CACHE[key]
        choice = decide(lp, train_norm[rows][:, : t + 1], K, w)
        right += int((choice == t).sum())
        total += int(rows.sum())
    return right / total


def own_crossfit(cross, train_scores):
    """Train split: a patch's score on its own training images is its cross-fitted calibration."""
    out = {}
    for f, (s, cals) in train_scores.items():
        s = s.clone()
        for p, cal in enumerate(cals):
            s[cross["exp_train"] == p, p] = cal
        out[f] = (s, cals)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stream", default="fmnist5")
    p.add_argument("--ranks", default="0,8,16")
    args = p.parse_args()
    torch.set_num_threads(1)
    cross = torch.load(HERE / f"cross_{args.stream}.pt")
    exps = torch.load(CACHE / f"feats_{args.stream}_32.pt")
    ranks = [int(r) for r in args.ranks.split(",")]
    T = len(exps)
    z_tr = torch.cat([e["z_train"] for e in exps]).double()
    z_te = torch.cat([e["z_test"] for e in exps]).double()
    true, y_te = cross["exp_test"], cross["y_test"]
    routers_by_t, lda = [], None
    for t in range(T):
        lda = LDARouter()
        for j in range(t + 1):
            e = exps[j]
            ya = e["y_train"] - cross["offsets"][j]
            lda.add(f"e{j}", compress(full_stats(e["z_train"], ya, int(ya.max()) + 1), 16))
        routers_by_t.append(lda)
    ran = RanPACRouter(RandomProjection(z_te.shape[1], 2000, seed=0), rank=None)
    for j, e in enumerate(exps):
        ran.add_data(f"e{j}", e["z_train"], e["y_train"], int(e["y_train"].max()) + 1)
    lp = torch.log_softmax(lda.task_scores(z_te).double(), 1)
    pred = torch.stack([cross["test"][q]["logits"].argmax(1) for q in range(T)], 1)  # [N, T]
    within = pred.gather(1, true[:, None]).squeeze(1) == y_te

    def e2e(choice):
        return float(((choice == true) & (pred.gather(1, choice[:, None]).squeeze(1) == y_te))
                     .double().mean())

    rows = []
    ran_choice = ran.task_scores(z_te).argmax(1)
    _, ran_cls = ran.predict(z_te)
    ref = {"ranpac_grouped_taskid": float((ran_choice == true).double().mean()),
           "ranpac_classinc": float((ran_cls == torch.cat([e["y_test"] for e in exps])).double().mean()),
           "within_true_task": float(within.double().mean())}
    for K in (2, 3):
        top = lp.topk(min(K, T), 1).indices
        ref[f"lda_top{K}_contains_true"] = float((top == true[:, None]).any(1).double().mean())
    lda_choice = lp.argmax(1)
    rows.append({"method": "LDA compact k16 (router only)", "K": 1, "w": 0.0,
                 "taskid": float((lda_choice == true).double().mean()), "e2e": e2e(lda_choice)})
    rows.append({"method": "RanPAC M=2000 grouped (router only)", "K": 1, "w": 0.0,
                 "taskid": ref["ranpac_grouped_taskid"], "e2e": e2e(ran_choice)})
    te_scores = patch_scores(cross, "test", ranks)
    tr_scores = own_crossfit(cross, patch_scores(cross, "train", ranks))
    for how in ("z", "p"):
        te_n, tr_n = normalised(te_scores, how), normalised(tr_scores, how)
        for fam in te_n:
            for K in (2, 3, T):
                if K > T or (K == T and T <= 3):
                    continue
                accs = {w: float((decide(lp, te_n[fam], K, w) == true).double().mean()) for w in WS}
                sel = {w: causal_train_acc(cross, z_tr, routers_by_t, tr_n[fam], K, w) for w in WS}
                w_sel = max(WS, key=lambda w: (sel[w], -w))
                w_best = max(WS, key=lambda w: accs[w])
                rows.append({"method": f"{fam}/{how}", "K": K, "w": w_sel,
                             "taskid": accs[w_sel], "e2e": e2e(decide(lp, te_n[fam], K, w_sel)),
                             "w_test_best": w_best, "taskid_test_best": accs[w_best],
                             "taskid_w1": accs[1.0], "patch_only": accs[math.inf],
                             "train_sel": sel[w_sel]})
    nbytes = {f"maha{r}": None for r in ranks}
    print(json.dumps(ref, indent=1))
    print("| method | K | w (train) | task id | e2e | w=1 | patch only | test-best w: task id |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['K']} | {r['w']} | {r['taskid']:.3f} | {r['e2e']:.3f} | "
              f"{r.get('taskid_w1', float('nan')):.3f} | {r.get('patch_only', float('nan')):.3f} | "
              f"{r.get('w_test_best', '')}: {r.get('taskid_test_best', float('nan')):.3f} |")
    (HERE / f"rescore_{args.stream}.json").write_text(
        json.dumps({"ref": ref, "rows": rows, "bytes": nbytes}, indent=1, default=str))


if __name__ == "__main__":
    main()
