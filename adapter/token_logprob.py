"""A token's log-probability and the likeliest tokens at its place: what scoring a text (adapter.next_token) and a
decode asked for log-probabilities (adapter.generate's `logprobs`) both return, built one way."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

MAX_ALTERNATIVES = 50  # the likeliest tokens kept beside a token's own, scored or decoded


@dataclass(frozen=True)
class TokenLogprob:
    """One answer token: its text, its log-probability, and the likeliest tokens at its place with theirs; the
    bytes each adds to a text beside (`data`, `top_data`: a byte token's one byte, where its text names it)."""

    text: str
    logprob: float
    top: list[tuple[str, float]]
    data: bytes
    top_data: list[bytes]


def token_text(tokenizer: Any, token: int) -> str:
    """A token's text; ids past the tokenizer's (a model whose vocabulary is padded) by their number."""
    return tokenizer.token_text(token) if token < tokenizer.n_words else f"<id {token}>"


def token_bytes(tokenizer: Any, token: int) -> bytes:
    """The bytes a token adds to a text (`Tokenizer.token_bytes`); an id past the tokenizer's adds none."""
    return tokenizer.token_bytes(token) if token < tokenizer.n_words else b""


def scored_tokens(tokenizer: Any, logprobs: torch.Tensor, tokens: Sequence[int],
                  top_k: int | Sequence[int]) -> list[TokenLogprob]:
    """Each of `tokens` with its log-probability in the matching row of `logprobs` ([rows, vocab], log-softmaxed)
    and that row's `top_k` likeliest tokens (one count for every row, or one per row)."""
    counts = [top_k] * len(tokens) if isinstance(top_k, int) else list(top_k)
    logprobs = logprobs.float()  # picked where they are (a GPU's), only the few numbers kept come over
    picked = torch.as_tensor(list(tokens), dtype=torch.long, device=logprobs.device)
    chosen = logprobs.gather(-1, picked[:, None])[:, 0].tolist()
    top_values, top_ids = (part.tolist() for part in logprobs.topk(max(counts, default=0), dim=-1))
    return [TokenLogprob(token_text(tokenizer, token), value,
                         [(token_text(tokenizer, i), v) for v, i in zip(values[:k], ids[:k])],
                         token_bytes(tokenizer, token), [token_bytes(tokenizer, i) for i in ids[:k]])
            for token, value, values, ids, k in zip(tokens, chosen, top_values, top_ids, counts)]
