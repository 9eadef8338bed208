"""TAPS overhead on the real base, measured in one run so both sides see the same machine.

Prints three ratios and writes JSON:
- TAPS training step time / plain fine-tuning step time (target <= 1.15)
- a step of this release's default (size "compact": low-rank deltas on every layer, as before
  its gates are chosen, the costliest phase) / a step of the paper mode (dense deltas on every
  layer, as at its start); issue 20: training time within 1.2x of the previous default
- merged-model inference time / base inference time (target <= 1.02)

Steps are interleaved (A, B, B, A, ...) and the median is reported, so background load hits
both sides alike.  Run: ``python benchmarks/overhead.py [--size 64 --batch 32 --repeats 15]``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an install

from benchmarks.harness import RESULTS, interleaved_medians, parser, print_table, save
from taps_cl.bases import load_base
from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.data import preprocess
from taps_cl.scenarios import get_task
from taps_cl.taps.model import TAPSModel
from taps_cl.training.loop import build_optimizer


def training_steps(base: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """One optimizer step of plain fine-tuning and of TAPS, each on its own copy of the base;
    and the TAPS model (for its merged form)."""
    finetune = copy.deepcopy(base)
    finetune.reset_classifier(10)
    finetune.train()
    ft_opt = torch.optim.AdamW(finetune.parameters(), lr=1e-4)
    taps = TAPSModel(copy.deepcopy(base), TAPSConfig(lam=1.0, size="paper"))
    taps.add_task("t", 10)
    taps_opt = build_optimizer(taps, "t", TrainConfig(lr=1e-4), score_lr=1e-3)
    taps.train()

    def ft_step() -> None:
        loss = F.cross_entropy(finetune(x), y)
        ft_opt.zero_grad(set_to_none=True)
        loss.backward()
        ft_opt.step()

    def taps_step() -> None:
        loss = F.cross_entropy(taps(x, task="t"), y) + taps.config.lam * taps.penalty("t")
        taps_opt.zero_grad(set_to_none=True)
        loss.backward()
        taps_opt.step()

    default = TAPSModel(copy.deepcopy(base), TAPSConfig())
    default.add_task("t", 10)
    default_opt = build_optimizer(default, "t", TrainConfig(), score_lr=0.0)
    default.train()

    def default_step() -> None:  # budget mode: no penalty, scores only measure importance
        loss = F.cross_entropy(default(x, task="t"), y)
        default_opt.zero_grad(set_to_none=True)
        loss.backward()
        default_opt.step()

    return {"finetune": ft_step, "taps": taps_step, "default": default_step, "model": taps}


def inference(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model(x)

    return run


def measure(args: argparse.Namespace) -> dict:
    """Median step and inference times on one batch of real images, and their ratios."""
    loaded = load_base("efficientnet_lite0")
    base = loaded.module
    # Real images (not noise): activations stay in range, as in use, for both models alike.
    spec = get_task("digits", max_train=args.batch * 2)
    x = preprocess(spec.train.images[: args.batch], loaded.preprocessing, args.size)
    y = spec.train.targets[: args.batch]
    steps = training_steps(base, x, y)
    taps = steps.pop("model")
    taps.eval()
    merged = taps.merged("t")
    plain = copy.deepcopy(base).eval()
    plain.reset_classifier(10)
    taps.train()
    train = interleaved_medians(steps, args.repeats, warmup=1)
    infer = {"base": inference(plain, x), "merged": inference(merged, x)}
    infer = interleaved_medians(infer, args.repeats, warmup=1)
    res = {
        "image_size": args.size,
        "batch": args.batch,
        "threads": args.threads,
        "finetune_step_s": train["finetune"],
        "taps_step_s": train["taps"],
        "default_step_s": train["default"],
        "base_infer_s": infer["base"],
        "merged_infer_s": infer["merged"],
    }
    res["taps_over_finetune_step"] = res["taps_step_s"] / res["finetune_step_s"]
    res["merged_over_base_inference"] = res["merged_infer_s"] / res["base_infer_s"]
    res["default_over_paper_step"] = res["default_step_s"] / res["taps_step_s"]
    return res


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, out=RESULTS / "overhead.json")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    res = measure(args)
    rows = [("fine-tune step", "finetune_step_s"), ("TAPS step (paper)", "taps_step_s"),
            ("TAPS step (default size)", "default_step_s"),
            ("base inference", "base_infer_s"), ("merged inference", "merged_infer_s")]  # fmt: skip
    print_table(["median of", "ms"], [(label, f"{1e3 * res[k]:.1f}") for label, k in rows])
    print(f"TAPS step / fine-tune step = {res['taps_over_finetune_step']:.3f}  (target <= 1.15)")
    print(f"merged / base inference    = {res['merged_over_base_inference']:.3f}  (target <= 1.02)")
    print(f"default / paper TAPS step  = {res['default_over_paper_step']:.3f}  (target <= 1.2)")
    save(args, res)


if __name__ == "__main__":
    main()
