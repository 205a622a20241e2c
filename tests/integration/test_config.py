"""Configuration: composition, overrides, and bad values refused in the launcher with the key named."""

from __future__ import annotations

import pytest
import torch

from fsdpqlora.config import CONF_DIR, compose_config, validate
from fsdpqlora.errors import ConfigError
from fsdpqlora.preflight import check_machine
from tests.helpers import base_overrides, run_launcher


def test_defaults_and_presets_compose():
    cfg = compose_config([])
    validate(cfg)
    assert (cfg.model.name, cfg.shard.strategy, cfg.quant.quant_type, cfg.quant.double_quant) == ("tiny", "full_shard", "nf4", True)
    assert cfg.adapter.target_modules == ["all-linear"]
    assert cfg.shard.activation_checkpointing is True


def test_command_line_overrides():
    cfg = compose_config(["model=llama-3.1-70b", "adapter.r=16", "train.lr=2e-4", "shard=shard_grad_op"])
    validate(cfg)
    assert cfg.model.path == "meta-llama/Llama-3.1-70B"
    assert (cfg.adapter.r, cfg.train.lr, cfg.shard.strategy) == (16, 2e-4, "shard_grad_op")


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml") if p.stem != "tiny"))
def test_model_presets(preset):
    cfg = compose_config([f"model={preset}"])
    validate(cfg)
    assert cfg.model.name == preset
    assert len(cfg.model.path.split("/")) == 2, "a hub id, org/name"


@pytest.mark.parametrize(
    "preset, path, fmt",
    [
        ("pydoc_qa", "", "alpaca"),
        ("pydoc_text", "", "text"),
        ("alpaca", "yahma/alpaca-cleaned", "alpaca"),
        ("alpaca_json", "", "alpaca"),
        ("guanaco", "timdettmers/openassistant-guanaco", "chat"),
        ("ultrachat", "HuggingFaceH4/ultrachat_200k", "chat"),
        ("chat_json", "", "chat"),
        ("orca_math", "microsoft/orca-math-word-problems-200k", "template"),
        ("text_files", "", "text"),
    ],
)
def test_data_presets(preset, path, fmt):
    cfg = compose_config([f"data={preset}"])
    validate(cfg)
    assert (cfg.data.name, cfg.data.path, cfg.data.format) == (preset, path, fmt)


@pytest.mark.parametrize(
    "override, message",
    [
        ("adapter.rank=8", "adapter.rank: Key 'rank' not in 'AdapterConfig'"),
        ("+foo=1", "foo: Key 'foo' not in 'Config'"),
        ("adapter.r=abc", "adapter.r: Value 'abc' of type 'str' could not be converted to Integer"),
        ("shard=everything", "shard=everything: no such option; choose one of full_shard, hybrid_shard, no_shard, shard_grad_op"),
        ("adapter.r=0", "adapter.r=0: must be a positive integer"),
        ("train.lr=-1e-4", "train.lr=-0.0001: must be positive"),
        ("shard.strategy=fsdp9", "shard.strategy='fsdp9': must be one of full_shard, shard_grad_op, hybrid_shard, no_shard"),
        ("quant.storage_dtype=float32", "quant.storage_dtype='float32': float storage must equal quant.compute_dtype"),
        ("model=llama-2-7b model.path=''", "model.path='': is empty"),
        ("launch.cache_dir=~/models", "launch.cache_dir=~/models: Hydra cannot parse this override; quote the value"),
        ("data.prompt_template={q}", "data.prompt_template={q}: Hydra cannot parse this override; quote the value, e.g. 'data.prompt_template=\"{q}\"'"),
        ("precision=fp16 quant.storage_dtype=bfloat16", "quant.storage_dtype='bfloat16': float storage must equal quant.compute_dtype (float16)"),
        ("adapter.dtype=float16", "adapter.dtype='float16': fp16 master weights lose small updates; use float32"),
        ("precision=fp16 adapter.dtype=bfloat16", "adapter.dtype='bfloat16': bfloat16 adapters cast to float16 compute"),
        ("adapter.method=vera", "adapter.method='vera': must be one of lora, dora"),
        ("train.optimizer=sgd", "train.optimizer='sgd': must be one of adamw, adamw_8bit, paged_adamw, paged_adamw_8bit"),
        ("shard.checkpoint_every=-1", "shard.checkpoint_every=-1: must be >= 0"),
        ("shard.activation_checkpointing=false shard.activation_offload=true", "shard.activation_offload=True: offloads the inputs that checkpointing saves"),
        ("precision=tf32", "precision=tf32: no such option; choose one of bf16, bf16_mixed, fp16, fp32"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(override.split()))
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "preset, compute, adapter",
    [("bf16_mixed", "bfloat16", "float32"), ("bf16", "bfloat16", "bfloat16"), ("fp16", "float16", "float32"), ("fp32", "float32", "float32")],
)
def test_precision_presets(preset, compute, adapter):
    cfg = compose_config([f"precision={preset}"])
    validate(cfg)
    assert (cfg.quant.compute_dtype, cfg.adapter.dtype) == (compute, adapter)


def test_bf16_mixed_is_the_schemas_default():
    assert compose_config(["precision=bf16_mixed"]) == compose_config([])


@pytest.mark.parametrize(
    "overrides, has_cuda, message",
    [
        (["train.optimizer=paged_adamw"], False, "train.optimizer='paged_adamw': paged optimizers page GPU memory, and this machine has no CUDA GPU; use adamw"),
        (["train.optimizer=paged_adamw_8bit", "shard.cpu_offload=true"], True, "train.optimizer='paged_adamw_8bit': paged optimizers page GPU memory, and shard.cpu_offload keeps the optimizer state in host memory already; use adamw_8bit"),
    ],
)
def test_paged_optimizers_need_a_gpu(overrides, has_cuda, message):
    cfg = compose_config(overrides)
    validate(cfg)
    with pytest.raises(ConfigError) as info:
        check_machine(cfg, has_cuda)
    assert str(info.value) == message
    check_machine(compose_config(["train.optimizer=paged_adamw"]), True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where there is no GPU")
def test_launcher_refuses_a_paged_optimizer_without_a_gpu(tmp_path):
    result = run_launcher("train.optimizer=paged_adamw", f"launch.output_root={tmp_path}/out", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("fsdpqlora: error: train.optimizer='paged_adamw': paged optimizers page GPU memory")
    assert not (tmp_path / "out").exists(), "no run directory for a refused config"


def test_sequence_length_over_the_model_limit(model_dir, cache_dir):
    with pytest.raises(ConfigError, match=r"data.seq_len=1024: exceeds the model's limit of 512 positions"):
        validate(compose_config([*base_overrides(model_dir, cache_dir), "data.seq_len=1024"]), 512)


@pytest.mark.parametrize(
    "args, message",
    [
        (["adapter.r=0"], "fsdpqlora: error: adapter.r=0: must be a positive integer"),
        (["trian.lr=1"], "fsdpqlora: error: trian: Key 'trian' not in 'Config'"),
        (["shard=ddp"], "fsdpqlora: error: shard=ddp: no such option"),
        (["model=llama-2-7b", "model.path=/nonexistent/model"], "fsdpqlora: error: model.path='/nonexistent/model': no such directory"),
        (["-m", "adapter.r=8,16"], "fsdpqlora: error: multirun sweeps (-m) run on SLURM, one job per point: fsdpqlora submit -m"),
        (["data=alpaca_json"], "fsdpqlora: error: data=alpaca_json needs data.path=FILE"),
        (["trian", "adapter.r=8"], "fsdpqlora: error: unknown command 'trian'; commands: train"),
    ],
)
def test_launcher_refuses_before_spawning_workers(tmp_path, args, message):
    result = run_launcher(*args, f"launch.output_root={tmp_path}/out", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "torch.distributed.run" not in result.stdout + result.stderr
    assert not (tmp_path / "out").exists(), "no run directory for a refused config"


def test_launcher_refuses_a_hybrid_group_that_does_not_divide_the_workers(model_dir, cache_dir, tmp_path):
    args = [*base_overrides(model_dir, cache_dir), "shard=hybrid_shard", "shard.hybrid_shard_size=3"]
    result = run_launcher(*args, f"launch.output_root={tmp_path}/out", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "fsdpqlora: error: shard.hybrid_shard_size=3: must divide the 2 workers"
    assert not (tmp_path / "out").exists(), "no run directory for a refused config"


def test_config_prints_the_resolved_configuration_and_starts_nothing(tmp_path):
    from omegaconf import OmegaConf

    from fsdpqlora.config import config_from

    overrides = ["model=llama-3.1-8b", "adapter.r=8", "train.epochs=3", f"launch.output_root={tmp_path}/out"]
    shown = run_launcher("config", *overrides, cwd=tmp_path)
    assert shown.returncode == 0 and shown.stderr == ""
    assert config_from(OmegaConf.create(shown.stdout)) == compose_config(overrides)
    assert run_launcher("--cfg", "job", *overrides, cwd=tmp_path).stdout == shown.stdout
    assert not (tmp_path / "out").exists()


def test_presets_list_each_option_with_a_line():
    listed = run_launcher("presets", "shard")
    assert listed.returncode == 0
    assert listed.stdout.splitlines() == [
        "shard (shard=OPTION):",
        "  full_shard     Frozen weights, gradients and optimizer state sharded; gathered weights freed after each forward (ZeRO-3).",
        "  hybrid_shard   Sharded inside a group (a node by default: shard.hybrid_shard_size), replicated across groups.",
        "  no_shard       Every worker holds the whole model; only gradients are reduced (DDP-like).",
        "  shard_grad_op  Sharded, but gathered weights kept from forward to backward: less traffic, more memory (ZeRO-2).",
    ]
    models = run_launcher("model=list").stdout
    assert run_launcher("model=").stdout == models
    assert "  llama-3.1-70b  meta-llama/Llama-3.1-70B from the Hugging Face hub.\n" in models
    everything = run_launcher("presets").stdout
    assert all(f"\n{group} ({group}=OPTION):\n" in "\n" + everything for group in ("model", "data", "rig", "precision"))
    help_text = run_launcher("--help").stdout
    assert "  config [OVERRIDE ...]" in help_text and "Groups (group=list shows a group's presets): adapter, data, logger, model," in help_text


@pytest.mark.parametrize(
    "args, message",
    [
        (["train.lrr=1e-4"], "fsdpqlora: error: train.lrr: Key 'lrr' not in 'TrainConfig'; did you mean train.lr?"),
        (["trian.lr=1"], "fsdpqlora: error: trian: Key 'trian' not in 'Config'; did you mean train?"),
        (["model=llama-3-70b"], "fsdpqlora: error: model=llama-3-70b: no such option; choose one of gemma-2-27b,"),
        (["shard=fullshard"], "fsdpqlora: error: shard=fullshard: no such option; choose one of full_shard, hybrid_shard, no_shard, shard_grad_op; did you mean full_shard?"),
        (["presets", "shrd"], "fsdpqlora: error: no group 'shrd'; groups: adapter, data, logger, model, precision, quant, rig, shard, train; did you mean shard?"),
        (["confg"], "fsdpqlora: error: unknown command 'confg'; commands: train, config, presets, plan, data, plot, submit, merge, generate; did you mean config?"),
        (["--info"], "fsdpqlora: error: unknown option '--info'; fsdpqlora --help lists the commands"),
    ],
)
def test_did_you_mean(tmp_path, args, message):
    result = run_launcher(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(message) and len(result.stderr.strip().splitlines()) == 1, result.stderr
    if args == ["model=llama-3-70b"]:
        assert result.stderr.strip().endswith("; did you mean llama-3.3-70b?")
