"""Every memory lever against the single-process reference (gloo, 2 processes).

Every sharding strategy x activation checkpointing (off, every layer, every 2nd) x CPU offload x
activation offload (MATRIX) trains in one torchrun launch (tests/integration/lever_worker.py runs the configurations one
after another in one process group); DoRA, one reduce-scatter per step, no_shard with gradient
accumulation, fp16 with a gradient scaler, bf16 adapters, a bitsandbytes 8-bit optimizer, peft's
per-module LoRA path, LoRA dropout with and without checkpointing and the embedding kept in host
memory ride along. All fp32 but fp16
and bf16; LoRA dropout off but in those two.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import FP32, REPO, base_overrides, qa_overrides, run_torchrun

pytestmark = pytest.mark.distributed

STRATEGIES = ("full_shard", "shard_grad_op", "hybrid_shard", "no_shard")
CHECKPOINTING = {"ac_off": ["shard.activation_checkpointing=false"], "ac_every": ["shard.checkpoint_every=1"], "ac_every2": ["shard.checkpoint_every=2"]}
# Every strategy x CPU offload x checkpointing (off; every layer or every 2nd, each with and
# without activation offload): 40 configurations, about 1.5 s each after the shared start-up.
CHECKPOINTING_MODES = (("ac_off", False), ("ac_every", False), ("ac_every", True), ("ac_every2", False), ("ac_every2", True))


def _matrix() -> dict[str, list[str]]:
    runs = {}
    for strategy, cpu_offload in itertools.product(STRATEGIES, (False, True)):
        for ac, act_offload in CHECKPOINTING_MODES:
            name = f"{strategy}/{ac}/cpu_offload={cpu_offload}/act_offload={act_offload}"
            runs[name] = [
                f"shard={strategy}", *CHECKPOINTING[ac], f"shard.cpu_offload={cpu_offload}", f"shard.activation_offload={act_offload}"
            ]  # fmt: skip
    return runs


MATRIX = _matrix()
ONE_MICRO_BATCH = ["train.micro_batch_size=1", "train.grad_accum_steps=2"]  # the same 4 rows per step
FP16 = ["quant.compute_dtype=float16"]
BF16 = ["model.dtype=bfloat16", "quant.compute_dtype=bfloat16", "adapter.dtype=bfloat16"]  # precision=bf16
# name: (overrides of the 2-rank run, overrides of its 1-process reference)
EXTRAS = {
    "dora": (["adapter.method=dora"], ["adapter.method=dora"]),
    "reduce_every_micro_batch": ([*ONE_MICRO_BATCH, "train.reduce_every_micro_batch=true"], []),
    "reduce_once": ([*ONE_MICRO_BATCH, "train.reduce_every_micro_batch=false"], []),
    # no_shard's replicated copies (no FSDP): 2 micro-batches, gradients averaged once, in buckets of
    # a few adapter tensors each (10 KiB); and averaged after every micro-batch
    "no_shard_accumulated": (["shard=no_shard", *ONE_MICRO_BATCH, "shard.bucket_mib=0.01"], []),
    "no_shard_reduce_every_micro_batch": (["shard=no_shard", *ONE_MICRO_BATCH, "train.reduce_every_micro_batch=true"], []),
    "fp16": (FP16, FP16),
    "bf16": (BF16, BF16),
    "adamw_8bit": (["train.optimizer=adamw_8bit"], ["train.optimizer=adamw_8bit"]),
    # the loss: from the whole logits (the head's unit gathered in forward and again for the logits'
    # backward), and in chunks of 16 target tokens (the head's unit gathered once, for every chunk)
    "loss_whole_logits": (["train.loss_chunk_tokens=0"], []),
    "loss_chunks_of_16": (["train.loss_chunk_tokens=16"], []),
    # peft's own per-module LoRA branches, against the default that shares q/k/v's and gate/up's A product
    "unfused": (["adapter.fused_shared_inputs=false"], []),
    # LoRA dropout with and without checkpointing: the recompute must draw the same masks
    "dropout_ac_off": (["adapter.dropout=0.1", "shard.activation_checkpointing=false"], []),
    "dropout_ac_every": (["adapter.dropout=0.1"], []),
    # the input embedding whole in host memory, outside FSDP2 (and in the plain one-process model)
    "embedding_on_host": (["shard.embedding_on_host=true"], ["shard.embedding_on_host=true"]),
}


@pytest.fixture(scope="session")
def lever_runs(tmp_path_factory, model_dir, cache_dir, qa_file):
    tmp = tmp_path_factory.mktemp("levers")
    common = [*base_overrides(model_dir, cache_dir), *qa_overrides(qa_file), *FP32]
    sharded = {name: common + o for name, o in MATRIX.items()} | {name: common + o for name, (o, _) in EXTRAS.items()}
    # The reference: one plain process, no FSDP, the same 4-row global batch in 2 micro-batches.
    references = {"lora": [], **{name: ref for name, (_, ref) in EXTRAS.items() if ref}}
    references = {name: [*common, "train.grad_accum_steps=2", *o] for name, o in references.items()}
    for name, runs in (("sharded", sharded), ("reference", references)):
        (tmp / f"{name}.json").write_text(json.dumps(runs))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    worker = str(REPO / "tests/integration/lever_worker.py")
    reference = subprocess.Popen(  # beside the torchrun launch: both wait on start-up more than compute
        [sys.executable, worker, str(tmp / "reference.pt"), str(tmp / "reference.json"), "--no-shard", "--save-adapter=lora"],
        env=dict(env, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    save = ["--save-adapter=dora", "--save-adapter=no_shard_accumulated"]
    run_torchrun(2, [worker, str(tmp / "sharded.pt"), str(tmp / "sharded.json"), *save], timeout=600)
    _, stderr = reference.communicate(timeout=600)
    assert reference.returncode == 0, stderr[-6000:]
    results = torch.load(tmp / "sharded.pt", weights_only=False)
    results["reference"] = torch.load(tmp / "reference.pt", weights_only=False)
    results["dir"] = tmp
    return results


@pytest.mark.parametrize("name", MATRIX)
def test_lever_trains_like_one_process(lever_runs, name):
    run, ref = lever_runs[name], lever_runs["reference"]["lora"]
    torch.testing.assert_close(run["logits_before"], ref["logits_before"], rtol=0, atol=1e-5)
    assert run["losses"] == pytest.approx(ref["losses"], rel=1e-4), (run["losses"], ref["losses"])
    assert run["losses"][-1] < run["losses"][0] - 0.01  # it trains (trap B leaves the loss flat)
    torch.testing.assert_close(run["logits_after"], ref["logits_after"], rtol=1e-3, atol=1e-3)
    missing = [p for p, grad in run["grads"].items() if not grad]
    assert len(run["grads"]) == 2 * 2 * 7 and not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("name", MATRIX)
def test_no_shard_is_plain_copies_unless_offloaded(lever_runs, name):
    """no_shard replicates without FSDP; with CPU offload it stays FSDP2 (shard groups of one), whose
    offload it needs."""
    assert lever_runs[name]["fsdp"] == (not name.startswith("no_shard") or "cpu_offload=True" in name)


@pytest.mark.parametrize("name", MATRIX)
def test_packed_weights_per_rank(lever_runs, name):
    run = lever_runs[name]
    if name.startswith("no_shard"):
        assert run["per_rank_bytes"] == [run["total_bytes"]] * 2
    else:  # full_shard, shard_grad_op, and hybrid_shard with its group of the node's 2 ranks
        assert sum(run["per_rank_bytes"]) == run["total_bytes"]
        assert run["per_rank_bytes"] == [pytest.approx(run["total_bytes"] / 2, rel=0.02)] * 2


def test_activation_offload_moves_the_checkpointed_layers_inputs(lever_runs):
    for strategy, cpu_offload in itertools.product(STRATEGIES, (False, True)):
        key = f"{strategy}/{{}}/cpu_offload={cpu_offload}/act_offload={{}}"
        every, every2 = lever_runs[key.format("ac_every", True)], lever_runs[key.format("ac_every2", True)]
        assert lever_runs[key.format("ac_every", False)]["offloaded_bytes"] is None
        # 2 decoder layers: every layer's inputs, or only layer 0's; those hold at least the hidden
        # states (64 fp32 per token) of the 3 forward passes with gradients, 2 rows of 64+ tokens each.
        assert every["offloaded_bytes"] == 2 * every2["offloaded_bytes"]
        assert every2["offloaded_bytes"] >= 3 * 2 * 64 * 64 * 4


def test_dora_two_ranks_match_one_process(lever_runs):
    run, ref = lever_runs["dora"], lever_runs["reference"]["dora"]
    torch.testing.assert_close(run["logits_before"], lever_runs["reference"]["lora"]["logits_before"], rtol=0, atol=1e-5)
    assert run["losses"] == pytest.approx(ref["losses"], rel=1e-4)
    assert run["losses"][-1] < run["losses"][0] - 0.01
    # A, B and the magnitude of 14 linears, every one with a gradient
    assert len(run["grads"]) == 3 * 14 and all(run["grads"].values())
    torch.testing.assert_close(run["logits_after"], ref["logits_after"], rtol=1e-3, atol=1e-3)


def test_dora_adapter_reloads_in_peft_with_same_logits(lever_runs, model_dir, cache_dir):
    from peft import PeftModel

    from fsdpqlora.config import compose_config
    from tests.integration.test_interop import _transformers_4bit

    base = _transformers_4bit(model_dir, compose_config([*base_overrides(model_dir, cache_dir), *FP32]))
    model = PeftModel.from_pretrained(base, lever_runs["dir"] / "sharded-dora-adapter").eval()
    assert any("lora_magnitude_vector" in name for name, _ in model.named_parameters())
    from tests.helpers import PROBE

    with torch.no_grad():
        logits = model(input_ids=PROBE).logits.float()
    torch.testing.assert_close(logits, lever_runs["dora"]["logits_after"], rtol=1e-4, atol=1e-4)


def test_no_shard_with_accumulation_trains_like_one_process(lever_runs):
    """no_shard on 2 ranks, each with 2 micro-batches of 1 row whose gradients accumulate locally and
    are averaged once per step in several buckets (or after every micro-batch): the losses and the
    adapter of one process on the same 4-row global batches, to fp32 rounding."""
    from safetensors.torch import load_file

    ref = lever_runs["reference"]["lora"]
    for name in ("no_shard_accumulated", "no_shard_reduce_every_micro_batch"):
        run = lever_runs[name]
        assert not run["fsdp"]
        assert run["losses"] == pytest.approx(ref["losses"], rel=1e-5), name
        torch.testing.assert_close(run["logits_after"], ref["logits_after"], rtol=1e-4, atol=1e-4)
    ours = load_file(lever_runs["dir"] / "sharded-no_shard_accumulated-adapter" / "adapter_model.safetensors")
    theirs = load_file(lever_runs["dir"] / "reference-lora-adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and len(ours) == 28
    for key, value in theirs.items():
        assert (value != 0).any(), key  # trained: B moved away from its zero init
        # Adam divides each update by the gradient's running RMS, which magnifies the rounding of
        # small gradients (summed in another order) into differences of about 1e-6 here
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5)


def test_no_shard_adapter_reloads_in_peft_with_same_values(lever_runs, model_dir, cache_dir):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from fsdpqlora.config import compose_config
    from tests.helpers import PROBE
    from tests.integration.test_interop import _transformers_4bit

    saved = lever_runs["dir"] / "sharded-no_shard_accumulated-adapter"
    base = _transformers_4bit(model_dir, compose_config([*base_overrides(model_dir, cache_dir), *FP32]))
    model = PeftModel.from_pretrained(base, saved).eval()
    loaded, written = get_peft_model_state_dict(model), load_file(saved / "adapter_model.safetensors")
    assert loaded.keys() == written.keys()
    assert all(torch.equal(loaded[key], written[key]) for key in written)
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits.float()
    torch.testing.assert_close(logits, lever_runs["no_shard_accumulated"]["logits_after"], rtol=0, atol=1e-5)


def test_one_reduce_scatter_per_step_changes_nothing(lever_runs):
    once, every = lever_runs["reduce_once"]["losses"], lever_runs["reduce_every_micro_batch"]["losses"]
    assert once == pytest.approx(every, rel=1e-5)
    assert once == pytest.approx(lever_runs["reference"]["lora"]["losses"], rel=1e-4)


@pytest.mark.parametrize("name", ["loss_whole_logits", "loss_chunks_of_16"])
def test_loss_chunking_trains_like_one_process(lever_runs, name):
    assert lever_runs[name]["losses"] == pytest.approx(lever_runs["reference"]["lora"]["losses"], rel=1e-4)
    # the same sharded run with the default chunks (FSDP averages gradients over ranks: compare like with like)
    default = lever_runs["full_shard/ac_every/cpu_offload=False/act_offload=False"]
    assert lever_runs[name]["grads"] == pytest.approx(default["grads"], rel=1e-4)


def test_shared_input_products_train_like_peft(lever_runs):
    """FSDP2 gathers the A weights that each forward concatenates; gradients reach every shard, and the
    run is peft's to rounding (only the input gradients sum in another order)."""
    fused, peft = lever_runs["full_shard/ac_every/cpu_offload=False/act_offload=False"], lever_runs["unfused"]
    assert fused["losses"] == pytest.approx(peft["losses"], rel=1e-5)
    assert fused["grads"] == pytest.approx(peft["grads"], rel=1e-4)
    torch.testing.assert_close(fused["logits_after"], peft["logits_after"], rtol=1e-4, atol=1e-4)


def test_checkpointing_redraws_the_same_dropout_masks(lever_runs):
    """The same seed, with and without checkpointing: the same losses and gradients, bit for bit."""
    plain, checkpointed = lever_runs["dropout_ac_off"], lever_runs["dropout_ac_every"]
    assert checkpointed["losses"] == plain["losses"] and checkpointed["grads"] == plain["grads"]
    assert plain["losses"] != lever_runs["full_shard/ac_off/cpu_offload=False/act_offload=False"]["losses"]


def test_fp16_with_a_gradient_scaler_trains(lever_runs):
    """fp16 compute against the same run in one process, and within 1% of fp32 compute."""
    run = lever_runs["fp16"]
    assert run["losses"] == pytest.approx(lever_runs["reference"]["fp16"]["losses"], rel=1e-3)
    assert run["losses"] == pytest.approx(lever_runs["reference"]["lora"]["losses"], rel=1e-2)
    assert run["losses"][-1] < run["losses"][0] - 0.01


def test_bf16_adapters_train(lever_runs):
    """bf16 adapters (no fp32 master copy): two ranks within bf16's precision of one process."""
    run = lever_runs["bf16"]
    assert run["losses"] == pytest.approx(lever_runs["reference"]["bf16"]["losses"], rel=1e-2)
    assert run["losses"][-1] < run["losses"][0] - 0.01


def test_bitsandbytes_8bit_optimizer_trains(lever_runs):
    """8-bit state is quantized in blocks cut within each rank's shard, so two ranks only come close
    to one process; the first step (no state yet) is exact."""
    run, ref = lever_runs["adamw_8bit"]["losses"], lever_runs["reference"]["adamw_8bit"]["losses"]
    assert run[0] == pytest.approx(ref[0], rel=1e-5)
    assert run == pytest.approx(ref, rel=1e-3)
    assert run[-1] < run[0] - 0.01


def test_the_embedding_in_host_memory_trains_like_the_sharded_one(lever_runs):
    """shard.embedding_on_host: FSDP2 leaves the table whole on every rank (not a DTensor), and the
    run is the default's; in one process, the plain model's."""
    run, sharded = lever_runs["embedding_on_host"], lever_runs["full_shard/ac_every/cpu_offload=False/act_offload=False"]
    vocab_and_hidden = run["embedding"][2]
    assert run["embedding"] == (False, "cpu", vocab_and_hidden) and run["fsdp"]
    assert sharded["embedding"][0] and sharded["embedding"][2][0] == -(-vocab_and_hidden[0] // 2)  # rank 0: half the rows
    assert run["losses"] == pytest.approx(sharded["losses"], rel=1e-6)
    assert run["grads"] == pytest.approx(sharded["grads"], rel=1e-6)
    references = lever_runs["reference"]
    assert references["embedding_on_host"]["losses"] == references["lora"]["losses"]
