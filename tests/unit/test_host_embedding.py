"""shard.embedding_on_host (fsdpqlora/model/host_embedding.py): the table in host memory, the
looked-up rows handed to the compute device; refused for a head tied to the embedding."""

import pytest
import torch

from fsdpqlora.config import compose_config
from fsdpqlora.errors import ConfigError
from fsdpqlora.model.host_embedding import materialize_with_host_embedding
from fsdpqlora.plan.arch import hf_config_of
from fsdpqlora.preflight import check_against_model


def _meta_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_the_table_is_made_in_host_memory_and_the_rest_on_the_device():
    model = _meta_llama()
    embedding = model.get_input_embeddings()
    # meta stands in for a GPU: the rest stays on it, only the table is made in host memory
    materialize_with_host_embedding(model, model, torch.device("meta"), torch.device("meta"))
    assert model.get_input_embeddings() is embedding  # put back where it was
    assert embedding.weight.device.type == "cpu" and embedding.weight.shape == (100, 8)
    others = [p.device.type for name, p in model.named_parameters() if "embed_tokens" not in name]
    assert others and set(others) == {"meta"}
    rows = embedding(torch.tensor([[3, 7]]))
    assert rows.device.type == "meta" and rows.shape == (1, 2, 8)  # handed to the compute device


def test_the_rows_are_the_tables():
    model = _meta_llama()
    materialize_with_host_embedding(model, model, torch.device("cpu"), torch.device("cpu"))
    table = torch.arange(800.0).view(100, 8)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(table)
    ids = torch.tensor([[3, 7], [0, 99]])
    assert torch.equal(model.get_input_embeddings()(ids), table[ids])


@pytest.mark.parametrize("model", ["llama-3.2-1b", "gemma-2-9b"])
def test_refused_for_a_head_tied_to_the_embedding(model):
    cfg = compose_config([f"model={model}", "shard.embedding_on_host=true"])
    with pytest.raises(ConfigError, match="shard.embedding_on_host=true: this model's head is tied"):
        check_against_model(cfg, hf_config_of(cfg))


def test_accepted_for_an_untied_head():
    cfg = compose_config(["model=llama-3.1-8b", "shard.embedding_on_host=true"])
    check_against_model(cfg, hf_config_of(cfg))
