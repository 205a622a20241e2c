"""Whether a checkpoint can be resumed under the current config (fsdpqlora/train/checkpoint.py
check_resumable, over _flatten's dotted keys): another model or adapter shape is refused naming
the key; a changed trajectory (learning rate, data, dropout) is listed for a warning."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from fsdpqlora.config import Config, config_from, to_dict
from fsdpqlora.errors import ConfigError
from fsdpqlora.train.checkpoint import _flatten, check_resumable

SETTINGS = {
    "model": {"name": "test-llama", "path": "/models/llama", "dtype": "bfloat16"},
    "adapter": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "train": {"lr": 2e-4, "max_steps": 100, "micro_batch_size": 2, "grad_accum_steps": 4, "seed": 42},
    "data": {"seq_len": 512, "path": "a.jsonl"},
    "checkpoint": {"every_steps": 50},
}
PATH = Path("/runs/run-1/checkpoints/step-50")


def current(**changes) -> Config:
    """The typed config of SETTINGS with dotted keys (written with __) replaced."""
    values = copy.deepcopy(SETTINGS)
    for key, value in changes.items():
        section, name = key.split("__")
        values.setdefault(section, {})[name] = value
    return config_from(values)


def saved(*without: str) -> dict:
    """What a checkpoint's meta.json records for SETTINGS, less the dotted keys `without` (a
    checkpoint written before those settings existed)."""
    record = to_dict(current())
    for key in without:
        section, name = key.split(".")
        del record[section][name]
    return record


def test_flatten_gives_dotted_keys_of_the_leaves():
    assert _flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}
    assert _flatten({}) == {}
    assert _flatten(3) == {"": 3}
    assert _flatten(3, "x") == {"x": 3}


def test_the_same_config_resumes_without_warnings():
    assert check_resumable(saved(), current(), PATH) == []


@pytest.mark.parametrize(
    "key, value",
    [
        ("model.name", "other"),
        ("model.path", "/models/other"),
        ("quant.blocksize", 128),
        ("quant.double_quant", False),
        ("adapter.method", "dora"),
        ("adapter.r", 16),
        ("adapter.alpha", 32),
        ("adapter.target_modules", ["q_proj"]),
        ("adapter.dtype", "bfloat16"),
        ("train.optimizer", "adamw_8bit"),
    ],
)
def test_another_model_or_adapter_shape_is_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError) as error:
        check_resumable(saved(), current(**{key.replace(".", "__"): value}), PATH)
    message = str(error.value)
    assert message.startswith(f"{key}={value!r}: the checkpoint {PATH} was trained with {key}=")
    # Advice that works when followed: checkpoint.resume=never would refuse this directory too.
    assert "checkpoint.resume=never" not in message
    assert f"; to train with {key}={value!r}, choose another launch.run_dir; to continue this run, keep {key}=" in message


def test_a_key_the_checkpoint_lacks_in_an_incompatible_section_is_refused():
    with pytest.raises(ConfigError) as error:
        check_resumable(saved("quant.blocksize"), current(), PATH)
    assert str(error.value).startswith(f"quant.blocksize=64: the checkpoint {PATH} was trained with quant.blocksize=None")


def test_a_changed_trajectory_is_listed_sorted():
    changed = current(train__lr=1e-4, data__seq_len=1024, adapter__dropout=0.0, model__dtype="float32", train__seed=7)
    assert check_resumable(saved(), changed, PATH) == [
        "adapter.dropout",
        "data.seq_len",
        "model.dtype",
        "train.lr",
        "train.seed",
    ]


def test_a_longer_run_or_the_same_global_batch_cut_differently_is_no_warning():
    changed = current(train__max_steps=200, train__micro_batch_size=4, train__grad_accum_steps=2)
    assert check_resumable(saved(), changed, PATH) == []


def test_settings_outside_model_adapter_training_and_data_are_free():
    changed = current(logger__kind="wandb", checkpoint__every_steps=10, launch__max_restarts=0)
    assert check_resumable(saved(), changed, PATH) == []


def test_a_key_new_since_the_checkpoint_in_a_trajectory_section_is_listed():
    assert check_resumable(saved("data.truncation"), current(), PATH) == ["data.truncation"]
