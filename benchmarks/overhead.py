"""TAPS overhead on the real base, measured in one run so both sides see the same machine.

Prints two ratios and writes JSON:
- TAPS training step time / plain fine-tuning step time (target <= 1.15)
- merged-model inference time / base inference time (target <= 1.02)

Steps are interleaved (A, B, A, B, ...) and the median is reported, so background load hits
both sides alike.  Run: ``python benchmarks/overhead.py [--size 64 --batch 32 --repeats 15]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from taps_cl.bases import load_base
from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.data import preprocess
from taps_cl.scenarios import get_task
from taps_cl.taps.model import TAPSModel
from taps_cl.training.loop import build_optimizer


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = load_base("efficientnet_lite0")
    base = loaded.module
    # Real images (not noise): activations stay in range, as in use, for both models alike.
    spec = get_task("digits", max_train=args.batch * 2)
    x = preprocess(spec.train.images[: args.batch], loaded.preprocessing, args.size)
    y = spec.train.targets[: args.batch]

    finetune = copy.deepcopy(base)
    finetune.reset_classifier(10)
    finetune.train()
    ft_opt = torch.optim.AdamW(finetune.parameters(), lr=1e-4)

    taps = TAPSModel(copy.deepcopy(base), TAPSConfig(lam=1.0))
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

    taps.eval()
    merged = taps.merged("t")
    plain = copy.deepcopy(base).eval()
    plain.reset_classifier(10)
    taps.train()

    def infer(model):
        def run() -> None:
            with torch.inference_mode():
                model(x)

        return run

    for fn in (ft_step, taps_step, infer(plain), infer(merged)):  # warm-up
        fn()
    ft, tp, bi, mi = [], [], [], []
    for i in range(args.repeats):
        # Alternate which side goes first, so cache and allocator effects hit both alike.
        first, second = (ft_step, taps_step) if i % 2 == 0 else (taps_step, ft_step)
        times = {first: _timed(first), second: _timed(second)}
        ft.append(times[ft_step])
        tp.append(times[taps_step])
    for i in range(args.repeats):
        first, second = (plain, merged) if i % 2 == 0 else (merged, plain)
        times = {id(first): _timed(infer(first)), id(second): _timed(infer(second))}
        bi.append(times[id(plain)])
        mi.append(times[id(merged)])
    res = {
        "image_size": args.size,
        "batch": args.batch,
        "threads": args.threads,
        "finetune_step_s": statistics.median(ft),
        "taps_step_s": statistics.median(tp),
        "base_infer_s": statistics.median(bi),
        "merged_infer_s": statistics.median(mi),
    }
    res["taps_over_finetune_step"] = res["taps_step_s"] / res["finetune_step_s"]
    res["merged_over_base_inference"] = res["merged_infer_s"] / res["base_infer_s"]
    print(f"fine-tune step  {res['finetune_step_s'] * 1e3:8.1f} ms")
    print(f"TAPS step       {res['taps_step_s'] * 1e3:8.1f} ms")
    print(f"base inference  {res['base_infer_s'] * 1e3:8.1f} ms")
    print(f"merged inference{res['merged_infer_s'] * 1e3:8.1f} ms")
    print(
        f"TAPS step / fine-tune step     = {res['taps_over_finetune_step']:.3f}  (target <= 1.15)"
    )
    print(f"merged / base inference = {res['merged_over_base_inference']:.3f}  (target <= 1.02)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
