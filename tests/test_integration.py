"""Integration: the real ImageNet-pretrained EfficientNet-Lite0 on real offline data."""

from __future__ import annotations

import copy

import pytest
import torch

from taps_cl.bases import load_base
from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.data import prepare
from taps_cl.engine import Engine
from taps_cl.scenarios import get_task
from taps_cl.taps.budget import route_reserve
from taps_cl.taps.model import TAPSModel
from taps_cl.training.baselines import fit_baseline
from taps_cl.training.loop import fit_task

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lite0():
    return load_base("efficientnet_lite0")


def test_real_base_loads_and_classifies_like_imagenet(lite0):
    assert lite0.num_parameters == 4_652_008
    x = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        assert lite0.module(x).shape == (1, 1000)


def test_taps_beats_the_frozen_feature_extractor(lite0):
    # digits (8x8 scans) is far from ImageNet: adapting layers must pay off clearly.
    # Measured on this setting: TAPS 98.2%, feature extractor 88.7% (benchmarks/transfer.py).
    spec = get_task("digits")
    prep = dict(preprocessing=lite0.preprocessing, image_size=64)
    train, test = prepare(spec.train, **prep), prepare(spec.test, **prep)
    cfg = TrainConfig(epochs=3, image_size=64)
    linear = fit_baseline(lite0.module, 10, train, test, cfg, mode="linear")
    model = TAPSModel(copy.deepcopy(lite0.module), TAPSConfig())
    model.add_task("digits", 10)
    fit = fit_task(model, "digits", train, test, cfg, quiet=True)
    patch = model.finalize_task("digits")
    assert fit.accuracy > linear.accuracy + 0.04, (fit.accuracy, linear.accuracy)
    assert 0 < len(patch.active_layers) < patch.num_layers  # gates really closed, some stayed on
    assert patch.num_parameters < 0.5 * lite0.num_parameters
    # the default size: about 1 MiB a task, routing statistics included
    assert patch.nbytes + route_reserve(10, 1280) <= 1024**2


def test_engine_on_real_base_round_trips_through_the_store(lite0, tmp_path):
    store = f"sqlite:///{tmp_path / 'tasks.db'}"
    engine = Engine(lite0, store=store, train=TrainConfig(epochs=1, image_size=48))
    spec = get_task("lfw_faces")
    rec = engine.add_task(spec.train, name="faces", eval_dataset=spec.test, quiet=True)
    assert rec.accuracy > 0.6
    expected = engine.predict("faces", spec.test.images, logits=True)
    fresh = Engine("efficientnet_lite0", store=store)
    assert fresh.fingerprint == engine.fingerprint
    assert torch.equal(fresh.predict("faces", spec.test.images, logits=True), expected)
