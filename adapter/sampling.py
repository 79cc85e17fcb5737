"""Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p, a repetition penalty (CTRL's, over
prompt and answer), OpenAI's presence and frequency penalties (over the answer's tokens so far) and its logit bias."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

MAX_SEED = 2**63 - 1  # torch's generators take unsigned 64-bit seeds: room left for a request's seed + j of n


def seed_problem(seed: object) -> str | None:
    """What is wrong with a seed (None when it is a whole number from 0 to MAX_SEED, or None itself)."""
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED):
        return None
    return f"must be a whole number from 0 to {MAX_SEED}, got {seed!r}"


def logit_bias_pairs(value: Mapping[Any, Any] | Sequence[Any],
                     bound: float = math.inf) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias ({"token id": bias}: JSON's keys are texts, its biases may be whole numbers) or
    (token id, bias) pairs, as sorted (int, float) pairs; each bias finite and within +-bound."""
    within = f" from -{bound:g} to {bound:g}" if math.isfinite(bound) else ""
    pairs = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = tuple(sorted((int(token) if isinstance(token, str) and token.isdigit() else token,
                              float(bias) if type(bias) is int else bias) for token, bias in pairs))
    except (TypeError, ValueError):
        pairs = None
    if pairs is None or not all(type(token) is int and token >= 0 and type(bias) is float and math.isfinite(bias)
                                and -bound <= bias <= bound for token, bias in pairs):
        raise ValueError(f"logit_bias: expected {{token id: bias{within}}} or (token id, bias) pairs, got "
                         f"{value!r:.80}")
    if twice := sorted({token for (token, _), (following, _) in zip(pairs, pairs[1:]) if token == following}):
        raise ValueError(f"logit_bias: token id {twice[0]} is given more than once (\"5\" and \"05\" are one "
                         "token): give each once")  # (the biases were added up, past the bound)
    return pairs


@dataclass(frozen=True)
class SamplingParams:
    """Defaults are those of the official LLaMA-Adapter demos (temperature 0.1, top-p 0.75)."""

    temperature: float = 0.1
    top_p: float = 0.75
    top_k: int = 0
    min_p: float = 0.0  # keep the tokens at least this times as likely as the likeliest (0: off)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, added to its logit); OpenAI's {"token id": bias} is read into such pairs (logit_bias_pairs)
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            if isinstance(getattr(self, name), bool):  # True is an int to Python: top_k=True failed in torch.topk
                raise ValueError(f"{name}: expected a number, got {getattr(self, name)!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < math.inf):
            raise ValueError(f"temperature: must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k: must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1):
            raise ValueError(f"min_p: must be in [0, 1] (0 = off), got {self.min_p!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and 0 < self.repetition_penalty < math.inf):
            raise ValueError(f"repetition_penalty: must be a finite number > 0 (1 = off), got "
                             f"{self.repetition_penalty!r}")
        object.__setattr__(self, "logit_bias", logit_bias_pairs(self.logit_bias))
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and -2 <= value <= 2):
                raise ValueError(f"{name}: must be between -2 and 2 (0 = off), got {value!r}")

    @property
    def counts_answer(self) -> bool:
        """Whether sampling needs how often each token was already chosen."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token already in the row: positive logits divided, negative multiplied."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def penalize_answer(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties: each token's logit less `frequency` times the times it was chosen, and less `presence`
    once if it was."""
    if presence == 0 and frequency == 0:
        return logits
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Next token id per row from logits [B, vocab]; `seen` [B, vocab] marks tokens already in each row (prompt
    and answer), `counts` [B, vocab] how often each was chosen in the answer so far. `generator` may be one per
    row: each row then draws from its own, so a row's tokens do not depend on the rows beside it (a seeded answer
    is the same in any batch)."""
    logits = logits.float()
    if not math.isfinite(logits.amax()):  # NaN or inf (NaN weights, a gate scale too large for the dtype):
        # sampled from, torch.multinomial raised from deep inside; greedy, the first token was taken, nothing said
        raise ValueError("logits: the model's scores for the next token are not finite (NaN or inf): its weights "
                         "hold some, or the gate or delta scale is too large for its dtype")
    if seen is not None:
        logits = penalize_repeats(logits, seen, params.repetition_penalty)
    if counts is not None:
        logits = penalize_answer(logits, counts, params.presence_penalty, params.frequency_penalty)
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias)
        logits = logits.index_add(1, torch.tensor(ids, device=logits.device),
                                  torch.tensor(biases, device=logits.device).expand(logits.shape[0], -1))
    if params.greedy:
        return logits.argmax(dim=-1)
    # from the row's largest logit down: a tiny temperature (or a tiny repetition penalty's division) made
    # them overflow to inf, and softmax of inf is nan
    logits = logits.clamp(max=torch.finfo(logits.dtype).max)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:  # as vLLM, llama.cpp and transformers: relative to the likeliest, after the temperature
        probs = probs.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest set whose mass reaches top_p (the most likely token is always kept); drawn in
        # vocabulary order, not sorted order, so two near-equal tokens whose order flips with the last bit of
        # rounding (a row padded in a batch) do not swap which one a seeded draw picks
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p  # reached before this token
        probs = probs.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), 0.0)
    return _draw(probs, generator)[:, 0]


def _draw(weights: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """One index per row [B, 1], drawn in proportion to `weights` [B, vocab]."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(weights, 1, generator=generator)
    if len(generator) != weights.shape[0]:
        raise ValueError(f"generator: {len(generator)} given for a batch of {weights.shape[0]} rows")
    return torch.cat([torch.multinomial(weights[row:row + 1], 1, generator=own) for row, own in enumerate(generator)])
