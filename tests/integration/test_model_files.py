"""Broken model directories: one clear line naming the file (and tensor), non-zero exit, no hang."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from tests.helpers import REPO, base_overrides, run_launcher, run_torchrun


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
    result = run_launcher(*overrides, cwd=tmp_path)
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
    from fsdpqlora.config import compose_config
    from fsdpqlora.errors import ModelFilesError
    from fsdpqlora.model.build import build_model

    model = _copy(model_dir, tmp_path)
    shard = next(s for s in _shards(model) if "model.layers.1.self_attn.k_proj.weight" in load_file(s))
    tensors = load_file(shard)
    tensors["model.layers.1.self_attn.k_proj.weight"][3, 5] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ModelFilesError, match=f"{shard}: tensor model.layers.1.self_attn.k_proj.weight contains NaN"):
        build_model(compose_config(base_overrides(model, cache_dir)), process_group, model)


def test_unsupported_architecture_is_named(model_dir, cache_dir, tmp_path, process_group):
    from fsdpqlora.config import compose_config
    from fsdpqlora.errors import ModelFilesError
    from fsdpqlora.model.build import build_model

    model = _copy(model_dir, tmp_path)
    expected = break_unsupported_architecture(model)
    with pytest.raises(ModelFilesError, match=expected):
        build_model(compose_config(base_overrides(model, cache_dir)), process_group, model)


def test_unknown_checkpoint_tensor_is_named(model_dir, cache_dir, tmp_path, process_group):
    """A tensor the config does not describe (biases under attention_bias=false, say) is an error,
    not silently dropped."""
    import torch

    from fsdpqlora.config import compose_config
    from fsdpqlora.errors import ModelFilesError
    from fsdpqlora.model.build import build_model

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
    from fsdpqlora.config import compose_config
    from fsdpqlora.errors import ConfigError
    from fsdpqlora.model.build import build_model

    cfg = compose_config([*base_overrides(model_dir, cache_dir), "adapter.target_modules=[q_proj,embed_tokens,qproj]"])
    with pytest.raises(ConfigError, match="adapter.target_modules: embed_tokens, qproj not linear layers of this model"):
        build_model(cfg, process_group, model_dir)


def test_hub_id_resolves_through_the_hub_cache(model_dir, tmp_path):
    """A hub id is resolved to a local snapshot by huggingface_hub (here from its cache, offline, as
    on a cluster node that downloaded it before); an id that cannot be had is one clear error."""
    snapshot = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "0123abc"
    shutil.copytree(model_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abc")
    script = (
        "from fsdpqlora.config import compose_config\n"
        "from fsdpqlora.errors import ModelFilesError\n"
        "from fsdpqlora.model.directory import resolve_model_dir\n"
        "print(resolve_model_dir(compose_config(['model.name=x', 'model.path=acme/tiny-llama'])))\n"
        "try:\n"
        "    resolve_model_dir(compose_config(['model.name=x', 'model.path=acme/missing']))\n"
        "except ModelFilesError as exc:\n"
        "    print(exc)\n"
    )
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    resolved, error = result.stdout.strip().splitlines()
    assert resolved == str(snapshot)
    assert error.startswith("model.path='acme/missing': not a local directory, and the hub download failed")


def test_custom_code_is_not_run_unless_trusted(model_dir, cache_dir, tmp_path):
    """A config that names custom code (auto_map) is refused by default, and the code never runs."""
    model = _copy(model_dir, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="acme", auto_map={"AutoConfig": "configuration_acme.AcmeConfig"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_acme.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    result = run_launcher(*base_overrides(model, cache_dir), f"launch.output_root={tmp_path}/out", cwd=tmp_path)
    assert result.returncode == 2
    assert "names custom code (auto_map), which fsdpqlora does not run unless model.trust_remote_code=true" in result.stderr
    assert not (tmp_path / "ran").exists()
