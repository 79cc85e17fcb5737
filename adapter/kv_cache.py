"""Preallocated key/value storage for one generation request.

Besides the usual per-layer keys/values of the text, it holds the adaption prompts' keys/values: they
depend only on the prompt (and the image), so they are computed once per request and reused each step.
"""

from __future__ import annotations

import torch


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
    ) -> None:
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
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
        """Write this step's keys/values at `start` and return every key/value so far (views, no copy)."""
        end = start + k.shape[2]
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]
