"""The committing side of the two-process routing test (``tests/test_router_scale.py``).

Run as ``python -m tests._route_child URL FOLDER LOG GO`` from the repository root: opens the
tiny engine on the SQLite store ``URL``, waits for the file ``GO``, then imports every patch file
in ``FOLDER`` (sorted by name) through ``Engine.import_task``, one every few tens of ms, and
after each import appends one JSON line to ``LOG``: the wall time after the commit returned and
the routable task -> current version set of the store at that moment (this process is the
only writer, so that is exactly the set the commit made).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.test_engine import tiny_engine


def _state(engine) -> dict[str, int]:
    return {r.name: r.current_version for r in engine.tasks() if r.routable}


def main(url: str, folder: str, log: str, go: str) -> None:
    engine = tiny_engine(url)
    deadline = time.monotonic() + 60
    while not Path(go).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{go} did not appear")
        time.sleep(0.01)
    with open(log, "a") as out:
        for path in sorted(Path(folder).glob("*.safetensors")):
            engine.import_task(path)
            line = {"t": time.time(), "state": _state(engine)}
            out.write(json.dumps(line) + "\n")
            out.flush()
            time.sleep(0.05)


if __name__ == "__main__":
    main(*sys.argv[1:])
