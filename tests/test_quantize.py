"""The 4/8-bit frozen base, for real with bitsandbytes on CPU (nothing mocked)."""

from __future__ import annotations

import pytest
import torch

import adapter
from adapter.quantize import quantize_model
from tests.conftest import TINY, V2, make_model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode, bound", [("int8", 0.05), ("nf4", 0.35)])
def test_quantized_logits_stay_close_and_the_adapter_stays_trainable(mode, bound):
    import bitsandbytes as bnb

    reference = make_model(TINY, V2)
    model = make_model(TINY, V2)
    quantize_model(model, mode)
    tokens = torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(tokens), model(tokens)
    error = relative_error(got, expected)
    assert error < bound, f"{mode}: relative logit error {error:.3f}"
    assert error > 0, "the base must really be quantized"
    quantized_type = bnb.nn.Linear4bit if mode == "nf4" else bnb.nn.Linear8bitLt
    for block in model.layers:
        for linear in (block.attention.wq, block.attention.wk, block.attention.wv, block.attention.wo,
                       block.feed_forward.w1, block.feed_forward.w2, block.feed_forward.w3):
            assert isinstance(linear, quantized_type)
            assert linear.weight.dtype in (torch.uint8, torch.int8)
    trainable = dict(model.trainable_parameters())
    assert set(trainable) == {n for n, _ in reference.named_parameters() if reference.is_adapter_parameter(n)}
    assert all(p.dtype == torch.float32 for p in trainable.values())
    model.train()
    model(tokens).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_load_quantizes_while_loading(base_folder, mode):
    full = adapter.load(base_folder, device="cpu")
    quantized = adapter.load(base_folder, quantize=mode, device="cpu")
    assert quantized.quantization == mode
    tokens = torch.tensor([full.tokenizer.encode("The red circle is left of")])
    with torch.no_grad():
        assert relative_error(quantized(tokens), full(tokens)) < (0.05 if mode == "int8" else 0.35)
    assert quantized.generate("Hi", temperature=0.0, max_new_tokens=4)


def test_unknown_quantize_mode_is_refused(base_folder):
    with pytest.raises(ValueError, match="quantize: unknown mode 'fp8'"):
        adapter.load(base_folder, quantize="fp8", device="cpu")
