"""What the two comparisons with Avalanche's strategies (``avalanche_compare.py``,
``class_incremental.py``) share: their common options, the ``--fast``/full presets, and the
arguments every strategy is built with, so both give every strategy the same budget."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Before avalanche is first imported: its import and its strategies warn about optional extras.
warnings.filterwarnings("ignore", message="no QP solver")  # avalanche imports qpsolvers (GEM)
warnings.filterwarnings("ignore", message="No loggers specified")
warnings.filterwarnings("ignore", category=DeprecationWarning)

from avalanche.evaluation.metrics import (  # noqa: E402
    accuracy_metrics,
    bwt_metrics,
    forgetting_metrics,
)
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402

from benchmarks.harness import parser  # noqa: E402


def strategy_parser(
    doc: str | None,
    strategies: Sequence[str],
    *,
    out: str | Path | None,
    experiment_help: str,
    fast_help: str,
    mem_size: int,
) -> argparse.ArgumentParser:
    """The options of a strategy comparison; ``None`` sizes come from :func:`parse_with_presets`."""
    p = parser(doc, out=out, experiment_help=experiment_help)
    p.add_argument("--fast", action="store_true", help=fast_help)
    p.add_argument("--strategies", default=",".join(strategies), help="comma-separated subset")
    for name in ("epochs", "image-size", "max-train", "max-test"):
        p.add_argument(f"--{name}", type=int, default=None, help="default: from the preset")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam(W) learning rate, all strategies")
    p.add_argument("--lam", type=float, default=1.0, help="TAPS sparsity weight")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="TAPS penalty warm-up")
    p.add_argument("--mem-size", type=int, default=mem_size, help="replay buffer (samples)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_with_presets(
    p: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    presets: Mapping[str, Mapping[str, Any]],
    strategies: Sequence[str],
) -> argparse.Namespace:
    """Parse, fill the sizes not given from the ``"fast"`` or ``"full"`` preset, and refuse
    unknown strategies."""
    args = p.parse_args(argv)
    for key, value in presets["fast" if args.fast else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = sorted(set(args.strategies.split(",")) - set(strategies))
    if unknown:
        p.error(f"unknown strategies {unknown}; choose from {tuple(strategies)}")
    return args


def evaluator(*, bwt: bool = False) -> EvaluationPlugin:
    """Accuracy and forgetting per experience and over the stream (and BWT), no loggers."""
    metrics = [
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
    ]
    if bwt:
        metrics.append(bwt_metrics(experience=True, stream=True))
    return EvaluationPlugin(*metrics, loggers=[])


def strategy_kwargs(args: argparse.Namespace, evaluator: Any, device: str) -> dict[str, Any]:
    """The training budget and evaluation every strategy of one comparison shares."""
    return dict(
        train_mb_size=args.batch_size,
        train_epochs=args.epochs,
        eval_mb_size=128,
        device=device,
        evaluator=evaluator,
    )
