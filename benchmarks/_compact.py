"""Pieces of the budget sweep of ``benchmarks/transfer.py`` (issue 13): a PEFT LoRA adapter per
task, trained with the same loop pieces as every baseline, and the accuracy-vs-bytes plot."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from taps_cl.config import TrainConfig
from taps_cl.taps.model import find_head, set_child
from taps_cl.taps.modules import is_norm
from taps_cl.training.baselines import train_plain
from taps_cl.training.runtime import seed_everything


def fit_lora(base: nn.Module, num_classes: int, train, test, cfg: TrainConfig, rank: int) -> dict:
    """One PEFT LoRA adapter (rank ``rank``, alpha = rank) on every dense conv and linear layer
    (depthwise convs have no LoRA in peft), with trainable norms and head (``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model

    seed_everything(cfg.seed)
    model = copy.deepcopy(base)
    head = find_head(model)
    old = model.get_submodule(head)
    set_child(model, head, nn.Linear(old.in_features, num_classes))
    targets = [
        n
        for n, m in model.named_modules()
        if n != head and ((isinstance(m, nn.Conv2d) and m.groups == 1) or isinstance(m, nn.Linear))
    ]
    norms = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_norm(m)})
    lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets,
                      modules_to_save=[head, *norms])  # fmt: skip
    peft_model = get_peft_model(model, lora)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    acc, seconds = train_plain(peft_model, trainable, train, test, cfg, "lora")
    saved = list(trainable) + [
        b for n, b in peft_model.named_buffers() if "modules_to_save" in n and b.is_floating_point()
    ]
    params = sum(t.numel() for t in saved)
    return {"accuracy": acc, "params": params, "bytes": 4 * params, "seconds": seconds}


def plot(rows: list[dict[str, Any]], out: str, full_bytes: int) -> None:
    """Mean accuracy over tasks against mean stored bytes per task, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["method"], []).append(r)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    families = {"taps": "o-", "taps-int8": "s-", "taps-r": "^-", "lastk": "x--", "lora": "d:"}
    series: dict[str, list[tuple[float, float, str]]] = {}
    for method, sel in groups.items():
        acc = sum(r["accuracy"] for r in sel) / len(sel)
        nbytes = sum(r["bytes"] for r in sel) / len(sel)
        family = method.split("@")[0]
        series.setdefault(family, []).append((nbytes, 100 * acc, method))
    for family, pts in sorted(series.items()):
        pts.sort()
        style = families.get(family.split("-r")[0] + ("-r" if "-r" in family else ""), "o")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=family)
    ax.axvline(full_bytes * 0.1, color="grey", lw=0.8, ls=":", label="10% of a fp32 copy")
    ax.set_xscale("log")
    ax.set_xlabel("stored bytes per task (mean over tasks)")
    ax.set_ylabel("mean accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        out.append({"task": "MEAN", "method": m,
                    **{k: sum(r[k] for r in sel) / len(sel)
                       for k in ("accuracy", "params", "bytes", "seconds")}})  # fmt: skip
    return out


def targets(means: list[dict[str, Any]], rows: list[dict[str, Any]], n_base: int) -> dict:
    """Issue 13's benchmark targets, each with the numbers it was judged on."""
    by = {m["method"]: m for m in means}
    taps = [m for m in means if m["method"].startswith("taps")]
    lora = [m for m in means if m["method"].startswith("lora")]
    ft = by["finetune"]
    out: dict[str, Any] = {}
    out["taps_vs_lora"] = [
        {"lora": lo["method"], "lora_accuracy": lo["accuracy"], "lora_bytes": lo["bytes"],
         "taps": [t["method"] for t in taps
                  if t["accuracy"] >= lo["accuracy"] and t["bytes"] <= lo["bytes"]]}
        for lo in lora
    ]  # fmt: skip
    tenth = 0.1 * 4 * n_base
    near = [t for t in taps if t["bytes"] <= tenth and t["accuracy"] >= ft["accuracy"] - 0.01]
    best_small = max((t for t in taps if t["bytes"] <= tenth), key=lambda t: t["accuracy"],
                     default=None)  # fmt: skip
    out["within_1pt_of_finetune_at_10pct_bytes"] = {
        "met": bool(near), "configs": [t["method"] for t in near],
        "best": best_small and {"method": best_small["method"], "gap_points":
                                100 * (ft["accuracy"] - best_small["accuracy"])},
    }  # fmt: skip
    vs_lastk = {}
    for m in means:
        if m["method"].startswith("lastk@"):
            b = m["method"].split("@")[1]
            t = by.get(f"taps@{b}")
            if t:
                vs_lastk[b] = 100 * (t["accuracy"] - m["accuracy"])
    out["taps_minus_lastk_points"] = vs_lastk
    shares = [(r["method"], r["task"], r["params"] / n_base, r["budget"]) for r in rows
              if r["method"].startswith("taps") and "budget" in r]  # fmt: skip
    out["share_over_budget_by_10pct"] = [s for s in shares if s[2] > 1.1 * s[3]]
    out["share_under_budget_by_10pct"] = [s for s in shares if s[2] < 0.9 * s[3]]
    return out
