"""CLI options built from the config dataclasses: one flag per field, its help the field's
``metadata["help"]`` and its shown default the dataclass default, so neither a default nor a
field's documentation is ever written twice."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

from taps_cl.config import JointConfig, TAPSConfig, TrainConfig

# The fields each training command exposes, per config class.
TRAIN_FIELDS = (
    "epochs",
    "batch_size",
    "image_size",
    "lr",
    "score_lr",
    "optimizer",
    "weight_decay",
    "schedule",
    "max_grad_norm",
    "seed",
    "num_workers",
)
TAPS_FIELDS = (
    "size",
    "lam",
    "tau",
    "penalty",
    "warmup_epochs",
    "norm_stats",
    "budget",
    "budget_select",
    "delta_rank",
    "delta_alpha",
    "delta_dtype",
    "delta_kind",
    "head_init",
    "head_refit",
)
JOINT_FIELDS = ("epoch_length", "base_lr")


def _none_or(kind: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _int_or_str(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _flag(text: str) -> bool:
    """``true``/``false`` (also yes/no, on/off, 1/0) for a bool field's option."""
    value = {"true": True, "yes": True, "on": True, "1": True}.get(text.lower())
    if value is None and text.lower() not in ("false", "no", "off", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return bool(value)


_flag.__name__ = "bool"

_TYPES: dict[str, Any] = {
    "bool": _flag,
    "int": int,
    "float": float,
    "str": str,
    "int | None": _none_or(int),
    "float | None": _none_or(float),
    "str | None": _none_or(str),
    "int | str": _int_or_str,
    "int | str | None": _none_or(_int_or_str),
}


def add_config_options(
    parser: argparse.ArgumentParser, cls: type, names: Sequence[str], title: str | None = None
) -> None:
    """Add ``--field-name`` options for ``names`` of the config dataclass ``cls``. An option
    that is not given leaves the attribute unset, so the config's own default applies."""
    group = parser.add_argument_group(title or f"{cls.__name__} options")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        field = fields[name]
        kind = _TYPES[str(field.type)]
        hint = " ('none' for None)" if "None" in str(field.type) else ""
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            default=argparse.SUPPRESS,
            metavar=name.upper(),
            help=f"{field.metadata.get('help', '')}{hint} (default: {field.default})",
        )


def config_from_args(cls: type, args: argparse.Namespace, names: Sequence[str], **extra: Any):
    """``cls`` built from the options given on the command line (others keep their default)."""
    values = {n: getattr(args, n) for n in names if hasattr(args, n)}
    return cls(**values, **extra)


def train_config(args: argparse.Namespace) -> TrainConfig:
    return config_from_args(TrainConfig, args, TRAIN_FIELDS)


def taps_config(args: argparse.Namespace) -> TAPSConfig:
    return config_from_args(TAPSConfig, args, TAPS_FIELDS)


def joint_config(args: argparse.Namespace, ratios: dict[str, float] | None) -> JointConfig:
    return config_from_args(JointConfig, args, JOINT_FIELDS, ratios=ratios)


def add_training_options(parser: argparse.ArgumentParser, joint: bool = False) -> None:
    add_config_options(parser, TrainConfig, TRAIN_FIELDS, "training (TrainConfig)")
    add_config_options(parser, TAPSConfig, TAPS_FIELDS, "gating (TAPSConfig)")
    if joint:
        add_config_options(parser, JointConfig, JOINT_FIELDS, "joint sampling (JointConfig)")
