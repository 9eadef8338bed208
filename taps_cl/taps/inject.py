"""Wrapping a base in place: find its classifier, swap modules for their TAPS wrappers.

Every gateable layer becomes a :class:`~taps_cl.taps.layer.TaskAdaptiveLayer`, every
``nn.MultiheadAttention`` a :class:`~taps_cl.taps.attention.TaskAdaptiveAttention`, every norm
a :class:`~taps_cl.taps.modules.TaskNorm`; modules are replaced with ``setattr`` on the parent
(peft's ``_replace_module``), so the base stays the module the user gave.
"""

from __future__ import annotations

from torch import nn

from taps_cl.config import TAPSConfig
from taps_cl.taps.attention import TaskAdaptiveAttention
from taps_cl.taps.deltas import kind_for
from taps_cl.taps.layer import TaskAdaptiveLayer, gateable_weight_attr
from taps_cl.taps.modules import TaskNorm, is_norm


def find_head(model: nn.Module, head: str | None = None) -> str:
    """Dotted name of the classifier ``nn.Linear``: ``head`` if given, else timm's
    ``get_classifier()``, torchvision's ``fc``/``classifier``/``heads``, else the last Linear."""
    names = {id(m): n for n, m in model.named_modules()}
    if head is not None:
        try:
            module = model.get_submodule(head)
        except AttributeError as err:
            raise ValueError(f"head {head!r} is not a submodule of {type(model).__name__}") from err
        candidates = [(head, module)]
    else:
        candidates = []
        if hasattr(model, "get_classifier"):
            module = model.get_classifier()
            if isinstance(module, nn.Module) and id(module) in names:
                candidates.append((names[id(module)], module))
        for attr in ("fc", "classifier", "heads", "head"):
            if isinstance(getattr(model, attr, None), nn.Module):
                candidates.append((attr, getattr(model, attr)))
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        candidates += linears[-1:]
    for name, module in candidates:
        if isinstance(module, nn.Linear):
            return name
        inner = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        if inner:
            return f"{name}.{inner[-1][0]}"
    raise ValueError(
        f"no classifier nn.Linear found in {type(model).__name__}; pass head='<dotted name>'"
    )


def set_child(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


def inject(base: nn.Module, config: TAPSConfig, skip: str) -> tuple[dict[str, str], list[str]]:
    """Wrap ``base``'s gateable layers, attentions and (with ``task_norms``) norms in place,
    leaving the subtree ``skip`` (the head) alone. Returns the gated layers' names -> paths of
    their :class:`GatedWeight` s, and the wrapped norms' paths, both in module order."""
    tau, score_init = config.tau, config.score_init
    delta = {"kind": kind_for(config), "dtype": config.stored_dtype}
    layer_paths: dict[str, str] = {}
    norm_names: list[str] = []
    done = [skip]  # wrapped subtrees: their insides are the wrapper's business
    for name, module in list(base.named_modules()):
        if not name or any(name == d or name.startswith(d + ".") for d in done):
            continue
        if isinstance(module, nn.MultiheadAttention):
            attn = TaskAdaptiveAttention(module, tau, score_init, **delta)
            for local, path in attn.gated_layers().items():
                layer_paths[f"{name}.{local}"] = f"{name}.{path}"
            wrapper: nn.Module = attn
        elif gateable_weight_attr(module) is not None:
            wrapper = TaskAdaptiveLayer(module, tau, score_init, **delta)
            layer_paths[name] = name
        elif config.task_norms and is_norm(module):
            wrapper = TaskNorm(module, reset_stats=config.norm_stats == "reset")
            norm_names.append(name)
        else:
            continue
        set_child(base, name, wrapper)
        done.append(name)
    if not layer_paths:
        raise ValueError(f"{type(base).__name__} has no gateable layers (Conv/Linear)")
    return layer_paths, norm_names
