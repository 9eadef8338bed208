"""Avalanche integration: the TAPS strategy, its loss plugin and task-label router, baselines.

An integration (Avalanche). May import every part of the library (the method, training,
routing, storage, tracking, the engine); nothing in the library imports it, and it never
imports the CLI.
"""

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
