"""Serving logic behind the Gradio app (`app.py`), importable and testable without gradio.

One `Engine` wraps one loaded model; `Engines` holds the adapters one app serves on one base. Every request
carries its own `Settings` (gate scale, the layers that speak, delta scale, sampling), passed to generation per
call, so concurrent users never change each other's answers; the model's global scales are never touched.
Generation holds the device's lock while it decodes and stops as soon as its generator is closed (the user
pressed stop or went away), which releases the lock.
"""

from __future__ import annotations

import bisect
import math
import os
import secrets
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, replace
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .chat_batcher import ChatBatcher, ChatJob
from .device_work import DeviceWork, device_lock
from .finetune.records import not_text
from .footprint import held_bytes, kv_bytes_per_token
from .gate_layers import Speaker, adapter_layers, describe, gate_scale_rows, layer_sweep_rows, parse_layers
from .generate import scales_from_text, stream_batch
from .images import gather_uploads, load_image
from .prompt_ids import Answer, Prompt, checked_ids, prompt_ids
from .prompts import format_named
from .sampling import logit_bias_pairs, seed_problem

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .choices import ChoiceEvaluation
    from .evaluate import Evaluation
    from .gate_view import PromptShares
    from .model import Transformer
    from .next_token import NextTokens
    from .token_logprob import TokenLogprob

MAX_QUESTION_CHARS = 4000
MAX_LAYERS_CHARS = 200  # a layer selection ("top 4", "20-23, 31")
MAX_SCALE = 2.0
MAX_TEMPERATURE = 2.0
MAX_REPETITION_PENALTY = 10.0
MAX_LOGIT_BIAS, MAX_LOGIT_BIASES = 100.0, 300  # as OpenAI's
MAX_STOP_TOKEN_IDS = 64  # a request's stop_token_ids
MAX_SWEEP = 9  # gate scales answered together in one sweep (one batch row each)
MAX_SCORE_RECORDS = 200  # records one score request reads (the device is held while it runs)
MAX_SCORE_TOKENS = 20_000  # tokens of plain text one score request reads
NEXT_TOKENS_TOP_K = 5  # likeliest next tokens shown per gate scale


def _number(name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    """A finite number in [low, high] (or (low, high]), else a ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name}: must be in {bracket}{low:g}, {high:g}], got {value!r}")
    return float(value)


def check_integer(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """An integer (whole floats allowed, as sliders and JSON send them) in [low, high] (None: unbounded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ValueError(f"{name}: expected a whole number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name}: must be {bound}, got {value!r}")
    return int(value)


def _seed(value: Any) -> int:
    """A seed, whole floats allowed (as sliders and JSON send them), its range worded as everywhere else's."""
    seed = check_integer("seed", value)
    if (problem := seed_problem(seed)) is not None:
        raise ValueError(f"seed: {problem}")
    return seed


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias with its ranges: biases from -100 to 100, at most 300 tokens."""
    pairs = logit_bias_pairs(value, MAX_LOGIT_BIAS)
    if len(pairs) > MAX_LOGIT_BIASES:
        raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIASES} tokens, got {len(pairs)}")
    return pairs


def _switch(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: must be true or false, got {value!r:.80}")
    return value


def _token_ids(name: str, value: Any) -> tuple[int, ...]:
    """Token ids as a tuple (which are in the vocabulary is the model's to say, when decoding starts)."""
    if not isinstance(value, (list, tuple)) or len(value) > MAX_STOP_TOKEN_IDS or \
            not all(type(token) is int and token >= 0 for token in value):
        raise ValueError(f"{name}: expected a list of up to {MAX_STOP_TOKEN_IDS} token ids, got {value!r:.80}")
    return tuple(value)


def _layers_text(value: Any) -> str:
    """A layer selection as text ("all" when empty), checked here for its type and length only: which layers
    exist is the adapter's to say (Engine.layers_of)."""
    if value is None:
        return "all"
    if not isinstance(value, str):
        raise ValueError(f"gate_layers: expected text such as 'all', 'top 2', '28-31' or '31:0-3', got {value!r}")
    if len(value) > MAX_LAYERS_CHARS:
        raise ValueError(f"gate_layers: {len(value)} characters is too long (at most {MAX_LAYERS_CHARS})")
    return value.strip().lower() or "all"


def gate_scales(value: str | Sequence[Any]) -> list[float]:
    """1 to MAX_SWEEP gate scales, each in [0, MAX_SCALE], from a list or from text such as "0, 0.5, 1"."""
    if isinstance(value, str):
        value = scales_from_text(value, "gate_scales")
    if not isinstance(value, Sequence):  # None from an API client's empty box, a number, ...
        raise ValueError(f"gate_scales: give 1 to {MAX_SWEEP} scales such as \"0, 0.5, 1\", got {value!r}"[:200])
    scales = [_number("gate_scales", scale, 0.0, MAX_SCALE) for scale in value]
    if not 1 <= len(scales) <= MAX_SWEEP:
        raise ValueError(f"gate_scales: give 1 to {MAX_SWEEP} scales, got {len(scales)}")
    return scales


def check_text(value: Any, name: str = "question") -> str:
    """A non-empty question of at most MAX_QUESTION_CHARS characters."""
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected text, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{name}: is empty; type a question first")
    if len(value) > MAX_QUESTION_CHARS:
        raise ValueError(f"{name}: {len(value):,} characters is too long (at most {MAX_QUESTION_CHARS:,})")
    if (problem := not_text(value)) is not None:
        raise ValueError(f"{name}: {problem}")
    return value.strip()


def checked_history(history: Any) -> list[tuple[str, str]]:
    """Earlier turns as (question, answer) pairs of text (ValueError naming the first turn that is not one)."""
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise ValueError(f"history: expected a list of (question, answer) turns, got {type(history).__name__}")
    for index, turn in enumerate(history):
        if isinstance(turn, (str, bytes)) or not isinstance(turn, Sequence) or len(turn) != 2 or \
                not all(isinstance(text, str) for text in turn):
            raise ValueError(f"history[{index}]: expected a (question, answer) pair of texts, got {turn!r:.80}")
    return [tuple(turn) for turn in history]


def check_system(value: Any) -> str | None:
    """A system prompt: None when left out or blank (as no system prompt), else checked as a question is."""
    return check_text(value, "system") if value and str(value).strip() else None


class ContextExceeded(ValueError):
    """A prompt the model's context cannot hold (with room for an answer's first token): the API answers it with
    OpenAI's code for it, context_length_exceeded."""


@dataclass(frozen=True)
class Settings:
    """What one request may choose: gate/delta scales, sampling and a system prompt (chat formats only).
    Validated on construction."""

    gate_scale: float = 1.0
    delta_scale: float = 1.0
    temperature: float = 0.1
    top_p: float = 0.75
    max_new_tokens: int = 128
    seed: int | None = 0  # the same seed gives the same answer, so the gate alone changes it
    system: str | None = None  # empty: none
    gate_layers: str = "all"  # the adapter layers whose prompts speak (adapter.gate_layers), the others silent
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # CTRL's, over prompt and answer; 1: off
    presence_penalty: float = 0.0  # OpenAI's, over the answer; 0: off
    frequency_penalty: float = 0.0
    logit_bias: Any = ()  # OpenAI's {token id: bias}, held as sorted (id, bias) pairs
    min_tokens: int = 0  # vLLM's: no end of text before this many tokens
    ignore_eos: bool = False  # vLLM's: decode on past the end of text, to max_new_tokens
    stop_token_ids: Any = ()  # vLLM's: ids that end an answer beside the tokenizer's own

    def __post_init__(self) -> None:
        checked = {
            "gate_scale": _number("gate_scale", self.gate_scale, 0.0, MAX_SCALE),
            "delta_scale": _number("delta_scale", self.delta_scale, 0.0, MAX_SCALE),
            "temperature": _number("temperature", self.temperature, 0.0, MAX_TEMPERATURE),
            "top_p": _number("top_p", self.top_p, 0.0, 1.0, low_open=True),
            "max_new_tokens": check_integer("max_new_tokens", self.max_new_tokens, 1),
            "seed": None if self.seed is None else _seed(self.seed),
            "system": check_system(self.system),
            "gate_layers": _layers_text(self.gate_layers),
            "top_k": check_integer("top_k", self.top_k, 0),
            "min_p": _number("min_p", self.min_p, 0.0, 1.0),
            "repetition_penalty": _number("repetition_penalty", self.repetition_penalty, 0.0, MAX_REPETITION_PENALTY,
                                          low_open=True),
            "presence_penalty": _number("presence_penalty", self.presence_penalty, -2.0, 2.0),
            "frequency_penalty": _number("frequency_penalty", self.frequency_penalty, -2.0, 2.0),
            "logit_bias": _logit_bias(self.logit_bias),
            "min_tokens": check_integer("min_tokens", self.min_tokens, 0),
            "ignore_eos": _switch("ignore_eos", self.ignore_eos),
            "stop_token_ids": _token_ids("stop_token_ids", self.stop_token_ids),
        }
        if checked["min_tokens"] > checked["max_new_tokens"]:
            raise ValueError(f"min_tokens: must be at most the answer's most tokens ({checked['max_new_tokens']}), "
                             f"got {checked['min_tokens']}")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def sampling(self) -> dict[str, Any]:
        """Keyword arguments for `adapter.generate` other than the scales, the stop strings and the system."""
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "seed": self.seed, "top_k": self.top_k, "min_p": self.min_p,
                "repetition_penalty": self.repetition_penalty,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "logit_bias": self.logit_bias, "min_tokens": self.min_tokens, "ignore_eos": self.ignore_eos,
                "stop_token_ids": self.stop_token_ids}


class Engine:
    """Answers chat, image and side-by-side requests from one model; shows its gates.

    Questions are written in the adapter's prompt format (adapter.prompts: what it was trained on), or in
    `prompt_format` when given (e.g. "llama3" for a Llama 3 Instruct base served without an adapter)."""

    def __init__(self, model: Transformer, lock: threading.Lock | None = None, *, max_new_tokens: int = 256,
                 compile: bool = False, prompt_format: str | None = None, batch_chats: int = 1,
                 max_cached_tokens: int | None = None) -> None:
        if model.tokenizer is None:
            raise ValueError("model: has no tokenizer; load it with adapter.load(...)")
        self.prompts = format_named(prompt_format or model.prompt_format)
        self.prompts.check(model.tokenizer)
        self.model = model
        self.device = model.tok_embeddings.weight.device
        self.lock = lock if lock is not None else device_lock(self.device)
        self.work = DeviceWork(self.device, self.lock)  # model work: holding the lock, on the compute thread if any
        self.max_new_tokens = check_integer("max_new_tokens", max_new_tokens, 1)
        if not isinstance(compile, bool):
            raise ValueError(f"compile: must be True or False, got {compile!r}")
        self.compile = compile  # decode steps through torch.compile (see Transformer.step)
        # more than 1: chats and image questions waiting for the device are decoded together, up to this many rows
        # (adapter.chat_batcher)
        batch_chats = check_integer("batch_chats", batch_chats, 1)
        # the KV cache one decode may hold, in tokens over its rows (None: no bound): rows beyond it (a gate sweep's
        # scales) decode in turns; the app sizes it as adapter.space_fit counts its memory
        self.max_cached_tokens = None if max_cached_tokens is None else \
            check_integer("max_cached_tokens", max_cached_tokens, 1)
        self.batcher = None if batch_chats == 1 else ChatBatcher(
            model, self.work, max_rows=batch_chats, stop=self.prompts.stop_strings, compile=compile,
            max_cached_tokens=self.max_cached_tokens)

    # ----- what the model can do ----------------------------------------------------------------------
    @property
    def base(self) -> str | None:
        """The base as `adapter.load` was given it (the embedded model's short name resolved to its folder)."""
        return self.model.base_path

    @property
    def adapter(self) -> str | None:
        return self.model.adapter_path

    @property
    def can_see_images(self) -> bool:
        return self.model.visual_prompt is not None and self.model.image_encoder is not None

    @property
    def has_gates(self) -> bool:
        return self.model.adapter_query is not None

    def check(self, settings: Settings) -> Settings:
        """The per-server limits on top of the Settings' own checks (the answer's length, the vocabulary)."""
        if settings.max_new_tokens > self.max_new_tokens:
            raise ValueError(f"max_new_tokens: must be between 1 and {self.max_new_tokens}, "
                             f"got {settings.max_new_tokens}")
        checked_ids([token for token, _ in settings.logit_bias], self.model.args.vocab_size, "logit_bias")
        checked_ids(settings.stop_token_ids, self.model.args.vocab_size, "stop_token_ids")
        return settings

    # ----- answering -------------------------------------------------------------------------------------
    def chat_prompt(self, history: Sequence[tuple[str, str]], message: str, settings: Settings) -> str:
        """The chat prompt, dropping the oldest turns until it leaves room for the answer."""
        return self._fitted(history, check_text(message, "message"), settings, "message",
                            lambda turns, text: self.prompts.chat(turns, text, settings.system))

    def image_prompt(self, question: str, settings: Settings | None = None,
                     history: Sequence[tuple[str, str]] = ()) -> str:
        """An image question's prompt. Earlier (question, answer) turns about the same picture make it a
        conversation, written as fine-tuning writes image conversations (LLaVA records: the chat format, the
        picture speaking through the prompts all along), the oldest dropped until the answer has room."""
        settings = settings or Settings()

        def written(turns: list[tuple[str, str]], text: str) -> str:
            return (self.prompts.chat(turns, text, settings.system) if turns
                    else self.prompts.image_question(text, settings.system))

        return self._fitted(history, check_text(question), settings, "question", written)

    def _fitted(self, history: Sequence[tuple[str, str]], text: str, settings: Settings, field: str,
                written: Callable[[list[tuple[str, str]], str], str]) -> str:
        """`written(turns, text)` with the fewest oldest turns dropped that leave room for the answer (all of them
        when none do), found by bisection: a long history is written and tokenized a few times, not once a turn."""
        turns = checked_history(history)
        dropped = bisect.bisect_left(range(len(turns)), True, key=lambda first: self._fits(
            written(turns[first:], text), settings.max_new_tokens))
        prompt = written(turns[dropped:], text)
        self._require_room(prompt, field)
        return prompt

    def chat(self, history: Sequence[tuple[str, str]], message: str, settings: Settings) -> Iterator[str]:
        """The answer so far, growing as tokens are decoded (each item is the whole answer up to now).

        Checks the request now (ValueError) and decodes only while the result is iterated.
        """
        return self.answer_prompt(self.chat_prompt(history, message, self.check(settings)), settings, None)

    def ask_image(self, image: Any, question: str, settings: Settings,
                  history: Sequence[tuple[str, str]] = ()) -> Iterator[str]:
        """The answer to a question about `image` (after the `history` of earlier turns about it, if any); an
        adapter that cannot see answers from the text alone."""
        prompt, images = self.image_rows(image, question, settings, 1, history)
        return self.answer_prompt(prompt, settings, images[0] if images else None)

    def answer_prompt(self, prompt: str, settings: Settings, image: Any = None, generated: list[int] | None = None,
                      scores: list[TokenLogprob] | None = None, top_logprobs: int = 0) -> Iterator[str]:
        """One user's answer so far to a prompt already written and checked (`chat_prompt`, `image_rows`): a row
        of the users' batch with a batcher, else a decode of its own. `generated` is told every token decoded (the
        stop id that ends it included), as in `complete`; `scores` each one's log-probability as it is decoded,
        with the `top_logprobs` likeliest at its place."""
        gate = self._gates(settings, [settings.gate_scale])
        if self.batcher is not None:
            options = settings.sampling() | ({} if scores is None else {"logprobs": top_logprobs})
            return self.batcher.answer(ChatJob(prompt, gate[0], settings.delta_scale, options, image, generated,
                                               scores))
        rows = self._generate([prompt], settings, gate, settings.delta_scale, None if image is None else [image],
                              generated=None if generated is None else [generated],
                              scores=None if scores is None else ([scores], top_logprobs))
        return _each(rows, itemgetter(0))

    def complete(self, prompt: Prompt, settings: Settings, generated: list[int] | None = None,
                 scores: list[TokenLogprob] | None = None, top_logprobs: int = 0) -> Iterator[str]:
        """A continuation of `prompt` (a text, or token ids) as it is written (no prompt format, so none of its stop
        strings): what the legacy completions API asks for; decoded on its own, not in the users' batch. Checked
        now (ValueError). `generated` is told every token decoded (the stop id that ends it included), `scores`
        each one's log-probability with the `top_logprobs` likeliest at its place."""
        if isinstance(prompt, str):
            check_text(prompt, "prompt")
        self._require_room(prompt, "prompt")
        gate = self._gates(self.check(settings), [settings.gate_scale])
        rows = None if generated is None else [generated]
        return _each(self._generate([prompt], settings, gate, settings.delta_scale, stop=(), generated=rows,
                                    scores=None if scores is None else ([scores], top_logprobs), continued=True),
                     itemgetter(0))

    def check_scored(self, prompt: Prompt, name: str = "prompt") -> None:
        """A ValueError unless `prompt` is a text (or token ids) the model can score whole (not empty, within its
        context)."""
        if isinstance(prompt, str):
            check_text(prompt, name)
        self._require_room(prompt, name, 0)

    def text_logprobs(self, prompt: Prompt, answer: Answer, settings: Settings,
                      top_k: int = 0) -> list[TokenLogprob | None]:
        """Every token of `prompt` and `answer` (a text, or the token ids decoded) with its log-probability at the
        settings' scales and layers (None for a first token with nothing before it;
        adapter.next_token.text_logprobs), holding the lock."""
        from .next_token import text_logprobs

        return self.work.run(text_logprobs, self.model, prompt, answer,
                             self._gates(settings, [settings.gate_scale]), settings.delta_scale, top_k)

    def _question_prompt(self, question: str, settings: Settings) -> str:
        """The prompt of a one-off question (compare, sweep), checked with the settings before decoding."""
        prompt = self.prompts.instruction(check_text(question), system=settings.system)
        self.check(settings)
        self._require_room(prompt, "question")
        return prompt

    def image_rows(self, image: Any, question: str, settings: Settings, count: int,
                    history: Sequence[tuple[str, str]]) -> tuple[str, list | None]:
        """The image prompt and `count` copies of the picture, checked (none for an adapter that cannot see)."""
        prompt = self.image_prompt(question, self.check(settings), history)
        if not self.can_see_images:
            return prompt, None
        if image is None:
            raise ValueError("image: upload an image first")
        return prompt, [load_image(image)] * count

    def compare(self, question: str, settings: Settings) -> Iterator[tuple[str, str]]:
        """(frozen base, adapted) answers so far, decoded together in one batch of two rows.

        The base row has gate and delta scale 0, which is exactly the frozen base model.
        """
        prompt = self._question_prompt(question, settings)
        rows = self._generate([prompt, prompt], settings, self._gates(settings, [0.0, settings.gate_scale]),
                              [0.0, settings.delta_scale])
        return _each(rows, tuple)

    def sweep(self, question: str, scales: str | Sequence[Any], settings: Settings) -> Iterator[list[str]]:
        """The answers so far to one question at each gate scale in `scales` (settings' delta scale and
        sampling for all), decoded together in one batch: how the answer moves as the prompts speak louder."""
        scales = gate_scales(scales)
        return self._sweep(self._question_prompt(question, settings), None, scales, settings)

    def sweep_image(self, image: Any, question: str, scales: str | Sequence[Any], settings: Settings,
                    history: Sequence[tuple[str, str]] = ()) -> Iterator[list[str]]:
        """As `sweep`, for a question about `image` (after `history`, as `ask_image`): the gate scales how much
        the visual prompt speaks."""
        scales = gate_scales(scales)
        prompt, images = self.image_rows(image, question, settings, len(scales), history)
        return self._sweep(prompt, images, scales, settings)

    def _sweep(self, prompt: str, images: list | None, scales: list[float], settings: Settings) -> Iterator[list[str]]:
        rows = self._generate([prompt] * len(scales), settings, self._gates(settings, scales), settings.delta_scale,
                              images)
        return _each(rows, list)

    def layer_sweep(self, question: str, settings: Settings) -> tuple[list[str], Iterator[list[str]]]:
        """Labels ("top 2: 30-31") and the answers so far to one question with only the top N adapter layers'
        prompts speaking, N from 0 to all (at most MAX_SWEEP rows, one batch; the settings' gate scale, delta
        scale and sampling, not their layers): how many layers it takes to steer the answer."""
        labels, rows = layer_sweep_rows(self.model, settings.gate_scale, MAX_SWEEP)
        return labels, self._layer_sweep(self._question_prompt(question, settings), None, rows, settings)

    def layer_sweep_image(self, image: Any, question: str, settings: Settings,
                          history: Sequence[tuple[str, str]] = ()) -> tuple[list[str], Iterator[list[str]]]:
        """As `layer_sweep`, for a question about `image` (after `history`, as `ask_image`)."""
        labels, rows = layer_sweep_rows(self.model, settings.gate_scale, MAX_SWEEP)
        prompt, images = self.image_rows(image, question, settings, len(labels), history)
        return labels, self._layer_sweep(prompt, images, rows, settings)

    def _layer_sweep(self, prompt: str, images: list | None, rows: torch.Tensor,
                     settings: Settings) -> Iterator[list[str]]:
        return _each(self._generate([prompt] * len(rows), settings, rows, settings.delta_scale, images), list)

    def next_tokens(self, question: str, scales: str | Sequence[Any], settings: Settings) -> NextTokens:
        """The next token's probabilities after `question` at each gate scale (adapter.next_token: each scale's
        NEXT_TOKENS_TOP_K likeliest, one prefill with a row per scale, settings' delta scale), holding the lock."""
        scales = gate_scales(scales)
        return self._next_tokens(self._question_prompt(question, settings), None, scales, settings)

    def next_tokens_image(self, image: Any, question: str, scales: str | Sequence[Any], settings: Settings,
                          history: Sequence[tuple[str, str]] = ()) -> NextTokens:
        """As `next_tokens`, for a question about `image` (after `history`, as `ask_image`; the picture encoded
        once for all the scales)."""
        scales = gate_scales(scales)
        prompt, images = self.image_rows(image, question, settings, 1, history)
        return self._next_tokens(prompt, images[0] if images else None, scales, settings)

    def _next_tokens(self, prompt: str, image: Any, scales: list[float], settings: Settings) -> NextTokens:
        from .next_token import next_tokens

        return self.work.run(next_tokens, self.model, prompt, scales, delta_scale=settings.delta_scale,
                             top_k=NEXT_TOKENS_TOP_K, image=image, layers=self.layers_of(settings))

    def layers_of(self, settings: Settings) -> list[Speaker] | None:
        """The adapter layers the settings let speak (None: all of them)."""
        return None if settings.gate_layers == "all" else parse_layers(settings.gate_layers, self.model)

    def _gates(self, settings: Settings, scales: list[float]) -> list[float] | torch.Tensor:
        """The gate scale of rows at `scales`, only the settings' layers speaking."""
        return gate_scale_rows(self.model, scales, self.layers_of(settings))

    def _generate(self, prompts: list[Prompt], settings: Settings, gate_scale: Any, delta_scale: Any,
                  images: list[Any] | None = None, stop: Sequence[str] | None = None,
                  generated: Sequence[list[int]] | None = None,
                  scores: tuple[Sequence[list[TokenLogprob]], int] | None = None,
                  continued: bool = False) -> Iterator[list[str]]:
        """Whole answers so far, one per prompt, ending at EOS or one of `stop` (default: the prompt format's stop
        strings; `generated` is told each one's tokens; `scores`, (one list per prompt, top count), their
        log-probabilities; `continued`: texts read as their prompts go on). The lock is held until this generator
        ends or is closed; closing it stops decoding at the current token."""
        answers = [""] * len(prompts)
        yielded = False
        scored = {} if scores is None else {"scores": scores[0], "logprobs": scores[1]}
        decoding = self.work.stream(lambda: stream_batch(
            self.model, prompts, images=images, gate_scale=gate_scale, delta_scale=delta_scale, compile=self.compile,
            stop=self.prompts.stop_strings if stop is None else stop, generated=generated, continued=continued,
            max_cached_tokens=self.max_cached_tokens, **scored, **settings.sampling()))
        with closing(decoding) as steps:
            for pieces in steps:
                if any(pieces):
                    answers = [answer + piece for answer, piece in zip(answers, pieces)]
                    yielded = True
                    yield answers
        if not yielded:
            yield answers

    def _fits(self, prompt: Prompt, new_tokens: int, name: str = "prompt") -> bool:
        ids = prompt_ids(self.model.tokenizer, prompt, self.model.args.vocab_size, name)
        return len(ids) + new_tokens <= self.model.args.max_seq_len

    def _require_room(self, prompt: Prompt, name: str, new_tokens: int = 1) -> None:
        if not self._fits(prompt, new_tokens, name):
            limit = self.model.args.max_seq_len
            raise ContextExceeded(f"{name}: too long for this model's context of {limit} tokens; shorten it")

    def score(self, data: str | os.PathLike, scales: str | Sequence[Any], settings: Settings,
              exact: bool = False,
              images: Sequence[str | os.PathLike] | None = None) -> Evaluation | ChoiceEvaluation:
        """Held-out loss, token accuracy and (with `exact`) exact greedy answers of the first MAX_SCORE_RECORDS
        records of `data` at each gate scale (`adapter.evaluate`, settings' delta scale), holding the lock.
        Image records (LLaVA layout) find their pictures among `images` by file name. A file of multiple-choice
        questions is scored by which choice the model finds likeliest (`adapter.choices`); plain text (a .txt file,
        or records of "text") by its perplexity, its first MAX_SCORE_TOKENS tokens (`evaluate_text`)."""
        from .choices import evaluate_choices, holds_choices
        from .evaluate import evaluate, evaluate_text
        from .finetune.records import holds_text

        scales = gate_scales(scales)
        if data is None:
            raise ValueError("data: upload a file of records (JSON, JSONL or Parquet) or of plain text (.txt) first")
        if holds_text(data):
            return self.work.run(evaluate_text, self.model, data, gate_scales=scales, delta_scale=settings.delta_scale,
                                 limit=MAX_SCORE_RECORDS, max_tokens=MAX_SCORE_TOKENS, layers=self.layers_of(settings))
        choices = holds_choices(data)  # read before the device's lock is taken
        with tempfile.TemporaryDirectory(prefix="uploaded-images-") as folder:
            gather_uploads(images or (), Path(folder))
            if choices:
                return self.work.run(evaluate_choices, self.model, data, gate_scales=scales,
                                     delta_scale=settings.delta_scale, limit=MAX_SCORE_RECORDS,
                                     prompt_format=self.prompts.name, layers=self.layers_of(settings),
                                     image_folder=folder)
            return self.work.run(evaluate, self.model, data, image_folder=folder, gate_scales=scales,
                                 delta_scale=settings.delta_scale, limit=MAX_SCORE_RECORDS, exact=bool(exact),
                                 prompt_format=self.prompts.name, layers=self.layers_of(settings),
                                 max_cached_tokens=self.max_cached_tokens)

    # ----- seeing the gates ------------------------------------------------------------------------------
    def gate_heatmap(self, scale: float, gate_layers: str | None = "all") -> Figure:
        """The effective gates [prompt_layers, n_heads] at `scale` with only `gate_layers` speaking, as a
        matplotlib figure."""
        from .gate_view import draw_gates

        settings = Settings(gate_scale=scale, gate_layers=gate_layers)
        layers = self.layers_of(settings)
        gates = self.model.effective_gates(gate_scale=gate_scale_rows(self.model, [settings.gate_scale], layers))
        return draw_gates(gates, self.model.first_prompt_layer, settings.gate_scale,
                          None if layers is None else describe(layers))

    def token_shares(self, prompt_text: str, answer: str, settings: Settings, image: Any = None) -> PromptShares:
        """How much of the attention output came through the prompts while `answer` was produced: per piece of
        it (averaged over adapter layers) and per adapter layer, from one forward pass over prompt + answer."""
        from .gate_view import prompt_shares

        images = [load_image(image)] if image is not None and self.can_see_images else None
        return self.work.run(prompt_shares, self.model, prompt_text, answer,
                             self._gates(settings, [settings.gate_scale]), settings.delta_scale, images)

    def answer_logprobs(self, prompt_text: Prompt, answer: Answer, settings: Settings, image: Any = None,
                        top_k: int = 0) -> list[TokenLogprob]:
        """Each token of `answer` (a text, or the token ids decoded) with its log-probability at the settings'
        scales and layers (and the `top_k` likeliest at its place; adapter.next_token.answer_logprobs), holding the
        lock."""
        from .next_token import answer_logprobs

        picture = load_image(image) if image is not None and self.can_see_images else None
        return self.work.run(answer_logprobs, self.model, prompt_text, answer,
                             self._gates(settings, [settings.gate_scale]), settings.delta_scale, picture, top_k)

    def training_plot(self) -> Path | None:
        """`gates.png` written by `adapter.finetune` next to this adapter, if there is one."""
        from .gate_view import find_gate_plot

        return find_gate_plot(self.adapter)

    def model_info(self) -> dict[str, Any]:
        """What is loaded and how much memory it takes."""
        model = self.model
        scaling = model.args.rope_scaling
        memory = process_memory_mb()
        info: dict[str, Any] = {
            "base": self.base, "adapter": self.adapter, "base_format": model.base_format,
            "base_packing": model.base_packing or "none",
            "base_family": model.base_family,
            "tokenizer": f"{model.tokenizer.kind}, {model.tokenizer.n_words} pieces",
            "rope_scaling": "none" if scaling is None else f"{scaling.kind} x{scaling.factor:g}",
            "adapter_format": model.adapter_format, "prompt_format": self.prompts.name,
            "v2_parts": ", ".join(model.adapter_args.v2_parts) or "none",
            "prompt_keys_values": model.adapter_args.prompt_projection,
            "quantization": model.quantization or "none",
            "device": str(self.device), "dtype": str(model.tok_embeddings.weight.dtype).replace("torch.", ""),
            "parameters": model.count_parameters(), "trainable_parameters": model.count_parameters(trainable_only=True),
            "adapter_layers": model.adapter_args.prompt_layers if self.has_gates else 0,
            "adapter_layer_numbers": describe(adapter_layers(model)) if self.has_gates else "none",
            "prompt_len": model.adapter_args.prompt_len if self.has_gates else 0,
            "sees_images": self.can_see_images,
            "image_encoder": model.image_encoder.name if model.image_encoder is not None else None,
            "max_seq_len": model.args.max_seq_len, "max_new_tokens": self.max_new_tokens,
            "compiled_decode": self.compile,
            "kv_cache": model.kv_cache,
            "base_weights_mib": round(held_bytes(model) / 2**20, 1),
            "kv_cache_mib_per_1000_tokens": round(1000 * kv_bytes_per_token(model) / 2**20, 1),
            "process_memory_mb": None if memory is None else round(memory, 1),
        }
        if self.device.type == "cuda":
            info["cuda_allocated_mb"] = round(torch.cuda.memory_allocated(self.device) / 2**20, 1)
            info["cuda_reserved_mb"] = round(torch.cuda.memory_reserved(self.device) / 2**20, 1)
        return info


KEY_PREFIX = "sk-session-"  # an API key of one session (Engines.api_key), shaped as OpenAI's keys are


class Engines:
    """The adapters served on one frozen base, by name: one Engine each (their models share the base's tensors,
    see `adapter.load_sharing`, and the device's lock). A request names its adapter; None means the first.

    Most are served to every user (`by_name`); an adapter added privately (the app's `--private-adapters`) is
    served to the one session that added it: `seen_by(session)` is what that session may ask, and to everyone
    else it is as if it were not served at all."""

    def __init__(self, engines: Mapping[str, Engine], defaults: Settings | None = None) -> None:
        if not engines:
            raise ValueError("adapters: serve at least one")
        self.by_name = dict(engines)
        self.private: dict[str, tuple[str, Engine]] = {}  # name -> (the session it is served to, its engine)
        self.defaults = defaults or Settings()  # what a request that sets nothing gets (the served gate, ...)
        self._changing = threading.Lock()  # one add or remove at a time (a trained and an uploaded adapter)
        self._keys: dict[str, str] = {}  # an API key -> the session whose private adapters it reaches

    def settings(self, **fields: Any) -> Settings:
        """A request's settings: the fields it sets over the served defaults (checked: ValueError)."""
        return replace(self.defaults, **fields)

    @property
    def names(self) -> list[str]:
        return list(self.by_name)

    @property
    def default(self) -> Engine:
        return next(iter(self.by_name.values()))

    @property
    def for_images(self) -> str:
        """The name the image tab starts with: the first adapter that can see, else the first."""
        return next((name for name, engine in self.by_name.items() if engine.can_see_images), self.names[0])

    def taken(self, name: str) -> bool:
        """Whether `name` is served, to everyone or to one session."""
        return name in self.by_name or name in self.private

    def add(self, name: str, engine: Engine, owner: str | None = None) -> None:
        """Serve one more adapter (one trained or uploaded while serving: adapter.added_adapters), to everyone or,
        with `owner`, to that session alone. The mappings are replaced, not changed in place, so requests reading
        them meanwhile see them whole, before or after."""
        with self._changing:
            if self.taken(name):
                raise ValueError(f"adapter: {name!r} is served already")
            if owner is None:
                self.by_name = {**self.by_name, name: engine}
            else:
                self.private = {**self.private, name: (owner, engine)}

    def replace(self, name: str, engine: Engine) -> None:
        """Serve `engine` under `name` instead of the one served now, to the same users and in the same place (a
        stopped run's adapter once the run is resumed to its end)."""
        with self._changing:
            if name in self.private:
                self.private = {**self.private, name: (self.private[name][0], engine)}
            elif name in self.by_name:
                self.by_name = {key: engine if key == name else held for key, held in self.by_name.items()}
            else:
                raise ValueError(f"adapter: {name!r} is not served here")

    def remove(self, name: str) -> None:
        """Serve `name` no more (requests under way with it finish); the last one served to everyone stays."""
        with self._changing:
            if name in self.private:
                self.private = {key: held for key, held in self.private.items() if key != name}
                return
            if name not in self.by_name or len(self.by_name) == 1:
                raise ValueError(f"adapter: {name!r} is not served here or is the only one")
            self.by_name = {key: engine for key, engine in self.by_name.items() if key != name}

    def api_key(self, session: str) -> str:
        """The key through which a client without a session (the OpenAI-compatible API) asks what `session` may ask:
        made when first asked for, the same after, until `revoke_key`."""
        with self._changing:
            key = next((key for key, owner in self._keys.items() if owner == session), None)
            if key is None:
                key = KEY_PREFIX + secrets.token_urlsafe(24)
                self._keys = {**self._keys, key: session}
            return key

    def revoke_key(self, session: str) -> None:
        """`session`'s key (if it has one) reaches nothing more: its page was closed."""
        with self._changing:
            self._keys = {key: owner for key, owner in self._keys.items() if owner != session}

    def holds_key(self, key: str) -> bool:
        """Whether `key` is a session's (one its page was given, and not yet revoked)."""
        return key in self._keys

    def seen_with_key(self, key: str | None) -> Engines:
        """What a client presenting `key` may ask: the session's view whose key it is; for any other key, or none,
        the adapters served to everyone."""
        return self.seen_by(self._keys.get(key) if key else None)

    def seen_by(self, session: str | None) -> Engines:
        """What `session` may ask (None: a client without a session, such as the OpenAI-compatible API): the
        adapters served to everyone, then those served to it alone; itself where there are none of those."""
        own = {name: engine for name, (owner, engine) in self.private.items() if owner == session}
        if session is None or not own:
            return self
        return Engines({**self.by_name, **own}, self.defaults)

    def get(self, name: str | None) -> Engine:
        """The engine of adapter `name` (None: the first), or a ValueError naming the choices."""
        if name is None:
            return self.default
        served = self.by_name  # one reading: the mapping may be replaced meanwhile (add, remove)
        if not isinstance(name, str) or name not in served:  # (a list sent by an API client: "unhashable type")
            raise ValueError(f"adapter: {name!r:.200} is not served here; choose from {', '.join(served)}")
        return served[name]


def _each(rows: Iterator[list[str]], pick: Callable[[list[str]], Any]) -> Iterator[Any]:
    """`pick(row)` for each row; closing this closes `rows` at once, which stops decoding and frees the lock."""
    with closing(rows):
        for row in rows:
            yield pick(row)


def process_memory_mb() -> float | None:
    """Resident memory of this process now (VmRSS); the peak (ru_maxrss) where /proc is missing (macOS); None where
    neither can be read (Windows has no `resource` module)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
