"""Every place fsdpqlora reaches past a third-party library's public API, in one module.

Each entry names the version it was written against and why it is needed; tests/test_compat.py
checks that the upstream code still has the shape each one relies on, so an upgrade fails there,
by name, instead of deep inside a training run or, worse, in a run that trains wrong and says
nothing. Versions: torch 2.13.0, peft 0.21.2, bitsandbytes 0.50.2, transformers 5.23.0,
datasets 5.2.0.

Third-party imports stay inside the functions: `import fsdpqlora` (and so the launcher's checks)
must not pay for torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

# bitsandbytes 0.50.2, backends/cpu/ops.py: logged at import on every AVX512-BF16 CPU.
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_MISSING_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward"
# transformers 5.23.0 PreTrainedModel.is_gradient_checkpointing, which peft 0.21.2 still reads.
GRADIENT_CHECKPOINTING_DEPRECATION = ".*is_gradient_checkpointing.*is deprecated"
# torch 2.13.0 torch/distributed/algorithms/_checkpoint/checkpoint_wrapper.py `_CHECKPOINT_PREFIX`.
CHECKPOINT_WRAPPER_PREFIX = "_checkpoint_wrapped_module."


def quiet_third_party_logs() -> None:
    """bitsandbytes 0.50.2 logs at import, on every AVX512-BF16 CPU, that the optional `kernels`
    package is missing; its own CPU kernels serve instead. Harmless, and it would bury our one-line
    errors. peft 0.21.2 asks transformers 5.23.0 for `is_gradient_checkpointing`, which transformers
    has renamed; each rank would print the FutureWarning."""
    logging.getLogger(BNB_CPU_LOGGER).addFilter(lambda record: BNB_MISSING_KERNELS_MESSAGE not in record.getMessage())
    warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_DEPRECATION, category=FutureWarning)


# --- torch elastic (torch 2.13.0) ---


class ElasticAgentHooks:
    """Mixin for torch's LocalElasticAgent (put it first in the bases) that gives its private restart
    machinery public names. torch 2.13.0 has no hook for "a worker group was started" or "a
    monitoring pass saw this result", and no way to end restarts but its private counter
    `_remaining_restarts` (which its own agent zeroes for a wedged worker). A subclass defines
    `workers_started(pids)` and `workers_checked(worker_group, result)`."""

    def _start_workers(self, worker_group):
        pids = super()._start_workers(worker_group)
        self.workers_started(pids)
        return pids

    def _monitor_workers(self, worker_group):
        result = super()._monitor_workers(worker_group)
        self.workers_checked(worker_group, result)
        return result

    @property
    def remaining_restarts(self) -> int:
        return self._remaining_restarts

    def stop_restarting(self) -> None:
        self._remaining_restarts = 0


def leave_stop_signals_to_us() -> None:
    """torch 2.13.0: the agent's process-start code installs handlers for the signals named in
    TORCHELASTIC_SIGNALS_TO_HANDLE (default SIGTERM,SIGINT,SIGHUP,SIGQUIT), which turn SIGTERM and
    Ctrl-C's SIGINT into an exception that kills the workers mid-step (KeyboardInterrupt tracebacks
    from every rank, the work since the last checkpoint lost). Leaving both out lets ours forward them."""
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"


# torch 2.13.0 torch/distributed/elastic/multiprocessing/api.py logs every failed worker group.
ELASTIC_PROCESS_LOGGER = "torch.distributed.elastic.multiprocessing.api"
ELASTIC_FAILURE_MESSAGE = "failed (exitcode: %s)"


def quiet_expected_worker_exits(exit_codes: tuple[int, ...]) -> None:
    """torch 2.13.0's agent logs `E ... failed (exitcode: N) local_rank: ...` whenever a worker exits
    non-zero, which for a stop on request (75) or a refusal the workers explained in one line (2)
    only adds a line that reads like a crash. Those exit codes are left out of its log."""

    def keep(record: logging.LogRecord) -> bool:
        expected = record.msg.startswith(ELASTIC_FAILURE_MESSAGE) and record.args and record.args[0] in exit_codes
        return not expected

    logging.getLogger(ELASTIC_PROCESS_LOGGER).addFilter(keep)


def store_per_rendezvous_round() -> None:
    """torch 2.13.0: a new store, on a new port, for every rendezvous round
    (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1). The shared agent store keeps the previous round's keys,
    and a restarted group would find its dead predecessors' addresses there."""
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"


def attempt_store(world_size: int, timeout):
    """torch 2.13.0: torchrun's workers share its agent's key-value store (TORCHELASTIC_USE_AGENT_STORE
    is "True", MASTER_ADDR/PORT are the store's). After a restart (--max-restarts) the previous
    attempt's keys are still in it, and gloo then tries to connect to the dead workers' addresses
    they hold; so each attempt (TORCHELASTIC_RESTART_COUNT) gets a key prefix of its own. None outside
    torchrun, and where the agent gives every attempt a store of its own (`store_per_rendezvous_round`,
    as the launcher does: across nodes the restart counts of plain torchrun's agents can differ)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist

    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"fsdpqlora/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def checkpoint_wrapper(module, **kwargs):
    """torch 2.13.0 has its activation-checkpointing module wrapper only in a private module
    (torch.distributed.algorithms._checkpoint). It puts `CHECKPOINT_WRAPPER_PREFIX` into parameter
    names; its state-dict hooks remove it from saved names, and adapters.py from the names it saves."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper as wrap

    return wrap(module, **kwargs)


# --- peft (0.21.2) ---


@contextlib.contextmanager
def dora_magnitude_left_on_meta():
    """peft 0.21.2 computes DoRA's magnitude from the dequantized base weight when it attaches the
    adapter (DoraLinearLayer.update_layer); our base is still on meta then (no byte loaded). Attach a
    meta magnitude of the right shape instead; adapters.init_dora_magnitudes computes it once the
    weights are loaded and sharded."""
    import torch
    from peft.tuners.lora.dora import DoraLinearLayer
    from torch import nn

    def meta_magnitude(self, *, base_layer, lora_A, **_):
        self.weight = nn.Parameter(torch.empty(base_layer.out_features, dtype=lora_A.dtype, device="meta"))

    peft_init = DoraLinearLayer.update_layer
    DoraLinearLayer.update_layer = meta_magnitude
    try:
        yield
    finally:
        DoraLinearLayer.update_layer = peft_init


@contextlib.contextmanager
def model_type_hidden(hf_config):
    """peft 0.21.2 (utils/transformers_weight_conversion.py) rewrites a Mixtral's expert targets
    (w1, w2, w3) into transformers 5's fused expert parameters, for adapters trained under
    transformers 4. moe.py replaced those with per-expert linears, so peft would adapt no expert at
    all; under no model type peft knows, it attaches to the model as it is."""
    own = vars(hf_config).get("model_type")
    hf_config.model_type = None
    try:
        yield
    finally:
        if own is None:
            del hf_config.model_type  # back to the config class's own
        else:
            hf_config.model_type = own


def mark_loaded_in_4bit(model) -> None:
    """peft 0.21.2 picks its 4-bit LoRA layer (which dequantizes the base weight) only for a model
    with `is_loaded_in_4bit`, the flag transformers sets when it quantizes; our skeleton is
    quantized by us."""
    model.is_loaded_in_4bit = True


# --- bitsandbytes (0.50.2) ---


def exact_4bit_kernels(model) -> None:
    """Keep every Linear4bit in `model` (itself included) on bitsandbytes' dequantize-then-matmul
    path. bitsandbytes 0.50.2 sets `support_avx512bf16_for_cpu` on an AVX512-BF16 CPU, and then an
    eval-mode no-grad forward repacks the weight in place for a kernel that has no autograd: after
    one evaluation, the LoRA gradients below every such layer are None while the loss still falls.
    For inference that kernel also rounds differently from the path training used, so base + adapter
    and the merged model would not answer alike."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def set_quant_state(layer, quant_state) -> None:
    """bitsandbytes 0.50.2: FSDP2 replaces a Linear4bit's Params4bit with a plain sharded parameter,
    and the all-gathered weight has no quant_state; Linear4bit.forward then takes the layer's own
    `quant_state` (fix_4bit_weight_quant_state_from_module), so that is where it is set."""
    layer.quant_state = quant_state


# --- datasets (5.2.0) ---


def dataset_fingerprint(dataset) -> str:
    """datasets 5.2.0 keeps the hash of a data set's content and of every transform applied to it in
    the private `_fingerprint`; its cache is keyed by it, and so is our tokenized cache."""
    return dataset._fingerprint
