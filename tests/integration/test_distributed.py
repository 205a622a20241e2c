"""FSDP2-sharded 4-bit + LoRA against the unsharded single-process reference (gloo, 2 processes).

fp32 runs compare tightly (only the order of gradient reductions differs); the bf16 run checks
that sharding itself changes nothing bit for bit. LoRA dropout is off: its random masks would
differ between one process and two by design.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import SHARDED_RUNS

pytestmark = pytest.mark.distributed

STRATEGIES = list(SHARDED_RUNS)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sharded_logits_equal_unsharded(runs, strategy):
    torch.testing.assert_close(runs[strategy]["logits_before"], runs["reference"]["logits_before"], rtol=0, atol=1e-5)


def test_bf16_sharded_logits_bit_identical(runs):
    assert torch.equal(runs["bf16_sharded"]["logits_before"], runs["bf16_reference"]["logits_before"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_match_one_process_losses(runs, strategy):
    ours, ref = runs[strategy]["losses"], runs["reference"]["losses"]
    assert ours == pytest.approx(ref, rel=1e-4), (ours, ref)
    # The loss moves under every strategy (trap B: an optimizer holding the wrong tensors leaves it flat).
    assert ours[-1] < ours[0] - 0.01
    torch.testing.assert_close(runs[strategy]["logits_after"], runs["reference"]["logits_after"], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_match_one_process_on_packed_batches_and_evaluation(runs, strategy):
    """The steps above ran on packed rows (several examples each, the default batching), and the
    evaluation loss over the held-out examples, shared out among the ranks, is the same too."""
    assert runs[strategy]["packed"] and runs["reference"]["packed"]
    ours, ref = runs[strategy]["eval_losses"], runs["reference"]["eval_losses"]
    assert ours == pytest.approx(ref, rel=1e-4), (ours, ref)
    assert ours[1] < ours[0]  # training on the other examples helped on these


def test_bf16_two_ranks_match_one_process_losses(runs):
    assert runs["bf16_sharded"]["losses"] == pytest.approx(runs["bf16_reference"]["losses"], rel=1e-2)


@pytest.mark.parametrize("strategy", STRATEGIES + ["reference"])
def test_every_lora_parameter_gets_a_gradient(runs, strategy):
    grads = runs[strategy]["grads_after_first_step"]
    assert len(grads) == 2 * 2 * 7  # 2 layers x (A, B) x 7 target modules
    missing = [name for name, value in grads.items() if value is None or value == 0.0]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_saved_adapter_equals_live_adapter(runs, strategy):
    """Every saved value equals the live one (guards the rank-0-shard-only saving bug)."""
    run = runs[strategy]
    saved, live = run["saved_adapter"], run["live_adapter"]
    assert len(saved) == len(live) == 28
    for name, value in live.items():
        key = name.replace("_checkpoint_wrapped_module.", "").replace(".default.", ".")
        assert torch.equal(saved[key], value), key
    on_disk = runs["dir"] / f"{strategy}-adapter"
    from safetensors.torch import load_file

    written = load_file(on_disk / "adapter_model.safetensors")
    assert written.keys() == saved.keys()
    for key in saved:
        assert torch.equal(written[key], saved[key])
