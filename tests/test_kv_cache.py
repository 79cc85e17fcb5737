"""The int8 KV cache: per-vector absmax quantization, decoding close to the full-precision cache at half its
memory, the static step on it, and the setting through adapter.load and the app."""

from __future__ import annotations

import pytest
import torch

from adapter.app_config import parse_config
from adapter.kv_cache import KVCache, dequantize_vectors, quantize_vectors
from adapter.loading import load
from adapter.model import Transformer
from tests.conftest import TINY_GQA, V1, V2, make_model


def test_each_vector_round_trips_within_half_a_step_of_its_own_scale():
    magnitudes = torch.tensor([1e-3, 1.0, 40.0])[None, :, None, None]  # one per head
    x = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0)) * magnitudes
    x[0, 0, 0] = 0.0  # an all-zero vector: zeros back, no NaN
    values, scale = quantize_vectors(x)
    assert values.dtype == torch.int8 and scale.shape == (2, 3, 5, 1)
    back = dequantize_vectors(values, scale)
    assert torch.equal(back[0, 0, 0], torch.zeros(16))
    assert bool(((back - x).abs() <= scale / 2 + 1e-7).all())
    assert torch.equal(values.abs().amax(-1)[1], torch.full((3, 5), 127, dtype=torch.int8))  # each uses its range


def teacher_forced(model: Transformer, tokens: torch.Tensor, kind: str,
                   static: bool = False) -> tuple[list[torch.Tensor], KVCache]:
    """Logits of every one-token step after an 8-token prompt, the same tokens fed on every side."""
    with torch.inference_mode():
        cache = model.new_cache(tokens.shape[0], tokens.shape[1], kv_cache=kind)
        out = [model.step(tokens[:, :8], cache)]
        for i in range(8, tokens.shape[1]):
            out.append(model.step(tokens[:, i:i + 1], cache, compile=static))
    return out, cache


def test_int8_cache_decodes_close_to_the_full_cache_in_half_the_memory():
    # (the tiny v2 adapter's random biases put outliers into the keys, which one scale per vector serves poorly:
    # up to 14% there; trained LLaMA keys are kinder, but that is why int8 is a choice and not the default)
    model = make_model(TINY_GQA, V1)
    tokens = torch.randint(3, TINY_GQA.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    full, full_cache = teacher_forced(model, tokens, "auto")
    small, small_cache = teacher_forced(model, tokens, "int8")
    worst = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(full, small))
    assert 0 < worst < 5e-3, worst
    assert all(torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(full, small))
    stored = lambda cache: sum(t.numel() * t.element_size() for t in [*cache.keys, *cache.values,  # noqa: E731
                                                                       *(cache.key_scales or []),
                                                                       *(cache.value_scales or [])])
    assert stored(small_cache) / stored(full_cache) == pytest.approx((1 + 4 / TINY_GQA.head_dim) / 4)


def test_the_static_step_on_an_int8_cache_gives_the_plain_steps_logits():
    from adapter.static_decode import StaticDecoder

    model = make_model(TINY_GQA, V2)
    tokens = torch.randint(3, TINY_GQA.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    plain, _ = teacher_forced(model, tokens, "int8")
    model.static_decoders[True] = StaticDecoder(model, capture=False)
    static, cache = teacher_forced(model, tokens, "int8", static=True)
    assert model.static_decoders[True].slots and cache.keys[0].dtype == torch.int8
    for a, b in zip(plain, static):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_kind_is_set_by_load_and_the_app_and_checked(base_folder):
    model = load(base_folder, kv_cache="int8")
    assert model.kv_cache == "int8" and model.new_cache(1, 4).keys[0].dtype == torch.int8
    assert model.new_cache(1, 4, kv_cache="auto").keys[0].dtype == torch.float32
    with pytest.raises(ValueError, match="kv_cache: unknown kind 'fp8'; choose from"):
        load(base_folder, kv_cache="fp8")
    with pytest.raises(ValueError, match="kv_cache: unknown kind 'int4'"):
        model.new_cache(1, 4, kv_cache="int4")
    assert parse_config(["--base", str(base_folder), "--kv-cache", "int8"], {}).kv_cache == "int8"
    assert parse_config(["--base", str(base_folder)], {"ADAPTER_KV_CACHE": "int8"}).kv_cache == "int8"
