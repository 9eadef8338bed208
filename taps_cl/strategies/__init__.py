"""Avalanche integration: the TAPS strategy, its loss plugin and task-label router."""

from taps_cl.strategies.plugin import TAPSLossPlugin
from taps_cl.strategies.router import TAPSRouter
from taps_cl.strategies.taps import TAPS

__all__ = ["TAPS", "TAPSLossPlugin", "TAPSRouter"]
