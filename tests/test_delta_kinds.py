"""Delta kinds are registered classes: a kind defined here, in the test file, goes end to end.

``RowScale`` is a toy kind (one scale per output row: ``delta = diag(v) @ w_base``) that no
library file knows. Registered by a fixture and unregistered after, it trains through
``Engine.add_task``, is stored, reloads in a fresh engine with the same bits, merges, exports
and imports into another store past the layout checks.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from taps_cl.bases import Base, Preprocessing
from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.engine import Engine
from taps_cl.errors import InvalidPatchError
from taps_cl.registry import DELTA_KINDS
from taps_cl.taps.budget import task_size
from taps_cl.taps.deltas import (
    DeltaKind,
    decode_delta,
    encode_delta,
    kind_for,
    register_delta_kind,
)
from taps_cl.taps.model import TAPSModel
from taps_cl.taps.patch import TaskPatch
from tests.tiny import tiny_cnn, tiny_images


class RowScale(DeltaKind):
    """Per task one scale per output row of the weight: ``delta = v[:, None, ...] * w``."""

    name = "rowscale"
    params = ("row_scale",)
    stored = ("row_scale",)

    def init(self, weight: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        return {"row_scale": weight.new_zeros(weight.shape[0])}

    def value(self, params: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        return _scaled(params["row_scale"], weight)

    def to_stored(self, params, weight):
        return {"row_scale": params["row_scale"]}

    @classmethod
    def expected(cls, shape, given):
        return {"row_scale": (shape[0],)}

    @classmethod
    def from_stored(cls, stored, weight):
        return _scaled(stored["row_scale"], weight)


def _scaled(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (weight.dim() - 1))) * weight


@pytest.fixture
def rowscale():
    register_delta_kind(RowScale)
    try:
        yield RowScale
    finally:
        DELTA_KINDS.remove(RowScale.name)


def _engine(path: Path, config: TAPSConfig | None = None) -> Engine:
    base = Base(tiny_cnn(), "tiny", "tests.tiny", Preprocessing(input_size=16))
    train = TrainConfig(epochs=2, batch_size=8, lr=1e-2)
    return Engine(base, store=f"sqlite:///{path}", train=train, config=config)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_kind_registered_in_a_test_goes_end_to_end(rowscale, tmp_path, dtype):
    config = TAPSConfig(size=None, lam=0.0, delta_kind="rowscale", delta_dtype=dtype)  # gates stay
    engine = _engine(tmp_path / "a.db", config)
    x, y = tiny_images(24, 3)
    rec = engine.add_task((x, y), name="t", quiet=True)
    assert rec.active_layers == ["conv1", "conv2"]
    stored = engine.store.load("t")
    assert stored.tensors["row_scale.conv2"].shape == (16,)
    assert not stored.kind("delta") and stored.config["delta_kind"] == "rowscale"
    assert any(k.startswith("scale.row_scale.") for k in stored.tensors) == (dtype == "int8")
    logits = engine.predict("t", x, logits=True)

    fresh = _engine(tmp_path / "a.db")  # default (dense) config, a new process's view
    assert torch.equal(fresh.predict("t", x, logits=True), logits)
    merged = fresh.model("t")
    with torch.no_grad():
        assert (merged(fresh.preprocess(x, "t")) - logits).abs().max() <= 1e-5

    path = engine.export_task("t", tmp_path / "t.safetensors")
    other = _engine(tmp_path / "b.db")
    other.import_task(path)
    assert torch.equal(other.predict("t", x, logits=True), logits)

    from taps_cl.storage.layout import check_layout

    patch = other.load_patch("t")
    patch.tensors["row_scale.conv1"] = patch.tensors["row_scale.conv1"][:3]
    with pytest.raises(InvalidPatchError, match=r"row_scale.conv1.*needs \[8\]"):
        check_layout(patch, other.patch_layout(), "file", other.fingerprint)


def test_a_kind_trains_and_counts_like_the_built_in_ones(rowscale):
    config = TAPSConfig(size=None, delta_kind="rowscale", delta_dtype="int8")
    model = TAPSModel(tiny_cnn(), config)
    model.add_task("a", 3)
    conv2 = model.base.get_submodule("conv2")
    assert conv2.factorised and list(conv2.row_scale) == ["a"] and "a" not in conv2.delta
    assert [p.shape for p in model.param_groups("a")["delta"]] == [(8,), (16,)]
    assert conv2.stored_size() == 16 + 16  # one scale per row, plus its int8 scale
    with torch.no_grad():
        conv2.row_scale["a"].fill_(0.5)
    x = tiny_images(4)[0]
    with torch.no_grad():
        before = model(x, task="a")
        patch = model.finalize_task("a")
        assert (model(x, task="a") - before).abs().max() <= 1e-5
    assert patch.tensors["row_scale.conv2"].dtype == torch.int8
    assert patch.num_parameters == task_size(model, "a")  # scales counted as parameters
    assert not hasattr(conv2, "lora_a")  # only the configured kind's dicts exist


def test_registering_twice_or_with_taken_names_is_refused(rowscale):
    with pytest.raises(ValueError, match="already registered"):
        register_delta_kind(RowScale)

    class Clash(RowScale):
        name = "clash"
        params = ("lora_a",)  # the low-rank kind's

    class Reserved(RowScale):
        name = "reserved"
        stored = ("score",)  # a patch's gate scores

    for kind in (Clash, Reserved):
        with pytest.raises(ValueError, match="used by no other kind"):
            register_delta_kind(kind)
    with pytest.raises(TypeError):
        register_delta_kind(object)
    assert "clash" not in DELTA_KINDS and "reserved" not in DELTA_KINDS


def test_unknown_or_unregistered_kinds_are_refused():
    with pytest.raises(ValueError, match="unknown delta kind 'rowscale'.*dense"):
        TAPSConfig(delta_kind="rowscale")
    with pytest.raises(ValueError, match="needs delta_rank"):
        TAPSConfig(delta_kind="lowrank", size=None)  # with a size, the size gives the rank
    assert TAPSConfig(delta_kind="lowrank").rank == 32
    with pytest.raises(ValueError, match="must start with one of"):
        TaskPatch("t", 2, {"row_scale.conv1": torch.zeros(2)}, [], 1, "f" * 64)


def test_delta_kind_round_trips_and_old_configs_load():
    config = TAPSConfig(delta_kind="lowrank", delta_rank=4)
    assert TAPSConfig.from_json(config.to_json()) == config
    old = {k: v for k, v in TAPSConfig(delta_rank=4).to_dict().items() if k != "delta_kind"}
    assert type(kind_for(TAPSConfig.from_dict(old))).__name__ == "LowRank"  # today's rule
    assert type(kind_for(TAPSConfig(size=None))).__name__ == "Dense"  # the paper's
    assert type(kind_for(TAPSConfig())).__name__ == "LowRank"  # the default size


def test_the_cli_option_comes_from_the_dataclass():
    from taps_cl.cli.options import add_training_options, taps_config

    parser = argparse.ArgumentParser()
    add_training_options(parser)
    args = parser.parse_args(["--delta-kind", "lowrank", "--delta-rank", "4"])
    assert taps_config(args).delta_kind == "lowrank"
    assert taps_config(parser.parse_args(["--delta-kind", "none"])).delta_kind is None


@pytest.mark.parametrize("name", DELTA_KINDS.names())
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_every_registered_kind_starts_at_zero_and_decodes_what_it_stores(name, dtype):
    weight = torch.randn(16, 8, 3, 3)
    kind = kind_for(TAPSConfig(delta_kind=name, delta_rank=2 if name == "lowrank" else None))
    params = kind.init(weight, seed=0)
    assert torch.equal(kind.value(params, weight), torch.zeros_like(weight))
    params = {k: v + 0.1 * torch.randn_like(v) for k, v in params.items()}
    stored = encode_delta(kind.to_stored(params, weight), dtype)
    assert set(stored) >= set(kind.stored)
    assert {tuple(stored[k].shape) for k in kind.stored} == set(kind.shapes(weight.shape).values())
    err = (decode_delta(stored, weight) - kind.value(params, weight)).abs().max()
    assert err <= {"float32": 1e-6, "bfloat16": 0.05, "int8": 0.05}[dtype]
