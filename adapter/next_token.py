"""The next token's probabilities at several gate scales: which tokens the adaption prompts make likelier.

The prompt is fed once, with one row per gate scale, through the same `Transformer.step` that generation
starts with, so each row's distribution is the one the first answer token is drawn from (shown at
temperature 1, before top-p/top-k). Each scale's `top_k` likeliest tokens are kept, together, so a token
that only one scale favours still shows how likely every other scale finds it.

Command line: `python -m adapter.generate ... --next-tokens K [--gate-sweep S,S,...]`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .gate_layers import Speaker, gate_scale_rows
from .generate import check_room, prompt_writer, require_tokenizer
from .prompt_ids import Answer, Prompt
from .token_logprob import MAX_ALTERNATIVES, TokenLogprob, scored_tokens, token_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .model import Transformer

MAX_TOP_K = 50
OTHERS = "(all others)"


@dataclass(frozen=True)
class NextTokens:
    """The shown tokens' probabilities [token][scale], likeliest first (by their highest over the scales)."""

    gate_scales: list[float]
    ids: list[int]
    texts: list[str]  # each token as it reads on its own (Tokenizer.token_text)
    probabilities: list[list[float]]

    def others(self) -> list[float]:
        """Per scale, the probability of every token not shown."""
        return [max(0.0, 1.0 - sum(column)) for column in zip(*self.probabilities)]

    def headers(self) -> list[str]:
        return ["token", *(f"gate {scale:g}" for scale in self.gate_scales)]

    def rows(self) -> list[list[Any]]:
        """Table rows: the token quoted (so a leading space or a newline shows), then % per scale; last, the rest."""
        shown = [[quoted(text), *(round(100 * p, 2) for p in row)] for text, row in zip(self.texts, self.probabilities)]
        return [*shown, [OTHERS, *(round(100 * p, 2) for p in self.others())]]

    def table(self) -> str:
        """The rows as aligned text (percentages), for a terminal."""
        lines = [self.headers(), *([row[0], *(f"{value:.2f}%" for value in row[1:])] for row in self.rows())]
        widths = [max(len(str(line[column])) for line in lines) for column in range(len(lines[0]))]
        return "\n".join("  ".join(str(cell).ljust(width) if column == 0 else str(cell).rjust(width)
                                   for column, (cell, width) in enumerate(zip(line, widths))).rstrip()
                         for line in lines)

    def figure(self, lines: int = 8) -> Figure:
        """Each of the `lines` likeliest tokens' probability against the gate scale (Agg canvas, nothing kept
        in pyplot's registry, as adapter.gate_view draws)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        drawn = Figure(figsize=(8, 3.6), dpi=100)
        FigureCanvasAgg(drawn)
        axis = drawn.add_subplot()
        for text, row in list(zip(self.texts, self.probabilities))[:lines]:
            axis.plot(self.gate_scales, [100 * p for p in row], marker="o", label=quoted(text))
        axis.set(xlabel="gate scale", ylabel="probability of the next token, %", ylim=(0, 105))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        drawn.tight_layout()
        return drawn


def quoted(text: str) -> str:
    """A token's text in double quotes with escapes, so spaces and newlines are visible."""
    return json.dumps(text, ensure_ascii=False)


def next_tokens(
    model: Transformer,
    prompt: str,
    gate_scales: Sequence[float] = (0.0, 1.0),
    *,
    delta_scale: float = 1.0,
    top_k: int = 5,
    image: Any = None,
    template: str | None = None,
    system: str | None = None,
    layers: Sequence[Speaker] | None = None,
) -> NextTokens:
    """The next token's distribution after `prompt` at each gate scale (one batch row each), its `top_k`
    likeliest tokens per scale kept. `template`/`system` write the prompt as `adapter.generate` does (None: fed
    as given after BOS); `image` is asked about through the visual prompt, encoded once for all rows; with
    `layers`, only those adapter layers' prompts speak (adapter.gate_layers)."""
    tokenizer = require_tokenizer(model)
    if not isinstance(prompt, str):
        raise ValueError(f"prompt: expected a string, got {type(prompt).__name__}")
    scales = _checked_scales(gate_scales)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k: must be a whole number from 1 to {MAX_TOP_K}, got {top_k!r}")
    written = prompt_writer(model, template, system)
    ids = tokenizer.encode(prompt if written is None else written.instruction(prompt, system=system), bos=True)
    if not ids:
        raise ValueError("prompt: empty prompt (no tokens to start from)")
    if len(ids) > model.args.max_seq_len:
        raise ValueError(f"prompt: {len(ids)} tokens do not fit max_seq_len={model.args.max_seq_len}")
    rows = len(scales)
    device = model.tok_embeddings.weight.device
    with torch.inference_mode():
        visual = None
        if image is not None:
            from .visual import encode_images

            visual = encode_images(model, [image]).expand(rows, -1, -1).contiguous()
        cache = model.new_cache(rows, len(ids), visual_prompt=visual)
        tokens = torch.tensor([ids] * rows, device=device)
        gate_scale = gate_scale_rows(model, scales, layers)
        probabilities = model.step(tokens, cache, gate_scale=gate_scale, delta_scale=delta_scale).float().softmax(-1)
    probabilities = probabilities.cpu()
    kept = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1).indices.unique().tolist()
    kept.sort(key=lambda token: (-float(probabilities[:, token].max()), token))
    return NextTokens(gate_scales=scales, ids=kept, texts=[token_text(tokenizer, token) for token in kept],
                      probabilities=probabilities[:, kept].T.tolist())


def _checked_scales(gate_scales: Sequence[float]) -> list[float]:
    if isinstance(gate_scales, (str, bytes)) or not isinstance(gate_scales, Sequence) or not gate_scales:
        raise ValueError(f"gate_scales: expected a non-empty list of numbers, got {gate_scales!r}")
    for scale in gate_scales:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < math.inf:
            raise ValueError(f"gate_scales: {scale!r} is not a finite number >= 0")
    return [float(scale) for scale in gate_scales]


def answer_logprobs(model: Transformer, prompt: Prompt, answer: Answer, gate_scale: Any = 1.0,
                    delta_scale: float = 1.0, image: Any = None, top_k: int = 0) -> list[TokenLogprob]:
    """Each token of `answer` (a text, or the token ids decoded) after `prompt` (a text after BOS, or token ids)
    with its log-probability under the model at these scales (temperature 1: the distribution it is drawn from,
    before top-p), and the `top_k` likeliest tokens at its place: one forward over prompt + answer, the head run at
    the answer's places only."""
    from .gate_view import answer_tokens

    prompt_ids, answer_ids = answer_tokens(model, prompt, answer)
    check_room(len(prompt_ids), model.args.max_seq_len)  # else [] came back, read as an empty answer
    return token_logprobs(model, prompt_ids + answer_ids, len(prompt_ids), gate_scale, delta_scale, image, top_k)


def text_logprobs(model: Transformer, prompt: Prompt, answer: Answer = "", gate_scale: Any = 1.0,
                  delta_scale: float = 1.0, top_k: int = 0) -> list[TokenLogprob | None]:
    """Every token of `prompt` and of `answer` after it with its log-probability given the tokens before it, as
    `answer_logprobs` (how a text is scored: the legacy completions API's `echo`). A text prompt is read after BOS,
    token ids as they are; None stands for a first token with nothing before it (no BOS, or token ids)."""
    from .gate_view import answer_tokens

    prompt_ids, answer_ids = answer_tokens(model, prompt, answer)
    scored = token_logprobs(model, prompt_ids + answer_ids, 1, gate_scale, delta_scale, None, top_k)
    return scored if isinstance(prompt, str) and model.tokenizer.bos_id >= 0 else [None, *scored]


def token_logprobs(model: Transformer, ids: list[int], start: int, gate_scale: Any = 1.0, delta_scale: float = 1.0,
                   image: Any = None, top_k: int = 0) -> list[TokenLogprob]:
    """The tokens `ids[start:]` (start >= 1) each with its log-probability given the tokens before it, and the
    `top_k` likeliest at its place: one forward, the head run at those places only."""
    from .gate_view import visual_prompt_of

    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= MAX_ALTERNATIVES:
        raise ValueError(f"top_k: must be a whole number from 0 to {MAX_ALTERNATIVES}, got {top_k!r}")
    if start < 1:
        raise ValueError(f"start: the first token scored needs one before it (start >= 1), got {start}")
    if start >= len(ids):
        return []
    device = model.tok_embeddings.weight.device
    tokens = torch.tensor([ids], device=device)
    places = torch.zeros_like(tokens, dtype=torch.bool)
    places[0, start - 1: len(ids) - 1] = True  # each predicts the next token
    with torch.inference_mode():
        logits = model(tokens, gate_scale=gate_scale, delta_scale=delta_scale, positions=places,
                       visual_prompt=visual_prompt_of(model, None if image is None else [image]))
    return scored_tokens(model.tokenizer, torch.log_softmax(logits.float(), dim=-1), ids[start:], top_k)
