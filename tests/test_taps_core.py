"""Table-driven tests of the TAPS core over architectures (a new architecture is one row)."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
import torchvision
from torch import nn

from taps_cl.config import TAPSConfig
from taps_cl.errors import BaseMismatchError, DuplicateTaskError, UnknownTaskError
from taps_cl.taps.attention import TaskAdaptiveAttention
from taps_cl.taps.layer import TaskAdaptiveLayer
from taps_cl.taps.model import TAPSModel
from taps_cl.taps.modules import TaskNorm
from taps_cl.taps.wrap import Transparent
from tests.tiny import tiny_cnn

PAPER = TAPSConfig(size=None)  # these tests pin down the paper mode's mechanics (dense deltas)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 16)
        )
        self.classifier = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.body(x)))


class TinyTransformer(nn.Module):
    """Pre-norm attention block written with nn.Linear q/k/v (as timm and HF models are)."""

    def __init__(self, dim: int = 16, patches: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.norm1, self.norm2, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        h = self.norm1(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 4.0, dim=-1)
        x = x + self.proj(att @ self.v(h))
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm(x).mean(1))


class WithMHA(nn.Module):
    """A bare ``nn.MultiheadAttention`` (cross-attention sizes optional: q/k/v_proj_weight)."""

    def __init__(self, kdim: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Linear(3 * 4, 8)
        self.kv = nn.Linear(3 * 4, kdim or 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.unfold(2, 2, 2).unfold(3, 2, 2).flatten(2, 3).flatten(3).transpose(1, 2)
        tokens = tokens.reshape(x.shape[0], -1, 3 * 4)
        h, kv = self.embed(tokens), self.kv(tokens)
        return self.fc(self.attn(h, kv, kv, need_weights=False)[0].mean(1))


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` (batch_first, even heads: the eval fast path is taken)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.patch(x).flatten(2).transpose(1, 2)).mean(1))


class EncoderDecoder(nn.Module):
    """``nn.Transformer`` (encoder and decoder layers, self- and cross-attention)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.query = nn.Parameter(torch.randn(1, 2, dim))
        self.transformer = nn.Transformer(dim, 2, 1, 1, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src = self.patch(x).flatten(2).transpose(1, 2)
        out = self.transformer(src, self.query.expand(x.shape[0], -1, -1))
        return self.head(out.mean(1))


def _hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, num_labels=5)  # fmt: skip
    return ViTForImageClassification(config)


def _hf_convnext() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)
    return ConvNextForImageClassification(config)


def _logits(out) -> torch.Tensor:
    """A base's logits: Hugging Face models return a ``ModelOutput``."""
    return out if isinstance(out, torch.Tensor) else out.logits


def _seeded(factory):
    def build():
        torch.manual_seed(0)
        return factory().eval()

    return build


# name, factory, input size
CASES = [
    ("tiny_cnn_bn", lambda: tiny_cnn(), 16),
    ("mlp", _seeded(MLP), 8),
    ("tf_efficientnet_lite0", _seeded(lambda: timm.create_model("tf_efficientnet_lite0")), 32),
    ("resnet18", _seeded(lambda: torchvision.models.resnet18(weights=None)), 32),
    (
        "vit_tiny",
        _seeded(lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8)),
        32,
    ),
    ("tiny_transformer_ln", _seeded(TinyTransformer), 8),
    ("mha", _seeded(WithMHA), 8),
    ("mha_kdim", _seeded(lambda: WithMHA(kdim=6)), 8),
    ("transformer_encoder", _seeded(Encoder), 8),
    ("transformer", _seeded(EncoderDecoder), 8),
    ("hf_vit", _seeded(_hf_vit), 16),
    ("hf_convnext", _seeded(_hf_convnext), 16),
]
ATTENTION = {"mha", "mha_kdim", "transformer_encoder", "transformer"}
IDS = [c[0] for c in CASES]


def _x(size: int, n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _perturb(model: TAPSModel, name: str, seed: int, off: int = 1) -> None:
    """Random deltas, norms and head for ``name``; the first ``off`` layers get a closed gate."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (_, layer) in enumerate(model.layers()):
            d = layer.delta[name]
            d.copy_(torch.randn(d.shape, generator=g) * 0.02)
            if i < off:
                layer.score[name].fill_(model.config.tau / 2)
        for p in model.param_groups(name)["norm"]:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("name,factory,size", CASES, ids=IDS)
def test_fresh_wrap_is_identity(name, factory, size):
    base = factory()
    # The reference is frozen like the wrapped base: torch's MultiheadAttention takes another
    # kernel (last-bit differences) when its weights require grad, even under no_grad.
    reference = copy.deepcopy(base).requires_grad_(False)
    model = TAPSModel(base, PAPER)
    x = _x(size)
    with torch.no_grad():
        assert torch.equal(model(x), _logits(reference(x)))
    # A new task with zero deltas and the base head's weights is the base itself.
    head = reference.get_submodule(model.head_name)
    model.add_task("same", head.out_features)
    model.heads.tasks["same"].load_state_dict(head.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x, task="same"), _logits(reference(x)))


@pytest.mark.parametrize("name,factory,size", CASES, ids=IDS)
def test_merged_matches_gated_and_prunes(name, factory, size):
    model = TAPSModel(factory(), PAPER)
    model.add_task("a", 3)
    _perturb(model, "a", seed=2, off=2)
    x = _x(size)
    with torch.no_grad():
        gated = model(x, task="a")
    patch = model.finalize_task("a")
    off = model.layer_names[:2]
    assert all(f"delta.{n}" not in patch.tensors for n in off)
    assert all(f"score.{n}" in patch.tensors for n in model.layer_names)
    assert patch.active_layers == model.layer_names[2:]
    merged = model.merged("a")
    assert not any(type(m).__module__.startswith("taps_cl") for m in merged.modules())
    with torch.no_grad():
        assert torch.equal(model(x, task="a"), gated)  # pruning a closed gate changes nothing
        assert (_logits(merged(x)) - gated).abs().max() <= 1e-5


@pytest.mark.parametrize("name,factory,size", CASES, ids=IDS)
def test_zero_forgetting_and_patch_round_trip(name, factory, size):
    model = TAPSModel(factory(), PAPER)
    x = _x(size)
    outputs = {}
    for i, task in enumerate(["t0", "t1", "t2"]):
        model.add_task(task, 2 + i, seed=i)
        _perturb(model, task, seed=10 + i)
        _train_steps(model, task, x)
        model.finalize_task(task)
        with torch.no_grad():
            outputs[task] = model(x, task=task)
        for earlier, expected in outputs.items():  # every earlier task is bit-for-bit unchanged
            with torch.no_grad():
                assert torch.equal(model(x, task=earlier), expected), earlier
    fresh = TAPSModel(factory(), PAPER)
    for task in outputs:
        fresh.load_patch(model.export_patch(task))
        with torch.no_grad():
            assert torch.equal(fresh(x, task=task), outputs[task])


def _train_steps(model: TAPSModel, task: str, x: torch.Tensor, steps: int = 2) -> None:
    opt = torch.optim.SGD(model.trainable_parameters(task), lr=0.01)
    model.train()
    for _ in range(steps):
        loss = model(x, task=task).logsumexp(1).mean() + model.penalty(task)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_base_batchnorm_statistics_never_move():
    base = tiny_cnn()
    model = TAPSModel(base, PAPER)
    before = {k: v.clone() for k, v in base.state_dict().items() if "base" in k or "running" in k}
    model.add_task("a", 3)
    model.train()
    model(_x(16), task="a").sum().backward()
    model(_x(16))  # no task, train mode: the base must still not update its statistics
    after = base.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    running = model.base.bn1.tasks["a"].running_mean
    assert not torch.equal(running, model.base.bn1.base.running_mean)  # the task's copy moved


def test_task_names_and_errors():
    model = TAPSModel(tiny_cnn(), PAPER)
    model.add_task("a", 2)
    with pytest.raises(DuplicateTaskError):
        model.add_task("a", 2)
    with pytest.raises(UnknownTaskError, match="known tasks"):
        model.set_task("nope")
    for bad in ["", "1abc", "a b", "x" * 65, "a.b", "a;drop"]:
        with pytest.raises(ValueError, match="invalid task name"):
            model.add_task(bad, 2)
    with pytest.raises(ValueError, match="num_classes"):
        model.add_task("b", 0)
    other = TAPSModel(tiny_cnn(seed=1), PAPER)
    with pytest.raises(BaseMismatchError):
        other.load_patch(model.export_patch("a"))
    assert "a" not in other.tasks


def test_head_detection_and_explicit_head():
    with pytest.raises(ValueError, match="head"):
        TAPSModel(nn.Sequential(nn.Conv2d(3, 4, 3)))
    model = TAPSModel(_seeded(MLP)(), head="body.3")
    assert model.head_name == "body.3"
    assert "classifier" in model.layer_names  # not the head any more, so it is gated


def test_config_validation_and_json_round_trip():
    cfg = TAPSConfig(lam=0.5, penalty="weighted", warmup_epochs=0.5)
    assert TAPSConfig.from_json(cfg.to_json()) == cfg
    for kwargs in [{"lam": -1}, {"score_init": 0.05}, {"penalty": "l2"}, {"warmup_epochs": -1}]:
        with pytest.raises(ValueError):
            TAPSConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown TAPSConfig fields"):
        TAPSConfig.from_dict({"lamda": 1.0})


def test_loaded_patch_ignores_the_loading_models_tau():
    model = TAPSModel(tiny_cnn(), TAPSConfig(tau=0.1))
    model.add_task("a", 3)
    _perturb(model, "a", seed=4, off=0)
    with torch.no_grad():
        model.base.conv1.score["a"].fill_(0.12)  # on under tau 0.1, off under 0.2
    patch = model.finalize_task("a")
    x = _x(16)
    with torch.no_grad():
        expected = model(x, task="a")
    other = TAPSModel(tiny_cnn(), TAPSConfig(tau=0.2, score_init=0.25))
    other.load_patch(patch)
    assert other.gates("a") == model.gates("a")
    with torch.no_grad():
        assert torch.equal(other(x, task="a"), expected)


def test_shared_norms_never_move_without_task_norms():
    base = tiny_cnn()
    model = TAPSModel(base, TAPSConfig(task_norms=False))
    stats = base.bn1.running_mean.clone()
    model.add_task("a", 3)
    model.train()
    assert not base.bn1.training
    model(_x(16), task="a").sum().backward()
    assert torch.equal(base.bn1.running_mean, stats)


ATTENTION_CASES = [c for c in CASES if c[0] in ATTENTION]
# Attributes code reads from layers, norms and attention modules instead of calling them.
ATTRS = (
    "eps", "normalized_shape", "num_features", "elementwise_affine", "momentum", "in_features",
    "out_features", "in_channels", "out_channels", "kernel_size", "stride", "padding", "weight",
    "bias", "running_mean", "running_var", "embed_dim", "num_heads", "head_dim", "batch_first",
    "_qkv_same_embed_dim", "in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
    "v_proj_weight", "bias_k", "dropout",
)  # fmt: skip


def _wrappers(model: TAPSModel) -> dict[str, nn.Module]:
    """Wrapped modules by their path in the unwrapped base (``.base_layer`` dropped)."""
    return {
        path.replace(".base_layer", ""): module
        for path, module in model.base.named_modules()
        if isinstance(module, Transparent) and path != model.head_name
    }


def _task_value(wrapper: nn.Module, attr: str, task: str, original: object) -> object:
    """What ``wrapper.<attr>`` must answer while ``task`` is active."""
    if isinstance(wrapper, TaskAdaptiveLayer) and attr == wrapper.weight_attr:
        return wrapper.effective_weight(task)
    if isinstance(wrapper, TaskAdaptiveAttention) and attr in wrapper.projections:
        return wrapper.projections[attr].effective_weight(task)
    if isinstance(wrapper, TaskNorm):
        return getattr(wrapper.tasks[task], attr)
    return original


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("name,factory,size", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_attention_projections_are_gated(name, factory, size):
    model = TAPSModel(factory(), PAPER)
    attention = [n for n, m in model.base.named_modules() if isinstance(m, TaskAdaptiveAttention)]
    assert attention
    for path in attention:
        mha = model.base.get_submodule(path)
        assert isinstance(mha, nn.MultiheadAttention)  # isinstance checks keep holding
        inputs = ["in_proj_weight"] if mha._qkv_same_embed_dim else ["q_proj_weight"]
        for layer in (*inputs, "out_proj"):
            assert f"{path}.{layer}" in model.layer_names
    model.add_task("a", 3)
    x = _x(size)
    with torch.no_grad():
        before = model(x, task="a")
    for lname, layer in model.layers():
        if not lname.startswith(tuple(attention)):
            continue
        with torch.no_grad():
            layer.delta["a"].normal_(0, 0.1)
            assert not torch.allclose(model(x, task="a"), before, atol=1e-4), lname
            layer.delta["a"].zero_()


@pytest.mark.parametrize(
    "name,factory,size",
    [c for c in CASES if c[0] in ATTENTION | {"tiny_cnn_bn", "tiny_transformer_ln"}],
)
def test_wrappers_answer_like_the_wrapped_module(name, factory, size):
    base = factory()
    reference = copy.deepcopy(base)
    model = TAPSModel(base, PAPER)
    model.add_task("a", 3)
    _perturb(model, "a", seed=3, off=0)
    wrappers = _wrappers(model)
    assert wrappers
    for path, wrapper in wrappers.items():
        original = reference.get_submodule(path)
        assert isinstance(wrapper, type(original)), path
        attrs = [a for a in ATTRS if hasattr(original, a)]
        for attr in attrs:
            assert _same(getattr(wrapper, attr), getattr(original, attr)), (path, attr)
        with model.using("a"), torch.no_grad():
            for attr in attrs:
                expected = _task_value(wrapper, attr, "a", getattr(original, attr))
                assert _same(getattr(wrapper, attr), expected), (path, attr)
            if isinstance(wrapper, TaskAdaptiveLayer):  # the deltas are visible, not the base
                assert not torch.equal(wrapper.weight, original.weight), path
    heads = model.heads
    with model.using("a"):
        assert heads.out_features == 3 and heads.weight is heads.tasks["a"].weight
    assert heads.out_features == reference.get_submodule(model.head_name).out_features


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_encoder_fast_path_sees_the_active_task(context, monkeypatch):
    model = TAPSModel(_seeded(Encoder)(), PAPER)
    model.add_task("a", 3)
    _perturb(model, "a", seed=5, off=0)
    x = _x(8)
    calls = []
    fused = torch._transformer_encoder_layer_fwd

    def spy(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", spy)
    slow = model(x, task="a")  # grad enabled and deltas require grad: the slow path
    assert not calls
    with context():
        fast = model(x, task="a")
    assert len(calls) == 2  # both encoder layers took the fused kernel
    assert (fast - slow.detach()).abs().max() <= 1e-5
    with torch.no_grad():
        for _, layer in model.layers():
            layer.delta["a"].zero_()
        without_deltas = model(x, task="a")
    assert (fast - without_deltas).abs().max() > 1e-3  # the fast path computed with the deltas


def test_patch_names_of_ordinary_models_are_unchanged():
    model = TAPSModel(tiny_cnn(), PAPER)
    model.add_task("a", 3)
    names = set(model.finalize_task("a").tensors)
    norm = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = {f"{k}.{n}" for k in ("delta", "score") for n in ("conv1", "conv2")}
    expected |= {f"norm.{bn}.{key}" for bn in ("bn1", "bn2") for key in norm}
    assert names == expected | {"head.weight", "head.bias"}


def test_wrapped_model_pickles_and_deep_copies():
    model = TAPSModel(_seeded(Encoder)(), PAPER)
    model.add_task("a", 3)
    _perturb(model, "a", seed=6)
    model.finalize_task("a")
    x = _x(8)
    with torch.no_grad():
        expected = model(x, task="a")
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        attn = clone.base.encoder.layers[0].self_attn
        assert attn.projections["in_proj_weight"].base_weight is attn.base_layer.in_proj_weight
        with torch.no_grad():
            assert torch.equal(clone(x, task="a"), expected)


def test_state_dict_round_trip_needs_the_same_tasks_first():
    model = TAPSModel(tiny_cnn(), PAPER)
    for i, task in enumerate(("a", "b")):
        model.add_task(task, 2 + i, seed=i)
        _perturb(model, task, seed=i)
    state, x = model.state_dict(), _x(16)
    fresh = TAPSModel(tiny_cnn(), PAPER)
    with pytest.raises(ValueError, match=r"\['a', 'b'\].*add_task"):
        fresh.load_state_dict(state)
    fresh.add_task("a", 2)
    fresh.add_task("b", 3)
    fresh.load_state_dict(state)
    with torch.no_grad():
        for task in ("a", "b"):
            assert torch.equal(fresh(x, task=task), model(x, task=task))


def test_task_patch_save_load_is_the_export_format(tmp_path):
    from taps_cl.storage import read_patch_file
    from taps_cl.taps.patch import TaskPatch

    model = TAPSModel(tiny_cnn(), PAPER)
    model.add_task("a", 3, ["x", "y", "z"])
    _perturb(model, "a", seed=3)
    patch = model.finalize_task("a")
    path = patch.save(tmp_path / "a.safetensors")
    loaded = TaskPatch.load(path)
    assert read_patch_file(path)[0].name == "a" and loaded.class_names == ["x", "y", "z"]
    assert loaded.tensors.keys() == patch.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], v) for k, v in patch.tensors.items())
    fresh = TAPSModel(tiny_cnn(), PAPER)
    fresh.load_patch(loaded)
    with torch.no_grad():
        assert torch.equal(fresh(_x(16), task="a"), model(_x(16), task="a"))
