"""What the tests share: a small random Llama checkpoint and a qa file written on demand, the configs
pointing at them, and running torchrun workers and the launcher. Fixtures live in tests/conftest.py;
tests and the worker scripts (run with PYTHONPATH=REPO) import from here."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# The suite's workers compute on CPU (gloo) on every machine, a GPU machine included: its two-rank
# runs need two devices (NCCL refuses two ranks on one GPU) and compare against CPU references.
# tests/conftest.py sets this before anything touches CUDA, so the test process and every worker it
# starts see no GPU; what only a GPU shows is benchmarks/gpu.py's.
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}

# Small enough for a 2-core CPU, shaped like the real thing: GQA, several safetensors shards with
# an index, bf16 weights, every linear dimension a multiple of the 64-element quantization block.
TEST_LLAMA = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


# Token ids every comparison feeds the models (all below the test tokenizer's 512).
PROBE = torch.tensor([[1, 5, 17, 33, 101, 7, 64, 250], [1, 300, 2, 44, 45, 46, 9, 10]])


def base_module_name(name: str) -> str:
    """A module or parameter name of our model (peft + checkpoint wrapper) as transformers names it."""
    for wrapper in ("base_model.model.", "_checkpoint_wrapped_module.", ".base_layer"):
        name = name.replace(wrapper, "")
    return name


def write_test_model(out_dir: Path, seed: int = 0, model_type: str = "llama", dtype=None, **config) -> Path:
    """A random model of a real architecture saved as the hub would ship it: config.json, a
    tokenizer, and several safetensors shards with an index (in bf16 unless `dtype` says)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fsdpqlora.assets import train_tokenizer

    tokenizer = train_tokenizer(out_dir, vocab_size=512)
    hf_config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**TEST_LLAMA, **config},
    )
    torch.manual_seed(seed)
    # A larger init than HF's default 0.02, so logits and gradients are far from zero and a
    # mismatch anywhere shows.
    hf_config.initializer_range = 0.1
    model = AutoModelForCausalLM.from_config(hf_config)
    model.to(dtype or torch.bfloat16).save_pretrained(out_dir, max_shard_size="100KB")
    return out_dir


def write_qa_file(path: Path, rows: int = 80, seed: int = 0) -> Path:
    """Short questions (a documentation topic) and answers from Python's docs cut to lengths from a
    few words to a paragraph, so that rows of data.seq_len=128 tokens pack one to several of them."""
    from fsdpqlora.assets import pydoc_qa_records

    rng = random.Random(seed)
    with open(path, "w") as f:
        for record in pydoc_qa_records()[:rows]:
            f.write(json.dumps({"question": record["topic"], "answer": record["output"][: rng.randint(8, 200)]}) + "\n")
    return path


def qa_overrides(path: Path) -> list[str]:
    """The template format over the qa file, 10% held out for evaluation."""
    return [
        f"data.path={path}",
        "data.format=template",
        'data.prompt_template="Question: {question}\\nAnswer: "',
        'data.completion_template="{answer}"',
        "data.eval_fraction=0.1",
    ]


def base_overrides(model_dir: Path, cache_dir: Path) -> list[str]:
    return [
        "model.name=test-llama",
        f"model.path={model_dir}",
        f"launch.cache_dir={cache_dir}",
        "data.seq_len=128",
        "train.micro_batch_size=2",
        "generate.max_new_tokens=0",
        "logger.plots=false",  # drawn by test_train.py's run; a second or two of each other run
    ]


def run_torchrun(nproc: int, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **CPU_ONLY)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"torchrun failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


def run_launcher(*args, cwd=None) -> subprocess.CompletedProcess:
    """`fsdpqlora ARGS` for a configuration the launcher must refuse, with HOME in cwd so nothing
    of the user's is touched. Run in this process: the checks are the same code, and a launcher
    process would spend seconds importing torch and transformers first (tests/integration/test_train.py runs the
    real program end to end)."""
    from fsdpqlora.launcher.cli import main

    home = cwd or REPO
    saved_cwd, saved_home = os.getcwd(), os.environ.get("HOME")
    out, err = io.StringIO(), io.StringIO()
    os.chdir(home)
    os.environ["HOME"] = str(home)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(saved_cwd)
        if saved_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = saved_home
    return subprocess.CompletedProcess(["fsdpqlora", *args], code, out.getvalue(), err.getvalue())


# The distributed comparison runs (test_distributed, test_interop): one reference process without
# FSDP, and 2-rank torchrun runs under every strategy, all on the same global batches of packed rows.
FP32 = ["model.dtype=float32", "quant.compute_dtype=float32", "adapter.dtype=float32", "adapter.dropout=0", "train.lr=1e-2"]
BF16 = ["adapter.dropout=0", "train.lr=1e-2"]


# The strategies that shard the adapter (whose saving must gather every shard); every strategy x
# memory lever also runs in tests/integration/test_levers.py, in one launch.
SHARDED_RUNS = {
    "full_shard": ["shard=full_shard"],
    "shard_grad_op": ["shard=shard_grad_op"],
    "hybrid_shard": ["shard=hybrid_shard"],
}


def _run(tmp_path, name, nproc, overrides, model_dir, cache_dir, qa_file):
    out = tmp_path / f"{name}.pt"
    args = [str(out), *base_overrides(model_dir, cache_dir), *qa_overrides(qa_file), *overrides]
    if nproc == 0:  # the unsharded reference: one plain process, no FSDP
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
        env["PYTHONPATH"] = str(REPO)
        result = subprocess.run(
            [sys.executable, str(REPO / "tests/integration/dist_worker.py"), *args, "--no-shard"],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-6000:]
    else:
        run_torchrun(nproc, [str(REPO / "tests/integration/dist_worker.py"), *args])
    return torch.load(out, weights_only=False)

