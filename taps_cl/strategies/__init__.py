"""Avalanche integration: the TAPS strategy, its loss plugin and task-label router, baselines."""

from taps_cl.strategies.multihead import BASELINES, MultiHeadNet, PackNetMultiHead, build_baseline
from taps_cl.strategies.multitask import TAPSRouter
from taps_cl.strategies.plugin import TAPSLossPlugin
from taps_cl.strategies.taps import TAPS

__all__ = [
    "BASELINES",
    "TAPS",
    "MultiHeadNet",
    "PackNetMultiHead",
    "TAPSLossPlugin",
    "TAPSRouter",
    "build_baseline",
]
