"""Mixed-task forwards for a server: rows of many task versions in one pass over the base.

A :class:`TaskServer` serves ``predict`` from one merged module per loaded version (the
bit-for-bit path). Routing and per-row prediction instead run every row through ONE
:class:`~taps_cl.taps.mixed.MixedTaskModel` (the base once, each task's delta, norms and head
on its rows; vLLM's ``punica_wrapper`` does this for LoRA adapters), so a batch that holds many
tasks costs about one forward, not one per task.

:class:`MixedForwards` keeps the versions those forwards need in a TAPS model of its own (a
"holder", never the server's loader): each loaded ``(task, version)`` is a task there under a
slot name of its own (``s0``, ``s1``, ...), so two versions of one task never collide. At most
``max_loaded`` versions are held (least recently used are dropped), and one mixed model is
kept, over every held version: a batch over any subset of them reuses it (a mixed model costs
nothing per forward for the tasks a batch does not hold). A batch naming more versions than
``max_loaded`` runs in chunks of at most ``max_loaded`` versions, so memory stays bounded by
``max_loaded`` whatever the number of stored tasks.

Thread safety: loads, evictions and rebuilds run under one lock; a forward runs outside it on
the mixed model it was handed (the model keeps no per-call state and holds its own references
to the tensors, so a later eviction or rebuild never changes a forward in flight).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from taps_cl.bases import Preprocessing, version_preprocessing
from taps_cl.data import preprocess
from taps_cl.taps.mixed import MixedTaskModel
from taps_cl.taps.model import TAPSModel
from taps_cl.taps.patch import TaskPatch
from taps_cl.taps.prefix import Resume

__all__ = ["MixedForwards", "VersionInfo"]

Key = tuple[str, int]  # (task, version)
_CHUNK = 256  # rows per forward (as the server's merged forwards)
_INFO_KEPT = 4096  # version metadata kept after its tensors are dropped (a few hundred bytes each)


@dataclass(frozen=True)
class VersionInfo:
    """What a mixed forward needs to know of one version besides its tensors."""

    preprocessing: Preprocessing  # the version's (at its trained input size)
    num_classes: int
    class_names: list[str] | None


class MixedForwards:
    """Task versions held for mixed-task forwards (see the module docstring).

    ``new_model()`` builds the holder (a task-free TAPS model of the base) on first use;
    ``load_patch(name, version)`` reads a verified patch; ``max_loaded()`` is the current limit
    (read on every load, as the server's own ``max_loaded`` may change)."""

    def __init__(
        self,
        *,
        new_model: Callable[[], TAPSModel],
        load_patch: Callable[[str, int], TaskPatch],
        base_preprocessing: Preprocessing,
        device: torch.device,
        max_loaded: Callable[[], int],
    ) -> None:
        self._new_model = new_model
        self._load_patch = load_patch
        self._base_prep = base_preprocessing
        self.device = device
        self._max_loaded = max_loaded
        self._holder: TAPSModel | None = None
        self._slots: OrderedDict[Key, str] = OrderedDict()  # LRU of held versions
        self._info: OrderedDict[Key, VersionInfo] = OrderedDict()
        self._mixed: tuple[dict[Key, int], MixedTaskModel] | None = None  # (slot index, model)
        self._next = 0
        self._lock = threading.RLock()

    def holder(self) -> TAPSModel:
        """The TAPS model the mixed forwards' tensors come from (built on first use): a routing
        pass over its base shares those tensors, so a mixed forward may resume from it."""
        with self._lock:
            return self._get_holder()

    def held(self) -> list[Key]:
        """The held versions, least recently used first."""
        with self._lock:
            return list(self._slots)

    def forget(self, name: str | None = None) -> None:
        """Drop every held version of ``name`` (None: of every task), e.g. after the task was
        removed or replaced in the store (a re-created task may reuse a version number)."""
        with self._lock:
            for key in [k for k in self._slots if name is None or k[0] == name]:
                self._drop(key)
            for key in [k for k in self._info if name is None or k[0] == name]:
                del self._info[key]

    def info(self, keys: Sequence[Key]) -> dict[Key, VersionInfo]:
        """Each version's metadata (a version never seen is loaded to read it)."""
        with self._lock:
            missing = [k for k in dict.fromkeys(keys) if k not in self._info]
        for chunk in _chunks(missing, self._limit()):
            self._model(chunk)
        with self._lock:
            return {k: self._info[k] for k in keys}

    @torch.no_grad()
    def logits(
        self,
        keys: Sequence[Key],
        x: torch.Tensor,
        rows: torch.Tensor,
        resume: Resume | None = None,
    ) -> torch.Tensor:
        """Row ``i`` of preprocessed ``x`` through version ``keys[rows[i]]``: logits padded
        with ``-inf`` to the widest head among ``keys`` (CPU, float32). ``resume``: the routing
        pass ``x`` came from (each mixed forward resumes from it where it can)."""
        keys = list(keys)
        rows = torch.as_tensor(rows, dtype=torch.int64).flatten().cpu()
        if len(set(keys)) != len(keys) or not keys:
            raise ValueError(f"mixed logits need distinct task versions, got {keys!r}")
        if rows.numel() != x.shape[0] or (
            rows.numel() and not 0 <= rows.min() <= rows.max() < len(keys)
        ):
            raise ValueError(
                f"{rows.numel()} row indices into {len(keys)} versions for {x.shape[0]} inputs"
            )
        present = sorted(set(rows.tolist()))
        width = max(i.num_classes for i in self.info([keys[p] for p in present]).values())
        out = torch.full((x.shape[0], width), float("-inf"))
        for chunk in _chunks(present, self._limit()):
            slot_of, mixed = self._model([keys[p] for p in chunk])
            local = torch.full((len(keys),), -1, dtype=torch.int64)
            local[chunk] = torch.tensor([slot_of[keys[p]] for p in chunk])
            sel = None if len(chunk) == len(present) else torch.isin(rows, torch.tensor(chunk))
            xs, idx = (x, local[rows]) if sel is None else (x[sel], local[rows[sel]])
            pos = torch.arange(x.shape[0]) if sel is None else sel.nonzero().flatten()
            part = torch.cat([
                mixed(c.to(self.device), i.to(self.device),
                      resume=None if resume is None else resume.part(p))
                for c, i, p in zip(xs.split(_CHUNK), idx.split(_CHUNK), pos.split(_CHUNK),
                                   strict=True)
            ])[:, :width]  # fmt: skip
            # (the mixed model may hold a wider task than these rows use: -inf columns)
            if sel is None:
                out[:, : part.shape[1]] = part
            else:
                out[sel.nonzero().flatten(), : part.shape[1]] = part
        return out

    def predict(self, row_keys: Sequence[Key], inputs: object) -> torch.Tensor:
        """Logits of raw ``inputs``, row ``i`` through version ``row_keys[i]`` (padded with
        ``-inf`` to the widest head): one mixed forward per distinct preprocessing."""
        keys = list(dict.fromkeys(row_keys))
        info = self.info(keys)
        views: dict[tuple, list[Key]] = {}
        for key in keys:
            views.setdefault(dataclasses.astuple(info[key].preprocessing), []).append(key)
        width = max(i.num_classes for i in info.values())
        out = None
        for members in views.values():
            prep = info[members[0]].preprocessing
            x = preprocess(inputs, prep, prep.input_size)
            if x.shape[0] != len(row_keys):
                raise ValueError(
                    f"{len(row_keys)} task names for {x.shape[0]} inputs: give one per input"
                )
            if out is None:
                out = torch.full((x.shape[0], width), float("-inf"))
            pos = {k: i for i, k in enumerate(members)}
            sel = [i for i, k in enumerate(row_keys) if k in pos]
            rows = torch.tensor([pos[row_keys[i]] for i in sel], dtype=torch.int64)
            if len(sel) == len(row_keys):
                part = self.logits(members, x, rows)
                out[:, : part.shape[1]] = part
            else:
                part = self.logits(members, x[sel], rows)
                out[torch.tensor(sel), : part.shape[1]] = part
        return out

    # -- under the lock ---------------------------------------------------------------------

    def _limit(self) -> int:
        return max(1, int(self._max_loaded()))

    def _model(self, keys: Sequence[Key]) -> tuple[dict[Key, int], MixedTaskModel]:
        """The mixed model over the held versions, holding ``keys`` (loaded if need be)."""
        with self._lock:
            for key in keys:
                if key in self._slots:
                    self._slots.move_to_end(key)
            current = self._mixed
            fits = len(self._slots) <= self._limit()  # (the limit may have been lowered)
            if fits and current is not None and all(k in current[0] for k in keys):
                return current
            missing = [k for k in keys if k not in self._slots]
            self._make_room(keys, len(missing))
            for key in missing:
                self._load(key)
            held = list(self._slots)
            model = MixedTaskModel(self._get_holder(), [self._slots[k] for k in held])
            self._mixed = ({k: i for i, k in enumerate(held)}, model)
            return self._mixed

    def _get_holder(self) -> TAPSModel:
        if self._holder is None:
            self._holder = self._new_model().to(self.device).eval()
        return self._holder

    def _make_room(self, keep: Sequence[Key], extra: int) -> None:
        """Drop least recently used versions not in ``keep`` until ``extra`` more fit."""
        while len(self._slots) + extra > self._limit():
            victim = next((k for k in self._slots if k not in keep), None)
            if victim is None:
                return  # every held version is needed now (a chunk is at most the limit)
            self._drop(victim)

    def _load(self, key: Key) -> None:
        holder = self._get_holder()
        patch = self._load_patch(*key)
        slot = f"s{self._next}"
        self._next += 1
        try:
            holder.load_patch(patch, name=slot)
        except BaseException:
            if slot in holder.tasks:
                holder.remove_task(slot)
            raise
        holder.eval()
        self._slots[key] = slot
        prep = version_preprocessing(patch.config, self._base_prep)
        self._info[key] = VersionInfo(prep, patch.num_classes, patch.class_names)
        self._info.move_to_end(key)
        while len(self._info) > _INFO_KEPT:
            self._info.popitem(last=False)

    def _drop(self, key: Key) -> None:
        slot = self._slots.pop(key)
        self._holder.remove_task(slot)
        if self._mixed is not None and key in self._mixed[0]:
            self._mixed = None  # it holds the dropped version's tensors: let them go


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
