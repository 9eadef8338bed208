"""taps_cl.routing: the math of task-free routing (which stored task an input belongs to).

- :mod:`~taps_cl.routing.features`: base features, the one way they are computed
- :mod:`~taps_cl.routing.stats`: per-task statistics of those features (stored with a patch),
  full (older versions) or compact (:data:`COMPACT_RANK` scatter plus diagonal)
- :mod:`~taps_cl.routing.pool`: the pooled scatter, each task's own term
- :mod:`~taps_cl.routing.classtable` and :mod:`~taps_cl.routing.discriminant`: the class rows a
  router scores with, solved in full or (a derived router) only for the tasks that changed
- :mod:`~taps_cl.routing.task_router`: :class:`TaskRouter`, the routing methods over them
- :mod:`~taps_cl.routing.methods`: the registry of routing methods (``@register_method``)

May import: the foundation (config, errors, bases, data) and the method (:mod:`taps_cl.taps`).
Must never import: training, storage, serving, tracking, the engine, integrations or the CLI.
Training-time collection over data loaders is :mod:`taps_cl.training.route_stats`; routing over a
store is :mod:`taps_cl.serving.route`.
"""

from taps_cl.routing.features import base_feature_extractor, base_features, collect_route_stats
from taps_cl.routing.methods import ROUTING_METHODS, RoutingMethod, register_method
from taps_cl.routing.stats import (
    COMPACT_RANK,
    Calibration,
    CalibrationAccumulator,
    RouteStats,
    RouteStatsAccumulator,
    pack_symmetric,
    unpack_symmetric,
)
from taps_cl.routing.task_router import (
    METHODS,
    PATCHED_METHODS,
    RouteResult,
    TaskRouter,
    oas_shrinkage,
)

__all__ = [
    "COMPACT_RANK",
    "METHODS",
    "PATCHED_METHODS",
    "ROUTING_METHODS",
    "Calibration",
    "CalibrationAccumulator",
    "RouteResult",
    "RouteStats",
    "RouteStatsAccumulator",
    "RoutingMethod",
    "TaskRouter",
    "base_feature_extractor",
    "base_features",
    "collect_route_stats",
    "oas_shrinkage",
    "pack_symmetric",
    "register_method",
    "unpack_symmetric",
]
