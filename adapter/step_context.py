"""What every layer needs to know about the current forward call (shared by the model and the static step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .kv_cache import KVCache
    from .static_decode import SlotView


@dataclass
class StepContext:
    """What every layer needs to know about the current forward call."""

    rope: torch.Tensor  # complex [T, D/2] or [B, T, D/2], see rope_table
    gate_scale: torch.Tensor  # [] or [B, 1, 1, 1], or [L, B|1, H|1, 1, 1] per adapter layer (see _gate_for_rows)
    delta_scale: torch.Tensor  # [] or [B, 1, 1]
    attn_mask: torch.Tensor | None = None  # bool [B, 1, T, S], True = may attend
    is_causal: bool = False
    cache: KVCache | SlotView | None = None  # where keys/values are stored (SlotView: a static step's)
    start: int = 0
    fused: bool = False  # decoding without gradients: stacked projections (adapter.fused), one-call norms
    fp32_attention: bool = False  # see Transformer.fp32_attention
