"""Choosing the next token from logits: greedy, temperature, top-k, top-p and a repetition penalty."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Defaults are those of the official LLaMA-Adapter demos (temperature 0.1, top-p 0.75)."""

    temperature: float = 0.1
    top_p: float = 0.75
    top_k: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k: must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty: must be > 0 (1 = off), got {self.repetition_penalty!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token already in the row: positive logits divided, negative multiplied."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Next token id per row from logits [B, vocab]; `seen` [B, vocab] marks tokens already in each row.
    `generator` may be one per row: each row then draws from its own, so a row's tokens do not depend on the
    rows beside it (a seeded answer is the same in any batch)."""
    logits = logits.float()
    if seen is not None:
        logits = penalize_repeats(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest set whose mass reaches top_p (the most likely token is always kept)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        return order.gather(-1, _draw(sorted_probs, generator))[:, 0]
    return _draw(probs, generator)[:, 0]


def _draw(weights: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """One index per row [B, 1], drawn in proportion to `weights` [B, vocab]."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(weights, 1, generator=generator)
    if len(generator) != weights.shape[0]:
        raise ValueError(f"generator: {len(generator)} given for a batch of {weights.shape[0]} rows")
    return torch.cat([torch.multinomial(weights[row:row + 1], 1, generator=own) for row, own in enumerate(generator)])
