"""litgpt adapter checkpoints (`lit_model.pth.adapter`), fabricated with the real key names."""

from __future__ import annotations

import pytest
import torch

import adapter
from adapter.config import AdapterArgs
from tests.conftest import TINY
from tests.reference import reference_logits

TOKENS = torch.tensor([[1, 45, 300, 7, 99, 12]])


def litgpt_state(start: int = 1, prompt_len: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    model = {}
    for layer in range(start, TINY.n_layers):
        model[f"transformer.h.{layer}.attn.adapter_wte.weight"] = torch.randn(prompt_len, TINY.dim, generator=g)
        model[f"transformer.h.{layer}.attn.gating_factor"] = torch.randn(1, TINY.n_heads, 1, 1, generator=g)
    return {"model": model}


def test_litgpt_adapter_loads_as_raw_gated_prompts_on_its_layers(base_folder, tmp_path):
    path = tmp_path / "lit_model.pth.adapter"
    state = litgpt_state()
    torch.save(state, path)
    model = adapter.load(base_folder, adapter=path, device="cpu")
    assert model.adapter_args == AdapterArgs(prompt_len=4, prompt_layers=3, gate_activation="raw")
    assert model.adapter_format == "litgpt"
    prompts = model.adapter_query.weight.view(3, 4, TINY.dim)
    assert torch.equal(prompts[0], state["model"]["transformer.h.1.attn.adapter_wte.weight"])
    assert torch.equal(model.layers[3].attention.gate, state["model"]["transformer.h.3.attn.gating_factor"])
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), reference_logits(model, TOKENS), atol=2e-4, rtol=1e-4)


def test_litgpt_adapter_with_gaps_or_odd_keys_is_refused(base_folder, tmp_path):
    path = tmp_path / "lit_model.pth.adapter"
    state = litgpt_state()
    del state["model"]["transformer.h.2.attn.adapter_wte.weight"], state["model"]["transformer.h.2.attn.gating_factor"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"lit_model.pth.adapter: adapter layers \[1, 3\] are not contiguous"):
        adapter.load(base_folder, adapter=path, device="cpu")
    state = litgpt_state()
    state["model"]["transformer.h.1.attn.proj.weight"] = torch.zeros(2)
    torch.save(state, path)
    with pytest.raises(ValueError, match="unexpected key transformer.h.1.attn.proj.weight"):
        adapter.load(base_folder, adapter=path, device="cpu")
