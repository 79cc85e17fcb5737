"""The static-shape one-token step (adapter.static_decode) against the plain step: same logits, through cache
lengths that cross buckets, left padding, slider moves, slots reused by later requests; on a GPU, as CUDA graphs."""

from __future__ import annotations

import gc
import shutil

import pytest
import torch

import adapter.static_decode as static_decode
from adapter.model import Transformer
from adapter.static_decode import StaticDecoder, bucket
from tests.conftest import TINY, TINY_GQA, V1, V2, make_model

CASES = {"mha-v1": (TINY, V1), "gqa-v2": (TINY_GQA, V2)}


@pytest.fixture(autouse=True)
def small_buckets(monkeypatch):
    """Buckets of 8, 16, 32, ... positions, so that a short decode crosses several."""
    monkeypatch.setattr(static_decode, "BUCKET", 8)


def left_padded(vocab: int, lengths=(6, 2, 9), seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    tokens = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens[row, longest - n:] = torch.randint(3, vocab, (n,), generator=generator)
    return tokens, torch.tensor([longest - n for n in lengths])


def decode(model: Transformer, tokens: torch.Tensor, pad: torch.Tensor, steps: int, compile: bool,
           scales=lambda step: {}, max_len: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy tokens [B, steps] and each step's logits, one-token steps with `compile` as asked."""
    with torch.inference_mode():
        cache = model.new_cache(tokens.shape[0], max_len or tokens.shape[1] + steps, pad=pad)
        logits = model.step(tokens.to(model.output.weight.device), cache, **scales(0))
        out, seen = [logits.argmax(-1)], [logits]
        for step in range(1, steps):
            logits = model.step(out[-1][:, None], cache, compile=compile, **scales(step))
            out.append(logits.argmax(-1))
            seen.append(logits)
    return torch.stack(out, 1), seen


def assert_same_decode(a, b) -> None:
    """Equal tokens, logits equal up to summation order (attention sums over masked positions too)."""
    assert torch.equal(a[0], b[0])
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def with_static(model: Transformer, **options) -> StaticDecoder:
    model.static_decoders[True] = StaticDecoder(model, capture=False, **options)
    return model.static_decoders[True]


def test_buckets_are_powers_of_two_from_the_smallest_up_to_the_limit():
    assert [bucket(n, 96) for n in (1, 8, 9, 16, 17, 33, 64, 65, 96)] == [8, 8, 16, 16, 32, 64, 64, 96, 96]


@pytest.mark.parametrize("case", list(CASES))
def test_static_steps_give_the_plain_steps_logits_across_buckets_with_padding_and_moving_sliders(case):
    args, adapter = CASES[case]
    model = make_model(args, adapter)
    tokens, pad = left_padded(args.vocab_size)
    # per-row gates and deltas that change every step: the slider moving while an answer streams
    scales = lambda step: {"gate_scale": [0.5 * (step % 3), 1.0, 1.7], "delta_scale": [1.0, 0.1 * step, 0.0]}  # noqa: E731
    plain = decode(model, tokens, pad, 40, compile=False, scales=scales)
    decoder = with_static(model)
    assert_same_decode(decode(model, tokens, pad, 40, compile=True, scales=scales), plain)
    assert len(decoder.slots) == 1
    assert sorted(decoder.slots[0].graphs) == [16, 32, 64]  # the lengths crossed from position 9 to 48


@pytest.mark.parametrize("rows", [[1.0, 1.0], [[1.0] * V1.prompt_layers]])
def test_a_scale_tensor_changed_in_place_between_steps_is_read_anew(rows):
    """The slot kept the caller's own tensor as the scales last copied, so a slider writing into that tensor
    compared equal to itself and the static step went on with the old gates."""
    model = make_model(TINY, V1)
    tokens, pad = left_padded(TINY.vocab_size, lengths=(6, 2))
    gate = torch.tensor(rows)
    moved = lambda step: {"gate_scale": gate.fill_(1.0) if step < 2 else gate.fill_(0.0)}  # noqa: E731
    plain = decode(model, tokens, pad, 6, compile=False, scales=moved)
    with_static(model)
    assert_same_decode(decode(model, tokens, pad, 6, compile=True, scales=moved), plain)


def test_a_later_request_reuses_the_free_slot_and_never_sees_the_earlier_keys():
    model = make_model(TINY_GQA, V2)
    decoder = with_static(model)
    long_tokens, long_pad = left_padded(TINY_GQA.vocab_size, (9, 9, 9), seed=1)
    decode(model, long_tokens, long_pad, 30, compile=True)
    storage = decoder.slots[0].storage.keys[0].data_ptr()
    gc.collect()
    tokens, pad = left_padded(TINY_GQA.vocab_size, (3, 1, 2), seed=2)  # padding where the last request wrote
    expected = decode(model, tokens, pad, 30, compile=False, max_len=39)
    assert_same_decode(decode(model, tokens, pad, 30, compile=True, max_len=39), expected)
    assert len(decoder.slots) == 1 and decoder.slots[0].storage.keys[0].data_ptr() == storage


def test_a_cache_still_in_use_keeps_its_slot_and_eager_steps_can_follow_static_ones():
    model = make_model(TINY, V1)
    decoder = with_static(model)
    tokens, pad = left_padded(TINY.vocab_size)
    caches, ids = [], []
    with torch.inference_mode():
        for _ in range(2):  # two live requests: two slots
            cache = model.new_cache(3, 40, pad=pad)
            ids.append(model.step(tokens, cache).argmax(-1))
            caches.append(cache)
        first = [model.step(ids[i][:, None], cache, compile=True) for i, cache in enumerate(caches)]
        assert len(decoder.slots) == 2
        # a three-token eager step on the first cache, then static steps again: as if all were eager
        more = torch.randint(3, TINY.vocab_size, (3, 3), generator=torch.Generator().manual_seed(3))
        after = model.step(more, caches[0])
        last = model.step(after.argmax(-1)[:, None], caches[0], compile=True)
        reference = model.new_cache(3, 40, pad=pad)
        model.step(tokens, reference)
        expected_first = model.step(ids[0][:, None], reference)
        expected_after = model.step(more, reference)
        expected_last = model.step(expected_after.argmax(-1)[:, None], reference)
    torch.testing.assert_close(first[0], expected_first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, expected_after, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, expected_last, rtol=1e-5, atol=1e-5)


def test_steps_without_a_fed_prompt_or_with_gradients_stay_on_the_plain_path(monkeypatch):
    model = make_model(TINY, V1)
    decoder = with_static(model)
    monkeypatch.setattr(model, "_compiled_logits", lambda: model._last_logits)  # the CPU's compiled step, uncompiled
    with torch.inference_mode():
        cache = model.new_cache(1, 8)
        model.step(torch.tensor([[5]]), cache, compile=True)  # the first token: no prompt keys yet
    assert decoder.slots == []
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model.step(torch.tensor([[5, 6]]), cache)
    model.step(torch.tensor([[7]]), cache, compile=True)  # gradients on: plain
    assert decoder.slots == []


has_compiler = shutil.which("g++") is not None or shutil.which("clang++") is not None


@pytest.mark.skipif(not has_compiler, reason="torch.compile on CPU needs a C++ compiler")
def test_the_compiled_static_step_gives_the_plain_tokens():
    model = make_model(TINY_GQA, V2)
    tokens, pad = left_padded(TINY_GQA.vocab_size)
    plain = decode(model, tokens, pad, 20, compile=False)
    with_static(model, compile=True)
    assert_same_decode(decode(model, tokens, pad, 20, compile=True), plain)


def test_a_step_that_fails_warns_and_leaves_the_decoder_for_the_plain_path(monkeypatch):
    model = make_model(TINY, V1)
    tokens, pad = left_padded(TINY.vocab_size)
    plain = decode(model, tokens, pad, 12, compile=False)
    decoder = with_static(model)
    monkeypatch.setattr(model, "_compiled_logits", lambda: model._last_logits)  # the CPU's compiled step, uncompiled

    def broken(slot, visible):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    decoder.body = broken
    with pytest.warns(RuntimeWarning, match=r"static decode step failed \(RuntimeError: operation not permitted "
                                            r"when stream is capturing\); decoding on the plain path"):
        assert_same_decode(decode(model, tokens, pad, 12, compile=True), plain)
    assert decoder.failure.startswith("RuntimeError: operation not permitted")


def test_slots_follow_the_longest_idle_request_of_each_batch_size():
    model = make_model(TINY, V1)
    decoder = with_static(model)
    tokens, pad = left_padded(TINY.vocab_size)
    decode(model, tokens, pad, 4, compile=True)  # 9 + 4 positions: a slot of 16
    decode(model, tokens, pad, 30, compile=True)  # 39: the idle 16 is let go for a 64
    assert [s.length for s in decoder.slots] == [64]
    decode(model, tokens, pad, 4, compile=True)  # a short request takes the idle 64 (and its graphs)
    decode(model, tokens[:1, 3:], None, 4, compile=True)  # another batch size: a slot of its own
    assert sorted((s.storage.batch, s.length) for s in decoder.slots) == [(1, 16), (3, 64)]


def test_graphs_are_captured_again_once_a_parameter_the_step_reads_was_replaced(monkeypatch):
    model = make_model(TINY, V1)
    decoder = with_static(model)
    captured = []
    capture = decoder._capture
    monkeypatch.setattr(decoder, "_capture", lambda slot, visible: captured.append(visible) or capture(slot, visible))
    tokens, pad = left_padded(TINY.vocab_size)
    decode(model, tokens, pad, 20, compile=True)
    decode(model, tokens, pad, 20, compile=True)  # the same addresses: the graphs are replayed
    assert captured == [16, 32]
    with torch.no_grad():
        model.layers[-1].attention.gate.mul_(2.0)  # in place: the graphs see the new values
    decode(model, tokens, pad, 20, compile=True)
    assert captured == [16, 32]
    model.reset_adapter("cpu")  # new parameters at new addresses
    expected = decode(model, tokens, pad, 20, compile=False)
    assert_same_decode(decode(model, tokens, pad, 20, compile=True), expected)
    assert captured == [16, 32, 16, 32]


def test_without_a_gpu_or_a_decoder_set_every_step_is_plain():
    model = make_model(TINY, V1)
    tokens, pad = left_padded(TINY.vocab_size)
    decode(model, tokens, pad, 4, compile=False)
    assert model.static_decoders == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_on_a_gpu_one_token_steps_replay_cuda_graphs_captured_once_per_length():
    model = make_model(TINY_GQA, V2).cuda()
    tokens, pad = left_padded(TINY_GQA.vocab_size)
    scales = lambda step: {"gate_scale": [0.5 * (step % 3), 1.0, 1.7]}  # noqa: E731
    model.cuda_graphs = False
    plain = decode(model, tokens, pad, 40, compile=False, scales=scales)
    assert model.static_decoders == {}
    model.cuda_graphs = True
    for compile in (False, True):  # graphs of the eager step, and of the compiled one
        assert_same_decode(decode(model, tokens, pad, 40, compile=compile, scales=scales), plain)
        decoder = model.static_decoders[compile]
        assert decoder.capture and decoder.captures == 3  # lengths 16, 32, 64; the slider captured nothing
    gc.collect()
    model.cuda_graphs = False
    expected = decode(model, tokens, pad, 40, compile=False)
    assert_same_decode(decode(model, tokens, pad, 40, compile=True), expected)
    assert model.static_decoders[True].captures == 3  # the next request replayed the same graphs
