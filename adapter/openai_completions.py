"""OpenAI's legacy `POST /v1/completions` for the served adapters: a text continued as it is written (no prompt
format), for the clients and evaluation harnesses that score texts rather than chat.

`prompt` is a text or a list of up to MAX_PROMPTS of them (a choice each, decoded one after another), or token ids
(a list of them, or a list of such lists), fed exactly as given (adapter.prompt_ids: no BOS added); `echo`
returns each prompt (token ids decoded) before its continuation; `logprobs` (0 to MAX_LOGPROBS) gives every
returned token's log-probability at the request's gate and that many likeliest tokens at its place, in the legacy
layout (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`); with `echo`, the prompt's tokens are scored too
(the first has none without a BOS before it: always so for token ids), and `max_tokens: 0` only scores. A
continuation's tokens are the very ones decoded, the end of text that ended it included (as OpenAI and vLLM return
them; lm-evaluation-harness drops the last returned token as the generated one), their log-probabilities kept as
the decode drew them; one cut by a stop string returns the tokens that wrote the cut text (the one the stop string
begins in included, as chat's). The sampling fields, `stop` and
this project's `gate_scale`, `delta_scale` and `gate_layers` are read as in chat completions; `stream` sends the
continuations as server-sent events, one after another, each chunk naming its `index` (with `logprobs`, each
chunk's tokens in the legacy layout); `n` continues each prompt that many times, the j-th with seed + j. Decoding
stops at the end of text or a stop string only: no prompt format's stop strings apply.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator, Sequence
from typing import Any

from .engine import Engine, Engines, Settings
from .openai_api import (
    Call,
    RequestError,
    choices_asked,
    finished,
    options,
    refuse_unserved,
    refused,
    request_stops,
    response_id,
    seeded,
    served,
    sse_events,
    total_usage,
)
from .prompt_ids import Prompt, is_token_ids, prompt_text
from .token_logprob import TokenLogprob

MAX_PROMPTS = 20
MAX_LOGPROBS = 5  # as OpenAI's legacy completions


class TextCall(Call):
    """One prompt's continuation, with what the legacy layout returns besides: the echo and the log-probabilities."""

    def __init__(self, engine: Engine, prompt: Prompt, settings: Settings, logprobs: int | None,
                 stops: tuple[str, ...], echo: bool, score_only: bool, choice: int = 0) -> None:
        if score_only:
            engine.check_scored(prompt)
        generated: list[int] = []
        # kept as it decodes; with an echo (never streamed) prompt and continuation are scored together at the end
        scores = [] if logprobs is not None and not echo else None
        answers = iter([""]) if score_only else engine.complete(prompt, settings, generated, scores, logprobs or 0)
        super().__init__(engine, prompt, answers, generated, settings, None, logprobs, stops, choice, scores)
        self.echo, self.score_only = echo, score_only
        self.prompt_text = prompt_text(engine.model.tokenizer, prompt)
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # the streamed tokens' bytes, read on
        self.unsettled: list[str] = []  # the texts of the tokens sent whose offsets a longer text may still move
        self.settled_end = len(self.prompt_text)  # where the text after the tokens sent before them begins

    def text(self, answer: str) -> str:
        return self.prompt_text + answer if self.echo else answer

    def legacy_logprobs(self, answer: str) -> dict[str, Any] | None:
        """`tokens`, `token_logprobs`, `top_logprobs` and `text_offset` of what is returned (None: not asked)."""
        if self.top_logprobs is None:
            return None
        k = self.top_logprobs
        # the very tokens decoded (an end of text included, as OpenAI returns it); cut by a stop string, those that
        # wrote the cut text (the one the stop string begins in included), as a streamed continuation sends them
        tokens = self.generated[:self.covering(answer) or 0] if self.stopped else self.generated
        if self.echo:
            scored, offset = self.engine.text_logprobs(self.prompt, tokens, self.settings, k), 0
        else:
            scored, offset = self.scores[:len(tokens)], len(self.prompt_text)
        first = self._first_token()  # (scored None: nothing before it)
        texts = [first[0] if token is None else token.text for token in scored]
        written = written_pieces([first[1] if token is None else token.data for token in scored])
        return legacy_layout(scored, texts, text_offsets(self.prompt_text + answer, written, offset)[0])

    def streamed_legacy_logprobs(self, shown: str, last: bool) -> dict[str, Any]:
        """The legacy `logprobs` of a streamed chunk: the tokens decoded that wrote `shown` (the continuation so
        far) not sent before; the last chunk's, every token left (the end of text that ended it included) unless a
        stop string cut the continuation."""
        new = self.new_scores(shown, every=last and not self.stopped)
        texts = [token.text for token in new]
        self.unsettled += written_pieces([token.data for token in new], self.utf8)  # read on from the last
        # settled token, not from the first (quadratic)
        offsets, settled, self.settled_end = text_offsets(self.prompt_text + shown, self.unsettled, self.settled_end)
        del self.unsettled[:settled]
        return legacy_layout(new, texts, offsets[len(offsets) - len(texts):])

    def _first_token(self) -> tuple[str, bytes]:
        """The text and bytes of the prompt's first token."""
        tokenizer = self.engine.model.tokenizer
        ids = tokenizer.encode(self.prompt, bos=False, eos=False) if isinstance(self.prompt, str) else self.prompt
        return tokenizer.token_text(ids[0]), tokenizer.token_bytes(ids[0])

    def finish_reason(self) -> str:
        return "length" if self.score_only else super().finish_reason()


def legacy_layout(scored: list[TokenLogprob | None], texts: list[str], offsets: list[int]) -> dict[str, Any]:
    """The legacy `logprobs` object of tokens scored (None: a first token with nothing before it), their texts and
    where each begins in the text returned."""
    return {"tokens": texts, "token_logprobs": [None if t is None else t.logprob for t in scored],
            "top_logprobs": [None if t is None else {**dict(t.top), t.text: t.logprob} for t in scored],
            "text_offset": offsets}


def written_pieces(data: Sequence[bytes], utf8: Any = None) -> list[str]:
    """The text each token adds, read from its bytes on from those before (`utf8`: an incremental decoder that
    holds them): a character split over byte tokens is written by the one that completes it, the others add none
    (as a stream shows the text), where their texts name them ("<0xC3>") and would be found nowhere in it."""
    utf8 = utf8 or codecs.getincrementaldecoder("utf-8")("replace")
    return [utf8.decode(piece) for piece in data]


def text_offsets(text: str, pieces: list[str], start: int) -> tuple[list[int], int, int]:
    """Where each token's text begins in `text` (the prompt and the continuation as returned), read on from
    `start`. A token's spaces stand for whatever whitespace the text has there (a tokenizer may read a newline as
    a space; SentencePiece writes a first word's space the text does not show), and a token the text does not
    show (BOS, the end of text) takes no room. Also how many of the first pieces were read before the text's end
    (a longer text would place them alike) and where the text after them begins: a stream reads on from there."""
    offsets, at, settled, settled_end, reached_end = [], start, 0, start, False
    for piece in pieces:
        offsets.append(at)
        read = at
        for char in piece:
            reached_end |= read >= len(text)
            if char.isspace():
                read += read < len(text) and text[read].isspace()
                continue
            while read < len(text) and text[read].isspace():
                read += 1
            if read >= len(text) or text[read] != char:
                reached_end |= read >= len(text)
                break
            read += 1
        else:
            at = read
        if not reached_end:
            settled, settled_end = settled + 1, at
    return offsets, settled, settled_end


def completion_calls(engines: Engines, body: Any) -> tuple[str, list[TextCall]]:
    """The adapter's name and one checked (lazy) continuation per prompt of a completions body; RequestError naming
    the field at fault."""
    name, engine = served(engines, body)
    prompts = body.get("prompt")
    prompts = [prompts] if isinstance(prompts, str) or (is_token_ids(prompts) and prompts) else prompts
    if not isinstance(prompts, list) or not 1 <= len(prompts) <= MAX_PROMPTS or \
            not all(isinstance(p, str) or (is_token_ids(p) and p) for p in prompts):
        raise RequestError(f"prompt: expected a text, a list of token ids, or a list of 1 to {MAX_PROMPTS} of "
                           "either", "prompt")
    refuse_unserved(body)
    count = choices_asked(body)
    if body.get("suffix"):
        raise RequestError("suffix: text after the insertion point is not served", "suffix")
    echo, logprobs = bool(body.get("echo")), _logprobs(body)
    if body.get("stream") and echo:
        raise RequestError("stream: a continuation streams without echo", "stream")
    score_only = body.get("max_tokens") == 0
    if score_only and not echo:
        raise RequestError("max_tokens: 0 returns nothing without echo", "max_tokens")
    fields = {key: value for key, value in options(body).items() if not (score_only and key == "max_new_tokens")}
    stops = request_stops(body)
    try:
        settings = engine.check(engines.settings(**fields))
        calls = [TextCall(engine, prompt, seeded(settings, choice), logprobs, stops, echo, score_only, choice)
                 for prompt in prompts for choice in range(count)]
    except ValueError as error:
        raise refused(error, "prompt", body) from None
    if not score_only:
        for call in calls:
            call.check_room(body)
    return name, calls


def _logprobs(body: dict) -> int | None:
    value = body.get("logprobs")
    if value is None or value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS:
        raise RequestError(f"logprobs: must be a whole number from 0 to {MAX_LOGPROBS}, got {value!r}", "logprobs")
    return value


def text_completion(name: str, calls: list[TextCall]) -> dict[str, Any]:
    done = finished(calls)
    return {"id": response_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": name,
            "choices": [{"text": call.text(answer), "index": index, "logprobs": call.legacy_logprobs(answer),
                         "finish_reason": call.finish_reason()} for index, (call, answer) in enumerate(done)],
            "usage": total_usage(calls)}


def stream_text_events(name: str, calls: Sequence[TextCall], usage_chunk: bool = False) -> Iterator[str]:
    """Server-sent events: for each continuation (`index`, as answered whole), each new piece, then its finish
    reason; the usage, [DONE]."""
    head = {"id": response_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": name}

    def pieces() -> Iterator[tuple[dict[str, Any], str | None]]:
        for index, call in enumerate(calls):

            def scored(shown: str, last: bool = False, call: TextCall = call) -> dict[str, Any] | None:
                return None if call.scores is None else call.streamed_legacy_logprobs(shown, last)

            shown = ""
            for piece, shown in call.pieces():
                yield {"text": piece, "index": index, "logprobs": scored(shown)}, None
            yield {"text": "", "index": index, "logprobs": scored(shown, last=True)}, call.finish_reason()

    return sse_events(head, pieces(), calls, usage_chunk)
