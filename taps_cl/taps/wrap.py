"""Transparent wrappers: a wrapped module still answers everything the module it wraps answers.

PyTorch's composite layers read their children's attributes instead of calling them
(``nn.TransformerEncoderLayer``'s fast path reads ``self.linear1.weight``, ``self.norm1.eps``,
``self.self_attn.in_proj_weight``; ``nn.MultiheadAttention`` reads ``self.out_proj.weight``).
A wrapper that hid those attributes would break such models, and one that answered with the
*base* values would silently compute with base weights. So every wrapper:

- answers an attribute it does not own from the module it wraps (``__getattr__`` fallback, as
  peft's ``BaseTunerLayer``), through :meth:`Transparent._passthrough`, which each wrapper
  overrides for the values that depend on the active task (a gated layer's effective weight, the
  active task's norm copy);
- is an instance of a subclass created once per wrapped type (``TaskAdaptiveLayer[Linear]`` is a
  subclass of both ``TaskAdaptiveLayer`` and ``nn.Linear``), the way ``torch.nn.utils.parametrize``
  makes ``ParametrizedLinear``. ``isinstance(m, nn.Linear)`` / ``nn.LayerNorm`` /
  ``nn.MultiheadAttention`` checks in torch, timm and user code keep holding. A ``__class__``
  swap on the base module itself would alias the frozen base with the wrapper; a subclass keeps
  the base an ordinary module. The wrapped type's ``__init__`` never runs on the wrapper: its
  state is the wrapped module's, reached through the fallback; its properties are re-routed to
  the fallback too, and state_dict/pickle hooks are plain ``nn.Module``'s (the wrapped type's
  hooks, e.g. BatchNorm's, would rewrite keys the wrapper does not own).
"""

from __future__ import annotations

from typing import Any

from torch import nn

_CLASSES: dict[tuple[type, type], type] = {}


def transparent_class(wrapper: type, wrapped: type) -> type:
    """The (cached) subclass of both ``wrapper`` and ``wrapped`` that wrappers are made of."""
    key = (wrapper, wrapped)
    if key not in _CLASSES:
        attrs: dict[str, Any] = {"_wrapped_type": wrapped, "__module__": wrapper.__module__}
        for klass in wrapped.__mro__:
            if klass in (nn.Module, object):
                break
            for attr, value in vars(klass).items():
                # A property of the wrapped type would run on the wrapper and bypass the
                # task-aware fallback; route it to the fallback instead.
                if isinstance(value, property) and attr not in attrs and not hasattr(wrapper, attr):
                    attrs[attr] = property(lambda self, _a=attr: self._passthrough(_a))
        name = f"{wrapper.__name__}[{wrapped.__name__}]"
        _CLASSES[key] = type(name, (wrapper, wrapped), attrs)
    return _CLASSES[key]


def _new_wrapper(wrapper: type, wrapped: type) -> nn.Module:
    return nn.Module.__new__(transparent_class(wrapper, wrapped))


class Transparent(nn.Module):
    """Mixin: attribute reads fall back to the wrapped module (see the module docstring).

    Subclasses implement :meth:`_passthrough_target` (the module answering for them right now)
    and :meth:`plain` (a plain module computing what the wrapper computes for one task).
    """

    _wrapped_type: type | None = None

    def __new__(cls, *args: object, **kwargs: object) -> Transparent:
        # The wrapped module is the constructor's first argument (positional or keyword).
        module = next((a for a in (*args, *kwargs.values()) if isinstance(a, nn.Module)), None)
        if module is not None and cls._wrapped_type is None:
            cls = transparent_class(cls, type(module))
        return nn.Module.__new__(cls)

    def _passthrough_target(self) -> nn.Module:
        raise NotImplementedError

    def _passthrough(self, name: str) -> Any:
        return getattr(self._passthrough_target(), name)

    def __getattr__(self, name: str) -> Any:
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            # Before nn.Module.__init__ (or for dunder probes by copy/pickle) there is nothing
            # to fall back to; answering would recurse.
            if name.startswith("__") or "_modules" not in self.__dict__:
                raise
        return self._passthrough(name)

    def plain(self, name: str | None) -> nn.Module:
        """A plain copy computing what this wrapper computes for task ``name`` (None = base)."""
        raise NotImplementedError

    # The wrapped type's own hooks act on state it owns; the wrapper owns other state.
    __setstate__ = nn.Module.__setstate__
    _save_to_state_dict = nn.Module._save_to_state_dict
    _load_from_state_dict = nn.Module._load_from_state_dict

    def __reduce_ex__(self, protocol: Any) -> Any:
        # The per-type subclass is not importable by name; rebuild it from its two parents.
        wrapped = type(self)._wrapped_type
        if wrapped is None:
            return super().__reduce_ex__(protocol)
        return (_new_wrapper, (type(self).__bases__[0], wrapped), self.__getstate__())
