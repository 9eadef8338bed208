"""Base sources are a registry: a new source is one registration, and names are unique."""

from __future__ import annotations

import pytest
import torch

from taps_cl.bases import BASE_SOURCES, Base, Preprocessing, load_base, register_source


@pytest.fixture
def toy_source():
    """A source registered from this file: ``"toy:<width>"`` is a seeded linear layer."""

    @register_source("toy", matches=lambda spec: spec.startswith("toy:"), hints=["toy:<width>"])
    def load_toy(spec: str, **_: object) -> Base:
        width = int(spec.removeprefix("toy:"))
        torch.manual_seed(0)
        prep = Preprocessing(input_size=width)
        return Base(torch.nn.Linear(width, 2).train(), f"toy{width}", spec, prep)

    yield load_toy
    del BASE_SOURCES["toy"]


def test_a_registered_source_loads_through_load_base(toy_source):
    base = load_base("toy:4")
    assert (base.name, base.source, base.preprocessing.input_size) == ("toy4", "toy:4", 4)
    assert isinstance(base.module, torch.nn.Linear) and base.module.in_features == 4
    custom = Preprocessing(input_size=8)
    assert load_base("toy:4", preprocessing=custom).preprocessing == custom
    with pytest.raises(ValueError, match="only applies to a checkpoint file"):
        load_base("toy:4", arch="resnet18")  # the toy source takes no architecture
    with pytest.raises(ValueError, match=r"toy:<width>"):  # listed among the known specs
        load_base("nothing-like-this")


def test_a_duplicate_registration_is_refused(toy_source):
    with pytest.raises(ValueError, match="already registered"):
        register_source("toy", matches=lambda spec: False, hints=[])(toy_source)
    with pytest.raises(ValueError, match="already registered"):
        register_source("timm", matches=lambda spec: False, hints=[])(toy_source)
    assert BASE_SOURCES["toy"].load is toy_source
    assert list(BASE_SOURCES)[:4] == ["efficientnet_lite", "timm", "timm-random", "file"]


def test_register_source_checks_its_arguments():
    with pytest.raises(ValueError, match="non-empty name"):
        register_source("", matches=lambda spec: True, hints=[])
    with pytest.raises(TypeError, match="callable"):
        register_source("bad", matches="timm:", hints=[])  # type: ignore[arg-type]
    assert "bad" not in BASE_SOURCES
