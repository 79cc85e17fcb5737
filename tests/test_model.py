"""The adapter math against the official formulas, the gate/delta scales, the KV cache and batching."""

from __future__ import annotations

import pytest
import torch

from adapter.config import LORA_TARGETS, AdapterArgs, ModelArgs
from adapter.head_loss import head_cross_entropy
from adapter.model import Transformer
from tests.conftest import TINY, TINY_GQA, V1, V2, make_model
from tests.reference import reference_logits

ADAPTERS = {
    "v1-tanh": V1,
    "v1-raw": AdapterArgs(prompt_len=3, prompt_layers=3, gate_activation="raw"),
    "v2-bias-norm-lora-newgate": V2,
    # the V2 paper's bias tuning, W(s * x) + b, on all seven linears, with prompts and with none (the official
    # V2 dialog model's "bias, scale, norm")
    "v2-bias-scale-norm": AdapterArgs(prompt_len=3, prompt_layers=2, bias=True, bias_targets=LORA_TARGETS, scale=True,
                                      norm=True, lora_rank=2),
    "v2-dialog": AdapterArgs(prompt_len=0, prompt_layers=0, bias=True, bias_targets=LORA_TARGETS, scale=True,
                             norm=True),
}


def tokens(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("args", [TINY, TINY_GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_logits_match_the_official_formulas(args, name):
    model = make_model(args, ADAPTERS[name])
    t = tokens(2, 11, args.vocab_size)
    with torch.no_grad():
        for gate, delta in [(1.0, 1.0), (0.5, 1.0), (1.7, 0.3)]:
            ours = model(t, gate_scale=gate, delta_scale=delta)
            ref = reference_logits(model, t, gate_scale=gate, delta_scale=delta)
            torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_scales_zero_reproduce_the_frozen_base_bit_for_bit(name):
    model = make_model(TINY, ADAPTERS[name])
    base = Transformer(TINY)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not model.is_adapter_parameter(k)})
    base.eval()
    t = tokens(3, 9, TINY.vocab_size)
    with torch.no_grad():
        expected = base(t)
        assert torch.equal(model(t, gate_scale=0.0, delta_scale=0.0), expected)
        model.set_gate_scale(0)
        model.set_delta_scale(0)
        assert torch.equal(model(t), expected)
        cache, base_cache = model.new_cache(3, 12), base.new_cache(3, 12)
        assert torch.equal(model.step(t, cache), base.step(t, base_cache))
        # and the adapter really does something at scale 1
        assert not torch.allclose(model(t, gate_scale=1.0, delta_scale=1.0), expected, atol=1e-3)


def test_a_set_scale_is_the_models_own_whatever_the_caller_does_to_its_tensor_after():
    """set_gate_scale / set_delta_scale kept the caller's float32 tensor (or array): filled in place afterwards, it
    changed the model's scale."""
    import numpy as np

    model = make_model(TINY, V2)
    gate, delta = torch.tensor(1.0), np.array(1.0, dtype=np.float32)
    model.set_gate_scale(gate)
    model.set_delta_scale(delta)
    gate.fill_(0.0)
    delta.fill(0.0)
    assert model.gate_scale.item() == model.delta_scale.item() == 1.0


@pytest.mark.parametrize("args, message", [
    ((-1,), "batch: must be a whole number of rows >= 1, got -1"),
    ((1, -5), "max_len: must be a whole number of positions >= 1, got -5"),
    ((1, 8, torch.tensor([0, 1])), r"pad: expected a tensor of 1 whole numbers from 0 to 7"),  # failed at step
    ((1, 8, torch.tensor([-1])), r"pad: expected a tensor of 1 whole numbers"),  # silently wrong positions
    ((1, 8, [0]), r"pad: expected a tensor of 1 whole numbers"),  # 'list' object has no attribute 'any'
])
def test_a_cache_of_no_rows_no_room_or_a_wrong_padding_is_refused_by_name(args, message):
    model = make_model(TINY, V1)
    batch, *rest = args
    with pytest.raises(ValueError, match=f"^{message}"):
        model.new_cache(batch, *rest[:1], pad=rest[1] if len(rest) > 1 else None)



def test_a_token_id_outside_the_vocabulary_is_named_by_forward_score_and_step():
    """(an IndexError from deep inside torch's embedding, "index out of range in self"; on a GPU, a device-side
    assert that ends the process's use of the GPU)"""
    model = make_model(TINY, V1)
    fed = torch.tensor([[1, 2, 3], [4, TINY.vocab_size, 6]])
    message = f"^tokens: token id {TINY.vocab_size} \\(row 1, place 1\\) is not in the vocabulary of {TINY.vocab_size}$"
    with torch.no_grad():
        with pytest.raises(ValueError, match=message):
            model(fed)
        with pytest.raises(ValueError, match=message):
            model.score(fed, fed > 0, fed[fed > 0])
        with pytest.raises(ValueError, match=message):
            model.step(fed, model.new_cache(2, 8))
        with pytest.raises(ValueError, match="^tokens: token id -1 \\(row 0, place 0\\)"):
            model.step(torch.tensor([[-1]]), model.new_cache(1, 8))
        assert model(fed.clamp(max=TINY.vocab_size - 1)).shape == (2, 3, TINY.vocab_size)
    """Zero-init gates, biases, LoRA-up and norm deltas: training starts at the base model."""
    torch.manual_seed(0)
    model = Transformer(TINY, V2).eval()
    base = Transformer(TINY).eval()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not model.is_adapter_parameter(k)})
    t = tokens(2, 8, TINY.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(t), base(t))


@pytest.mark.parametrize("device", [None, "cpu"])
def test_a_reset_adapter_with_every_v2_part_is_exactly_the_base(device):
    """reset_adapter (what training a new adapter starts from) zeroed the input scales too: W(0 x), not W x."""
    args = AdapterArgs(prompt_len=3, prompt_layers=2, bias=True, scale=True, norm=True, lora_rank=2, new_gate=True)
    torch.manual_seed(0)
    model = Transformer(TINY, args).eval()
    base = Transformer(TINY).eval()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not model.is_adapter_parameter(k)})
    model.reset_adapter(device)
    t = tokens(2, 8, TINY.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(t), base(t))


def test_prompt_contribution_is_linear_in_the_gate_scale_for_raw_gates():
    model = make_model(TINY, ADAPTERS["v1-raw"])
    attention = model.layers[-1].attention
    x = torch.randn(2, 7, TINY.dim, generator=torch.Generator().manual_seed(3))
    prompt = model.adapter_query.weight.view(3, 1, 3, TINY.dim)[-1]

    def attend(scale: float) -> torch.Tensor:
        ctx = model._context(2, model._rope_slice(torch.arange(7)), scale, 1.0, is_causal=True)
        return attention(x, ctx, attention.prompt_kv(prompt))

    with torch.no_grad():
        zero, one = attend(0.0), attend(1.0)
        contribution = one - zero
        assert contribution.abs().max() > 1e-3
        for s in (0.5, 2.0, -1.0):
            torch.testing.assert_close(attend(s) - zero, s * contribution, atol=1e-5, rtol=1e-4)


def test_prompt_i_goes_to_layer_n_layers_minus_prompt_layers_plus_i():
    model = make_model(TINY, AdapterArgs(prompt_len=2, prompt_layers=3, gate_activation="raw"))
    t = tokens(1, 6, TINY.vocab_size)
    first = TINY.n_layers - 3
    with torch.no_grad():
        for layer in model.layers[first:]:
            layer.attention.gate.zero_()
        model.layers[first + 1].attention.gate.fill_(1.0)  # only prompt 1 is live
        before = model(t)
        rows = model.adapter_query.weight.view(3, 2, TINY.dim)
        rows[0].add_(5.0)
        rows[2].add_(5.0)
        assert torch.equal(model(t), before), "prompts 0 and 2 must not reach the layer of prompt 1"
        rows[1].add_(5.0)
        assert not torch.allclose(model(t), before)


@pytest.mark.parametrize("args", [TINY, TINY_GQA], ids=["mha", "gqa"])
def test_cached_decoding_equals_one_full_forward(args):
    model = make_model(args, V2)
    t = tokens(2, 14, args.vocab_size)
    with torch.no_grad():
        full = model(t)
        cache = model.new_cache(2, 20)
        steps = [model.step(t[:, :5], cache)]
        steps += [model.step(t[:, i:i + 1], cache) for i in range(5, 9)]
        steps.append(model.step(t[:, 9:14], cache))  # a chunk after a cached prefix
    close = dict(atol=5e-5, rtol=1e-4)  # float32 rounding of other matmul shapes (AVX2 CPUs reach 1e-5)
    torch.testing.assert_close(steps[0], full[:, 4], **close)
    for offset, logits in enumerate(steps[1:5]):
        torch.testing.assert_close(logits, full[:, 5 + offset], **close)
    torch.testing.assert_close(steps[-1], full[:, 13], **close)


def test_left_padded_rows_equal_separate_runs():
    model = make_model(TINY_GQA, V2)
    short, long = tokens(1, 4, TINY_GQA.vocab_size, 1), tokens(1, 9, TINY_GQA.vocab_size, 2)
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0, 5:], batch[1] = short[0], long[0]
    with torch.no_grad():
        cache = model.new_cache(2, 12, pad=torch.tensor([5, 0]))
        first = model.step(batch, cache)
        nxt = torch.tensor([[7], [8]])
        second = model.step(nxt, cache)
        torch.testing.assert_close(first[0], model(short)[0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(first[1], model(long)[0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(second[0], model(torch.cat([short, nxt[:1]], 1))[0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(second[1], model(torch.cat([long, nxt[1:]], 1))[0, -1], atol=1e-5, rtol=1e-5)


def test_per_row_gate_scales_equal_separate_runs():
    model = make_model(TINY, V2)
    t = tokens(1, 8, TINY.vocab_size).repeat(3, 1)
    scales = [0.0, 1.0, 1.8]
    with torch.no_grad():
        together = model(t, gate_scale=scales, delta_scale=[0.0, 1.0, 0.5])
        cache = model.new_cache(3, 8)
        stepped = model.step(t, cache, gate_scale=torch.tensor(scales), delta_scale=[0.0, 1.0, 0.5])
        for row, (s, d) in enumerate(zip(scales, [0.0, 1.0, 0.5])):
            alone = model(t[:1], gate_scale=s, delta_scale=d)
            torch.testing.assert_close(together[row], alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(stepped[row], alone[0, -1], atol=1e-5, rtol=1e-5)


def test_prompt_keys_values_are_computed_once_per_request_and_never_cached_with_gradients(monkeypatch):
    model = make_model(TINY, V1)
    calls = []
    for block in model.layers:
        original = block.attention.prompt_kv
        monkeypatch.setattr(block.attention, "prompt_kv",
                            lambda p, d, original=original: calls.append(1) or original(p, d))
    t = tokens(1, 5, TINY.vocab_size)
    with torch.no_grad():
        cache = model.new_cache(1, 10)
        model.step(t, cache)
        for _ in range(3):
            model.step(t[:, :1], cache)
    assert len(calls) == V1.prompt_layers
    calls.clear()
    cache = model.new_cache(1, 10)
    model.step(t, cache).sum().backward()
    model.step(t[:, :1], cache)
    assert len(calls) == 2 * V1.prompt_layers and not cache.prompt_kv


def test_only_adapter_parameters_learn():
    model = make_model(TINY, V2).train()
    model(tokens(2, 6, TINY.vocab_size)).logsumexp(-1).mean().backward()
    for name, param in model.named_parameters():
        if model.is_adapter_parameter(name):
            assert param.requires_grad and param.grad is not None, name
        else:
            assert not param.requires_grad and param.grad is None, name


def test_llama_7b_v1_counts_1_2m_trainable_parameters_on_meta():
    with torch.device("meta"):
        model = Transformer(ModelArgs(), AdapterArgs(prompt_len=10, prompt_layers=30))
    assert model.adapter_query.weight.numel() == 1_228_800
    assert model.count_parameters(trainable_only=True) == 1_228_800 + 30 * 32
    assert model.count_parameters() == 6_738_415_616 + 1_228_800 + 30 * 32


def test_effective_gates_follow_activation_new_gate_and_scale():
    model = make_model(TINY, V2)
    gates = model.effective_gates(gate_scale=2.0)
    assert gates.shape == (V2.prompt_layers, TINY.n_heads)
    block = model.layers[TINY.n_layers - V2.prompt_layers]
    expected = 2.0 * block.attention.gate.detach().tanh().flatten() * block.attention.new_gate.detach().flatten()
    torch.testing.assert_close(gates[0], expected)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(prompt_layers=5), "prompt_layers"),
    (dict(prompt_len=-1), "prompt_len"),
    (dict(gate_activation="sigmoid"), "gate_activation"),
    (dict(lora_rank=2, lora_targets=("wz",)), "lora_targets"),
])
def test_bad_adapter_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        Transformer(TINY, AdapterArgs(**{"prompt_len": 2, "prompt_layers": 2, **kwargs}))


def test_bad_model_arguments_and_inputs_name_the_argument():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="dim"):
        ModelArgs(dim=65, n_heads=4)
    model = make_model(TINY, V1)
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(2, TINY.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="gate_scale"):
        model(tokens(2, 3, TINY.vocab_size), gate_scale=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="delta_scale"):
        model.set_delta_scale(float("nan"))


def test_gradient_checkpointing_gives_the_same_gradients():
    t = tokens(2, 9, TINY.vocab_size)
    grads = []
    for checkpointing in (False, True):
        model = make_model(TINY, V2).train()
        model.gradient_checkpointing = checkpointing
        model(t).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.trainable_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_fp32_attention_is_a_no_op_in_float32_and_attends_in_float32_under_bf16_autocast(monkeypatch):
    t = tokens(2, 9, TINY.vocab_size)
    runs = {}
    for autocast, flag in ((False, False), (False, True), (True, False), (True, True)):
        model = make_model(TINY, V1).train()
        model.fp32_attention = flag
        dtypes = set()
        real = torch.nn.functional.scaled_dot_product_attention

        def attention(q, *args, _real=real, _dtypes=dtypes, **kwargs):
            _dtypes.add(q.dtype)
            return _real(q, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", attention)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(t)
        logits.float().logsumexp(-1).mean().backward()
        monkeypatch.undo()
        runs[autocast, flag] = (dtypes, logits.detach().float(),
                                {n: p.grad.clone() for n, p in model.trainable_parameters()})
    assert runs[False, True][0] == runs[False, False][0] == {torch.float32}
    torch.testing.assert_close(runs[False, True][1], runs[False, False][1], atol=0, rtol=0)
    assert runs[True, False][0] == {torch.bfloat16} and runs[True, True][0] == {torch.float32}
    reference = runs[False, False]
    for name, grad in runs[True, True][2].items():
        torch.testing.assert_close(grad, reference[2][name], atol=2e-2, rtol=5e-2)
    torch.testing.assert_close(runs[True, True][1], reference[1], atol=5e-2, rtol=5e-2)


def chosen_positions(starts: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [2, 9], a bool mask choosing each row's positions from its start on, a target per chosen one)."""
    chosen = torch.zeros(2, 9, dtype=torch.bool)
    chosen[0, starts[0]:], chosen[1, starts[1]:] = True, True
    return tokens(2, 9, TINY.vocab_size), chosen, tokens(1, int(chosen.sum()), TINY.vocab_size, seed=seed)[0]


def test_logits_of_chosen_positions_equal_the_full_logits_there_and_so_do_their_gradients():
    t, chosen, targets = chosen_positions((4, 7), seed=3)
    results = []
    for positions in (None, chosen):
        model = make_model(TINY, V2).train()
        logits = model(t, gate_scale=[0.5, 1.5], positions=positions)
        logits = logits[chosen] if positions is None else logits
        torch.nn.functional.cross_entropy(logits, targets, reduction="sum").backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.trainable_parameters()}))
    (full, full_grads), (some, some_grads) = results
    assert some.shape == (int(chosen.sum()), TINY.vocab_size)
    torch.testing.assert_close(some, full, atol=1e-6, rtol=1e-6)
    for name in full_grads:
        torch.testing.assert_close(some_grads[name], full_grads[name], atol=1e-6, rtol=1e-5)
    model = make_model(TINY, V1)
    for bad in (chosen.long(), chosen[:, :5], [True] * 9):
        with pytest.raises(ValueError, match="positions: expected a bool mask of the tokens' shape"):
            model(t, positions=bad)


def test_summed_loss_of_chosen_positions_equals_cross_entropy_of_their_logits_and_so_do_its_gradients():
    """The head's loss computed chunk by chunk with its gradient (adapter.head_loss) is the plain one."""
    t, chosen, targets = chosen_positions((2, 5), seed=5)
    results = []
    for fused in (False, True):
        model = make_model(TINY, V2).train()
        for block in model.layers[model.first_prompt_layer:]:  # open gates: every trainable tensor gets a gradient
            block.attention.gate.data.fill_(0.3)
        if fused:
            loss = model(t, gate_scale=[0.5, 1.5], positions=chosen, targets=targets)
        else:
            logits = model(t, gate_scale=[0.5, 1.5], positions=chosen)
            loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.trainable_parameters()}))
    (plain, plain_grads), (fused, fused_grads) = results
    assert fused.shape == () and fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-6)
    assert plain_grads.keys() == fused_grads.keys()
    for name in plain_grads:
        largest = plain_grads[name].abs().max()
        assert largest > 0, name
        assert (fused_grads[name] - plain_grads[name]).abs().max() <= 1e-5 * largest, name
    model = make_model(TINY, V1)
    with torch.no_grad():
        torch.testing.assert_close(model(t, positions=chosen, targets=targets),
                                   torch.nn.functional.cross_entropy(model(t, positions=chosen), targets,
                                                                     reduction="sum"), atol=1e-5, rtol=1e-6)
    with pytest.raises(ValueError, match="targets: give the positions"):
        model(t, targets=targets)
    with pytest.raises(ValueError, match=r"target ids must be in \[0, 512\), got \d+\.\.512"):
        model(t, positions=chosen, targets=torch.cat([targets[:-1], torch.tensor([TINY.vocab_size])]))
    with pytest.raises(ValueError, match=r"targets must be a LongTensor \[11\]"):
        model(t, positions=chosen, targets=targets[:-1])
    model.output.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="the head weight is trainable"):
        model(t, positions=chosen, targets=targets)


def test_head_loss_does_not_depend_on_the_chunk_size():
    generator = torch.Generator().manual_seed(2)
    head = torch.randn(300, 16, generator=generator)
    targets = torch.randint(0, 300, (10,), generator=generator)
    hidden = torch.randn(10, 16, generator=generator)
    results = []
    for chunk_rows in (1, 3, 10, 128):
        h = hidden.clone().requires_grad_()
        loss = head_cross_entropy(h, head, targets, chunk_rows=chunk_rows)
        (2.5 * loss).backward()
        results.append((loss.detach(), h.grad))
    h = hidden.clone().requires_grad_()
    plain = torch.nn.functional.cross_entropy(h @ head.T, targets, reduction="sum")
    (2.5 * plain).backward()
    for loss, grad in results:
        torch.testing.assert_close(loss, plain.detach(), atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(grad, h.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_a_long_prompt_fed_in_pieces_gives_the_same_logits_and_cache(padded):
    model = make_model(TINY_GQA, V2)
    tokens = torch.randint(3, TINY_GQA.vocab_size, (2, 23), generator=torch.Generator().manual_seed(4))
    pad = torch.tensor([0, 5]) if padded else None
    results = []
    for chunk in (None, 6):  # 23 tokens: pieces of 6, 6, 6 and 5
        model.prefill_chunk = chunk
        with torch.inference_mode():
            cache = model.new_cache(2, 30, pad=pad)
            first = model.step(tokens, cache)
            after = model.step(first.argmax(-1)[:, None], cache)
        results.append((first, after, cache))
    (first, after, cache), (chunked_first, chunked_after, chunked) = results
    close = {"rtol": 1e-4, "atol": 1e-5}  # float32 matmuls of 6 rows and of 23 round differently (AVX512 kernels)
    torch.testing.assert_close(chunked_first, first, **close)
    torch.testing.assert_close(chunked_after, after, **close)
    assert chunked.length == cache.length == 24
    for a, b in zip(chunked.keys, cache.keys):
        torch.testing.assert_close(a, b, **close)


@pytest.mark.parametrize("chunk", [0, -4, 2.5])
def test_a_prefill_chunk_that_is_not_a_positive_count_is_refused(chunk):
    model = make_model(TINY, V1)
    model.prefill_chunk = chunk
    with pytest.raises(ValueError, match=f"prefill_chunk: must be a positive number of tokens or None, got {chunk}"):
        model.step(torch.tensor([[5, 6, 7]]), model.new_cache(1, 8))
