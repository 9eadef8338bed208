"""Resume a mixed-task forward from the routing pass: reuse the base's activations up to the
first module that holds anything task-specific for the batch's tasks.

A routed batch runs the plain base twice: once for the routing features, then once more inside
the mixed-task forward of the chosen tasks. Where those tasks adapt only late layers (no own
norms, gates restricted to late layers, ``TAPSConfig(task_norms=False, layers=[...])``), every
module before their first adapted layer computes the same thing twice: in eval mode, identical
inputs through identical shared weights give identical results. So:

- :func:`recordable` hooks the routing pass's module tree (once); inside :func:`recording` its
  forward keeps the output of each *point* (the root's children, and the children of
  ``nn.Sequential``/``ModuleList``/``ModuleDict`` containers, recursively: timm's ``blocks[i]``
  and ``blocks[i][j]``, torchvision's ``layerN`` and ``layerN[j]``) with the order in which points
  start and end. Outputs are references, not copies: one batch's, dropped with the recording.
- :func:`replayable` makes the same points of a mixed-task tree return the recorded output
  instead of computing, inside :func:`replaying`, for points that (a) ended before the first
  point holding a module specific to a task in the batch started, (b) ran once (a point called
  twice, e.g. a shared module, always computes), (c) hold the very same modules (types, every
  parameter and buffer the same tensor, eval mode) in both trees outside the task-specific ones,
  and (d) whose recorded tensor was not written in place afterwards (its version counter). The
  mixed forward's input must equal the recorded input's rows (else nothing is reused).

Everything before the first task-specific module then runs the same code on the same values, so
the resumed forward equals the forward without resume bit for bit (``tests/test_prefix.py``).
A model where any of this cannot be established (another module tree, a chunked routing pass,
different preprocessing, a task norm in the stem) simply runs the full pass.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Recording", "Resume", "points", "recordable", "recording", "replayable", "replaying"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_RECORDING: contextvars.ContextVar[Recording | None] = contextvars.ContextVar(
    "taps_prefix_recording", default=None
)
_REPLAY: contextvars.ContextVar[_Replay | None] = contextvars.ContextVar(
    "taps_prefix_replay", default=None
)
_HOOKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # roots recordable() already hooked


def points(root: nn.Module) -> list[str]:
    """Paths where a forward may resume: the root's children and, through containers, theirs."""
    out: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module._modules.items():
            if child is not None:
                out.append(prefix + name)
                if isinstance(child, _CONTAINERS):
                    walk(child, f"{prefix}{name}.")

    walk(root, "")
    return out


class Recording:
    """One routing pass: its input, its points' outputs (references, with their version
    counters) and when each module first started and each point ended (one clock)."""

    def __init__(self) -> None:
        self.root: nn.Module | None = None  # the recorded tree (None until its forward ran)
        self.input: tuple[torch.Tensor, int] | None = None  # (input, its version)
        self.broken = False  # the tree ran more than once (e.g. chunks): nothing is reusable
        self.start: dict[str, int] = {}  # module path -> clock when it first started
        self.end: dict[str, int] = {}  # point path -> clock when its only call ended
        self.calls: dict[str, int] = {}
        self.outputs: dict[str, tuple[torch.Tensor, int]] = {}  # point -> (output, version)
        self._clock = 0

    def usable(self) -> bool:
        return self.root is not None and not self.broken and self.input is not None

    def _begin(self, root: nn.Module, args: tuple) -> None:
        if self.root is not None:
            self.broken = True
        self.root = root
        x = args[0] if args else None
        version = _version(x)
        self.input = None if version is None else (x, version)

    def _enter(self, path: str) -> None:
        self._clock += 1
        self.calls[path] = self.calls.get(path, 0) + 1
        self.start.setdefault(path, self._clock)

    def _exit(self, path: str, out: object) -> None:
        self._clock += 1
        if self.calls.get(path) == 1:
            self.end[path] = self._clock
            version = _version(out)
            if version is not None:
                self.outputs[path] = (out, version)
        else:
            self.outputs.pop(path, None)

    def check(self) -> None:
        """Forget outputs written in place since they were recorded (never hand them out)."""
        for path, (t, version) in list(self.outputs.items()):
            if _version(t) != version:
                del self.outputs[path]


def _version(t: object) -> int | None:
    if not isinstance(t, torch.Tensor) or t.requires_grad:
        return None
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors keep no version counter
        return None


def recordable(root: nn.Module) -> nn.Module:
    """Hook ``root`` once so that its forward records inside :func:`recording` (outside one the
    hooks return at once): every module's start, every point's end and output. Returns it."""
    if root in _HOOKED:
        return root
    ends = set(points(root))
    for path, module in root.named_modules():
        if not path:
            module.register_forward_pre_hook(_root_hook(root))
            continue
        module.register_forward_pre_hook(_pre_hook(root, path))
        if path in ends:
            module.register_forward_hook(_post_hook(root, path))
    _HOOKED.add(root)
    return root


def _active(root: nn.Module) -> Recording | None:
    rec = _RECORDING.get()
    return rec if rec is not None and rec.root is root else None


def _root_hook(root: nn.Module):
    def hook(module: nn.Module, args: tuple) -> None:
        rec = _RECORDING.get()
        if rec is not None:
            rec._begin(root, args)

    return hook


def _pre_hook(root: nn.Module, path: str):
    def hook(module: nn.Module, args: tuple) -> None:
        rec = _active(root)
        if rec is not None:
            rec._enter(path)

    return hook


def _post_hook(root: nn.Module, path: str):
    def hook(module: nn.Module, args: tuple, out: object) -> None:
        rec = _active(root)
        if rec is not None:
            rec._exit(path, out)

    return hook


@contextlib.contextmanager
def recording() -> Iterator[Recording]:
    """Record the forward of a :func:`recordable` tree run inside (this thread/task only)."""
    rec = Recording()
    token = _RECORDING.set(rec)
    try:
        yield rec
    finally:
        _RECORDING.reset(token)
        rec.check()


@dataclass(frozen=True)
class Resume:
    """A mixed forward's link to a routing pass: its input is ``recording``'s input at
    ``rows`` (None: all of it, in order)."""

    recording: Recording
    rows: torch.Tensor | None = None

    def part(self, rows: torch.Tensor) -> Resume:
        """The resume of a forward over ``rows`` of this one's input."""
        rows = rows.to(torch.int64)
        return Resume(self.recording, rows if self.rows is None else self.rows[rows])


class _Replay:
    """The recorded outputs one mixed forward may return, each once, at its rows."""

    def __init__(self, outputs: dict[str, torch.Tensor], rows: torch.Tensor | None) -> None:
        self.outputs = outputs
        self.rows = rows
        self.used: set[str] = set()

    def take(self, path: str) -> torch.Tensor | None:
        if path in self.used or path not in self.outputs:
            return None
        self.used.add(path)  # a second call of the module computes
        out = self.outputs[path]
        return out if self.rows is None else out.index_select(0, self.rows.to(out.device))


class _ReplayForward:
    """A point's forward in a replayable tree: the recorded output while replaying, else the
    module's own forward."""

    def __init__(self, path: str, forward) -> None:
        self.path = path
        self.forward = forward

    def __call__(self, *args: object, **kwargs: object) -> object:
        replay = _REPLAY.get()
        if replay is not None:
            out = replay.take(self.path)
            if out is not None:
                return out
        return self.forward(*args, **kwargs)


def replayable(tree: nn.Module, skip: Iterable[str] = ()) -> nn.Module:
    """Let ``tree``'s points (except ``skip``, e.g. row modules) return recorded outputs
    inside :func:`replaying`; outside it they compute as before. Returns ``tree``."""
    skip = set(skip)
    for path in points(tree):
        if path not in skip:
            module = tree.get_submodule(path)
            module.forward = _ReplayForward(path, module.forward)
    return tree


@contextlib.contextmanager
def replaying(
    tree: nn.Module,
    x: torch.Tensor,
    resume: Resume | None,
    specific: Iterable[str],
    differs: Iterable[str],
) -> Iterator[None]:
    """Inside, the :func:`replayable` ``tree`` run on ``x`` returns what ``resume``'s recording
    holds for every point it may (see the module docstring). ``specific``: paths of modules
    holding something of the batch's tasks; ``differs``: paths where ``tree`` holds modules of
    its own (every task-specific module, whichever task), left out of the sameness check."""
    replay = None if resume is None else _plan(tree, x, resume, list(specific), tuple(differs))
    if replay is None:
        yield
        return
    token = _REPLAY.set(replay)
    try:
        yield
    finally:
        _REPLAY.reset(token)
        resume.recording.check()  # the forward may have written into what it was handed


def _plan(
    tree: nn.Module, x: torch.Tensor, resume: Resume, specific: list[str], differs: tuple
) -> _Replay | None:
    rec = resume.recording
    if not rec.usable() or not rec.outputs:
        return None
    inp, version = rec.input
    rows = resume.rows
    full = rows is not None and rows.numel() == inp.shape[0]
    if full and torch.equal(rows.cpu(), torch.arange(inp.shape[0])):
        rows = None
    if not _same_input(x, inp, version, rows):
        return None
    bound = _bound(rec, specific)
    if bound is None:
        return None
    same = _sameness(tree, rec.root, differs)
    ok = {
        p: t
        for p, (t, _) in rec.outputs.items()
        if rec.end[p] < bound and rec.calls[p] == 1 and same(p)
    }
    return _Replay(ok, rows) if ok else None


def _same_input(
    x: torch.Tensor, inp: torch.Tensor, version: int, rows: torch.Tensor | None
) -> bool:
    """Whether ``x`` holds the recorded input's ``rows`` (cheap when it is the same memory)."""
    if x.device != inp.device or x.dtype != inp.dtype:
        return False
    if rows is None:
        if x.shape != inp.shape:
            return False
        alias = x.data_ptr() == inp.data_ptr() and x.stride() == inp.stride()
        return (alias and inp._version == version) or torch.equal(x, inp)
    if x.shape[0] != rows.numel() or x.shape[1:] != inp.shape[1:]:
        return False
    return torch.equal(x, inp.index_select(0, rows.to(inp.device)))


def _bound(rec: Recording, specific: list[str]) -> int | None:
    """The clock at which the first module specific to the batch's tasks started; None if one
    of them is not in the recorded tree (another model: no resume)."""
    bound = rec._clock + 1
    for path in specific:
        try:
            rec.root.get_submodule(path)
        except AttributeError:
            return None
        if path in rec.start:  # (one that never ran before it in the routing pass runs later)
            bound = min(bound, rec.start[path])
    return bound


_SAMENESS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tree -> root -> path -> bool


def _sameness(tree: nn.Module, root: nn.Module, differs: tuple):
    """``same(path)``: whether ``tree`` and ``root`` hold the same modules under ``path`` (the
    same types in eval mode, every parameter and buffer the same tensor), outside ``differs``."""
    cache = _SAMENESS.setdefault(tree, weakref.WeakKeyDictionary()).setdefault(root, {})

    def same(path: str) -> bool:
        if (path, differs) not in cache:
            cache[(path, differs)] = _same_subtree(tree, root, path, differs)
        return cache[(path, differs)]

    return same


def _same_subtree(tree: nn.Module, root: nn.Module, path: str, differs: tuple) -> bool:
    for sub, a in root.get_submodule(path).named_modules(prefix=path):
        if any(sub == d or sub.startswith(d + ".") for d in differs):
            continue
        try:
            b = tree.get_submodule(sub)
        except AttributeError:
            return False
        if type(a) is not type(b) or a.training or b.training or not _same_tensors(a, b):
            return False
    return True


def _same_tensors(a: nn.Module, b: nn.Module) -> bool:
    ta = {**dict(a.named_parameters(recurse=False)), **dict(a.named_buffers(recurse=False))}
    tb = {**dict(b.named_parameters(recurse=False)), **dict(b.named_buffers(recurse=False))}
    if ta.keys() != tb.keys():
        return False
    return all(_same_tensor(ta[k], tb[k]) for k in ta)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
    )
