"""Patch builders for the store tests, and the code the multi-process tests run in children.

Run as ``python -m tests._store_child <command> <args...>`` from the repository root:

- ``commit-loop URL NAME N READY GO``: touch READY, wait for GO, commit N versions of NAME
- ``hang URL NAME MARKER``: start a commit, touch MARKER once tensor rows are written, sleep
- ``roundtrip URL NAME EXPECTED``: load NAME onto a fresh tiny_cnn, compare outputs to EXPECTED
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from taps_cl.taps.patch import TaskPatch

BASE = "b" * 64  # a made-up base fingerprint for patches that never meet a model


def make_patch(name: str = "flowers", seed: int = 0, base: str = BASE, **kw: object) -> TaskPatch:
    """A small patch with every tensor kind and several dtypes (incl. bfloat16 and 0-d)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "delta.conv1": torch.randn(8, 3, 3, 3, generator=g),
        "delta.fc": torch.randn(4, 16, generator=g).to(torch.bfloat16),
        "score.conv1": torch.tensor(0.5),
        "score.conv2": torch.tensor(-0.25),
        "score.fc": torch.tensor(0.3),
        "norm.bn1.weight": torch.ones(8),
        "norm.bn1.running_var": torch.rand(8, generator=g).half(),
        "norm.bn1.num_batches_tracked": torch.tensor(7),
        "head.weight": torch.randn(3, 16, generator=g),
        "head.bias": torch.zeros(3),
    }
    fields = dict(
        name=name,
        num_classes=3,
        tensors=tensors,
        active_layers=["conv1", "fc"],
        num_layers=3,
        base_fingerprint=base,
        class_names=["a", "b", "c"],
        config={"tau": 0.1, "lam": 1.0},
    )
    fields.update(kw)
    return TaskPatch(**fields)


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.01)


def commit_loop(url: str, name: str, n: str, ready: str, go: str) -> None:
    from taps_cl.storage import TaskStore

    store = TaskStore(url)
    Path(ready).touch()
    _wait_for(Path(go))
    versions = [store.commit(make_patch(name, seed=os.getpid() * 100 + i)) for i in range(int(n))]
    print(" ".join(map(str, versions)))


def hang(url: str, name: str, marker: str) -> None:
    from taps_cl.storage import TaskStore, ops

    original = ops.insert_tensor_rows

    def insert_then_hang(session, version_id, encoded):  # noqa: ANN001
        original(session, version_id, encoded)
        session.flush()
        Path(marker).touch()
        time.sleep(600)  # the test kills us here, mid-transaction

    ops.insert_tensor_rows = insert_then_hang
    TaskStore(url).commit(make_patch(name, seed=99))


def roundtrip(url: str, name: str, expected: str) -> None:
    from safetensors.torch import load_file

    from taps_cl.storage import TaskStore
    from taps_cl.taps.model import TAPSModel
    from tests.tiny import tiny_cnn, tiny_images

    patch = TaskStore(url).load(name)
    model = TAPSModel(tiny_cnn(seed=0)).eval()
    model.load_patch(patch)
    with torch.no_grad():
        out = model(tiny_images(8)[0], task=name)
    want = load_file(expected)["out"]
    print("EQUAL" if torch.equal(out, want) else f"DIFFERENT max {float((out - want).abs().max())}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    commands = {"commit-loop": commit_loop, "hang": hang, "roundtrip": roundtrip}
    commands[sys.argv[1]](*sys.argv[2:])
