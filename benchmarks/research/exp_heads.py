"""Parts a, c, d: closed-form heads, routers and compact statistics on cached base features.

    PYTHONPATH=. python benchmarks/research/exp_heads.py --stream fmnist5 --size 32 [--tag _nocrop]
Prints markdown tables and writes benchmarks/research/exp_heads_<stream>_<size><tag>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from taps_cl.routing.closedform import class_moments, lda_head, ncm_head, ridge_head
from taps_cl.routing.compactstats import FullStats, PooledStats, compress, full_stats
from taps_cl.routing.ranpac import RandomProjection, RanPACRouter
from taps_cl.taps.routestats import RouteStatsAccumulator
from taps_cl.taps.routing import TaskRouter
from taps_cl.routing.taskscore import reduce_scores, task_index

HERE = Path(__file__).parent


def local(e):
    lo = int(e["y_train"].min())
    ya, yb = e["y_train"] - lo, e["y_test"] - lo
    return ya, yb, int(ya.max()) + 1


def acc(pred, y):
    return float((pred == y).double().mean())


def part_a(exps):
    rows = {"ridge": [], "ridge_lam": [], "ridge_T": [], "lda": [], "lda_shrink": [], "ncm": []}
    for e in exps:
        ya, yb, k = local(e)
        r = ridge_head(e["z_train"], ya, k)
        rows["ridge"].append(acc(r.logits(e["z_test"]).argmax(1), yb))
        rows["ridge_lam"].append(r.param)
        rows["ridge_T"].append(r.scale)
        count, mean, scatter = class_moments(e["z_train"], ya, k)
        lda = lda_head(count, mean, scatter)
        rows["lda"].append(acc(lda.logits(e["z_test"]).argmax(1), yb))
        rows["lda_shrink"].append(lda.param)
        unit = torch.nn.functional.normalize(e["z_test"].double(), dim=1)
        rows["ncm"].append(acc(ncm_head(mean).logits(unit).argmax(1), yb))
    return rows


def heads_per_task(exps, kind="ridge"):
    """Within-task predictions of the closed-form head on each task's own test set."""
    out = []
    for e in exps:
        ya, yb, k = local(e)
        out.append(ridge_head(e["z_train"], ya, k).logits(e["z_test"]).argmax(1) == yb)
    return out


def lda_today(exps, reduce="logsumexp"):
    router = TaskRouter(reduce=reduce)
    for j, e in enumerate(exps):
        ya, _, k = local(e)
        accum = RouteStatsAccumulator(k)
        accum.update(e["z_train"], ya)
        router.add(f"exp{j}", accum.result())
    return router


def route_stats_of(exps, space=None):
    return [full_stats(e["z_train"] if space is None else space(e["z_train"]), local(e)[0], local(e)[2]) for e in exps]


def lda_scores(stats, z, reduce="logsumexp", shrinkage=None):
    """Pooled-covariance LDA over all classes of all tasks (no priors), as today's router."""
    count = torch.cat([s.count for s in stats])
    mean = torch.cat([s.class_means() for s in stats])
    scatter = sum(s.scatter_matrix() for s in stats)
    head = lda_head(count, mean, scatter, shrinkage=shrinkage, priors=False)
    cls = head.logits(z)
    task_of = task_index([int(s.count.shape[0]) for s in stats])
    return reduce_scores(cls, task_of, reduce), cls, task_of


def tpl_qda(stats, z, mix=0.5):
    """TPL-style ratio with each task's own (shrunk) covariance for p(z|t), pooled for not-t."""
    d = z.shape[1]
    pooled = sum(s.scatter_matrix() for s in stats)
    dof = sum(int(s.count.sum()) - int((s.count > 0).sum()) for s in stats)
    sig = pooled / dof
    tr = float(torch.diagonal(sig).sum()) / d
    from taps_cl.routing.closedform import oas_shrinkage
    a = oas_shrinkage(sig, dof)
    sig_p = (1 - a) * sig + a * tr * torch.eye(d, dtype=torch.float64)
    z = z.double()

    def loglik(mu, cov):
        chol = torch.linalg.cholesky(cov)
        diff = (z[:, None, :] - mu[None]).reshape(-1, d)
        sol = torch.cholesky_solve(diff.T.contiguous(), chol) if False else torch.linalg.solve_triangular(chol, diff.T, upper=False)
        maha = (sol * sol).sum(0).reshape(z.shape[0], mu.shape[0])
        return -0.5 * maha - torch.log(torch.diagonal(chol)).sum()

    inside, outside = [], []
    for t, s in enumerate(stats):
        dof_t = int(s.count.sum()) - int((s.count > 0).sum())
        sig_t = mix * s.scatter_matrix() / max(dof_t, 1) + (1 - mix) * sig_p
        inside.append(torch.logsumexp(loglik(s.class_means(), sig_t), 1))
        others = torch.cat([o.class_means() for u, o in enumerate(stats) if u != t])
        outside.append(torch.logsumexp(loglik(others, sig_p), 1))
    return torch.stack(inside, 1) - torch.stack(outside, 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stream", default="fmnist5")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--tag", default="")
    p.add_argument("--sizes", default="1000,2000,4000")
    p.add_argument("--patch", default="ridge3", help="part-b variant for end-to-end")
    args = p.parse_args()
    torch.set_num_threads(1)
    exps = torch.load(HERE / f"feats_{args.stream}_{args.size}{args.tag}.pt")
    res = {"stream": args.stream, "size": args.size, "tag": args.tag}
    res["a"] = part_a(exps)
    z = torch.cat([e["z_test"] for e in exps]).double()
    true_task = torch.cat([torch.full((len(e["y_test"]),), j) for j, e in enumerate(exps)])
    sizes = [len(e["y_test"]) for e in exps]
    own = heads_per_task(exps)  # closed-form within-task correctness
    plogits_path = HERE / f"patchlogits_{args.stream}_{args.size}_{args.patch}.pt"
    patch_ok = None
    if plogits_path.exists() and not args.tag:
        pl = torch.load(plogits_path)
        patch_ok = torch.cat([pl[j].argmax(1) == local(e)[1] for j, e in enumerate(exps)])
    own = torch.cat(own)
    routers = {}
    full = route_stats_of(exps)
    t0 = time.perf_counter()
    router = lda_today(exps)
    routers["lda_today(lse)"] = router.task_scores(z)
    routers["lda_today(max)"] = lda_today(exps, "max").task_scores(z)
    res["lda_today_s"] = time.perf_counter() - t0
    routers["lda_tpl_ratio"] = lda_scores(full, z, "ratio")[0]
    routers["tpl_qda(mix .5)"] = tpl_qda(full, z)
    for k in (0, 8, 16, 32):
        comp = [compress(s, k) for s in full]
        routers[f"lda_compact_k{k}"] = lda_scores(comp, z)[0]
    comp32 = [compress(s, 32, mean_dtype=torch.float32) for s in full]
    routers["lda_compact_k32_meanfp32"] = lda_scores(comp32, z)[0]
    # reduced space: PCA of the first task's train features (fixed basis) / of all (optimistic)
    for src, feats in (("first", exps[0]["z_train"]), ("all", torch.cat([e["z_train"] for e in exps]))):
        f = feats.double()
        mu = f.mean(0)
        _, _, vh = torch.linalg.svd(f - mu, full_matrices=False)
        for dim in (64, 128, 256):
            basis = vh[:dim].T
            space = lambda x, b=basis, m=mu: (x.double() - m) @ b
            red = route_stats_of(exps, space)
            routers[f"lda_pca{dim}_{src}"] = lda_scores(red, space(z))[0]
    ran = {}
    for m in [int(x) for x in args.sizes.split(",")]:
        t0 = time.perf_counter()
        rr = RanPACRouter(RandomProjection(z.shape[1], m, seed=0), rank=None)
        for j, e in enumerate(exps):
            ya, _, k = local(e)
            rr.add_data(f"exp{j}", e["z_train"], ya, k)
        cls = rr.class_scores(z)
        task_of = rr._solve()[1]
        ran[m] = {"lam": rr.lam_value, "fit_s": time.perf_counter() - t0}
        ytrue_global = torch.cat([e["y_test"] for e in exps]) - int(exps[0]["y_train"].min())
        starts = torch.tensor([0] + list(torch.cumsum(torch.bincount(task_of), 0)[:-1]))
        ran[m]["ci_acc"] = acc(cls.argmax(1), torch.cat([local(e)[1] + starts[j] for j, e in enumerate(exps)]))
        for red in ("max", "logsumexp"):
            routers[f"ranpac{m}_{red}"] = reduce_scores(cls, task_of, red, 1.0 if red == "max" else 20.0)
        if m == 2000:
            for k in (8, 16, 32):
                rc = RanPACRouter(RandomProjection(z.shape[1], m, seed=0), rank=k)
                for j, e in enumerate(exps):
                    ya, _, kk = local(e)
                    rc.add_data(f"exp{j}", e["z_train"], ya, kk)
                cc = rc.class_scores(z)
                routers[f"ranpac{m}_compact_k{k}_max"] = reduce_scores(cc, task_of, "max")
                ran[f"{m}_k{k}"] = {"ci_acc": acc(cc.argmax(1), torch.cat([local(e)[1] + starts[j] for j, e in enumerate(exps)])), "lam": rc.lam_value}
            lda_post = torch.log_softmax(routers["lda_today(lse)"], 1)
            rp = torch.log_softmax(20.0 * routers["ranpac2000_max"], 1)
            routers["lda+ranpac2000"] = lda_post + rp
    res["ranpac"] = {str(k): v for k, v in ran.items()}
    table = {}
    for name, scores in routers.items():
        right = scores.argmax(1) == true_task
        row = {"task_id": float(right.double().mean()),
               "e2e_closed": float((right & own).double().mean())}
        if patch_ok is not None:
            row["e2e_patch"] = float((right & patch_ok).double().mean())
        table[name] = row
    res["routers"] = table
    res["within_closed"] = float(own.double().mean())
    res["within_patch"] = None if patch_ok is None else float(patch_ok.double().mean())
    out = HERE / f"exp_heads_{args.stream}_{args.size}{args.tag}.json"
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "routers"}, indent=None))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in row.values()) + " |")


if __name__ == "__main__":
    main()
