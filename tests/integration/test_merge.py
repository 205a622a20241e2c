"""`fsdpqlora merge` and `fsdpqlora generate` against what training computed and what the Hugging
Face stack computes.

A run directory is made per family the way a run leaves it (config.yaml + adapter/ saved by our
save path) from our own 4-bit + LoRA model with every adapter weight random and non-zero, whose
logits are the reference: the merged model, loaded by plain transformers, must compute them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from fsdpqlora.compat import exact_4bit_kernels
from fsdpqlora.config import compose_config, save_run_config, to_dict
from fsdpqlora.export import generate, merge
from fsdpqlora.export.locate import RUN_CONFIG_COPY, locate
from fsdpqlora.model import adapters
from fsdpqlora.model.build import build_model
from fsdpqlora.parallel.process_group import Dist
from tests.helpers import PROBE, REPO, write_test_model
from tests.integration.test_data_formats import CONVERSATION
from tests.integration.test_loading import _checkpoint, _nf4, _transformers_4bit

FP32 = ["model.dtype=float32", "quant.compute_dtype=float32", "adapter.dropout=0", "adapter.r=4"]
# model_type -> config beyond the test shape
FAMILIES = {
    "llama": {},
    "phi3": {},  # fused qkv_proj and gate_up_proj
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},  # per-expert adapters, 16-bit router
}
# fp32 merge against the trained model: only the order of the sums differs ((W + sBA)x against
# Wx + s(B(Ax))), measured at about 3e-6 on logits of magnitude 3.
FP32_ATOL = 2e-5


def make_run(run_dir, model_dir, overrides, seed=1):
    """A run directory holding our model's adapter, every weight of it random, and the logits our
    4-bit + LoRA model computes with it (in fp32 compute)."""
    cfg = compose_config([f"model.path={model_dir}", "model.name=test", f"launch.cache_dir={run_dir}/cache", *overrides])
    built = build_model(cfg, Dist(0, 0, 1, torch.device("cpu")), model_dir, shard=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in adapters.lora_parameters(built.model):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        built.model.eval()
        logits = built.model(input_ids=PROBE, use_cache=False).logits.float()
    save_run_config(cfg, run_dir)
    adapters.save_adapter(built.model, adapters.gather_adapter_state(built.model), run_dir / "adapter")
    return SimpleNamespace(dir=run_dir, model_dir=model_dir, cfg=cfg, logits=logits)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("merge")
    result = {}
    for family, config in FAMILIES.items():
        base = model_dir if family == "llama" else write_test_model(root / f"{family}-model", model_type=family, **config)
        result[family] = make_run(root / family, base, FP32)
    return result


@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory):
    """Each run merged in fp32 (small shards, so there are several), llama and mixtral also in bf16."""
    root = tmp_path_factory.mktemp("merged")
    out = {}
    for family, run in runs.items():
        out[family] = root / family
        merge.merge(locate(run.dir, need_adapter=True), out[family], "float32", max_shard_bytes=100_000, show_progress=False)
    for family in ("llama", "mixtral"):
        out[f"{family}-bf16"] = root / f"{family}-bf16"
        merge.merge(locate(runs[family].dir, need_adapter=True), out[f"{family}-bf16"], "bfloat16", show_progress=False)
    return out


def _logits(model):
    with torch.no_grad():
        return model(input_ids=PROBE, use_cache=False).logits.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_merge_computes_the_trained_model(runs, merged, family):
    out = merged[family]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    torch.testing.assert_close(_logits(model), runs[family].logits, rtol=0, atol=FP32_ATOL)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and files == sorted(set(index["weight_map"].values()))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum((out / f).stat().st_size for f in files)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", RUN_CONFIG_COPY):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(".*tmp*")), "no temporary directory left"


def test_merge_equals_transformers_4bit_base_plus_peft_adapter(runs, merged):
    """The reference the ecosystem gives: transformers + BitsAndBytesConfig base, peft adapter."""
    from peft import PeftModel

    run = runs["llama"]
    reference = PeftModel.from_pretrained(_transformers_4bit(run.model_dir, "float32"), run.dir / "adapter")
    expected = _logits(reference)
    with reference.disable_adapter():
        assert (expected - _logits(reference)).abs().max() > 0.1, "the adapter changes the model"
    fp32 = _logits(AutoModelForCausalLM.from_pretrained(merged["llama"]))
    torch.testing.assert_close(fp32, expected, rtol=0, atol=FP32_ATOL)
    # bf16 weights: the rounding of each merged weight to bf16 (8 bits of mantissa) shows in the
    # logits, measured at about 0.02 here on logits of magnitude 3.
    bf16_model = AutoModelForCausalLM.from_pretrained(merged["llama-bf16"], dtype=torch.float32)
    bf16 = _logits(bf16_model)
    assert (bf16 - expected).abs().max() > FP32_ATOL, "bf16 rounding shows"
    torch.testing.assert_close(bf16, expected, rtol=0, atol=0.06)


def test_from_original_reports_its_difference_from_the_trained_weights(runs, merged, tmp_path):
    run = runs["llama"]
    summary = merge.merge(locate(run.dir, need_adapter=True), tmp_path / "orig", "float32", from_original=True, show_progress=False)
    # Independently: each 4-bit weight against its NF4 round trip (fp32 quantization, as model.dtype
    # says), over the 14 quantized linears.
    checkpoint = _checkpoint(run.model_dir)
    diffs = {}
    for name, weight in checkpoint.items():
        if name.endswith("proj.weight"):
            param = _nf4(weight)
            diffs[name] = weight.float() - bnb.functional.dequantize_4bit(param.data, param.quant_state)
    assert len(diffs) == 14
    everything = torch.cat([d.flatten() for d in diffs.values()])
    worst = max(diffs, key=lambda n: diffs[n].abs().max())
    d = summary.difference
    assert (d.max_4bit, d.max_4bit_name) == (everything.abs().max().item(), worst)
    assert d.mean_4bit == pytest.approx(everything.abs().double().mean().item(), rel=1e-9)
    assert d.max_4bit > 0.01 and d.max_other == 0.0  # bf16 checkpoint, fp32 model: 16-bit tensors exact
    # The written weights differ from the trained-weights merge by exactly that difference.
    original, trained = _checkpoint(tmp_path / "orig"), _checkpoint(merged["llama"])
    for name in diffs:
        torch.testing.assert_close(original[name] - trained[name], diffs[name], rtol=0, atol=1e-6)
    assert "4-bit weights max |d|" in "\n".join(summary.lines(locate(run.dir), True))


@pytest.mark.parametrize("family, linears", [("llama", 14), ("mixtral", 8)])
def test_requantized_output_loads_4bit_and_equals_bnb_quantizing_the_merged_model(runs, merged, tmp_path, family, linears):
    """transformers 5 keeps Mixtral's fused experts in 16 bits under bitsandbytes, so only its
    attention linears are 4-bit, in our output as in transformers' quantization of the merged model."""
    run = runs[family]
    out = tmp_path / "nf4"
    merge.merge(locate(run.dir, need_adapter=True), out, "bfloat16", requantize=True, show_progress=False)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    ours = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    reference = AutoModelForCausalLM.from_pretrained(
        merged[f"{family}-bf16"], quantization_config=generate.bnb_config(run.cfg), device_map="cpu"
    )
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    ref_layers = {n: m for n, m in reference.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert layers.keys() == ref_layers.keys() and len(layers) == linears
    for name, layer in layers.items():
        assert torch.equal(layer.weight.data, ref_layers[name].weight.data), name
    for model in (ours, reference):
        exact_4bit_kernels(model)
    assert torch.equal(_logits(ours), _logits(reference))
    if family == "llama":  # 4-bit linears, 16-bit embedding and head (most of this tiny model)
        assert (out / "model.safetensors").stat().st_size < 0.7 * (merged["llama-bf16"] / "model.safetensors").stat().st_size


def test_a_prequantized_base_merges_as_its_full_precision_original(runs, tmp_path, capsys):
    """A base saved in 4-bit by transformers holds the bytes that quantizing the original gives:
    merged from either, with model.dtype=bfloat16 (the dtype the 4-bit state dequantizes to), the
    weights are identical. It has no original weights to merge into."""
    run = runs["llama"]
    prequantized = tmp_path / "prequantized"
    _transformers_4bit(run.model_dir, "bfloat16").save_pretrained(prequantized)
    for tokenizer_file in run.model_dir.glob("tokenizer*"):
        shutil.copy(tokenizer_file, prequantized)
    run_dir = shutil.copytree(run.dir, tmp_path / "run")
    save_run_config(replace(run.cfg, model=replace(run.cfg.model, dtype="bfloat16")), run_dir)
    merge.merge(locate(run_dir, need_adapter=True), tmp_path / "from-original", "float32", show_progress=False)
    merge.merge(locate(run_dir, str(prequantized), need_adapter=True), tmp_path / "from-4bit", "float32", show_progress=False)
    original, from_4bit = _checkpoint(tmp_path / "from-original"), _checkpoint(tmp_path / "from-4bit")
    assert original.keys() == from_4bit.keys()
    assert all(torch.equal(original[name], from_4bit[name]) for name in original)
    code, err = _merge_cli(capsys, run_dir, tmp_path / "out", "--base", prequantized, "--from-original")
    assert code == 2 and "is saved in 4-bit; it has no original full-precision weights" in err


def test_dora_merge_equals_peft_merge_and_unload(model_dir, tmp_path):
    """A DoRA adapter made by peft on the dequantized 4-bit weights (what training sees), merged by
    peft's merge_and_unload, against ours merged from the checkpoint."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    targets = ["q_proj", "v_proj", "down_proj"]
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("proj"):  # every 4-bit linear, adapted or not
                param = _nf4(module.weight)
                module.weight.copy_(bnb.functional.dequantize_4bit(param.data, param.quant_state))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator)).add_(0.05 * torch.randn(param.shape, generator=generator))
    run_dir = tmp_path / "run"
    save_run_config(compose_config([f"model.path={model_dir}", "model.name=test", *FP32]), run_dir)
    peft_model.save_pretrained(run_dir / "adapter")
    expected = peft_model.merge_and_unload().state_dict()
    merge.merge(locate(run_dir, need_adapter=True), tmp_path / "out", "float32", show_progress=False)
    ours = _checkpoint(tmp_path / "out")
    assert ours.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=1e-6, msg=name)


def test_a_checkpoint_or_a_bare_adapter_directory_is_found(runs, merged, tmp_path, capsys):
    """A checkpoint's adapter merges with the configuration in its meta.json; an adapter directory
    alone, with the base its adapter_config.json names and the schema's default settings."""
    run = runs["llama"]
    step = tmp_path / "checkpoints" / "step-00000003"
    shutil.copytree(run.dir / "adapter", step / "adapter")
    (step / "meta.json").write_text(json.dumps({"step": 3, "config": to_dict(run.cfg)}))
    found = locate(step, need_adapter=True)
    assert (found.cfg, found.cfg_file, found.model_dir, found.adapter_dir) == (run.cfg, step / "meta.json", run.model_dir, step / "adapter")
    merge.merge(found, tmp_path / "from-checkpoint", "float32", show_progress=False)
    expected = _checkpoint(merged["llama"])
    assert all(torch.equal(value, expected[name]) for name, value in _checkpoint(tmp_path / "from-checkpoint").items())

    bare = shutil.copytree(run.dir / "adapter", tmp_path / "bare-adapter")
    assert merge.main([str(bare), str(tmp_path / "from-bare")]) == 0
    out = capsys.readouterr().out
    assert f"no run configuration next to {bare}; assuming the defaults: nf4, double_quant=True, blocksize 64, model.dtype=bfloat16" in out
    assert f"into the base weights as training saw them (4-bit, dequantized) of {run.model_dir}" in out
    assert not (tmp_path / "from-bare" / RUN_CONFIG_COPY).exists()


def _merge_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        merge.main([str(a) for a in args])
    return exit_info.value.code, capsys.readouterr().err


def test_a_failure_midway_leaves_no_output(runs, tmp_path, capsys):
    """A corrupted tensor in the last shard of the base is found after earlier shards were merged
    and written: the error names it, and neither the output nor a temporary directory remains."""
    run = runs["llama"]
    base = shutil.copytree(run.model_dir, tmp_path / "base")
    last = sorted(base.glob("model-*.safetensors"))[-1]
    tensors = load_file(last)
    name = sorted(tensors)[-1]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, last, metadata={"format": "pt"})
    out = tmp_path / "out"
    code, err = _merge_cli(capsys, run.dir, out, "--base", base, "--max-shard-size", "50KB")
    assert code == 2 and f"{last}: tensor {name} contains NaN" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def _bad_adapter(run, tmp_path, change):
    bad = shutil.copytree(run.dir, tmp_path / "run")
    change(bad / "adapter")
    return bad


def _reshape_one(adapter_dir):
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, path)


@pytest.mark.parametrize(
    "case, change, extra, message",
    [
        ("missing weights", lambda a: (a / "adapter_model.safetensors").unlink(), [], "adapter_model.safetensors: missing"),
        ("wrong shape", _reshape_one, [], "tensor base_model.model.model.layers.1.mlp.up_proj.lora_A.weight has shape [4, 32] but the base weight"),
        ("base missing", lambda a: None, ["--base", "/nonexistent/base"], "--base /nonexistent/base: "),
        ("another model", lambda a: None, ["--base", "PHI3"], "adapts model.layers.0.mlp.gate_proj, which is not a weight the base checkpoint holds"),
        ("out exists", lambda a: None, ["EXISTS"], "already exists"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v and len(v) < 20 else "",
)
def test_bad_input_is_one_error_and_writes_nothing(runs, tmp_path, capsys, case, change, extra, message):
    run_dir = _bad_adapter(runs["llama"], tmp_path, change)
    out = tmp_path / "out"
    if extra == ["EXISTS"]:
        out.mkdir()
        extra = []
    extra = [str(runs["phi3"].model_dir) if a == "PHI3" else a for a in extra]
    code, err = _merge_cli(capsys, run_dir, out, *extra)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out", "run"] if case == "out exists" else ["run"])


def _random_adapter(run_dir, model_dir):
    """A run directory with a random rank-2 adapter on every 4-bit linear of a Llama checkpoint,
    written directly (what it holds does not matter for memory)."""
    from peft import LoraConfig

    save_run_config(compose_config([f"model.path={model_dir}", "model.name=test"]), run_dir)
    LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
               base_model_name_or_path=str(model_dir)).save_pretrained(run_dir / "adapter")  # fmt: skip
    tensors = {}
    for name, weight in _checkpoint(model_dir).items():
        if name.endswith("proj.weight"):
            prefix = f"base_model.model.{name.removesuffix('.weight')}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(2, weight.shape[1])
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(weight.shape[0], 2)
    save_file(tensors, run_dir / "adapter" / "adapter_model.safetensors")


DEEP = 24


def test_merge_memory_does_not_grow_with_the_model(tmp_path):
    """Two models of the same width, 2 and 24 layers (17 and 190 MB), merged by `fsdpqlora merge`
    in one fresh process (the small one first as a warm-up: the libraries' first-use buffers), each
    merge reporting its own peak RSS growth: that of a few of the largest tensors, the same for
    both (measured 25-43 MiB, deep and shallow up to 12 MiB apart from run to run), never the model
    (173 MB between them). With 4 and 23 MB, then 17 and 100 MB models, that noise was over the 15%
    of their difference allowed."""
    size, jobs = {}, []
    for layers in (2, DEEP):
        model_dir = write_test_model(tmp_path / f"model{layers}", hidden_size=512, intermediate_size=2048, num_hidden_layers=layers)
        _random_adapter(tmp_path / f"run{layers}", model_dir)
        size[layers] = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20
    for name, layers in (("warm-up", 2), ("deep", DEEP), ("shallow", 2)):
        jobs.append(["merge", str(tmp_path / f"run{layers}"), str(tmp_path / name)])
    script = f"from fsdpqlora.launcher.cli import main\nfor job in {jobs!r}:\n    assert main(job) == 0"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "peak host RSS" in line]
    growth = dict(zip(("warm-up", "deep", "shallow"), (float(line.split("(")[-1].split(" MiB above")[0]) for line in lines), strict=True))
    written = sum(p.stat().st_size for p in (tmp_path / "deep").glob("*.safetensors"))
    assert f"{written / 2**30:.2f} GiB written" in lines[1] and written > 0.9 * size[DEEP] * 2**20
    assert growth["deep"] - growth["shallow"] < 0.15 * (size[DEEP] - size[2]), (growth, size)
    assert growth["deep"] < 0.5 * size[DEEP], (growth, size)


def _generate_cli(capsys, *args) -> list[str]:
    assert generate.main([str(a) for a in args]) == 0
    return [line.split("answer: ", 1)[1] for line in capsys.readouterr().out.splitlines() if "] answer: " in line]


def test_a_chat_runs_template_is_in_the_merged_tokenizer(runs, tmp_path):
    """A base without a chat template trains chat data with the built-in one: the merged model's
    tokenizer renders a conversation to the very ids training saw, and `generate` builds the same
    prompt from it as from the base."""
    from transformers import AutoTokenizer

    from fsdpqlora.config import DataFormat
    from fsdpqlora.data import generation_prompt_ids, make_format
    from fsdpqlora.data.tokenize import Encoder

    run = runs["llama"]
    chat_run = shutil.copytree(run.dir / "adapter", tmp_path / "run" / "adapter")
    cfg = replace(run.cfg, data=replace(run.cfg.data, format=DataFormat.chat))
    save_run_config(cfg, chat_run.parent)
    merge.merge(locate(chat_run.parent, need_adapter=True), tmp_path / "merged", "float32", show_progress=False)

    base = AutoTokenizer.from_pretrained(run.model_dir)
    assert base.chat_template is None
    fmt = make_format(cfg, base)
    segments = fmt.segments({"messages": CONVERSATION})
    trained, _ = Encoder(base, fmt, cfg).join(segments, [base(s.text, add_special_tokens=False).input_ids for s in segments])
    merged = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged.apply_chat_template(CONVERSATION, tokenize=False) == base.bos_token + "".join(s.text for s in segments)
    assert merged.apply_chat_template(CONVERSATION, return_dict=False) == trained
    assert trained[0] == base.bos_token_id and trained.count(base.eos_token_id) == 5
    merged_cfg = locate(tmp_path / "merged").cfg
    assert generation_prompt_ids(merged_cfg, merged, "Hi") == generation_prompt_ids(cfg, base, "Hi")


def test_generate_base_plus_adapter_equals_merged_model(runs, merged, tmp_path, capsys):
    run = runs["llama"]
    prompt = "How do I open a file?"
    on_base = _generate_cli(capsys, run.dir, "--prompt", prompt, "--max-new-tokens", 12)
    on_merged = _generate_cli(capsys, merged["llama"], "--prompt", prompt, "--max-new-tokens", 12)
    assert len(on_base) == 1 and on_base[0] and on_base == on_merged
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "Other question?"}) + "\n\n" + json.dumps({"prompt": prompt}) + "\n")
    from_file = _generate_cli(capsys, merged["llama"], "--prompts-file", prompts_file, "--max-new-tokens", 12)
    assert len(from_file) == 2 and from_file[1] == on_merged[0]
    plain_file = tmp_path / "prompts.txt"
    plain_file.write_text(f"{prompt}\n\nOther question?\n")
    assert _generate_cli(capsys, merged["llama"], "--prompts-file", plain_file, "--max-new-tokens", 12) == [from_file[1], from_file[0]]
    # --raw skips the training format: another prompt, another answer.
    raw = _generate_cli(capsys, merged["llama"], "--prompt", prompt, "--max-new-tokens", 12, "--raw")
    assert raw != on_merged
    prompts_file.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(SystemExit):
        generate.main([str(merged["llama"]), "--prompts-file", str(prompts_file)])
    assert "prompts.jsonl: row 1: no string field 'prompt'" in capsys.readouterr().err
