"""Broken model directories: one clear line naming the file (and tensor), non-zero exit, no hang."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import REPO, base_overrides, run_torchrun


def _copy(model_dir, tmp_path):
    return shutil.copytree(model_dir, tmp_path / "model")


def _shards(model):
    return sorted(model.glob("model-*.safetensors"))


def break_missing_shard(model):
    _shards(model)[1].unlink()
    return f"{_shards(model)[0].parent}/model-00002-of-"


def break_truncated_shard(model):
    shard = _shards(model)[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return f"{shard}: tensor model.embed_tokens.weight ends at byte"


def break_shard_header(model):
    shard = _shards(model)[1]
    data = bytearray(shard.read_bytes())
    data[10:14] = b"\xff\xfe{]"
    shard.write_bytes(bytes(data))
    return f"{shard}: unreadable safetensors file (header is not JSON"


def break_index_entry(model):
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = _shards(model)[0].name
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return f"{_shards(model)[0]}: tensor model.norm.weight is named in model.safetensors.index.json but not in the file"


def break_config_json(model):
    (model / "config.json").write_text('{"model_type": "llama", ')
    return f"{model / 'config.json'}: not valid JSON"


def break_index_json(model):
    (model / "model.safetensors.index.json").write_text("not json")
    return f"{model / 'model.safetensors.index.json'}: not a valid safetensors index"


def break_unsupported_architecture(model):
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "gpt2"
    (model / "config.json").write_text(json.dumps(config))
    return "architecture 'gpt2' is not supported; supported: gemma2, gemma3_text, llama, mistral, mixtral, phi3, qwen2, qwen3"


@pytest.mark.parametrize(
    "breaker",
    [break_missing_shard, break_truncated_shard, break_shard_header, break_index_entry, break_config_json, break_index_json],
)
def test_launcher_names_the_broken_file(model_dir, cache_dir, tmp_path, breaker):
    model = _copy(model_dir, tmp_path)
    expected = breaker(model)
    overrides = base_overrides(model, cache_dir) + [f"launch.output_root={tmp_path}/out"]
    result = subprocess.run(
        [sys.executable, "-m", "fsdpqlora.launch.cli", *overrides], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 2
    line = result.stderr.strip()
    assert line.startswith("fsdpqlora: error: ") and expected in line, line
    assert len(line.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("load_mode", ["every_rank", "rank0_broadcast"])
def test_shape_mismatch_fails_on_every_rank_without_hanging(model_dir, cache_dir, tmp_path, load_mode):
    """Shapes are only checked once a worker holds the tensor: every rank raises the same error,
    also when only rank 0 reads the files."""
    model = _copy(model_dir, tmp_path)
    shard = next(s for s in _shards(model) if "model.layers.0.mlp.up_proj.weight" in load_file(s))
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:-64]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(AssertionError) as info:
        overrides = [*base_overrides(model, cache_dir), f"launch.output_root={tmp_path}/out", f"model.load_mode={load_mode}"]
        run_torchrun(2, ["-m", "fsdpqlora.train", *overrides], timeout=180)
    message = "tensor model.layers.0.mlp.up_proj.weight has shape [128, 64] but the model's config.json implies [192, 64]"
    assert str(info.value).count(message) == 2, str(info.value)[-3000:]


def test_corrupted_tensor_values_are_named(model_dir, cache_dir, tmp_path, process_group):
    """Bytes flipped inside a 16-bit tensor usually decode to inf/NaN: caught, with the tensor named."""
    from fsdpqlora.build import build_model
    from fsdpqlora.config import compose_config
    from fsdpqlora.errors import ModelFilesError

    model = _copy(model_dir, tmp_path)
    shard = next(s for s in _shards(model) if "model.layers.1.self_attn.k_proj.weight" in load_file(s))
    tensors = load_file(shard)
    tensors["model.layers.1.self_attn.k_proj.weight"][3, 5] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ModelFilesError, match=f"{shard}: tensor model.layers.1.self_attn.k_proj.weight contains NaN"):
        build_model(compose_config(base_overrides(model, cache_dir)), process_group, model)


def test_unsupported_architecture_is_named(model_dir, cache_dir, tmp_path, process_group):
    from fsdpqlora.build import build_model
    from fsdpqlora.config import compose_config
    from fsdpqlora.errors import ModelFilesError

    model = _copy(model_dir, tmp_path)
    expected = break_unsupported_architecture(model)
    with pytest.raises(ModelFilesError, match=expected):
        build_model(compose_config(base_overrides(model, cache_dir)), process_group, model)


def test_unknown_checkpoint_tensor_is_named(model_dir, cache_dir, tmp_path, process_group):
    """A tensor the config does not describe (biases under attention_bias=false, say) is an error,
    not silently dropped."""
    import torch

    from fsdpqlora.build import build_model
    from fsdpqlora.config import compose_config
    from fsdpqlora.errors import ModelFilesError

    model = _copy(model_dir, tmp_path)
    shard = _shards(model)[-1]
    tensors = load_file(shard)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64, dtype=torch.bfloat16)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.q_proj.bias"] = shard.name
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFilesError, match="tensor model.layers.0.self_attn.q_proj.bias is not part of the model"):
        build_model(compose_config(base_overrides(model, cache_dir)), process_group, model)


def test_adapter_targets_must_be_linear_layers(model_dir, cache_dir, process_group):
    from fsdpqlora.build import build_model
    from fsdpqlora.config import compose_config
    from fsdpqlora.errors import ConfigError

    cfg = compose_config([*base_overrides(model_dir, cache_dir), "adapter.target_modules=[q_proj,embed_tokens,qproj]"])
    with pytest.raises(ConfigError, match="adapter.target_modules: embed_tokens, qproj not linear layers of this model"):
        build_model(cfg, process_group, model_dir)
