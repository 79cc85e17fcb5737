"""Making the gates visible: a heatmap of the effective gates, and how much of each answer token (and in each
adapter layer) came through the adaption prompts (the per-token share `Transformer.step(..., record=...)`
reports).

Figures are drawn on matplotlib's Agg canvas directly: no display, no global backend, nothing kept alive
in pyplot's registry between requests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .hub import is_remote
from .prompt_ids import Answer, Prompt, checked_ids, is_token_ids
from .prompt_ids import prompt_ids as read_prompt
from .text_stream import TextStream

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .model import ScaleLike, Transformer

GATE_PLOT = "gates.png"


def draw_gates(gates: torch.Tensor, first_layer: int, scale: float, speaking: str | None = None) -> Figure:
    """Heatmap of `gates` [prompt_layers, n_heads]; the colour range is symmetric around zero. `speaking` names
    the layers whose prompts speak when not all do."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if gates.numel() == 0:
        axes.text(0.5, 0.5, "this model has no adaption prompts (no gates)", ha="center", va="center")
        axes.set_axis_off()
        return figure
    values = gates.numpy()
    limit = max(float(abs(values).max()), 1e-6)
    image = axes.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_xticks(range(values.shape[1]))
    axes.set_yticks(range(values.shape[0]), [str(first_layer + i) for i in range(values.shape[0])])
    axes.set_title(f"effective gates at gate scale {scale:g}" + ("" if speaking is None else
                                                                  f", only layers {speaking} speaking"))
    figure.colorbar(image, ax=axes, label="gate")
    figure.tight_layout(rect=(0, 0, 1, 0.9))  # room above for the label the app draws over the plot
    return figure


@dataclass(frozen=True)
class PromptShares:
    """How much of the attention output came through the adaption prompts while an answer was chosen."""

    pieces: list[tuple[str, float]]  # each piece of the answer and its share, averaged over the adapter layers
    layers: list[int]  # the adapter layers (the base's layer numbers)
    per_layer: list[float]  # each adapter layer's share, averaged over the answer's tokens

    def figure(self) -> Figure:
        """A bar per adapter layer: where the prompts spoke."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6.0, 2.6), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        axes.bar([str(layer) for layer in self.layers], [100 * share for share in self.per_layer], color="#c0392b")
        axes.set(xlabel="adapter layer", ylabel="% through the prompts", ylim=(0, 100))
        figure.tight_layout(rect=(0, 0, 1, 0.88))  # room above for the label the app draws over the plot
        return figure


def prompt_shares(model: Transformer, prompt: str, answer: str, gate_scale: ScaleLike, delta_scale: float,
                  images: list[Any] | None = None) -> PromptShares:
    """The answer's prompt shares, from one no-grad forward over prompt + answer.

    A token's share is that of the position that predicted it (the one before it): how much of the attention
    output came through the prompts when it was chosen, per adapter layer; a piece's share is its tokens' mean
    over the layers (byte-fallback tokens of one character merged into one piece), a layer's its mean over the
    answer's tokens.
    """
    tokenizer = model.tokenizer
    layers = list(range(model.first_prompt_layer, model.args.n_layers)) if model.adapter_query is not None else []
    prompt_ids, answer_ids = answer_tokens(model, prompt, answer)
    if not answer_ids:
        return PromptShares([], layers, [0.0] * len(layers))
    tokens = torch.tensor([prompt_ids + answer_ids], device=model.tok_embeddings.weight.device)
    record: list[torch.Tensor] = []
    with torch.inference_mode():
        visual = visual_prompt_of(model, images)
        cache = model.new_cache(1, tokens.shape[1], visual_prompt=visual)
        model.step(tokens, cache, gate_scale=gate_scale, delta_scale=delta_scale, record=record)
    if not record:
        return PromptShares(_pieces(tokenizer, answer_ids, [0.0] * len(answer_ids)), layers, [])
    chosen = torch.stack(record).float()[:, 0, len(prompt_ids) - 1: len(prompt_ids) - 1 + len(answer_ids)].cpu()
    return PromptShares(_pieces(tokenizer, answer_ids, chosen.mean(0).tolist()), layers, chosen.mean(1).tolist())


def answer_tokens(model: Transformer, prompt: Prompt, answer: Answer) -> tuple[list[int], list[int]]:
    """The ids of `prompt` (a text after BOS, or token ids as given) and of `answer` after it (a text, or the token
    ids decoded), the answer cut to what the context holds."""
    prompt_ids = read_prompt(model.tokenizer, prompt, model.args.vocab_size)
    if not isinstance(answer, str) and not is_token_ids(answer):
        raise ValueError(f"answer: expected a text or a list of token ids, got {answer!r:.80}")
    answer_ids = model.tokenizer.encode(answer, bos=False, eos=False) if isinstance(answer, str) else \
        checked_ids(answer, model.args.vocab_size, "answer")
    return prompt_ids, answer_ids[: max(0, model.args.max_seq_len - len(prompt_ids))]


def visual_prompt_of(model: Transformer, images: list[Any] | None) -> torch.Tensor | None:
    """The visual prompt of `images` (one per batch row), None without any."""
    if not images:
        return None
    from .visual import encode_images

    return encode_images(model, images)


def _pieces(tokenizer, ids: list[int], shares: list[float]) -> list[tuple[str, float]]:
    stream = TextStream(tokenizer)
    pieces, pending = [], []
    for token, share in zip(ids, shares):
        pending.append(share)
        piece = stream.push(token)
        if piece:
            pieces.append((piece, sum(pending) / len(pending)))
            pending = []
    tail = stream.finish()
    if tail and pending:
        pieces.append((tail, sum(pending) / len(pending)))
    return pieces


def find_gate_plot(adapter: str | os.PathLike | None) -> Path | None:
    """The `gates.png` that `adapter.finetune` writes into its run folder (the adapter's folder or the one
    above it), if present."""
    if adapter is None or is_remote(adapter):
        return None
    path = Path(adapter)
    folder = path if path.is_dir() else path.parent
    for candidate in (folder / GATE_PLOT, folder.parent / GATE_PLOT):
        if candidate.is_file():
            return candidate
    return None
