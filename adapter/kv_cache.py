"""Preallocated key/value storage for one generation request.

Besides the usual per-layer keys/values of the text, it holds the adaption prompts' keys/values: they
depend only on the prompt (and the image), so they are computed once per request and reused each step.

With `int8`, each key/value vector (one head, one position) is stored as int8 with its own absmax scale,
half the memory of bf16 (for a 7B model at 2048 tokens of context, 0.5 GiB instead of 1); attention reads
them back in the compute dtype, one layer at a time.
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "int8")  # auto: the model's own dtype


def check_kv_cache(kind: str) -> str:
    if kind not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache: unknown kind {kind!r}; choose from {KV_CACHE_DTYPES}")
    return kind


def quantize_vectors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and one scale per vector of the last dimension (absmax / 127), in x's dtype."""
    scale = x.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny) / 127
    return (x / scale).round().clamp(-127, 127).to(torch.int8), scale


def dequantize_vectors(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return values.to(scale.dtype) * scale


class KVCache:
    """Static cache: per layer, `[batch, kv_heads, max_len, head_dim]` for keys and for values.

    One tensor per layer rather than one stacked tensor: a compiled decode step (`Transformer.step(...,
    compile=True)`) then writes each step's keys in place, where a slice of one big tensor would be copied whole.

    `pad` holds, per row, how many left-padding tokens precede the real prompt (rows of different
    lengths share one decode loop); `visual_prompt` is added to every layer's adaption prompt.
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        pad: torch.Tensor | None = None,
        visual_prompt: torch.Tensor | None = None,
        int8: bool = False,
    ) -> None:
        shape = (batch, kv_heads, max_len, head_dim)
        self.dtype, self.int8 = dtype, int8  # the compute dtype; whether keys/values are stored as int8
        stored = torch.int8 if int8 else dtype
        self.keys = [torch.zeros(shape, dtype=stored, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=stored, device=device) for _ in range(n_layers)]
        # int8: per layer [batch, kv_heads, max_len, 1] scales in the compute dtype
        scales = (batch, kv_heads, max_len, 1)
        self.key_scales = [torch.zeros(scales, dtype=dtype, device=device) for _ in range(n_layers)] if int8 else None
        self.value_scales = [torch.zeros(scales, dtype=dtype, device=device) for _ in range(n_layers)] if int8 \
            else None
        self.batch = batch
        self.max_len = max_len
        self.length = 0
        if pad is not None and not bool(pad.any()):
            pad = None
        self.pad = None if pad is None else pad.to(device=device, dtype=torch.long)
        self.visual_prompt = visual_prompt
        self.prompt_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.stacks_checked = False  # the model's stacked projections are up to date for this request

    def store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values at `start` and return every key/value so far (views, no copy; with
        int8, the compute-dtype values read back)."""
        end = start + k.shape[2]
        self._write(layer, lambda stored, new: stored[:, :, start:end].copy_(new), k, v)
        return self._read(layer, end)

    def store_at(self, layer: int, position: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 visible: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`store` of one position held in a tensor ([1]; a CUDA graph replays no Python int), returning the
        first `visible` positions (adapter.static_decode masks those not written yet)."""
        self._write(layer, lambda stored, new: stored.index_copy_(2, position, new), k, v)
        return self._read(layer, visible)

    def tensor_lists(self) -> list[list[torch.Tensor]]:
        """The per-layer storage: keys, values and, for int8, their scales."""
        return [self.keys, self.values] + ([self.key_scales, self.value_scales] if self.int8 else [])

    def _write(self, layer: int, put, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self.int8:
            put(self.keys[layer], k)
            put(self.values[layer], v)
            return
        for stored, scales, new in ((self.keys[layer], self.key_scales[layer], k),
                                    (self.values[layer], self.value_scales[layer], v)):
            quantized, scale = quantize_vectors(new)
            put(stored, quantized)
            put(scales, scale)

    def _read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
        if not self.int8:
            return keys, values
        return (dequantize_vectors(keys, self.key_scales[layer][:, :, :end]),
                dequantize_vectors(values, self.value_scales[layer][:, :, :end]))
