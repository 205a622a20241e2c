"""shard.embedding_on_host (fsdpqlora/model/host_embedding.py): the table in host memory, the
looked-up rows handed to the compute device; refused for a head tied to the embedding."""

import pytest
import torch
from torch import nn

from fsdpqlora.config import compose_config
from fsdpqlora.errors import ConfigError
from fsdpqlora.model.host_embedding import keep_on_host
from fsdpqlora.plan.arch import hf_config_of
from fsdpqlora.preflight import check_against_model


def test_the_table_lives_in_host_memory_and_its_rows_go_to_the_device():
    with torch.device("meta"):
        embedding = nn.Embedding(100, 8)
    keep_on_host(embedding, torch.device("meta"))  # meta stands in for a GPU: a device other than the table's
    assert embedding.weight.device.type == "cpu" and embedding.weight.shape == (100, 8)
    with torch.no_grad():
        embedding.weight.copy_(torch.arange(800.0).view(100, 8))
    rows = embedding(torch.tensor([[3, 7]]))
    assert rows.device.type == "meta" and rows.shape == (1, 2, 8)


def test_the_rows_are_the_tables():
    embedding = nn.Embedding(100, 8)
    keep_on_host(embedding, torch.device("cpu"))
    table = torch.arange(800.0).view(100, 8)
    with torch.no_grad():
        embedding.weight.copy_(table)
    assert torch.equal(embedding(torch.tensor([[3, 7], [0, 99]])), table[torch.tensor([[3, 7], [0, 99]])])


@pytest.mark.parametrize("model", ["llama-3.2-1b", "gemma-2-9b"])
def test_refused_for_a_head_tied_to_the_embedding(model):
    cfg = compose_config([f"model={model}", "shard.embedding_on_host=true"])
    with pytest.raises(ConfigError, match="shard.embedding_on_host=true: this model's head is tied"):
        check_against_model(cfg, hf_config_of(cfg))


def test_accepted_for_an_untied_head():
    cfg = compose_config(["model=llama-3.1-8b", "shard.embedding_on_host=true"])
    check_against_model(cfg, hf_config_of(cfg))
