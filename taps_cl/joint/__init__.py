"""Joint mode: train several tasks at once on one base (optionally the base too), on 1..N processes.

The loop is :func:`taps_cl.training.fit_tasks`, the same one that trains a single task: every step
draws one minibatch from *every* task (each task's stream cycles on its own, so tasks of
different sizes mix), runs each task's forward through its own gates, norms and head, sums the
task losses plus each task's sparsity penalty and takes ONE optimizer step, clipping each task's
gradient on its own. This package keeps what only several tasks need: per-task batch ratios,
training the shared base, and process groups. With the base
frozen (``train_base=False``) the result is, in kind, what incremental training gives: one patch
per task on the unchanged base. With ``train_base=True`` the shared weights are trained too (the
paper's joint multi-task variant): what tasks have in common moves into the base, so fewer
layers need task deltas. The trained weights then form a *new* base with its own fingerprint;
deltas are relative to it, and tasks of the old base are untouched.

Distributed: under ``torchrun`` (env ``WORLD_SIZE`` > 1) the process group is initialised from
the env (NCCL on GPUs, gloo on CPU), each task gets a ``DistributedSampler`` and one DDP module
runs all tasks' forwards. Every per-task parameter exists before the DDP wrap. All ranks end
with bit-identical state (rank 0's is broadcast); only rank 0 writes to the store.

Part of training. May import: the foundation, the method, routing math and training. Must
never import storage, serving, tracking, the engine, integrations or the CLI.
"""

from taps_cl.config import JointConfig
from taps_cl.joint.distributed import broadcast_state, distributed_session, init_distributed
from taps_cl.joint.fit import JointResult, fit_joint
from taps_cl.joint.sampling import task_batch_sizes
from taps_cl.joint.shared_base import base_parameters, new_base_label, stored_base, trained_base
from taps_cl.training.runtime import world

__all__ = [
    "JointConfig",
    "JointResult",
    "base_parameters",
    "broadcast_state",
    "distributed_session",
    "fit_joint",
    "init_distributed",
    "new_base_label",
    "stored_base",
    "task_batch_sizes",
    "trained_base",
    "world",
]
