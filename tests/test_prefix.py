"""Resuming a mixed-task forward from the routing pass (taps_cl/taps/prefix.py): bit for bit
the forward without resume, on tiny models of several shapes; nothing reused where it cannot be
established (an early task module, another input, a module called twice)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.routing import base_feature_extractor
from taps_cl.taps import prefix
from taps_cl.taps.mixed import MixedTaskModel
from taps_cl.taps.model import TAPSModel
from taps_cl.taps.prefix import Resume, points, recordable, recording
from tests.test_taps_core import CASES


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class Stages(nn.Module):
    """timm-like: stem conv + norm, ``blocks`` of stages (Sequentials of blocks), head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(
            nn.Sequential(_block(8, 8), _block(8, 8)),
            nn.Sequential(_block(8, 16, 2), _block(16, 16)),
            nn.Sequential(_block(16, 16), _block(16, 24, 2)),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn1(self.conv_stem(x))))
        return self.classifier(self.pool(x).flatten(1))


class Basic(nn.Module):
    """torchvision's BasicBlock: in-place ReLU and ``out += identity``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class ResNetLike(nn.Module):
    """torchvision ResNet's shape: conv1, bn1, in-place relu, maxpool, layerN, avgpool, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(Basic(8), Basic(8))
        self.layer2 = nn.Sequential(Basic(8), Basic(8))
        self.layer3 = nn.Sequential(Basic(8))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Functional(nn.Module):
    """Functional ops between modules (scaling, concatenation, a skip across modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, 1, 1)
        self.b = nn.Conv2d(6, 6, 3, 1, 1)
        self.c = nn.Conv2d(12, 8, 3, 2, 1)
        self.d = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.gelu(self.a(x)) * 0.5
        x = torch.cat([a, self.b(a).sigmoid()], 1)
        x = self.d(F.relu(self.c(x)))
        return self.fc(x.mean((2, 3)))


class Shared(nn.Module):
    """One module called twice (weight sharing): its calls are never reused."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.shared = nn.Conv2d(8, 8, 3, 1, 1)
        self.late = nn.Conv2d(8, 8, 3, 1, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(F.relu(self.shared(F.relu(self.stem(x)))))
        return self.fc(self.late(x).mean((2, 3)))


def _seeded(cls):
    def make() -> nn.Module:
        torch.manual_seed(0)
        model = cls()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        return model.eval()

    return make


# (name, factory, late layers the tasks adapt, points expected reused)
SHAPES = [
    ("stages", _seeded(Stages), ["blocks.2.*"], {"conv_stem", "bn1", "blocks.0", "blocks.1"}),
    # bn1's output is written by the in-place relu: recomputed (from conv1's), never handed out
    (
        "resnet_like",
        _seeded(ResNetLike),
        ["layer2.1.*", "layer3.*"],
        {"conv1", "relu", "maxpool", "layer1", "layer2.0"},
    ),
    ("functional", _seeded(Functional), ["d"], {"a", "b", "c"}),
    ("shared", _seeded(Shared), ["late"], {"stem"}),
]


def _tasks(factory, config: TAPSConfig, n: int = 3, seed: int = 0) -> TAPSModel:
    """``n`` frozen tasks with random deltas (where their gates are open), norms and heads."""
    model = TAPSModel(factory(), config).eval()
    g = torch.Generator().manual_seed(seed)
    for t in range(n):
        model.add_task(f"t{t}", 2 + t)
        with torch.no_grad():
            for group in ("delta", "norm", "head"):
                for p in model.param_groups(f"t{t}")[group]:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        model.finalize_task(f"t{t}")
    return model


class Spy:
    """The points each replaying forward handed back instead of computing."""

    def __init__(self, monkeypatch) -> None:
        self.reused: list[str] = []
        take = prefix._Replay.take

        def spy(replay, path):
            out = take(replay, path)
            if out is not None:
                self.reused.append(path)
            return out

        monkeypatch.setattr(prefix._Replay, "take", spy)


def _routed(model: TAPSModel, x: torch.Tensor):
    extractor = recordable(base_feature_extractor(model))
    with recording() as rec:
        feats = extractor(x)
    return feats, rec


def _rows(n: int, tasks: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, tasks, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,factory,layers,reused", SHAPES, ids=[s[0] for s in SHAPES])
def test_resumed_forward_is_bit_for_bit_and_skips_the_shared_prefix(
    name, factory, layers, reused, monkeypatch
):
    model = _tasks(factory, TAPSConfig(size=None, task_norms=False, layers=layers))
    mixed = MixedTaskModel(model, model.tasks)
    x, rows = torch.randn(12, 3, 16, 16), _rows(12, 3)
    want = mixed(x, rows)
    feats, rec = _routed(model, x)
    spy = Spy(monkeypatch)
    got = mixed(x, rows, resume=Resume(rec))
    assert torch.equal(got, want)
    assert set(spy.reused) == reused
    # again on the same recording (a server's chunks): what the first forward was handed is
    # still the recorded value, or was forgotten
    assert torch.equal(mixed(x, rows, resume=Resume(rec)), want)
    assert torch.equal(feats, base_feature_extractor(model)(x))  # recording changes nothing


@pytest.mark.parametrize("name,factory,layers,reused", SHAPES, ids=[s[0] for s in SHAPES])
def test_a_row_subset_reuses_its_rows(name, factory, layers, reused, monkeypatch):
    model = _tasks(factory, TAPSConfig(size=None, task_norms=False, layers=layers))
    mixed = MixedTaskModel(model, model.tasks)
    x, rows = torch.randn(12, 3, 16, 16), _rows(12, 3)
    _, rec = _routed(model, x)
    idx = torch.tensor([1, 4, 5, 9, 11])
    spy = Spy(monkeypatch)
    got = mixed(x[idx], rows[idx], resume=Resume(rec, idx))
    assert set(spy.reused) == reused
    # the reused rows are the full batch's: the rest runs on 5 rows, and a kernel may round a
    # batch of 5 differently from a batch of 12 (so: float rounding, against both)
    for want in (mixed(x, rows)[idx], mixed(x[idx], rows[idx])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_only_the_batch_tasks_end_the_prefix(monkeypatch):
    """A held task adapting an early layer does not stop a batch without it from resuming."""
    model = _tasks(_seeded(Stages), TAPSConfig(size=None, task_norms=False, layers=["blocks.2.*"]))
    early = _tasks(_seeded(Stages), TAPSConfig(size=None, task_norms=False), n=1)
    model.load_patch(early.export_patch("t0"), name="early")
    mixed = MixedTaskModel(model, model.tasks)  # slots t0, t1, t2, early
    x = torch.randn(8, 3, 16, 16)
    _, rec = _routed(model, x)
    spy = Spy(monkeypatch)
    late_rows = _rows(8, 3)
    assert torch.equal(mixed(x, late_rows, resume=Resume(rec)), mixed(x, late_rows))
    assert "blocks.1" in spy.reused
    spy.reused.clear()
    with_early = late_rows.clone()
    with_early[0] = 3
    assert torch.equal(mixed(x, with_early, resume=Resume(rec)), mixed(x, with_early))
    assert spy.reused == []  # the early task adapts the stem conv: nothing before it


def test_nothing_is_reused_for_an_early_task_norm_or_another_input(monkeypatch):
    model = _tasks(_seeded(Stages), TAPSConfig(size=None, layers=["blocks.2.*"]))  # own norms
    mixed = MixedTaskModel(model, model.tasks)
    x, rows = torch.randn(6, 3, 16, 16), _rows(6, 3)
    _, rec = _routed(model, x)
    spy = Spy(monkeypatch)
    assert torch.equal(mixed(x, rows, resume=Resume(rec)), mixed(x, rows))
    assert spy.reused == ["conv_stem"]  # only what runs before the stem's task norm
    late = _tasks(_seeded(Stages), TAPSConfig(size=None, task_norms=False, layers=["blocks.2.*"]))
    mixed = MixedTaskModel(late, late.tasks)
    _, rec = _routed(late, x)
    spy.reused.clear()
    other = x + 1  # e.g. another preprocessing: a different input
    assert torch.equal(mixed(other, rows, resume=Resume(rec)), mixed(other, rows))
    assert spy.reused == []


def test_a_chunked_or_foreign_routing_pass_is_not_reused(monkeypatch):
    model = _tasks(_seeded(Stages), TAPSConfig(size=None, task_norms=False, layers=["blocks.2.*"]))
    mixed = MixedTaskModel(model, model.tasks)
    x, rows = torch.randn(6, 3, 16, 16), _rows(6, 3)
    extractor = recordable(base_feature_extractor(model))
    with recording() as rec:
        extractor(x[:3]), extractor(x[3:])  # two forwards: no single batch to resume from
    assert not rec.usable()
    late = TAPSConfig(size=None, task_norms=False, layers=["layer3.*"])
    other = _tasks(_seeded(ResNetLike), late)
    _, foreign = _routed(other, x)  # another model's routing pass: its modules differ
    spy = Spy(monkeypatch)
    for r in (rec, foreign):
        assert torch.equal(mixed(x, rows, resume=Resume(r)), mixed(x, rows))
    assert spy.reused == []


def test_points_follow_containers():
    assert points(Stages())[:6] == [
        "conv_stem", "bn1", "blocks", "blocks.0", "blocks.0.0", "blocks.0.0.0"
    ]  # fmt: skip


@pytest.mark.parametrize("name,factory,size", CASES, ids=[c[0] for c in CASES])
def test_every_architecture_resumes_bit_for_bit(name, factory, size, monkeypatch):
    """Every model of the core suite, tasks adapting only its last gated layer (Hugging Face
    models hold everything but the classifier in one non-container module: nothing to reuse)."""
    names = TAPSModel(factory(), TAPSConfig(size=None)).layer_names
    config = TAPSConfig(size=None, task_norms=False, layers=[names[-1]])
    model = _tasks(factory, config, n=2)
    mixed = MixedTaskModel(model, model.tasks)
    x = torch.randn(4, 3, size, size)
    rows = _rows(4, 2)
    want = mixed(x, rows)
    _, rec = _routed(model, x)
    spy = Spy(monkeypatch)
    assert torch.equal(mixed(x, rows, resume=Resume(rec)), want)
    assert bool(spy.reused) == (not name.startswith("hf_"))


@pytest.mark.parametrize("max_loaded", [8, 1])  # 1: a mixed forward per task, on its rows
def test_engine_route_resumes_and_answers_as_without(tmp_path, monkeypatch, max_loaded):
    from tests.test_engine import tiny_engine
    from tests.test_route import bright, dark

    engine = tiny_engine(f"sqlite:///{tmp_path / 'tasks.db'}")
    engine.config = TAPSConfig(size=None, lam=0.0, task_norms=False, layers=["conv2"])
    slow = TrainConfig(epochs=1, batch_size=8, lr=1e-2, score_lr=1e-6)  # conv2's gate stays open
    engine.add_task(dark(48), name="dark", quiet=True, train=slow)
    engine.add_task(bright(48), name="bright", quiet=True, train=slow)
    engine.server.max_loaded = max_loaded
    x = torch.cat([dark(9, seed=3)[0], bright(7, seed=4)[0]])
    adapted = {n for t in ("dark", "bright") for n in engine.versions(t)[-1].active_layers}
    spy = Spy(monkeypatch)
    routed = engine.route(x)
    # everything before conv2 (the only layer the tasks may adapt)
    assert adapted == {"conv2"}
    assert set(spy.reused) == {"conv1", "bn1"}
    monkeypatch.setattr(prefix._Replay, "take", lambda replay, path: None)  # no resume
    plain = engine.route(x)
    assert routed.tasks == plain.tasks and set(routed.tasks) == {"dark", "bright"}
    assert torch.equal(routed.labels, plain.labels)
    assert torch.equal(routed.confidence, plain.confidence)


def test_config_layers_restricts_the_gates_a_task_may_open():
    from tests.tiny import tiny_cnn

    with pytest.raises(TypeError, match="layers"):
        TAPSConfig(layers="conv2")
    with pytest.raises(ValueError, match="non-empty"):
        TAPSConfig(layers=[])
    with pytest.raises(ValueError, match="match no gated layer"):
        TAPSModel(tiny_cnn(), TAPSConfig(layers=["conv9*"]))
    config = TAPSConfig(size=None, layers=("conv2",))
    assert TAPSConfig.from_json(config.to_json()) == config and config.layers == ["conv2"]
    model = TAPSModel(tiny_cnn(), config)
    model.add_task("a", 3)
    assert model.gates("a") == {"conv1": False, "conv2": True}
    assert not model.param_groups("a")["score"][0].requires_grad  # closed for good
    assert model.finalize_task("a").active_layers == ["conv2"]
    # a patch adapting more layers loads as it is (the patch decides, not this config)
    full = TAPSModel(tiny_cnn(), TAPSConfig(size=None))
    full.add_task("b", 2)
    model.load_patch(full.finalize_task("b"))
    assert model.gates("b") == {"conv1": True, "conv2": True}
