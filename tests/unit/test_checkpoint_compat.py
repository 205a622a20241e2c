"""Whether a checkpoint can be resumed under the current config (fsdpqlora/train/checkpoint.py
check_resumable, over _flatten's dotted keys): another model or adapter shape is refused naming
the key; a changed trajectory (learning rate, data, dropout) is listed for a warning."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fsdpqlora.errors import ConfigError
from fsdpqlora.train.checkpoint import _flatten, check_resumable

SAVED = {
    "model": {"name": "test-llama", "path": "/models/llama", "dtype": "bfloat16"},
    "quant": {"block_size": 64, "compute_dtype": "bfloat16"},
    "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "dtype": "float32"},
    "train": {"optimizer": "adamw", "lr": 2e-4, "max_steps": 100, "micro_batch_size": 2, "grad_accum_steps": 4, "seed": 42},
    "data": {"seq_len": 512, "path": "a.jsonl"},
    "logger": {"name": "stdout"},
    "checkpoint": {"every_steps": 50},
}
PATH = Path("/runs/run-1/checkpoints/step-50")


def changed(**changes):
    """SAVED with dotted keys replaced (None deletes the key)."""
    cfg = OmegaConf.create(SAVED)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            section, name = key.rsplit(".", 1)
            del OmegaConf.select(cfg, section)[name]
        else:
            OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def test_flatten_gives_dotted_keys_of_the_leaves():
    assert _flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}
    assert _flatten({}) == {}
    assert _flatten(3) == {"": 3}
    assert _flatten(3, "x") == {"x": 3}


def test_the_same_config_resumes_without_warnings():
    assert check_resumable(OmegaConf.create(SAVED), OmegaConf.create(SAVED), PATH) == []


@pytest.mark.parametrize(
    "key, value",
    [
        ("model.name", "other"),
        ("model.path", "/models/other"),
        ("quant.block_size", 128),
        ("adapter.method", "dora"),
        ("adapter.r", 16),
        ("adapter.alpha", 32),
        ("adapter.target_modules", ["q_proj"]),
        ("adapter.dtype", "bfloat16"),
        ("train.optimizer", "sgd"),
        ("quant.double_quant", True),  # a key only one side has
        ("quant.block_size", None),
    ],
)
def test_another_model_or_adapter_shape_is_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError) as error:
        check_resumable(OmegaConf.create(SAVED), changed(**{key.replace(".", "__"): value}), PATH)
    message = str(error.value)
    assert message.startswith(f"{key}={value!r}: the checkpoint {PATH} was trained with {key}=")
    assert "checkpoint.resume=never" in message


def test_a_changed_trajectory_is_listed_sorted():
    current = changed(train__lr=1e-4, data__seq_len=1024, adapter__dropout=0.0, model__dtype="float32", train__seed=7)
    assert check_resumable(OmegaConf.create(SAVED), current, PATH) == [
        "adapter.dropout",
        "data.seq_len",
        "model.dtype",
        "train.lr",
        "train.seed",
    ]


def test_a_longer_run_or_the_same_global_batch_cut_differently_is_no_warning():
    current = changed(train__max_steps=200, train__micro_batch_size=4, train__grad_accum_steps=2)
    assert check_resumable(OmegaConf.create(SAVED), current, PATH) == []


def test_settings_outside_model_adapter_training_and_data_are_free():
    current = changed(logger__name="wandb", checkpoint__every_steps=10)
    assert check_resumable(OmegaConf.create(SAVED), current, PATH) == []


def test_a_key_new_since_the_checkpoint_in_a_trajectory_section_is_listed():
    assert check_resumable(OmegaConf.create(SAVED), changed(data__shuffle=True), PATH) == ["data.shuffle"]
