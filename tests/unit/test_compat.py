"""The upstream shapes fsdpqlora/compat.py relies on, one test per entry: each fails, naming what
moved, when an upgrade of torch, peft, bitsandbytes, transformers or datasets changes what a patch
reaches into (and, where it is cheap to see, when the patch is no longer needed)."""

import inspect
import logging
import os
import warnings
from datetime import timedelta
from types import SimpleNamespace

import bitsandbytes as bnb
import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch import nn

from fsdpqlora import compat
from fsdpqlora.errors import ConfigError


def test_the_third_party_messages_we_silence_are_still_those_printed():
    import bitsandbytes.backends.cpu.ops as cpu_ops
    from transformers import PreTrainedModel

    assert cpu_ops.logger.name == compat.BNB_CPU_LOGGER
    assert compat.BNB_MISSING_KERNELS_MESSAGE in inspect.getsource(cpu_ops)
    deprecated = PreTrainedModel.is_gradient_checkpointing.fget
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deprecated(SimpleNamespace(is_activation_checkpointing=False))
    assert [w.category for w in caught] == [FutureWarning]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.quiet_third_party_logs()
        deprecated(SimpleNamespace(is_activation_checkpointing=False))
    assert caught == []
    record = logging.LogRecord(compat.BNB_CPU_LOGGER, logging.WARNING, "", 0, f"{compat.BNB_MISSING_KERNELS_MESSAGE}: x", (), None)
    assert not logging.getLogger(compat.BNB_CPU_LOGGER).filter(record)


def test_torch_elastic_agent_still_has_the_private_hooks_and_counter():
    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    from fsdpqlora.launcher.agent import TrainingAgent

    for name in ("_start_workers", "_monitor_workers"):
        assert list(inspect.signature(getattr(LocalElasticAgent, name)).parameters) == ["self", "worker_group"], name
        assert getattr(TrainingAgent, name) is getattr(compat.ElasticAgentHooks, name), f"{name}: mixin not first"
    # The counter the restart loop reads and decrements, and the agent's own way to end restarts.
    assert "self._remaining_restarts -= 1" in inspect.getsource(SimpleElasticAgent._invoke_run)
    assert "self._remaining_restarts = 0" in inspect.getsource(LocalElasticAgent)


def test_the_mixin_reports_started_and_checked_groups_and_ends_restarts():
    class Agent:
        def _start_workers(self, worker_group):
            return {0: 123}

        def _monitor_workers(self, worker_group):
            return "result"

    class Hooked(compat.ElasticAgentHooks, Agent):
        _remaining_restarts = 3

        def workers_started(self, pids):
            self.pids = pids

        def workers_checked(self, worker_group, result):
            self.checked = (worker_group, result)

    agent = Hooked()
    assert agent._start_workers("group") == {0: 123} and agent.pids == {0: 123}
    assert agent._monitor_workers("group") == "result" and agent.checked == ("group", "result")
    assert agent.remaining_restarts == 3
    agent.stop_restarting()
    assert agent.remaining_restarts == 0


def test_torch_elastic_still_reads_the_environment_we_set(monkeypatch):
    import torch.distributed.elastic.multiprocessing.api as mp_api
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

    assert '"TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT"' in inspect.getsource(mp_api)
    start = inspect.getsource(LocalElasticAgent._start_workers)
    for worker_env in ('"TORCHELASTIC_USE_AGENT_STORE": str(use_agent_store)', '"TORCHELASTIC_RESTART_COUNT"'):
        assert worker_env in start
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "0")
    monkeypatch.setenv("TORCHELASTIC_SIGNALS_TO_HANDLE", "")
    assert DynamicRendezvousHandler.use_agent_store.fget(None)
    compat.store_per_rendezvous_round()
    assert not DynamicRendezvousHandler.use_agent_store.fget(None)
    compat.leave_stop_signals_to_us()
    handled = os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"].split(",")
    assert "SIGTERM" not in handled and "SIGINT" not in handled


def test_the_agents_failure_line_is_quieted_for_expected_exits_only():
    import torch.distributed.elastic.multiprocessing.api as mp_api

    assert mp_api.logger.name == compat.ELASTIC_PROCESS_LOGGER
    assert f'"{compat.ELASTIC_FAILURE_MESSAGE} local_rank: %s (pid: %s) of binary: %s"' in inspect.getsource(mp_api)
    compat.quiet_expected_worker_exits((75, 2))

    def shown(code: int) -> bool:
        message = f"{compat.ELASTIC_FAILURE_MESSAGE} local_rank: %s (pid: %s) of binary: %s"
        record = logging.LogRecord(compat.ELASTIC_PROCESS_LOGGER, logging.ERROR, "", 0, message, (code, 0, 1, "python"), None)
        return bool(logging.getLogger(compat.ELASTIC_PROCESS_LOGGER).filter(record))

    assert not shown(75) and not shown(2) and shown(1) and shown(-9)


def test_each_torchrun_attempt_gets_a_key_prefix_in_the_agent_store(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert compat.attempt_store(1, timedelta(seconds=10)) is None
    agent_store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(seconds=10))
    for key, value in {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(agent_store.port)}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    compat.attempt_store(1, timedelta(seconds=10)).set("rank0", "address")
    assert agent_store.get("fsdpqlora/attempt-2/rank0") == b"address"


def test_checkpoint_wrapper_prefix_is_torchs():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

    assert compat.CHECKPOINT_WRAPPER_PREFIX == _CHECKPOINT_PREFIX
    wrapped = nn.Sequential(compat.checkpoint_wrapper(nn.Linear(2, 2)))
    assert [name for name, _ in wrapped.named_parameters()] == [f"0.{_CHECKPOINT_PREFIX}weight", f"0.{_CHECKPOINT_PREFIX}bias"]
    assert list(wrapped.state_dict()) == ["0.weight", "0.bias"]


class _Tiny(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def test_peft_dora_update_layer_takes_the_keywords_we_replace():
    from peft.tuners.lora.dora import DoraLinearLayer

    peft_init = DoraLinearLayer.update_layer
    parameters = inspect.signature(peft_init).parameters
    assert {"base_layer", "lora_A"} <= parameters.keys()
    assert all(p.kind is p.KEYWORD_ONLY for name, p in parameters.items() if name != "self")
    config = dict(r=2, lora_alpha=4, target_modules=["proj"], use_dora=True)
    with compat.dora_magnitude_left_on_meta():
        model = get_peft_model(_Tiny(nn.Linear(8, 4)), LoraConfig(**config))
    magnitude = model.base_model.model.proj.lora_magnitude_vector["default"].weight
    assert magnitude.is_meta and tuple(magnitude.shape) == (4,)
    assert DoraLinearLayer.update_layer is peft_init
    magnitude = get_peft_model(_Tiny(nn.Linear(8, 4)), LoraConfig(**config)).base_model.model.proj.lora_magnitude_vector
    assert not magnitude["default"].weight.is_meta


def test_peft_rewrites_mixtral_expert_targets_unless_the_model_type_is_hidden():
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    from transformers import MixtralConfig

    hf_config = MixtralConfig()
    model = SimpleNamespace(config=hf_config)
    rewritten = LoraConfig(target_modules=["w1", "w2", "w3"])
    convert_peft_config_for_transformers(rewritten, model=model, conversions=None)
    assert not {"w1", "w2", "w3"} & set(rewritten.target_modules), "peft no longer rewrites Mixtral targets"
    kept = LoraConfig(target_modules=["w1", "w2", "w3"])
    with compat.model_type_hidden(hf_config):
        convert_peft_config_for_transformers(kept, model=model, conversions=None)
    assert set(kept.target_modules) == {"w1", "w2", "w3"}
    assert hf_config.model_type == "mixtral" and "model_type" not in vars(hf_config)


def test_peft_picks_its_4bit_lora_layer_by_the_loaded_in_4bit_flag():
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    config = dict(r=2, lora_alpha=4, target_modules=["proj"])
    unmarked = get_peft_model(_Tiny(bnb.nn.Linear4bit(8, 4)), LoraConfig(**config))
    assert not isinstance(unmarked.base_model.model.proj, LoraLinear4bit), "peft no longer needs the flag"
    marked = _Tiny(bnb.nn.Linear4bit(8, 4))
    compat.mark_loaded_in_4bit(marked)
    assert isinstance(get_peft_model(marked, LoraConfig(**config)).base_model.model.proj, LoraLinear4bit)


def _quantized_layer() -> bnb.nn.Linear4bit:
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu")
    assert layer.weight.bnb_quantized
    return layer.eval()


def test_bitsandbytes_linear4bit_still_reads_support_avx512bf16_for_cpu():
    assert "self.support_avx512bf16_for_cpu" in inspect.getsource(bnb.nn.Linear4bit.forward)
    assert hasattr(_quantized_layer(), "support_avx512bf16_for_cpu")
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    layer = _quantized_layer()
    compat.exact_4bit_kernels(_Tiny(layer))
    packed = layer.weight.data.clone()
    with torch.no_grad():
        layer(x)
    assert torch.equal(layer.weight.data, packed), "an eval-mode no-grad forward repacked the weight"
    if bnb.functional.has_avx512bf16():  # the patch is still needed: unpatched, the weight is repacked
        unpatched = _quantized_layer()
        with torch.no_grad():
            unpatched(x)
        assert not torch.equal(unpatched.weight.data, packed)


def test_bitsandbytes_takes_the_quant_state_from_the_layer_when_the_weight_lost_it():
    layer = _quantized_layer()
    compat.exact_4bit_kernels(layer)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = layer(x)
    quant_state = layer.weight.quant_state
    layer.weight = nn.Parameter(layer.weight.data, requires_grad=False)  # as FSDP2's all-gather leaves it
    compat.set_quant_state(layer, quant_state)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)


def test_datasets_still_fingerprints_a_data_set_and_its_transforms():
    import datasets

    data = datasets.Dataset.from_dict({"text": ["a", "b"]})
    fingerprint = compat.dataset_fingerprint(data)
    assert isinstance(fingerprint, str) and fingerprint
    assert compat.dataset_fingerprint(data.map(lambda row: {"text": row["text"] * 2})) != fingerprint


# Owned instead: a sweep's points, expanded over Hydra's public override parser.


def test_sweep_points_are_the_cartesian_product_in_hydras_order():
    from fsdpqlora.launcher.slurm import sweep_points

    assert sweep_points(["a=1,2", "b=x", "c=3,4"]) == [
        ["a=1", "b=x", "c=3"], ["a=1", "b=x", "c=4"], ["a=2", "b=x", "c=3"], ["a=2", "b=x", "c=4"]
    ]  # fmt: skip
    assert sweep_points(["a=1,2", "b=x", "a=5,6"]) == [["a=5", "b=x"], ["a=6", "b=x"]]
    assert sweep_points(["+new=range(1,3)", 'q="u,v"', "g@pkg=v1"]) == [
        ["+new=1", 'q="u,v"', "g@pkg=v1"], ["+new=2", 'q="u,v"', "g@pkg=v1"]
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="sweep: a=interval"):
        sweep_points(["a=interval(0,1)"])
    with pytest.raises(ConfigError, match="sweep: "):
        sweep_points(["a=1,"])
