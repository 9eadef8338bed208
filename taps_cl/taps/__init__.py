"""taps_cl.taps: the method itself, in plain PyTorch.

Gated layers (``w = w_base + I_tau(s) * dw``, :mod:`~taps_cl.taps.layer`), delta kinds as
registered classes (:mod:`~taps_cl.taps.deltas`), per-task norms and heads
(:mod:`~taps_cl.taps.modules`), the model that injects them into any ``nn.Module``
(:class:`~taps_cl.taps.model.TAPSModel`), sparsity penalties and the budget, the patch a task
owns (:class:`~taps_cl.taps.patch.TaskPatch`) and its single-file format
(:mod:`~taps_cl.taps.patchfile`), and merged serving modules (:mod:`~taps_cl.taps.merge`).

May import: the foundation only (config, errors, registry, bases). Must never import routing,
training, storage, serving, tracking, the engine, Avalanche, SQL or MLflow: the method works on
any model without knowing where a task is trained, kept or served.
"""
