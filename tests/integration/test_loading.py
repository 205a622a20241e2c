"""Loading every supported family into the sharded 4-bit model, against transformers.

One tiny random model per family is written with save_pretrained (several safetensors shards and
an index, in bf16, fp16 or fp32), loaded by 2 FSDP ranks in one torchrun run (tests/integration/load_worker.py),
and compared with transformers' `from_pretrained(quantization_config=BitsAndBytesConfig(...))` on
the same directory: the same packed bytes and quantization state in every 4-bit layer, the same
logits. Both load modes must give byte-identical shards, and a checkpoint saved in 4-bit by
transformers loads without being quantized again.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import bitsandbytes as bnb
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from fsdpqlora.compat import exact_4bit_kernels
from fsdpqlora.config import compose_config
from fsdpqlora.export.generate import bnb_config
from tests.helpers import PROBE, REPO, run_torchrun, write_test_model

pytestmark = pytest.mark.distributed

# model_type -> (config beyond the test shape, checkpoint dtype, 4-bit linears per decoder layer).
# Each family brings something the loader must get right.
FAMILIES = {
    "llama": ({}, torch.bfloat16, 7),
    "mistral": ({}, torch.float16, 7),  # an fp16 checkpoint
    "qwen2": ({}, torch.float32, 7),  # an fp32 checkpoint; q/k/v biases
    "qwen3": ({"head_dim": 16, "tie_word_embeddings": True}, torch.bfloat16, 7),  # q/k norms, tied head
    # tied head, scaled embedding buffer, logit softcapping, sliding-window layers
    "gemma2": ({"head_dim": 16, "tie_word_embeddings": True}, torch.bfloat16, 7),
    "gemma3_text": ({"head_dim": 16, "tie_word_embeddings": True}, torch.bfloat16, 7),
    "phi3": ({}, torch.bfloat16, 4),  # fused qkv_proj and gate_up_proj
    # 4 attention linears + 4 experts x (w1, w2, w3); the router stays in the model dtype
    "mixtral": ({"num_local_experts": 4, "num_experts_per_tok": 2}, torch.bfloat16, 16),
}
TIED = {"qwen3", "gemma2", "gemma3_text"}
FP32 = ["model.dtype=float32", "quant.compute_dtype=float32"]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for model_type, (config, dtype, _) in FAMILIES.items():
        dirs[model_type] = write_test_model(root / model_type, model_type=model_type, dtype=dtype, **config)
    return dirs


@pytest.fixture(scope="session")
def prequantized_dir(family_dirs, tmp_path_factory):
    """The llama checkpoint loaded by transformers in 4-bit and saved again: packed weights plus
    quantization-state tensors, and a quantization_config in config.json."""
    out = tmp_path_factory.mktemp("prequantized")
    _transformers_4bit(family_dirs["llama"], "bfloat16").save_pretrained(out, max_shard_size="100KB")
    for tokenizer_file in family_dirs["llama"].glob("tokenizer*"):
        shutil.copy(tokenizer_file, out)
    return out


@pytest.fixture(scope="session")
def loaded(family_dirs, prequantized_dir, cache_dir, tmp_path_factory):
    """Every family loaded by 2 ranks (every_rank), llama and mixtral also by rank-0 broadcast, and
    the pre-quantized directory, all in one torchrun run: the results of rank 0 and 1, and the
    directory holding the adapters they trained."""
    out = tmp_path_factory.mktemp("loaded")
    jobs = [f"{name}={path}:every_rank" for name, path in family_dirs.items()]
    jobs += [f"llama={family_dirs['llama']}:rank0_broadcast", f"mixtral={family_dirs['mixtral']}:rank0_broadcast"]
    jobs += [f"prequantized={prequantized_dir}:every_rank", f"prequantized={prequantized_dir}:rank0_broadcast"]
    run_torchrun(2, [str(REPO / "tests/integration/load_worker.py"), str(out), str(cache_dir), *jobs], timeout=600)
    return SimpleNamespace(ranks=[torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], dir=out)


def _transformers_4bit(model_dir, dtype: str):
    cfg = compose_config([f"model.dtype={dtype}", f"quant.compute_dtype={dtype}"])
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=bnb_config(cfg), dtype=getattr(torch, dtype), device_map="cpu"
    )
    exact_4bit_kernels(model)
    return model.eval()


def _checkpoint(model_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in model_dir.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def _nf4(weight: torch.Tensor) -> bnb.nn.Params4bit:
    """A weight quantized the way transformers quantizes a Linear4bit's (Params4bit moved to a device)."""
    return bnb.nn.Params4bit(
        weight.float(), requires_grad=False, quant_type="nf4", compress_statistics=True, blocksize=64, quant_storage=torch.uint8
    )._quantize("cpu")


def _mixtral_reference(model_dir):
    """transformers keeps Mixtral's fused experts in 16-bit under BitsAndBytesConfig. The reference
    for our per-expert 4-bit linears is transformers' model with each expert replaced by its NF4
    round trip, quantized through bitsandbytes' Params4bit as transformers would quantize a linear."""
    model = _transformers_4bit(model_dir, "float32")
    checkpoint = _checkpoint(model_dir)
    experts_4bit = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            experts = layer.mlp.experts
            for e in range(experts.num_experts):
                dequantized = {}
                for w in ("w1", "w2", "w3"):
                    param = _nf4(checkpoint[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"])
                    experts_4bit[f"model.layers.{i}.mlp.experts.{e}.{w}"] = param
                    dequantized[w] = bnb.functional.dequantize_4bit(param.data, param.quant_state)
                experts.gate_up_proj[e].copy_(torch.cat([dequantized["w1"], dequantized["w3"]]))
                experts.down_proj[e].copy_(dequantized["w2"])
    return model, experts_4bit


@pytest.fixture(scope="session")
def references(family_dirs):
    refs = {}
    for name, path in family_dirs.items():
        if name == "mixtral":
            model, experts = _mixtral_reference(path)
        else:
            model, experts = _transformers_4bit(path, "float32"), {}
        layers = {n: (m.weight, m.weight.quant_state) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        layers.update({n: (p, p.quant_state) for n, p in experts.items()})
        with torch.no_grad():
            logits = model(input_ids=PROBE, use_cache=False).logits.float()
        refs[name] = {"layers": layers, "logits": logits, "model": model}
    return refs


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers_4bit(loaded, references, family):
    ours = loaded.ranks[0][f"{family}:every_rank"]["logits"]
    assert ours.abs().max() > 0.5, "a model whose logits are all near zero would compare equal to anything"
    torch.testing.assert_close(ours, references[family]["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_bytes_and_state_equal_transformers_4bit(loaded, references, family):
    ours = loaded.ranks[0][f"{family}:every_rank"]
    reference = references[family]["layers"]
    per_layer = FAMILIES[family][2]
    assert sorted(ours["packed"]) == sorted(reference) and len(reference) == 2 * per_layer
    for name, (ref_weight, ref_state) in reference.items():
        assert torch.equal(ours["packed"][name], ref_weight.data.view(torch.uint8).flatten()), name
        ref_dict = ref_state.as_dict(packed=True)
        assert ours["states"][name].keys() == ref_dict.keys(), name
        for key, value in ref_dict.items():
            assert torch.equal(ours["states"][name][key], value), f"{name}: {key}"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains(loaded, family):
    losses = loaded.ranks[0][f"{family}:every_rank"]["losses"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_adapter_reloads_in_peft_on_transformers(loaded, references, family):
    """The adapter trained by 2 FSDP ranks, loaded with peft onto transformers' model of the same
    directory, gives our trained logits. For Mixtral peft fuses our per-expert adapters (the hub's
    layout) into transformers 5's fused experts."""
    from peft import PeftModel
    from safetensors.torch import load_file

    ours = loaded.ranks[0][f"{family}:every_rank"]
    assert (ours["logits_after"] - ours["logits"]).abs().max() > 1e-2, "training changed the model"
    adapter_dir = loaded.dir / f"{family}-every_rank-adapter"
    # all-linear: an A and a B for every 4-bit linear, every expert's included
    assert len(load_file(adapter_dir / "adapter_model.safetensors")) == 2 * 2 * FAMILIES[family][2]
    model = PeftModel.from_pretrained(references[family]["model"], adapter_dir)
    with torch.no_grad():
        logits = model(input_ids=PROBE, use_cache=False).logits.float()
    model.unload()  # leave the shared reference model as it was
    torch.testing.assert_close(logits, ours["logits_after"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", sorted(TIED))
def test_tied_head_stays_the_embedding(loaded, family):
    assert loaded.ranks[0][f"{family}:every_rank"]["tied_head"]
    assert "lm_head.weight" not in loaded.ranks[0][f"{family}:every_rank"]["frozen_local"]


def test_mixtral_router_stays_in_model_dtype(loaded):
    frozen = loaded.ranks[0]["mixtral:every_rank"]["frozen_local"]
    routers = [name for name in frozen if name.endswith("mlp.gate.weight")]
    assert len(routers) == 2 and all(frozen[name].dtype == torch.float32 for name in routers)


@pytest.mark.parametrize("name", ["llama", "mixtral", "prequantized"])
def test_rank0_broadcast_and_every_rank_give_identical_shards(loaded, name):
    for rank in (0, 1):
        every, broadcast = loaded.ranks[rank][f"{name}:every_rank"], loaded.ranks[rank][f"{name}:rank0_broadcast"]
        assert (every["mode"], broadcast["mode"]) == ("every_rank", "rank0_broadcast")
        assert every["frozen_local"].keys() == broadcast["frozen_local"].keys()
        for key, value in every["frozen_local"].items():
            assert torch.equal(value, broadcast["frozen_local"][key]), f"rank {rank}: {key}"
        for key, state in every["states"].items():
            for field, value in state.items():
                assert torch.equal(value, broadcast["states"][key][field]), f"rank {rank}: {key}.{field}"


def test_each_rank_keeps_only_its_shard(loaded):
    """full_shard: the two ranks' local packed shards are disjoint halves of the full bytes."""
    name = "model.layers.0.mlp.down_proj.weight"
    halves = [loaded.ranks[r]["llama:every_rank"]["frozen_local"][name].view(torch.uint8).flatten() for r in (0, 1)]
    full = loaded.ranks[0]["llama:every_rank"]["packed"]["model.layers.0.mlp.down_proj"]
    assert halves[0].numel() == halves[1].numel() == full.numel() // 2
    assert torch.equal(torch.cat(halves), full)


def test_prequantized_checkpoint_loads_without_requantizing(loaded, prequantized_dir, family_dirs):
    """The packed bytes and quantization state are those in the files, and the model computes what
    transformers computes from the same directory."""
    ours = loaded.ranks[0]["prequantized:every_rank"]
    files = _checkpoint(prequantized_dir)
    assert len(ours["packed"]) == 14
    for name, packed in ours["packed"].items():
        assert torch.equal(packed, files[f"{name}.weight"].view(torch.uint8).flatten()), name
        assert torch.equal(ours["states"][name]["absmax"], files[f"{name}.weight.absmax"]), name
    # Same bytes as quantizing the original checkpoint: nothing was lost in the round trip.
    original = loaded.ranks[0]["llama:every_rank"]["packed"]
    assert all(torch.equal(ours["packed"][name], original[name]) for name in original)
    # transformers takes a pre-quantized checkpoint's own settings (bf16 compute here) over the ones
    # passed in; to compare in fp32, as ours ran, lift its 16-bit tensors and compute dtype to fp32.
    reference = _transformers_4bit(prequantized_dir, "float32")
    for param in reference.parameters():
        if param.dtype == torch.bfloat16:
            param.data = param.data.float()
    for module in reference.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = torch.float32
    with torch.no_grad():
        expected = reference(input_ids=PROBE, use_cache=False).logits.float()
    torch.testing.assert_close(ours["logits"], expected, rtol=0, atol=1e-5)
    assert ours["bytes_read"] < loaded.ranks[0]["llama:every_rank"]["bytes_read"], "4-bit files are smaller to read"


def test_prequantized_checkpoint_with_other_settings_is_refused(prequantized_dir, cache_dir):
    from fsdpqlora.errors import ConfigError
    from fsdpqlora.model.directory import check_prequantized, load_hf_config

    hf_config = load_hf_config(prequantized_dir, trust_remote_code=False)
    cfg = compose_config([f"model.path={prequantized_dir}", "model.name=x", "quant.quant_type=fp4"])
    with pytest.raises(ConfigError, match=r"quant.quant_type='fp4': the checkpoint .* is pre-quantized with nf4"):
        check_prequantized(cfg, hf_config, prequantized_dir)


def test_quantization_config_of_other_methods_is_refused(family_dirs, tmp_path):
    from fsdpqlora.errors import ModelFilesError
    from fsdpqlora.model.directory import load_hf_config, prequantized_config

    model = shutil.copytree(family_dirs["llama"], tmp_path / "gptq")
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFilesError, match="the checkpoint is quantized with gptq"):
        prequantized_config(load_hf_config(model, trust_remote_code=False))


