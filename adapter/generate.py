"""Generation: prefill once, decode step by step with a KV cache, stream text pieces.

Prompts of different lengths are left-padded into one batch; each row keeps its own positions, so a row
gives the same tokens as when generated alone (rows whose answers would get less room beside a long prompt
than alone are decoded after it: `fitting_groups`). Each row can carry its own gate scale, which is how gate 0
(the frozen base) and gate s are answered side by side in one batch.

Command line: `python -m adapter.generate --base DIR [--adapter FILE ...] --prompt TEXT ...` (several adapters
answer in turn, on one shared base, one block each).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .arg_types import refused, unicode_output
from .finetune.records import DATA_HELP
from .formats import BASE_HELP
from .formats.common import check_file_target
from .gate_layers import (
    FLAG_HELP,
    LAYER_SWEEP_ROWS,
    Speaker,
    gate_scale_rows,
    layer_sweep_rows,
    layers_from_flag,
    speaking,
)
from .kv_cache import KV_CACHE_DTYPES
from .prompt_ids import Prompt, checked_ids, is_token_ids, prompt_ids
from .prompts import TEMPLATES, PromptFormat, apply_template, template_format
from .sampling import SamplingParams, sample, seed_problem
from .sampling_flags import add_sampling_flags, sampling_flags
from .text_stream import TextStream
from .token_logprob import MAX_ALTERNATIVES, TokenLogprob, scored_tokens

if TYPE_CHECKING:
    from .answer_file import Question
    from .model import Transformer
    from .tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one call needs besides the prompts, validated once.

    `compile` runs the decode steps through torch.compile (see `Transformer.step`): faster steps after a
    first, slow compilation, so it pays off for long answers or a server that keeps the model. `logprobs`, when
    given, keeps each token decoded with its log-probability and that many likeliest tokens at its place (the
    distribution at temperature 1 that the step drew from, before top-p: as `adapter.next_token.answer_logprobs`
    scores an answer afterwards, but as it streams). As vLLM's, `stop_token_ids` end an answer beside the
    tokenizer's ends (its EOS, a prompt format's end of turn), `ignore_eos` decodes on past the latter (to
    `max_new_tokens`: what serving benchmarks ask), and `min_tokens` keeps both from being drawn before that many
    tokens (stop strings still end an answer).
    """

    max_new_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    seed: int | None = None
    compile: bool = False
    logprobs: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not (isinstance(self.max_new_tokens, int) and
                                                          self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens: must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile: must be True or False, got {self.compile!r}")
        if (problem := seed_problem(self.seed)) is not None:
            raise ValueError(f"seed: {problem}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_ALTERNATIVES):
            raise ValueError(f"logprobs: must be a whole number from 0 to {MAX_ALTERNATIVES} (the likeliest tokens "
                             f"kept beside each token's own) or None, got {self.logprobs!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or \
                not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens: must be a whole number from 0 to max_new_tokens ({self.max_new_tokens}), "
                             f"got {self.min_tokens!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos: must be True or False, got {self.ignore_eos!r}")
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(type(i) is int and i >= 0 for i in ids):
            raise ValueError(f"stop_token_ids: expected a list of token ids, got {ids!r:.80}")
        object.__setattr__(self, "stop_token_ids", tuple(ids))

    def ends(self, token: int, end_ids: Collection[int]) -> bool:
        """Whether `token` ends the answer: one of `stop_token_ids`, or of the tokenizer's `end_ids` unless
        `ignore_eos`."""
        return ends_answer(token, end_ids, self.ignore_eos, self.stop_token_ids)


def ends_answer(token: int, end_ids: Collection[int], ignore_eos: bool = False,
                stop_token_ids: Collection[int] = ()) -> bool:
    """Whether a decoded `token` ends its answer (GenerationRequest.ends), for whoever reads a decode afterwards."""
    return token in stop_token_ids or (not ignore_eos and token in end_ids)


def _request(
    written: PromptFormat | None,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.1,
    top_p: float = 0.75,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: Mapping[int | str, float] | Sequence[tuple[int, float]] = (),
    stop: Sequence[str] | str | None = None,
    seed: int | None = None,
    compile: bool = False,
    logprobs: int | None = None,
    min_tokens: int = 0,
    ignore_eos: bool = False,
    stop_token_ids: Sequence[int] = (),
) -> GenerationRequest:
    stops = () if stop is None else (stop,) if isinstance(stop, str) else \
        tuple(stop) if isinstance(stop, (list, tuple)) else stop
    if not isinstance(stops, tuple) or not all(isinstance(text, str) and text for text in stops):
        raise ValueError(f"stop: expected a string or a list of non-empty strings, got {stop!r:.80}")
    if written is not None:
        stops = stops + written.stop_strings
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                              repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                              frequency_penalty=frequency_penalty, logit_bias=logit_bias)
    return GenerationRequest(max_new_tokens=max_new_tokens, sampling=sampling, stop=stops, seed=seed, compile=compile,
                             logprobs=logprobs, min_tokens=min_tokens, ignore_eos=ignore_eos,
                             stop_token_ids=stop_token_ids)


def decode_tokens(
    model: "Transformer",
    prompts: Sequence[Sequence[int]],
    request: GenerationRequest | Sequence[GenerationRequest],
    *,
    gate_scale: Any = None,
    delta_scale: Any = None,
    visual_prompt: torch.Tensor | None = None,
    finished: list[bool] | None = None,
    scored: list[TokenLogprob | None] | None = None,
) -> Iterator[list[int]]:
    """Yield the next token id of every row, step by step.

    `request` is the batch's, or one per row: each row then samples with its own settings and seed (requests
    of several users decoded together; the first's `compile` is the batch's). The caller marks rows done in
    `finished` (EOS, stop string, its own length); the loop ends when all are, at the longest `max_new_tokens`,
    or when the sequence reaches the model's `max_seq_len`. `scored`, one place per row, holds at each yield the
    token's log-probability of every row whose request asks `logprobs` (None for the others).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompt: empty prompt (no tokens to start from)")
    limit = model.args.max_seq_len
    longest = max(len(p) for p in prompts)
    check_room(longest, limit)
    batch = len(prompts)
    requests = [request] * batch if isinstance(request, GenerationRequest) else list(request)
    if len(requests) != batch:
        raise ValueError(f"request: {len(requests)} given for {batch} prompts")
    finished = [False] * batch if finished is None else finished
    if scored is not None and len(scored) != batch:
        raise ValueError(f"scored: {len(scored)} places given for {batch} prompts")
    scoring = [row for row, r in enumerate(requests) if r.logprobs is not None] if scored is not None else []
    device = model.tok_embeddings.weight.device
    total = min(limit, longest + max(r.max_new_tokens for r in requests))
    tokens = torch.zeros(batch, longest, dtype=torch.long)
    for row, ids in enumerate(prompts):
        tokens[row, longest - len(ids):] = torch.as_tensor(list(ids), dtype=torch.long)
    pad = torch.tensor([longest - len(p) for p in prompts])
    tokens = tokens.to(device)
    # one generator per row: a seeded row samples as it would alone, whatever rows are beside it
    generators = [None if r.seed is None else torch.Generator(device=device).manual_seed(r.seed) for r in requests]
    seen = None
    if any(r.sampling.repetition_penalty != 1.0 for r in requests):
        seen = torch.zeros(batch, model.args.vocab_size, dtype=torch.bool, device=device)
        for row, ids in enumerate(prompts):
            seen[row, torch.as_tensor(list(ids), device=device)] = True
    counts = None  # each row's answer tokens so far, for OpenAI's presence and frequency penalties
    if any(r.sampling.counts_answer for r in requests):
        counts = torch.zeros(batch, model.args.vocab_size, dtype=torch.float32, device=device)
    scales = {"gate_scale": gate_scale, "delta_scale": delta_scale}
    end_ids = set(getattr(getattr(model, "tokenizer", None), "stop_ids", ()))
    # per row, the ids `min_tokens` holds back: gathered once, not at every step
    held_ids = [torch.tensor(sorted({*end_ids, *r.stop_token_ids}), dtype=torch.long, device=device)
                if r.min_tokens else None for r in requests]
    with torch.inference_mode():
        cache = model.new_cache(batch, total, pad=pad, visual_prompt=visual_prompt)
        logits = model.step(tokens, cache, **scales)
    new_tokens = total - longest
    for index in range(new_tokens):
        with torch.inference_mode():
            next_ids = _sample_rows(_ends_held_back(logits, requests, index, held_ids), requests, seen, counts,
                                    generators)
        if seen is not None:
            seen[torch.arange(batch, device=device), next_ids] = True
        if counts is not None:
            counts[torch.arange(batch, device=device), next_ids] += 1
        chosen = next_ids.tolist()
        if scoring:
            with torch.inference_mode():
                logprobs = torch.log_softmax(logits[scoring].float(), dim=-1)
            entries = scored_tokens(model.tokenizer, logprobs, [chosen[row] for row in scoring],
                                    [requests[row].logprobs for row in scoring])
            scored[:] = [None] * batch
            for row, entry in zip(scoring, entries):
                scored[row] = entry
        yield chosen
        if all(finished) or index == new_tokens - 1:
            return
        with torch.inference_mode():
            logits = model.step(next_ids[:, None], cache, compile=requests[0].compile, **scales)


def _ends_held_back(logits: torch.Tensor, requests: list[GenerationRequest], index: int,
                    held_ids: list[torch.Tensor | None]) -> torch.Tensor:
    """`logits` with the ids that would end a row's answer (`held_ids`, per row) out of reach while it has fewer
    than its `min_tokens` (the `index`-th token is being drawn)."""
    held = [row for row, request in enumerate(requests) if index < request.min_tokens]
    if not held:
        return logits
    logits = logits.clone()
    for row in held:
        logits[row, held_ids[row]] = float("-inf")
    return logits


def check_room(prompt_tokens: int, limit: int) -> None:
    """That a prompt of `prompt_tokens` leaves its answer room for a token within the context's `limit`."""
    if prompt_tokens >= limit:
        raise ValueError(f"prompt: {prompt_tokens} tokens do not fit max_seq_len={limit} (need room for one more)")


def fits_together(lengths: Sequence[int], max_new_tokens: Sequence[int], limit: int) -> bool:
    """Whether prompts of `lengths` tokens decoded as one batch each get the room for their answer they get alone
    (`max_new_tokens` each, within the context's `limit`): a batch pads to its longest prompt, and the context
    holds that length for every row."""
    longest = max(lengths)
    return all(min(new, limit - length) <= limit - longest for length, new in zip(lengths, max_new_tokens))


def _sample_rows(logits: torch.Tensor, requests: list[GenerationRequest], seen: torch.Tensor | None,
                 counts: torch.Tensor | None, generators: list[torch.Generator | None]) -> torch.Tensor:
    """The next token of each row, all rows at once when they share their sampling settings."""
    own = None if all(g is None for g in generators) else generators
    if all(r.sampling == requests[0].sampling for r in requests):
        return sample(logits, requests[0].sampling, seen=seen, counts=counts, generator=own)
    return torch.cat([sample(logits[row:row + 1], r.sampling, seen=None if seen is None else seen[row:row + 1],
                             counts=None if counts is None else counts[row:row + 1],
                             generator=None if own is None else [own[row]]) for row, r in enumerate(requests)])


def stream_batch(
    model: "Transformer",
    prompts: Sequence[Prompt],
    *,
    images: Sequence[Any] | None = None,
    template: str | None = None,
    system: str | None = None,
    gate_scale: Any = None,
    delta_scale: Any = None,
    rows: Sequence[dict[str, Any]] | None = None,
    generated: Sequence[list[int]] | None = None,
    scores: Sequence[list[TokenLogprob]] | None = None,
    finished: list[bool] | None = None,
    continued: bool = False,
    max_cached_tokens: int | None = None,
    **options: Any,
) -> Iterator[list[str]]:
    """For each step, the new text piece of every row (empty for rows that are done).

    A prompt is a text or token ids fed as they are (adapter.prompt_ids). `images` gives one image (path, PIL
    image, array) or None per prompt; each image is encoded once and
    its visual prompt reaches every adapter layer through the gated prompt path. `template` writes each
    prompt in a prompt format ("auto": the adapter's own, see adapter.prompts), after the `system` prompt
    when given (chat formats only); None feeds them as given. `rows` gives each row options of its own over
    `options` (temperature, top_p, seed, max_new_tokens, ...). `generated`, one list per prompt, is told every
    token its row generates (the stop id that ends it included, as OpenAI's legacy completions return it);
    `scores`, one list per prompt, each one's log-probability beside it, for the rows whose options ask `logprobs`
    (that many likeliest tokens with each).
    `finished`, one flag per prompt, is set as the step that yields a row's last piece is yielded (a stop id or
    string, its own length), before the batch ends: what lets a reader end that row's answer at once.
    `continued` reads each row's text as its prompt goes on (a raw continuation: " large" keeps its space, where
    an answer to a question starts at its first word). `max_cached_tokens` bounds the KV cache held at once (rows
    x their longest prompt and answer): rows beyond it decode in turns, a group after another (a row that alone
    needs more, alone), so that a gate sweep holds no more than the memory the app was sized for.
    """
    tokenizer = require_tokenizer(model)
    if isinstance(prompts, str):
        raise ValueError("prompts: expected a list of strings, got one string")
    if not prompts:
        raise ValueError("prompts: give at least one prompt")
    written = prompt_writer(model, template, system)
    if rows is not None and len(rows) != len(prompts):
        raise ValueError(f"rows: {len(rows)} given for {len(prompts)} prompts")
    if generated is not None and len(generated) != len(prompts):
        raise ValueError(f"generated: {len(generated)} lists given for {len(prompts)} prompts")
    if finished is not None and len(finished) != len(prompts):
        raise ValueError(f"finished: {len(finished)} flags given for {len(prompts)} prompts")
    if scores is not None and len(scores) != len(prompts):
        raise ValueError(f"scores: {len(scores)} lists given for {len(prompts)} prompts")
    requests = [_request(written, **{**options, **row}) for row in (rows or [{}] * len(prompts))]
    for request in requests:
        checked_ids([token for token, _ in request.sampling.logit_bias], model.args.vocab_size, "logit_bias")
        checked_ids(request.stop_token_ids, model.args.vocab_size, "stop_token_ids")
    visual_prompt = None
    if images is not None:
        if len(images) != len(prompts):
            raise ValueError(f"images: {len(images)} given for {len(prompts)} prompts (use None for no image)")
        if any(image is not None for image in images):
            from .visual import encode_images

            with torch.inference_mode():
                visual_prompt = encode_images(model, images)
    if written is not None and any(not isinstance(p, str) for p in prompts):
        raise ValueError("prompts: token ids are fed as they are; they take no template (a prompt format)")
    texts = [p if written is None else written.instruction(p, system=system) for p in prompts]
    ids = [prompt_ids(tokenizer, t, model.args.vocab_size, f"prompts[{i}]") for i, t in enumerate(texts)]
    streams = [TextStream(tokenizer, request.stop, row_ids if continued else ())
               for request, row_ids in zip(requests, ids)]
    finished = [False] * len(ids) if finished is None else finished
    for group in fitting_groups(ids, requests, model.args.max_seq_len, max_cached_tokens):
        done = [False] * len(group)
        scored: list[TokenLogprob | None] = [None] * len(group)
        for step, step_ids in enumerate(decode_tokens(
                model, [ids[row] for row in group], [requests[row] for row in group],
                gate_scale=_rows_of(gate_scale, group, len(ids)), delta_scale=_rows_of(delta_scale, group, len(ids)),
                visual_prompt=_rows_of(visual_prompt, group, len(ids)), finished=done,
                scored=None if scores is None else scored)):
            pieces = [""] * len(ids)
            for place, (row, token) in enumerate(zip(group, step_ids)):
                if done[place]:
                    continue
                if generated is not None:
                    generated[row].append(token)
                if scores is not None and scored[place] is not None:
                    scores[row].append(scored[place])
                if requests[row].ends(token, tokenizer.stop_ids):
                    pieces[row], done[place] = streams[row].finish(), True
                else:
                    pieces[row] = streams[row].push(token)
                    done[place] = streams[row].stopped
                    if not done[place] and step + 1 == requests[row].max_new_tokens:  # its own length reached
                        pieces[row], done[place] = pieces[row] + streams[row].finish(), True
                finished[row] = done[place]
            yield pieces
    tails = [("" if done else s.finish()) for s, done in zip(streams, finished)]
    if any(tails):
        yield tails


def fitting_groups(ids: Sequence[Sequence[int]], requests: Sequence[GenerationRequest], limit: int,
                   max_cached_tokens: int | None = None) -> list[list[int]]:
    """The rows decoded together: all at once where each answer gets the room it gets alone (`fits_together`)
    and their KV cache stays within `max_cached_tokens`; else, longest prompt first, groups that do, decoded one
    after another (a short prompt beside one that fills most of the context had its answer cut to the room the
    long one left)."""
    lengths, room = [len(row) for row in ids], [request.max_new_tokens for request in requests]
    everyone = list(range(len(ids)))
    if max(lengths, default=0) >= limit or (fits_together(lengths, room, limit) and
                                             cache_within(everyone, lengths, room, limit, max_cached_tokens)):
        return [everyone]  # (decode_tokens refuses a prompt that leaves no room)
    return list(fitting_batches(sorted(everyone, key=lambda row: -lengths[row]), lengths, room, limit,
                                max_cached_tokens=max_cached_tokens))


def fitting_batches(order: Sequence[int], lengths: Sequence[int] | Mapping[int, int],
                    room: Sequence[int] | Mapping[int, int], limit: int,
                    size: int | None = None, max_cached_tokens: int | None = None) -> Iterator[list[int]]:
    """The rows in `order`, consecutive ones batched together (up to `size`), a batch ending where the next row's
    answer would get less room beside it than alone (`fits_together`; `lengths` and `room` by row), or where the
    batch's KV cache would outgrow `max_cached_tokens`."""
    batch: list[int] = []
    for row in order:
        grown = [*batch, row]
        if batch and ((size is not None and len(grown) > size) or
                      not fits_together([lengths[r] for r in grown], [room[r] for r in grown], limit) or
                      not cache_within(grown, lengths, room, limit, max_cached_tokens)):
            yield batch
            grown = [row]
        batch = grown
    if batch:
        yield batch


def cache_within(rows: Sequence[int], lengths: Sequence[int] | Mapping[int, int],
                 room: Sequence[int] | Mapping[int, int], limit: int, max_cached_tokens: int | None) -> bool:
    """Whether `rows` decoded together hold a KV cache of at most `max_cached_tokens` tokens (None: any): each row
    holds the longest prompt and the longest answer, within the context's `limit` (decode_tokens' cache)."""
    if max_cached_tokens is None or not rows:
        return True
    longest = max(lengths[row] for row in rows) + max(room[row] for row in rows)
    return len(rows) * min(limit, longest) <= max_cached_tokens


def _rows_of(value: Any, group: list[int], batch: int) -> Any:
    """The rows `group` of a per-row value (a scale given one per row, a visual prompt); anything else (a
    number, a value the model will refuse) as it is."""
    if value is None or len(group) == batch:
        return value
    try:
        rows = value if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        return value
    return rows[group] if rows.dim() >= 1 and rows.shape[0] == batch else value


def prompt_writer(model: "Transformer", template: str | None, system: str | None) -> PromptFormat | None:
    """The prompt format `template` names for `model` ("auto": its adapter's), checked against its tokenizer;
    None (prompts fed as given) refuses a system prompt, which would have no place to go."""
    written = template_format(template, model.prompt_format)
    if written is not None:
        written.check(require_tokenizer(model))
    elif system:
        raise ValueError("system: a system prompt needs a template (a prompt format) to be written in")
    return written


def generate_batch(model: "Transformer", prompts: Sequence[str], **kwargs: Any) -> list[str]:
    """Whole answers for several prompts in one batch (`gate_scale` may give one value per prompt)."""
    answers = [""] * len(prompts)
    for pieces in stream_batch(model, prompts, **kwargs):
        answers = [a + p for a, p in zip(answers, pieces)]
    return answers


def stream(model: "Transformer", prompt: Prompt, image: Any = None, **kwargs: Any) -> Iterator[str]:
    """Text pieces of the answer to one prompt (about `image`, when given), as soon as they are safe to show."""
    if not isinstance(prompt, str) and not is_token_ids(prompt):
        raise ValueError(f"prompt: expected a text or a list of token ids, got {prompt!r:.80}")
    for pieces in stream_batch(model, [prompt], images=None if image is None else [image], **kwargs):
        if pieces[0]:
            yield pieces[0]


def generate(model: "Transformer", prompt: Prompt, **kwargs: Any) -> str:
    """The whole answer to one prompt (the prompt itself is not repeated)."""
    return "".join(stream(model, prompt, **kwargs))


def scales_from_text(text: str, name: str) -> list[float]:
    """Numbers written with commas or spaces between them ("0, 0.5 1"); a word that is not one is named."""
    scales = []
    for word in text.replace(",", " ").split():
        try:
            scales.append(float(word))
        except ValueError:
            raise ValueError(f"{name}: {word!r:.80} is not a number") from None
    return scales


def require_tokenizer(model: "Transformer") -> "Tokenizer":
    """The model's tokenizer; a ValueError saying how to give it one when it has none."""
    if model.tokenizer is None:
        raise ValueError("model: has no tokenizer; load it with adapter.load(...) or set model.tokenizer")
    return model.tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adapter.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help=BASE_HELP)
    parser.add_argument("--adapter", nargs="+", action="extend", metavar="ADAPTER",
                        help="adapter file or folder, any format; several answer in turn on one shared base, each "
                             "in a block of its own ('--- adapter NAME')")
    asked = parser.add_mutually_exclusive_group(required=True)
    asked.add_argument("--prompt", help="the instruction or text to continue")
    asked.add_argument("--prompts-file", metavar="FILE",
                       help=f"answer every question of {DATA_HELP} instead (strings, objects with "
                            "instruction, input?, system?, image?, or LLaVA records), written to --out as JSONL")
    parser.add_argument("--out", metavar="FILE", help="where --prompts-file's answers go (JSONL, written atomically)")
    parser.add_argument("--image-folder", help="folder that --prompts-file's image paths are relative to")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="--prompts-file's questions decoded together (each with a row per gate scale)")
    parser.add_argument("--image", help="an image to ask about (needs an adapter with a visual prompt and --clip)")
    parser.add_argument("--clip", help="CLIP weights for the image encoder of the adapters with a visual prompt: a "
                                       "local file, or an open_clip pretrained tag such as 'openai' (downloads)")
    parser.add_argument("--clip-model", help="open_clip model name or config .json (default: the adapter's)")
    parser.add_argument("--input", help="optional input after the instruction (not with --template none)")
    parser.add_argument("--system", help="system prompt (the chat prompt formats; Alpaca has none)")
    parser.add_argument("--template", default="auto", choices=TEMPLATES,
                        help="prompt format (default auto: the adapter's own, which is alpaca unless it was trained "
                             "with another; 'none' feeds the prompt as given)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    add_sampling_flags(parser)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--min-tokens", type=int, default=0,
                        help="the end of text is not drawn before this many tokens (stop strings still end)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="decode on past the end of text, to --max-new-tokens (as serving benchmarks ask)")
    parser.add_argument("--seed", type=int, help="seed for sampling")
    parser.add_argument("--gate-scale", type=float, default=1.0, help="0 = frozen base, 1 = trained adapter")
    parser.add_argument("--gate-sweep", metavar="SCALES",
                        help="answer at each of these gate scales instead, in one batch (e.g. '0,0.5,1,2'); "
                             "prints one block per scale")
    layers = parser.add_mutually_exclusive_group()
    layers.add_argument("--gate-layers", metavar="LAYERS", help=FLAG_HELP)
    layers.add_argument("--layer-sweep", action="store_true",
                        help="answer with the top N adapter layers' prompts speaking instead, N from 0 to all (at "
                             f"most {LAYER_SWEEP_ROWS} rows, one batch, at --gate-scale); one block per N")
    parser.add_argument("--delta-scale", type=float, default=1.0, help="scale of the v2 bias/LoRA/norm deltas")
    parser.add_argument("--next-tokens", type=int, metavar="K",
                        help="instead of answering, print the next token's probabilities: each gate scale's K "
                             "likeliest tokens, at --gate-sweep's scales (else at 0 and --gate-scale)")
    parser.add_argument("--quantize", choices=("none", "nf4", "int8"), default="none")
    parser.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype")
    parser.add_argument("--compile", action="store_true",
                        help="decode through torch.compile: faster steps after a slow first one (on CPU it needs "
                             "a C++ compiler)")
    parser.add_argument("--clip-quantize", choices=("none", "nf4", "int8"), default="none",
                        help="the CLIP tower's linears through bitsandbytes too")
    parser.add_argument("--kv-cache", choices=KV_CACHE_DTYPES, default="auto",
                        help="int8: keys/values in int8, half the KV cache's memory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    unicode_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    from .loading import load_many
    from .next_token import MAX_TOP_K
    from .tiny.assets import default_adapter

    try:
        sweep = None if args.gate_sweep is None else scales_from_text(args.gate_sweep, "--gate-sweep")
        if sweep == []:
            raise ValueError("--gate-sweep: give at least one gate scale, e.g. '0,0.5,1'")
        for flag, scales in (("--gate-sweep", sweep or []), ("--gate-scale", [args.gate_scale])):
            if not all(math.isfinite(scale) and scale >= 0 for scale in scales):  # before the model loads
                raise ValueError(f"{flag}: give finite gate scales >= 0 (0 = the frozen base), got "
                                 f"{', '.join(f'{scale:g}' for scale in scales)}")
        for flag, value in (("--gate-sweep", args.gate_sweep), ("--next-tokens", args.next_tokens),
                            ("--prompts-file", args.prompts_file)):
            if args.layer_sweep and value is not None:
                raise ValueError(f"--layer-sweep: not with {flag}")
        if args.next_tokens is not None and not 1 <= args.next_tokens <= MAX_TOP_K:
            raise ValueError(f"--next-tokens: must be from 1 to {MAX_TOP_K}, got {args.next_tokens}")
        questions = None if args.prompts_file is None else read_file_flags(args)
        if questions is None and not args.prompt.strip() and args.template != "none":
            raise ValueError("--prompt: empty; give an instruction to answer (or --template none to let the model "
                             "write from nothing)")
        for flag, value in (("--out", args.out), ("--image-folder", args.image_folder)):
            if value is not None and questions is None:
                raise ValueError(f"{flag}: only with --prompts-file")
        names = args.adapter or [default_adapter(args.base)]  # as an answer file records it (tiny: tiny-text)
        models = load_many(args.base, names, clip=args.clip, clip_model=args.clip_model,
                           clip_quantize=args.clip_quantize, quantize=args.quantize, device=args.device,
                           dtype=args.dtype, kv_cache=args.kv_cache)
        layers = [layers_from_flag(args.gate_layers, model) for model in models]
        if args.image is not None:  # each adapter asked, before any answers
            from .visual import require_sight

            for model, name in zip(models, names):
                try:
                    require_sight(model)
                except ValueError as error:
                    raise ValueError(f"--adapter {name}: {error}" if name else str(error)) from None
        for model, name, chosen in zip(models, names, layers):
            if chosen is not None:
                label = f" ({name})" if len(models) > 1 else ""
                print(f"note{label}: {speaking(model, chosen)}", file=sys.stderr)
        options = dict(max_new_tokens=args.max_new_tokens, **sampling_flags(args),
                       min_tokens=args.min_tokens, ignore_eos=args.ignore_eos,
                       seed=args.seed, delta_scale=args.delta_scale, compile=args.compile,
                       continued=args.template == "none")  # a raw text goes on from itself (its space kept)
        if questions is not None:
            answer_file(models, names, layers, questions, sweep or [args.gate_scale], args, options)
            return 0
        asked = [asked_as(model, args) for model in models]
        if args.next_tokens is not None:
            print_next_tokens(models, names, layers, asked, sweep or sorted({0.0, args.gate_scale}), args)
            return 0
        if sweep is None and len(models) == 1 and not args.layer_sweep:
            prompt, stop = asked[0]
            gate_scale = gate_scale_rows(models[0], [args.gate_scale], layers[0])
            for piece in stream(models[0], prompt, gate_scale=gate_scale, image=args.image, stop=stop, **options):
                sys.stdout.write(piece)
                sys.stdout.flush()
        else:
            rows = [batch_rows(model, chosen, sweep, args) for model, chosen in zip(models, layers)]
            blocks = answer_blocks(models, names, rows, asked, args.image, options)
            for index, (heading, answer) in enumerate(blocks):
                sys.stdout.write(("\n" if index else "") + f"--- {heading}\n{answer}")
                sys.stdout.flush()
    except (ValueError, OSError) as error:
        return refused(error, parser)
    except KeyboardInterrupt:  # Ctrl-C: what was written stays (and a file of questions' answers so far)
        sys.stdout.write("\n")
        return 130
    sys.stdout.write("\n")
    return 0


def read_file_flags(args: argparse.Namespace) -> list:
    """--prompts-file's questions, its companion flags checked first (before any model is loaded)."""
    from .answer_file import read_questions

    if args.out is None:
        raise ValueError("--out: give the file --prompts-file's answers are written to")
    check_file_target(args.out, "--out: ", {"--prompts-file": args.prompts_file})  # before the answers, not after
    for flag, value in (("--input", args.input), ("--image", args.image), ("--next-tokens", args.next_tokens)):
        if value is not None:
            raise ValueError(f"{flag}: not with --prompts-file (give it per question in the file)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: must be at least 1, got {args.batch_size}")
    return read_questions(args.prompts_file, args.image_folder)


def answer_file(models: Sequence["Transformer"], names: Sequence[str | None], layers: Sequence[list[int] | None],
                questions: list, scales: list[float], args: argparse.Namespace, options: dict[str, Any]) -> None:
    """Every question of --prompts-file answered by each model at each gate scale, written to --out; the answers
    so far kept in OUT.partial, from which the same command goes on after an interruption."""
    from .answer_file import PartialAnswers, answer_questions, can_see, checked_prompts, write_answers

    def named(error: ValueError, name: str | None) -> ValueError:
        return ValueError(f"--adapter {name}: {error}" if name else str(error))

    for model, name in zip(models, names):  # every adapter's questions checked before any is answered
        try:
            checked_prompts(model, questions, args.template, args.system)
        except ValueError as error:
            raise named(error, name) from None
    partial = PartialAnswers(args.out, answer_settings(args, questions))
    kept, found = partial.load()
    if found:
        print(found, file=sys.stderr)
    partial.begin(kept)
    answered = []
    pictured = sum(question.image is not None for question in questions)
    try:
        for position, (model, name, chosen) in enumerate(zip(models, names, layers)):
            label = f" ({name})" if len(models) > 1 else ""
            if pictured and not can_see(model):
                print(f"note{label}: this model cannot see (no visual prompt, or no --clip); it answers the "
                      f"{pictured} image question(s) from their text alone", file=sys.stderr)

            def progress(done: int, total: int, label: str = label) -> None:
                print(f"answered {done}/{total}{label}", file=sys.stderr, flush=True)

            def keep(answers: dict[int, list[str]], position: int = position) -> None:
                partial.add(position, answers)

            before = {index: answers for (adapter, index), answers in kept.items() if adapter == position}
            try:
                answered.append((name, answer_questions(
                    model, questions, gate_scales=scales, template=args.template, system=args.system,
                    batch_size=args.batch_size, stop=args.stop, progress=progress, layers=chosen, answered=before,
                    on_answers=keep, **options)))
            except ValueError as error:
                raise named(error, name) from None
    except KeyboardInterrupt:
        print(f"interrupted: the answers so far are kept in {partial.path}; the same command goes on from them"
              if partial.path.exists() else "interrupted: no question was answered yet", file=sys.stderr)
        raise
    lines = write_answers(args.out, questions, scales, answered, args.gate_layers)
    partial.remove()
    print(f"wrote {lines} answers to {args.out}", file=sys.stderr)


def answer_settings(args: argparse.Namespace, questions: Sequence["Question"]) -> dict[str, Any]:
    """What decides a --prompts-file run's answers: the questions as read (their records and pictures) and the
    command line's flags, but not how the questions are batched nor where files are."""
    digest = hashlib.sha256()
    for question in questions:
        digest.update(json.dumps([question.record, str(question.image)], sort_keys=True).encode())
        digest.update(b"\n")
    unrelated = ("out", "batch_size", "compile", "prompts_file", "image_folder")
    weights = {flag: [files_stamp(path) for path in ([value] if isinstance(value, str) else value)]
               for flag, value in (("base", args.base), ("adapter", args.adapter or []), ("clip", args.clip))
               if value is not None}
    return {"questions": digest.hexdigest(), "weights": weights,
            **{k: v for k, v in sorted(vars(args).items()) if k not in unrelated}}


def files_stamp(path: str) -> list:
    """The size and modification time of a weights file, or of each file in a folder (its name with them): a
    file rewritten at the same path (a newer adapter) is told from the one that wrote the answers kept. A name
    that is no local path (`tiny`, `hf:owner/name`, an open_clip tag) is its own stamp."""
    found = Path(path)
    if found.is_dir():
        files = {str(p.relative_to(found)): p for p in sorted(found.rglob("*")) if p.is_file()}
    else:
        files = {found.name: found} if found.is_file() else {}
    stamps = [[name, file.stat().st_size, file.stat().st_mtime_ns] for name, file in files.items()]
    return stamps or [path]


def print_next_tokens(models: Sequence["Transformer"], names: Sequence[str | None],
                      layers: Sequence[list[int] | None], asked: Sequence[tuple[str, list[str]]], scales: list[float],
                      args: argparse.Namespace) -> None:
    """--next-tokens: each model's table (headed by its adapter's name when there are several)."""
    from .next_token import next_tokens

    for index, (model, name, chosen, (prompt, _)) in enumerate(zip(models, names, layers, asked)):
        found = next_tokens(model, prompt, scales, delta_scale=args.delta_scale, top_k=args.next_tokens,
                            image=args.image, layers=chosen)
        heading = f"--- adapter {name}\n" if len(models) > 1 else ""
        sys.stdout.write(("\n" if index else "") + heading + found.table() + "\n")


def asked_as(model: "Transformer", args: argparse.Namespace) -> tuple[str, list[str]]:
    """The command line's prompt as `model` is asked it (`--template auto`: in its adapter's prompt format) and
    the stop strings: --stop's and the format's."""
    written = prompt_writer(model, args.template, None)  # the system prompt is checked below, naming its flag
    try:
        prompt = apply_template(args.template, args.prompt, args.input, model.prompt_format, args.system)
    except ValueError as error:  # input/system the template has no place for: name the flag
        raise ValueError(f"--{error}") from None
    return prompt, [*args.stop, *(written.stop_strings if written else ())]


def batch_rows(model: "Transformer", layers: list[Speaker] | None, sweep: list[float] | None,
               args: argparse.Namespace) -> tuple[list[str], list[float] | torch.Tensor]:
    """Each batch row's label ("" for a lone answer) and the batch's gate scale: --layer-sweep's rows, --gate-sweep's
    (only `layers` speaking), or --gate-scale's one."""
    if args.layer_sweep:
        return layer_sweep_rows(model, args.gate_scale, LAYER_SWEEP_ROWS, "--layer-sweep")
    scales = sweep or [args.gate_scale]
    labels = [f"gate scale {scale:g}" if sweep is not None else "" for scale in scales]
    return labels, gate_scale_rows(model, scales, layers)


def answer_blocks(models: Sequence["Transformer"], names: Sequence[str | None],
                  rows: Sequence[tuple[list[str], list[float] | torch.Tensor]], asked: Sequence[tuple[str, list[str]]],
                  image: Any, options: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(heading, answer) per adapter and per batch row (one batch per adapter); the heading names the adapter
    when there are several, then the row's label. `rows` gives each model's (labels, gate scale) (`batch_rows`),
    `asked` its (prompt, stop strings)."""
    for name, model, (labels, gate_scale), (prompt, stop) in zip(names, models, rows, asked):
        label = f"adapter {name}" if len(models) > 1 else ""
        images = None if image is None else [image] * len(labels)
        answers = generate_batch(model, [prompt] * len(labels), gate_scale=gate_scale, images=images, stop=stop,
                                 **options)
        for row, answer in zip(labels, answers):
            yield ", ".join(filter(None, (label, row))), answer


if __name__ == "__main__":
    sys.exit(main())
