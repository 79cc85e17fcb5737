"""The CPU weight layout (adapter.layout): which weights `adapter.load` stores column-major, that only the
memory layout changes (values, shapes, tokens), and that training and the fused stacks see the right layout."""

from __future__ import annotations

import torch

import adapter
from adapter.layout import column_major_wide, is_column_major, row_major
from tests.conftest import TINY, V2, make_model
from tests.test_fast_decode import greedy


def linears(model):
    return {name: m.weight for name, m in model.named_modules() if type(m) is torch.nn.Linear}


def test_load_stores_the_wide_frozen_float32_weights_column_major(base_folder):
    model = adapter.load(base_folder, adapter=V2, device="cpu")
    weights = linears(model)
    wide = {name for name, w in weights.items() if w.shape[0] > w.shape[1] and not w.requires_grad}
    assert {"output", "layers.0.feed_forward.w1", "layers.3.feed_forward.w3"} <= wide
    assert {name for name, w in weights.items() if is_column_major(w)} == wide
    assert all(w.is_contiguous() for name, w in weights.items() if name not in wide)  # wq, wo, w2, the LoRA parts
    assert tuple(model.output.weight.shape) == (TINY.vocab_size, TINY.dim)


def test_sixteen_bit_weights_stay_row_major(base_folder):
    model = adapter.load(base_folder, device="cpu", dtype="bfloat16")
    assert not any(is_column_major(w) for w in linears(model).values())


def test_column_major_changes_no_value_and_no_greedy_token():
    model = make_model(TINY, V2)
    row_state = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        row_logits = model(tokens)
    row_tokens = greedy(model, fused=False)
    assert column_major_wide(model) == 1 + 2 * TINY.n_layers  # the head, w1 and w3 of every layer
    assert column_major_wide(model) == 0  # already so
    assert all(torch.equal(model.state_dict()[k], v) for k, v in row_state.items())
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), row_logits, rtol=1e-5, atol=1e-5)
    assert greedy(model, fused=False) == row_tokens
    assert greedy(model, fused=True) == row_tokens
    stack = model.layers[0].feed_forward.w13_stack.weight
    assert is_column_major(stack), "the fused stack keeps its parts' layout"
    ff = model.layers[0].feed_forward
    assert torch.equal(stack, torch.cat([ff.w1.weight, ff.w3.weight]))


def test_row_major_puts_every_weight_back_for_training():
    model = make_model(TINY, V2)
    column_major_wide(model)
    assert row_major(model) == 1 + 2 * TINY.n_layers
    assert all(w.is_contiguous() for w in linears(model).values())
