"""Shared fixtures: tiny random configs on CPU. Nothing here downloads anything."""

from __future__ import annotations

import pytest
import torch

from adapter.config import AdapterArgs, ModelArgs
from adapter.model import Transformer
from adapter.random_model import write_random_base

TINY = ModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=96)
TINY_GQA = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32, max_seq_len=64)
V1 = AdapterArgs(prompt_len=5, prompt_layers=2, gate_activation="tanh")
V2 = AdapterArgs(prompt_len=5, prompt_layers=3, bias=True, norm=True, lora_rank=4, new_gate=True)


def randomize_adapter(model: Transformer, seed: int = 1, std: float = 0.3) -> Transformer:
    """Give every learned tensor a non-trivial value (fresh ones are zero and would test nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.trainable_parameters():
            param.add_(torch.randn(param.shape, generator=generator) * std)
    return model


def make_model(args: ModelArgs, adapter: AdapterArgs | None, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args, adapter).eval()
    with torch.no_grad():
        model.tok_embeddings.weight.normal_(0, 1)
    return randomize_adapter(model) if adapter is not None else model


@pytest.fixture(scope="session")
def base_folder(tmp_path_factory):
    """A random Meta-format folder (one shard) with a byte-fallback sentencepiece tokenizer."""
    return write_random_base(tmp_path_factory.mktemp("base"), TINY, seed=0)


@pytest.fixture(scope="session")
def sharded_base_folder(tmp_path_factory):
    """The same weights as `base_folder`, split into two model-parallel shards like Meta's 13B."""
    return write_random_base(tmp_path_factory.mktemp("base2"), TINY, seed=0, shards=2)
