"""taps_cl.serving: stored tasks answering inputs, with or without a task name.

- :class:`TaskServer` (:mod:`~taps_cl.serving.server`): loads task versions from a store on
  demand and serves each as its own merged module; thread safe
- :class:`TaskRouting` / :class:`Routed` (:mod:`~taps_cl.serving.route`): task-free routing,
  owned by the server (``server.route(...)``)
- :func:`save_timm_pretrained` (:mod:`~taps_cl.serving.export`): a served task as a timm model
- HTTP serving (not imported here: ``import taps_cl.serving`` costs no MLflow):
  :mod:`~taps_cl.serving.requests` (request decoding and limits),
  :mod:`~taps_cl.serving.answers` (one answer per row), :mod:`~taps_cl.serving.pyfunc` (the
  routed MLflow model; code in :mod:`~taps_cl.serving.mlflow_model`, config
  :class:`~taps_cl.serving.spec.ServedStore`, server from
  :func:`~taps_cl.serving.open.open_served`), :mod:`~taps_cl.serving.snapshot` (chosen
  versions copied into a new store), :mod:`~taps_cl.serving.http` (MLflow's scoring app
  behind a request guard)

Each part receives what it uses (fingerprint, preprocessing, a
:class:`~taps_cl.storage.TaskStoreAPI`, device, model factory), never the engine.
May import: the foundation, the method, routing math, training's evaluation and runtime, the
storage (the protocol and records; the SQL store only to open a served store read-only or
write a snapshot) and MLflow (the HTTP modules). Must never import: tracking, the engine,
integrations or the CLI.
"""

from taps_cl.serving.export import data_config, save_timm_pretrained
from taps_cl.serving.route import DEFAULT_METHOD, Routed, RoutingHost, TaskRouting
from taps_cl.serving.server import Served, TaskServer

__all__ = [
    "DEFAULT_METHOD",
    "Routed",
    "RoutingHost",
    "Served",
    "TaskRouting",
    "TaskServer",
    "data_config",
    "save_timm_pretrained",
]
