"""The fast decode paths (stacked projections, compiled steps) against the plain path; training untouched."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from adapter.config import LORA_TARGETS, AdapterArgs
from adapter.generate import GenerationRequest, decode_tokens
from adapter.layout import column_major_wide, is_column_major
from adapter.model import Transformer, frozen_linear
from adapter.quantize import quantize_model
from adapter.sampling import SamplingParams
from tests.conftest import TINY, TINY_GQA, V1, V2, make_model
from tests.unfused import unfused_logits

ARGS = {"mha": TINY, "gqa": TINY_GQA}
ADAPTERS = {"v1": V1, "v2": V2}
# (gate scale, delta scale): the frozen base, the trained adapter, and one value per row
SCALES = {"zero": (0.0, 0.0), "one": (1.0, 1.0), "per-row": ([0.0, 1.0, 1.7], [1.0, 0.5, 0.0])}
GREEDY = GenerationRequest(max_new_tokens=8, sampling=SamplingParams(temperature=0.0))


def prompts(vocab: int) -> list[list[int]]:
    """Three rows of different lengths, so that the batch is left-padded."""
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in (6, 2, 9)]


def greedy(model: Transformer, *, fused: bool = True, request: GenerationRequest = GREEDY, scales=(1.0, 1.0),
           rows: list[list[int]] | None = None) -> list[list[int]]:
    model.fused_inference = fused
    gate, delta = scales
    rows = prompts(model.args.vocab_size) if rows is None else rows
    steps = decode_tokens(model, rows, request, gate_scale=gate, delta_scale=delta)
    return [list(row) for row in zip(*steps)]


@pytest.mark.parametrize("scales", list(SCALES))
@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("args", list(ARGS))
def test_fused_decoding_gives_the_plain_paths_tokens(args, adapter, scales):
    model = make_model(ARGS[args], ADAPTERS[adapter])
    plain = greedy(model, fused=False, scales=SCALES[scales])
    assert all(block.attention.qkv_stack.weight is None for block in model.layers), "the plain path stacks nothing"
    fused = greedy(model, fused=True, scales=SCALES[scales])
    assert fused == plain
    assert all(block.attention.qkv_stack.weight is not None and block.feed_forward.w13_stack.weight is not None
               for block in model.layers), "the fused path must really have run"


def test_fused_step_logits_match_the_plain_step():
    model = make_model(TINY_GQA, V2)
    tokens = torch.randint(0, TINY_GQA.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    logits = {}
    with torch.inference_mode():
        for fused in (False, True):
            model.fused_inference = fused
            cache = model.new_cache(2, 9, pad=torch.tensor([3, 0]))
            first = model.step(tokens, cache, gate_scale=[0.5, 1.5])
            logits[fused] = (first, model.step(first.argmax(-1, keepdim=True), cache, gate_scale=[0.5, 1.5]))
    for plain, fused in zip(logits[False], logits[True]):
        torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def test_stacked_weights_follow_changed_and_replaced_weights_and_stay_out_of_the_state_dict():
    model = make_model(TINY, V2)
    names = set(model.state_dict())
    greedy(model)
    assert set(model.state_dict()) == names
    attention, ffn = model.layers[1].attention, model.layers[2].feed_forward
    with torch.no_grad():
        attention.wk.weight.mul_(-2.0)  # in place: the same tensor, a new version
    ffn.w3.weight = torch.nn.Parameter(torch.randn_like(ffn.w3.weight), requires_grad=False)  # replaced
    assert greedy(model) == greedy(model, fused=False)
    stacked = torch.cat([attention.wq.weight, attention.wk.weight, attention.wv.weight])
    assert torch.equal(attention.qkv_stack.weight, stacked)
    assert torch.equal(ffn.w13_stack.weight, torch.cat([ffn.w1.weight, ffn.w3.weight]))


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_linears_are_never_stacked_and_decode_as_on_the_plain_path(mode):
    model = quantize_model(make_model(TINY, V2), mode)
    plain = greedy(model, fused=False, scales=([0.0, 1.0, 1.5], 1.0))
    assert greedy(model, fused=True, scales=([0.0, 1.0, 1.5], 1.0)) == plain
    for block in model.layers:
        assert block.attention.qkv_stack.weight is None and block.feed_forward.w13_stack.weight is None


@pytest.mark.parametrize("mode", [None, "nf4"])
def test_input_scales_are_never_stacked_and_decode_as_separate_rows_do(mode):
    """A v2 input scale gives each linear an input of its own: nothing is stacked, and rows at different delta
    scales decode as each does alone (quantized linears read the scaled input too)."""
    scaled = AdapterArgs(prompt_len=3, prompt_layers=2, bias=True, bias_targets=LORA_TARGETS, scale=True, norm=True)
    model = make_model(TINY_GQA, scaled)
    if mode is not None:
        model = quantize_model(model, mode)
    rows = prompts(model.args.vocab_size)
    together = greedy(model, fused=True, scales=(1.0, [1.0, 0.5, 0.0]), rows=rows)
    assert all(b.attention.qkv_stack.weight is None and b.feed_forward.w13_stack.weight is None for b in model.layers)
    alone = [greedy(model, fused=False, scales=(1.0, delta), rows=[row])[0]
             for row, delta in zip(rows, (1.0, 0.5, 0.0))]
    assert together == alone
    assert alone[0] != greedy(model, fused=False, scales=(1.0, 0.0), rows=rows[:1])[0], "the scales act"


@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("args", list(ARGS))
def test_training_computation_is_bit_for_bit_the_unfused_one(args, adapter):
    """A grad-enabled forward in train mode, and its gradients, equal the written-out operations exactly."""
    model = make_model(ARGS[args], ADAPTERS[adapter]).train()
    tokens = torch.randint(0, model.args.vocab_size, (3, 10), generator=torch.Generator().manual_seed(4))
    params = [p for _, p in model.trainable_parameters()]
    for gate, delta in [(1.0, 1.0), (0.4, 1.6)]:
        ours = model(tokens, gate_scale=gate, delta_scale=delta)
        expected = unfused_logits(model, tokens, gate, delta)
        assert torch.equal(ours, expected)
        grads = torch.autograd.grad(ours.logsumexp(-1).mean(), params)
        expected_grads = torch.autograd.grad(expected.logsumexp(-1).mean(), params)
        assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads))
    with torch.no_grad():  # scoring (validation losses) stays on the same computation too
        assert torch.equal(model.eval()(tokens), unfused_logits(model, tokens))
    assert all(block.attention.qkv_stack.weight is None for block in model.layers)


has_compiler = shutil.which("g++") is not None or shutil.which("clang++") is not None


@pytest.mark.skipif(not has_compiler, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_decoding_gives_the_eager_tokens_and_slider_values_never_recompile():
    model = make_model(TINY_GQA, V2)
    compiled = GenerationRequest(max_new_tokens=8, sampling=SamplingParams(temperature=0.0), compile=True)
    graphs = counters["stats"]["unique_graphs"]
    per_layer = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [0.5, 1.0, 1.0]])  # [rows, adapter layers]
    for scales in [(1.0, 1.0), ([0.0, 1.0, 1.7], [1.0, 0.5, 0.0]), (per_layer, 1.0)]:  # each form compiles once
        assert greedy(model, request=compiled, scales=scales) == greedy(model, scales=scales)
    assert counters["stats"]["unique_graphs"] == graphs + 3
    with torch._dynamo.config.patch(error_on_recompile=True):  # new values, new requests: no compilation
        for scales in [(0.0, 0.0), (1.7, 0.3), ([1.0, 0.0, 0.5], [0.0, 1.0, 2.0]), (per_layer.flip(0), 0.5)]:
            assert greedy(model, request=compiled, scales=scales) == greedy(model, scales=scales)
        rows = prompts(model.args.vocab_size)
        rows = [rows[2] + rows[0], rows[1], rows[0]]  # other lengths, another cache size
        assert greedy(model, request=compiled, rows=rows) == greedy(model, rows=rows)


@pytest.mark.skipif(not has_compiler, reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize(("rows", "column_major", "reduction"),
                         [(1, False, True), (2, False, True), (3, False, False), (1, True, False)])
def test_compiled_steps_read_few_rows_through_row_major_weights_as_a_fused_reduction(rows, column_major, reduction):
    layer = nn.Linear(64, 96, bias=False).requires_grad_(False)
    if column_major:
        column_major_wide(layer)
    x = torch.randn(rows, 1, 64, generator=torch.Generator().manual_seed(rows))
    with torch.inference_mode():
        out, code = run_and_get_code(torch.compile(frozen_linear, dynamic=True), layer, x)
        expected = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert ("extern_kernels.mm(" not in "".join(code)) == reduction


@pytest.mark.skipif(not has_compiler, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_one_and_two_row_decoding_gives_the_eager_tokens_and_puts_weights_row_major():
    model = make_model(TINY_GQA, V2)
    assert column_major_wide(model) > 0, "laid out as adapter.load lays out a CPU model"
    compiled = GenerationRequest(max_new_tokens=8, sampling=SamplingParams(temperature=0.0), compile=True)
    rows = prompts(model.args.vocab_size)
    batches = [rows[:1], rows[1:]]  # one row (the reduction), two rows of different lengths (left padding)
    eager = [greedy(model, fused=False, rows=batch) for batch in batches]
    assert [greedy(model, fused=False, request=compiled, rows=batch) for batch in batches] == eager
    assert not any(is_column_major(p) for p in model.parameters()), "the compiled path reads weights row-major"


def test_compile_must_be_a_bool():
    with pytest.raises(ValueError, match="compile: must be True or False"):
        GenerationRequest(compile="yes")
