"""Config field help lives in each field's ``metadata["help"]``: one text for the dataclass,
``field_docs`` and the CLI's ``--help``."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from taps_cl.cli.options import JOINT_FIELDS, TAPS_FIELDS, TRAIN_FIELDS, add_training_options
from taps_cl.config import JointConfig, TAPSConfig, TrainConfig

CONFIGS = [(TAPSConfig, TAPS_FIELDS), (TrainConfig, TRAIN_FIELDS), (JointConfig, JOINT_FIELDS)]


@pytest.mark.parametrize("cls", [c for c, _ in CONFIGS], ids=lambda c: c.__name__)
def test_every_field_documents_itself_in_metadata(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help"
    assert cls.field_docs() == {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}


@pytest.mark.parametrize(("cls", "names"), CONFIGS, ids=lambda c: getattr(c, "__name__", ""))
def test_cli_option_help_is_the_field_help(cls, names):
    parser = argparse.ArgumentParser()
    add_training_options(parser, joint=True)
    helps = {a.dest: a.help for a in parser._actions}
    for name in names:
        field = next(f for f in dataclasses.fields(cls) if f.name == name)
        assert helps[name].startswith(field.metadata["help"])
        assert helps[name].endswith(f"(default: {field.default})")


def test_metadata_does_not_reach_the_json_round_trip():
    for cls, _ in CONFIGS:
        config = cls()
        assert cls.from_json(config.to_json()) == config
        assert set(json.loads(config.to_json())) == {f.name for f in dataclasses.fields(cls)}
    assert TAPSConfig().to_dict()["lam"] == 0.5
