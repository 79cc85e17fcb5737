"""`python -m adapter.openai_api`: the served adapters behind an OpenAI-compatible HTTP API, for the clients and
tools that speak it (the `openai` package, chat front-ends, evaluation harnesses).

`GET /v1/models` lists the served adapters; `POST /v1/completions` continues or scores raw texts
(adapter.openai_completions), `POST /v1/responses` is OpenAI's Responses API (adapter.openai_responses);
`POST /v1/chat/completions` answers a conversation with one of them
(`model`: its name, the first when left out), whole or streamed as server-sent events (`stream: true`). A user
message may carry a picture as an `image_url` part with a `data:` URL (nothing is fetched from the network): the
conversation is then about that picture, asked as the app's image tab asks it. Besides OpenAI's `temperature`,
`top_p`, `max_tokens` (`max_completion_tokens`), `seed`, `stop`, `presence_penalty`, `frequency_penalty` and
`logit_bias` (and `top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos` and `stop_token_ids` as vLLM
reads them), a request may set this project's
`gate_scale`, `delta_scale` and `gate_layers` (`n` answers are those of the next seeds; what is not served, such as
`tools`, is refused by name), and `logprobs` / `top_logprobs` give each answer token's log-probability at that
gate (streamed: each chunk's tokens with it, as the decode drew them). The flags are the app's (`python app.py
--help`), and so are the answers: each is what `Engine.chat` / `Engine.ask_image` answer for the same settings.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import io
import json
import secrets
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from contextlib import ExitStack, closing
from dataclasses import replace
from functools import cached_property
from typing import Any

import anyio

# with gradio; here, so that FastAPI reads the annotations
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from .arg_types import unicode_output
from .engine import ContextExceeded, Engine, Engines, Settings
from .generate import ends_answer
from .images import decode_image
from .prompt_ids import Prompt, prompt_ids
from .sampling import MAX_SEED
from .token_logprob import TokenLogprob

OWNER = "llama-adapter"
MAX_TOP_LOGPROBS = 20  # as OpenAI's
MAX_STOPS = 4  # as OpenAI's
MAX_CHOICES = 8  # `n`: answers to one request, each with the next seed
LEFT_POLL_S = 0.1  # how often a request answered whole checks that its client is still there
MAX_BODY_BYTES = 32 * 2**20  # a request's JSON: room for a 20 MB picture (OpenAI's limit) in base64
SETTING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "max_tokens": "max_new_tokens",
                  "max_completion_tokens": "max_new_tokens", "max_output_tokens": "max_new_tokens", "seed": "seed",
                  "presence_penalty": "presence_penalty",
                  "frequency_penalty": "frequency_penalty", "top_k": "top_k", "min_p": "min_p",
                  "repetition_penalty": "repetition_penalty", "logit_bias": "logit_bias", "gate_scale": "gate_scale",
                  "delta_scale": "delta_scale", "gate_layers": "gate_layers", "min_tokens": "min_tokens",
                  "ignore_eos": "ignore_eos", "stop_token_ids": "stop_token_ids"}
CONTEXT_CODE = "context_length_exceeded"  # OpenAI's code for a prompt (and max_tokens) the context cannot hold
MAX_STOP_CHARS = 200  # a stop string's length: each streamed piece is held back against every stop's beginnings
# the fields a request may give besides SETTING_FIELDS: read, refused by name when not served (`tools`), or OpenAI's
# that change no answer (`user`, `metadata`, ...); any other is refused, so that a misspelt `gate_scal` is not
# answered as if it were not asked
REQUEST_FIELDS = frozenset({"model", "stream", "stream_options", "n", "stop", "logprobs", "best_of", "response_format",
                            "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                            *SETTING_FIELDS}) - {"max_output_tokens"}  # the Responses API's name (openai_responses)
CHAT_FIELDS = REQUEST_FIELDS | {"messages", "top_logprobs", "tools", "functions", "tool_choice", "function_call",
                                "parallel_tool_calls"}
COMPLETION_FIELDS = REQUEST_FIELDS | {"prompt", "echo", "suffix"}
# what one OpenAI API calls by another's name (a chat body sent to the Responses API, ...), said when refused
RENAMED = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
           "max_output_tokens": "max_tokens", "messages": "input", "input": "messages"}
SWITCHES = ("stream", "echo")  # true or false; `logprobs` too in chat (the legacy completions' is a count)


# what a request asks about: (system prompt, earlier (user, assistant) turns, the last user message, its picture)
Conversation = tuple[str | None, list[tuple[str, str]], str, Any]


class RequestError(ValueError):
    """A request the API refuses: its HTTP status, the field at fault and OpenAI's error code, if it has one."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def build_api(engines: Engines, api_key: str | None = None) -> FastAPI:
    """A FastAPI application serving `engines` at /v1 (this module's command line), to requests presenting
    `api_key` where one is given; a path or method it does not serve, or a request without the key, is answered
    with OpenAI's error object too (the clients read `error.message`)."""
    from starlette.exceptions import HTTPException as AnyHTTPException  # FastAPI's and Starlette's own (404, 405)

    app = FastAPI(title="LLaMA-Adapter (OpenAI-compatible)")
    app.include_router(api_router(engines, api_key))

    @app.get("/health")
    def health() -> dict[str, str]:
        """For a container's or a load balancer's checks, as vLLM and llama.cpp answer it, without the key: the
        server listens only once its adapters are loaded."""
        return {"status": "ok"}

    @app.exception_handler(AnyHTTPException)
    async def unserved(request: Request, error: AnyHTTPException) -> JSONResponse:
        response = refusal(RequestError(f"{request.method} {request.url.path}: {error.detail}", None,
                                        error.status_code, "invalid_api_key" if error.status_code == 401 else None))
        response.headers.update(error.headers or {})  # a 401's WWW-Authenticate
        return response

    return app


def model_entry(name: str, engine: Engine) -> dict[str, Any]:
    """OpenAI's model object of a served adapter, with vLLM's `max_model_len` (its context, which clients read to
    size what they send)."""
    return {"id": name, "object": "model", "created": 0, "owned_by": OWNER,
            "max_model_len": engine.model.args.max_seq_len}


def api_router(engines: Engines, api_key: str | None = None) -> APIRouter:
    """The /v1 routes and vLLM's tokenizer routes (adapter.tokenizer_api), for an application of their own or for
    the Gradio app's (`app.py --openai-api`), where they are added once it runs; so each route answers refusals
    itself rather than through an exception handler (those are fixed when an application starts). With `api_key`,
    every route answers only requests presenting it, or a session's own key (whoever opens the app's page may ask
    through it already): 401 otherwise."""
    from .openai_responses import add_response_routes
    from .openai_schema import request_body
    from .tokenizer_api import add_tokenizer_routes

    def presented(request: Request) -> str | None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        return key.strip() if scheme.lower() == "bearer" else None

    def require_key(request: Request) -> None:
        key = presented(request)
        if api_key is None or key is not None and (secrets.compare_digest(key.encode(), api_key.encode()) or
                                                   engines.holds_key(key)):
            return
        raise HTTPException(401, "no API key presented (Authorization: Bearer KEY; OpenAI's clients send their "
                                 "api_key so)" if key is None else "the API key presented is not this server's",
                            headers={"WWW-Authenticate": "Bearer"})

    router = APIRouter(dependencies=[Depends(require_key)])

    def view(request: Request) -> Engines:
        """What the request may ask: everyone's adapters, and with a session's API key (the app's
        `--private-adapters`) that session's own."""
        return engines.seen_with_key(presented(request))

    @router.get("/v1/models")
    def models(request: Request) -> dict[str, Any]:
        seen = view(request)
        return {"object": "list", "data": [model_entry(name, seen.get(name)) for name in seen.names]}

    @router.get("/v1/models/{model:path}")
    def model(request: Request, model: str) -> Any:
        try:
            if not model:  # (not the first adapter, as a body's empty `model` is)
                raise RequestError("model: give a served adapter's name (GET /v1/models lists them)", "model", 404,
                                   "model_not_found")
            return model_entry(*served(view(request), {"model": model}))
        except RequestError as error:
            return refusal(error)

    @router.post("/v1/chat/completions", openapi_extra=request_body("chat"))
    async def chat_completions(request: Request):
        seen = view(request)
        return await answered(request, CHAT_FIELDS, lambda body: answer_calls(seen, body),
                              lambda name, calls, usage: stream_events(name, calls, usage), completion)

    @router.post("/v1/completions", openapi_extra=request_body("completion"))
    async def completions(request: Request):
        from .openai_completions import completion_calls, stream_text_events, text_completion

        seen = view(request)
        return await answered(request, COMPLETION_FIELDS, lambda body: completion_calls(seen, body),
                              lambda name, calls, usage: stream_text_events(name, calls, usage),
                              text_completion)

    add_response_routes(router, view, presented)
    add_tokenizer_routes(router, view)
    return router


async def answered(request: Request, fields: frozenset[str], check: Callable[[Any], tuple[str, Any]],
                   stream: Callable[[str, Any, bool], Generator[str, None, None]], whole: Callable[[str, Any], dict]):
    """A request's response: its JSON body checked (`fields` the ones it may give, then `check(body)`: the
    adapter's name and the lazy answer, or a RequestError, answered with OpenAI's error object), then answered as
    server-sent events (`stream`, told whether the usage comes in a chunk of its own) or whole (`whole`), each run
    in the thread pool, where decoding may wait for the device."""
    try:
        body = known_fields(await _json_body(request), fields)
        usage_chunk = usage_chunk_asked(body)
        name, answer = await run_in_threadpool(check, body)  # writing the prompt, reading a picture: not on the loop
    except RequestError as error:
        return refusal(error)
    if body.get("stream"):
        return StreamingResponse(closed_when_done(stream(name, answer, usage_chunk)), media_type="text/event-stream")
    return await whole_unless_left(request, whole, name, answer)


async def whole_unless_left(request: Request, whole: Callable[[str, Any], dict], name: str,
                            calls: Sequence[Call]) -> Any:
    """`whole(name, calls)`, run in the thread pool, its decoding ended once the client has gone (an answer not
    streamed, `n` of them up to `max_tokens` each, went on decoding for no one while later requests waited)."""
    left = threading.Event()
    for call in calls:
        call.left = left

    async def watch() -> None:
        while not await request.is_disconnected():
            await anyio.sleep(LEFT_POLL_S)
        left.set()

    async with anyio.create_task_group() as group:
        group.start_soon(watch)
        try:
            return await run_in_threadpool(whole, name, calls)
        finally:
            group.cancel_scope.cancel()


async def closed_when_done(events: Generator[str, None, None]) -> AsyncIterator[str]:
    """`events`, each drawn in the thread pool, and closed however the response ends: a client that goes away
    mid-answer cancels the response, and only closing the generator ends its decoding and lets the device go
    (left open, the compute thread would wait on it and every later answer behind it)."""
    try:
        while (event := await run_in_threadpool(next, events, None)) is not None:
            yield event
    finally:
        with anyio.CancelScope(shield=True):  # the close waits for the token being decoded
            await run_in_threadpool(events.close)


async def answered_json(request: Request, reply: Callable[[Any], dict]) -> Any:
    """`reply(body)` of a request's JSON object, or OpenAI's error object for a RequestError."""
    try:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        return await run_in_threadpool(reply, body)
    except RequestError as error:
        return refusal(error)


async def _json_body(request: Request) -> Any:
    """The request's JSON, read up to MAX_BODY_BYTES (a larger body is refused as it arrives: 413)."""
    too_large = RequestError(f"the body is larger than {MAX_BODY_BYTES // 2**20} MiB", status=413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    try:
        return await run_in_threadpool(json.loads, bytes(body))
    except RecursionError:  # (a 500 and a traceback: a body of nested lists, 200 KB)
        raise RequestError("the body's JSON is nested too deeply") from None
    except ValueError as error:  # not JSON, not UTF-8, a number of over 4,300 digits
        raise RequestError(f"the body is not JSON ({error})") from None


def refusal(error: RequestError) -> JSONResponse:
    """OpenAI's error object for a refused request."""
    return JSONResponse({"error": {"message": str(error), "type": "invalid_request_error", "param": error.param,
                                   "code": error.code}}, status_code=error.status)


class Call:
    """One checked request: the answers so far (an iterator that holds the device while it runs), what the usage
    figures count, and the log-probabilities asked for (None: not asked; `scores`: kept as the answer decodes)."""

    def __init__(self, engine: Engine, prompt: Prompt, answers: Iterator[str], generated: list[int],
                 settings: Settings, image: Any, top_logprobs: int | None, stops: tuple[str, ...] = (),
                 choice: int = 0, scores: list[TokenLogprob] | None = None) -> None:
        self.engine, self.prompt, self.answers, self.settings = engine, prompt, answers, settings
        self.generated = generated  # every token decoded, as `answers` decodes them (the stop id included)
        self.scores = scores  # each one's log-probability beside it, when logprobs are asked
        self.sent = 0  # how many of them went with the chunks streamed so far
        self.image, self.top_logprobs, self.stops = image, top_logprobs, stops
        self.choice = choice  # which of its prompt's `n` answers
        self.stopped = False  # a stop string ended the answer
        self.left: threading.Event | None = None  # set when the client of an answer not streamed has gone

    def close(self) -> None:
        """End its decoding now and let the device go (its client has gone), whoever still holds this call."""
        getattr(self.answers, "close", lambda: None)()  # a scored prompt's answer decodes nothing

    @cached_property
    def prompt_tokens(self) -> int:
        model = self.engine.model
        return len(prompt_ids(model.tokenizer, self.prompt, model.args.vocab_size))

    def check_room(self, body: dict) -> None:
        """OpenAI's (and vLLM's) refusal of a `max_tokens` asked that the prompt leaves no room for in the
        context; left out, an answer ends where the context does (finish reason "length")."""
        given = [name for name, ours in SETTING_FIELDS.items()
                 if ours == "max_new_tokens" and body.get(name) is not None]
        limit, asked = self.engine.model.args.max_seq_len, self.settings.max_new_tokens
        if given and self.prompt_tokens + asked > limit:
            raise RequestError(f"{given[0]}: the prompt's {self.prompt_tokens} tokens and {asked} new ones exceed "
                               f"this model's context of {limit} tokens", given[0], code=CONTEXT_CODE)

    def texts(self) -> Iterator[str]:
        """The answer so far as it may be shown: cut before the first of the request's stop strings (decoding ends
        there), and meanwhile without a tail that could still become one."""
        answer = ""
        for answer in self.answers:
            if self.left is not None and self.left.is_set():  # no one is waiting: the device goes to the next
                self.close()
                return
            found = [answer.find(stop) for stop in self.stops if stop in answer]
            if found:
                self.stopped = True
                self.close()  # ends decoding at this token
                yield answer[:min(found)]
                return
            yield answer[:len(answer) - _stop_prefix(answer, self.stops)]
        yield answer  # decoding has ended: what was held back is no stop string

    def pieces(self) -> Iterator[tuple[str, str]]:
        """Each new piece of `texts`, for streaming, with the text so far."""
        answer = ""
        for grown in self.texts():
            if len(grown) > len(answer):
                yield grown[len(answer):], grown
            answer = grown

    def logprobs(self, answer: str) -> dict[str, Any] | None:
        """OpenAI's `logprobs` of a choice: each answer token's, with the likeliest at its place, as the decode kept
        them (`scores`); scored by a forward of their own where no tokens decoded write the answer."""
        if self.top_logprobs is None or (self.left is not None and self.left.is_set()):
            return None
        tokens = self.covering(answer)
        scored = self.scores[:tokens] if self.scores is not None and tokens is not None else \
            self.engine.answer_logprobs(self.prompt, answer, self.settings, self.image, self.top_logprobs)  # re-read
        return {"content": [chat_entry(token) for token in scored]}

    def streamed_logprobs(self, shown: str) -> dict[str, Any]:
        """OpenAI's `logprobs` of a streamed chunk: the scores of the tokens decoded that wrote `shown` (the answer
        so far) not sent with an earlier chunk."""
        return {"content": [chat_entry(token) for token in self.new_scores(shown)]}

    def new_scores(self, shown: str, every: bool = False) -> list[TokenLogprob]:
        """The scores kept (`scores`) of the tokens that wrote `shown` (as `covering` counts them) not taken
        before, for the streamed chunk that shows it; none until some tokens do. `every`: all those left."""
        tokens = len(self.generated) if every else self.covering(shown, self.sent)
        new = [] if tokens is None or self.scores is None else self.scores[self.sent:tokens]
        self.sent += len(new)
        return new

    def covering(self, answer: str, start: int = 0) -> int | None:
        """How many of the tokens decoded wrote `answer`: the fewest from the first (at least `start`) whose text
        holds it (the one a stop string begins in included; an end of text, a prompt format's stop, what followed a
        stop string not), as OpenAI scores the tokens sampled; None where no number of them does."""
        decode, wanted = self.engine.model.tokenizer.decode, answer.strip()
        return next((n for n in range(start, len(self.generated) + 1)
                     if decode(self.generated[:n]).strip().startswith(wanted)), None)

    def finish_reason(self) -> str:
        """"length" when decoding ran out of tokens (`max_tokens`, or the context's end), else "stop" (the end of
        text, a stop string, the prompt format's end of turn)."""
        if self.stopped or (self.generated and ends_answer(self.generated[-1], self.engine.model.tokenizer.stop_ids,
                                                           self.settings.ignore_eos, self.settings.stop_token_ids)):
            return "stop"
        decoded = len(self.generated)
        full = decoded >= self.settings.max_new_tokens or \
            self.prompt_tokens + decoded >= self.engine.model.args.max_seq_len
        return "length" if full else "stop"

    def usage(self) -> dict[str, int]:
        """The prompt's tokens and those decoded (the one that ended the answer included, as vLLM counts)."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.generated),
                "total_tokens": self.prompt_tokens + len(self.generated)}


def known_fields(body: Any, fields: frozenset[str]) -> dict:
    """`body` when it is a JSON object of `fields` only, its switches (`stream`, `echo`) true or false; else a
    RequestError naming the field (a misspelt field is not answered as if it were not asked, nor `"stream":
    "no"` as a stream)."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    for field, value in body.items():
        if field not in fields:
            close = [RENAMED[field]] if RENAMED.get(field) in fields else difflib.get_close_matches(field, fields, n=1)
            raise RequestError(f"{field[:80]}: not a field this API reads" + (f" (did you mean {close[0]!r}?)"
                                                                            if close else ""), field[:80])
        if field in SWITCHES and value is not None and not isinstance(value, bool):
            raise RequestError(f"{field}: must be true or false, got {value!r:.80}", field)
    return body


def served(engines: Engines, body: Any) -> tuple[str, Engine]:
    """The adapter a request body names (`model`; the first served when left out) and its engine."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    name = body.get("model") or engines.names[0]
    if name not in engines.names:
        raise RequestError(f"model: no adapter {name!r} is served (served: {', '.join(engines.names)})", "model",
                           404, "model_not_found")
    return name, engines.get(name)


def refuse_unserved(body: dict) -> None:
    """A RequestError for what a request asks that is not served, rather than answering as if it were not asked:
    the best of several answers (`best_of`), function calling, structured output."""
    if body.get("best_of", 1) not in (1, None):
        raise RequestError(f"best_of: only 1 is served, got {body['best_of']!r}", "best_of")
    for field in ("tools", "functions"):
        if body.get(field):
            raise RequestError(f"{field}: function calling is not served", field)
    shape = body.get("response_format")
    if shape and not (isinstance(shape, dict) and shape.get("type") == "text"):
        raise RequestError(f"response_format: only text answers are served, got {shape!r:.80}", "response_format")


def choices_asked(body: dict) -> int:
    """OpenAI's `n`: how many answers (1 to MAX_CHOICES; streamed one after another, each chunk naming its
    answer's `index`)."""
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise RequestError(f"n: must be a whole number from 1 to {MAX_CHOICES}, got {n!r}", "n")
    return n


def seeded(settings: Settings, choice: int) -> Settings:
    """The settings of a request's `choice`-th answer: the next seed each (the first is the request's own; after
    MAX_SEED, 0), so sampled answers differ and each is the one a request with that seed gets."""
    if settings.seed is None or choice == 0:
        return settings
    return replace(settings, seed=(settings.seed + choice) % (MAX_SEED + 1))


def options(body: dict) -> dict[str, Any]:
    """The Settings fields a request body sets (OpenAI's names and this project's). Without a `seed` a request
    samples afresh, as OpenAI's does (the app's seed 0 is there so that its gate slider alone changes an answer)."""
    return {"seed": None, **{ours: body[theirs] for theirs, ours in SETTING_FIELDS.items()
                             if body.get(theirs) is not None}}


def refused(error: ValueError, default_param: str, body: dict) -> RequestError:
    """An engine's ValueError as a refusal naming the request field at fault, by the name the request gave it (its
    message starts with the setting; anything else is `default_param`'s)."""
    field, _, rest = str(error).partition(":")
    theirs = [name for name, ours in SETTING_FIELDS.items() if ours == field]
    code = CONTEXT_CODE if isinstance(error, ContextExceeded) else None
    if not theirs:
        return RequestError(str(error), default_param, code=code)
    param = next((name for name in theirs if body.get(name) is not None), theirs[0])
    return RequestError(f"{param}:{rest}", param, code=code)


def answer_calls(engines: Engines, body: Any, conversation: Conversation | None = None) -> tuple[str, list[Call]]:
    """The adapter's name and the checked (lazy) answers of a chat-completions body (`n` of them), to its
    `messages` or to a `conversation` read from elsewhere (the Responses API's input); RequestError naming the field
    at fault."""
    name, engine = served(engines, body)
    refuse_unserved(body)
    count = choices_asked(body)
    system, history, question, image = conversation or read_messages(body.get("messages"))
    if image is not None and not engine.can_see_images:  # the app's tab answers from the text, and says so
        seeing = [other for other in engines.names if engines.get(other).can_see_images]
        raise RequestError(f"messages: {name} cannot see pictures (no visual prompt, or no CLIP tower); "
                           f"{'ask ' + ' or '.join(seeing) if seeing else 'no served adapter can'}", "messages")
    top_logprobs, stops = _top_logprobs(body), request_stops(body)
    try:
        settings = engine.check(engines.settings(system=system, **options(body)))
        if image is None:
            prompt, picture = engine.chat_prompt(history, question, settings), None
        else:  # the picture as the adapter sees it (None for one that cannot)
            prompt, pictures = engine.image_rows(image, question, settings, 1, history)
            picture = pictures[0] if pictures else None
        chosen = [seeded(settings, choice) for choice in range(count)]
        generated: list[list[int]] = [[] for _ in chosen]
        scores = [None if top_logprobs is None else [] for _ in chosen]  # kept as each answer decodes
        answers = [engine.answer_prompt(prompt, each, picture, tokens, scored, top_logprobs or 0)  # written once
                   for each, tokens, scored in zip(chosen, generated, scores)]
    except ValueError as error:
        raise refused(error, "messages", body) from None
    calls = [Call(engine, prompt, *decoding, picture, top_logprobs, stops, choice, scored)
             for choice, (*decoding, scored) in enumerate(zip(answers, generated, chosen, scores))]
    calls[0].check_room(body)
    return name, calls


def request_stops(body: dict) -> tuple[str, ...]:
    """OpenAI's `stop`: a string or up to 4 of them."""
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stop is None:
        return ()
    if not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOPS or \
            not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise RequestError(f"stop: expected a string of 1 to {MAX_STOP_CHARS} characters or a list of up to "
                           f"{MAX_STOPS} of them, got {stop!r}"[:240], "stop")
    return tuple(stops)


def _stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """How long the end of `text` is that begins one of `stops` (held back until it is known not to be one)."""
    return max((n for stop in stops for n in range(min(len(stop) - 1, len(text)), 0, -1)
                if stop.startswith(text[-n:])), default=0)


def _top_logprobs(body: dict) -> int | None:
    """How many alternatives each token's log-probability comes with; None when no log-probabilities are asked."""
    top, asked = body.get("top_logprobs"), body.get("logprobs")
    if asked is not None and not isinstance(asked, bool):
        raise RequestError(f"logprobs: must be true or false, got {asked!r:.80}", "logprobs")
    if not asked:
        if top is not None:
            raise RequestError("top_logprobs: needs logprobs: true", "top_logprobs")
        return None
    if top is None:
        return 0
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise RequestError(f"top_logprobs: must be a whole number from 0 to {MAX_TOP_LOGPROBS}, got {top!r}",
                           "top_logprobs")
    return top


def read_messages(messages: Any) -> Conversation:
    """(system prompt, earlier (user, assistant) turns, the last user message, its conversation's picture).
    Messages of one role in a row are one turn, their texts a line apart (OpenAI takes them so)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: give a list of {role, content} messages ending with the user's", "messages")
    system, turns, images = None, [], []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{index}]: expected a {{role, content}} object, got "
                               f"{type(message).__name__}", "messages")
        role = message.get("role")
        if role in ("tool", "function") or message.get("tool_calls") or message.get("function_call"):
            raise RequestError(f"messages[{index}]: tool calls and their results are not served (function calling)",
                               "messages")
        if role not in ("system", "developer", "user", "assistant"):
            raise RequestError(f"messages[{index}]: unknown role {role!r} (system, user or assistant)", "messages")
        text, pictures = _text(message, index)
        if role != "user":
            _refuse_pictures(pictures, index, role)
        if role in ("system", "developer"):
            if index:
                raise RequestError(f"messages[{index}]: only the first message may be the system's", "messages")
            system = text
        elif turns and turns[-1][0] == role:
            turns[-1][1] += "\n" + text
        elif not turns and role == "assistant":
            raise RequestError(f"messages[{index}]: expected a user message, got 'assistant'", "messages")
        else:
            turns.append([role, text])
        images += pictures
    if not turns or turns[-1][0] != "user":
        raise RequestError("messages: the last message must be the user's (an assistant's to continue is not "
                           "served)", "messages")
    if len(images) > 1:
        raise RequestError("messages: a conversation may be about one picture (image_url), got "
                           f"{len(images)}", "messages")
    texts = [text for _, text in turns]
    return system, list(zip(texts[:-1:2], texts[1:-1:2])), texts[-1], images[0] if images else None


def _refuse_pictures(pictures: list[Any], index: int, role: str) -> None:
    """Only a user message may carry the conversation's picture (one elsewhere would be dropped unseen)."""
    if pictures:
        article = "an" if role[0] in "aeiou" else "a"
        raise RequestError(f"messages[{index}]: {article} {role} message may not carry a picture (image_url); give "
                           "it in a user message", "messages")


def _text(message: dict, index: int) -> tuple[str, list[Any]]:
    """A message's text (its text parts joined) and the pictures among its parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError(f"messages[{index}].content: expected text or a list of parts", "messages")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            images.append(_picture(part.get("image_url"), index))
        else:
            raise RequestError(f"messages[{index}].content: parts must be text or image_url, got {part!r}"[:200],
                               "messages")
    return "\n".join(texts), images


def _picture(image_url: Any, index: int) -> Any:
    """The picture of a `data:` URL (base64); other URLs are refused (nothing is fetched)."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    where = f"messages[{index}].image_url"
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise RequestError(f"{where}: only data: URLs with base64 pictures are read (nothing is downloaded)",
                           "messages")
    try:
        data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except binascii.Error as error:
        raise RequestError(f"{where}: not base64 ({error})", "messages") from None
    try:  # its size checked before it is decoded, turned upright as its EXIF says: as a file the app reads
        return decode_image(io.BytesIO(data), where)
    except ValueError as error:
        raise RequestError(str(error).removeprefix("image: "), "messages") from None


def chat_entry(token: TokenLogprob) -> dict[str, Any]:
    """A token of chat's `logprobs.content`: its text, log-probability and bytes, and the likeliest at its place."""

    def entry(text: str, logprob: float, data: bytes) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(data)}

    return {**entry(token.text, token.logprob, token.data),
            "top_logprobs": [entry(*top, data) for top, data in zip(token.top, token.top_data)]}


def completion(name: str, calls: list[Call]) -> dict[str, Any]:
    done = finished(calls)
    return {"id": response_id(), "object": "chat.completion", "created": int(time.time()), "model": name,
            "choices": [{"index": index, "message": {"role": "assistant", "content": answer},
                         "logprobs": call.logprobs(answer), "finish_reason": call.finish_reason()}
                        for index, (call, answer) in enumerate(done)],
            "usage": total_usage(calls)}


def finished(calls: Sequence[Call]) -> list[tuple[Call, str]]:
    """Each call with its whole answer, decoded to its end one after another."""
    done = []
    for call in calls:
        answer = ""
        for answer in call.texts():
            pass
        done.append((call, answer))
    return done


def total_usage(calls: Sequence[Call]) -> dict[str, int]:
    """Usage summed over a request's answers, each prompt counted once (as OpenAI counts `n` answers)."""
    prompt = completion_tokens = 0
    for call in calls:
        usage = call.usage()
        prompt += usage["prompt_tokens"] if call.choice == 0 else 0
        completion_tokens += usage["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def usage_chunk_asked(body: Any) -> bool:
    """OpenAI's `stream_options.include_usage`: the usage streamed in a chunk of its own, after the last answer
    chunk and with no choices, every chunk before it carrying `"usage": null` (not asked: the usage rides on the
    chunk that ends the answer)."""
    options = body.get("stream_options") if isinstance(body, dict) else None
    if options is None:
        return False
    if not body.get("stream"):
        raise RequestError("stream_options: only for streamed answers (stream: true)", "stream_options")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise RequestError(f"stream_options: give {{\"include_usage\": true or false}}, got {options!r:.80}",
                           "stream_options")
    return options.get("include_usage", False)


def sse_events(head: dict[str, Any], choice_events: Iterator[tuple[dict[str, Any], str | None]],
               calls: Sequence[Call], usage_chunk: bool) -> Iterator[str]:
    """Server-sent events of a request's streamed answers: a chunk per `(choice, finish reason)`, the usage on the
    one that ends the last answer or (`usage_chunk`) in one of its own, then [DONE]."""

    def event(choices: list[dict[str, Any]], usage: dict[str, int] | None) -> str:
        chunk = {**head, "choices": choices, **({"usage": usage} if usage_chunk or usage is not None else {})}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    ended = 0
    with ExitStack() as held:  # a client gone mid-answer ends its decoding now
        for call in calls:
            held.enter_context(closing(call))
        held.enter_context(closing(choice_events))
        for choice, finish in choice_events:
            ended += finish is not None
            last = ended == len(calls) and not usage_chunk
            yield event([{**choice, "finish_reason": finish}], total_usage(calls) if last else None)
    if usage_chunk:
        yield event([], total_usage(calls))
    yield "data: [DONE]\n\n"


def stream_events(name: str, calls: Sequence[Call], usage_chunk: bool = False) -> Iterator[str]:
    """Server-sent events: for each answer (`index`), the role, each new piece, the finish reason; the usage,
    [DONE]."""
    head = {"id": response_id(), "object": "chat.completion.chunk", "created": int(time.time()), "model": name}

    def deltas() -> Iterator[tuple[dict[str, Any], str | None]]:
        for index, call in enumerate(calls):

            def scored(shown: str, call: Call = call) -> dict[str, Any]:
                return {} if call.scores is None else {"logprobs": call.streamed_logprobs(shown)}

            yield {"index": index, "delta": {"role": "assistant", "content": ""}}, None
            shown = ""
            for piece, shown in call.pieces():
                yield {"index": index, "delta": {"content": piece}, **scored(shown)}, None
            yield {"index": index, "delta": {}, **scored(shown)}, call.finish_reason()

    return sse_events(head, deltas(), calls, usage_chunk)


def response_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def main(argv: Sequence[str] | None = None) -> int:
    unicode_output()
    import uvicorn

    from .app_config import Command, check_listening, load_engines, parse_config

    command = Command("python -m adapter.openai_api", "The served adapters behind an OpenAI-compatible HTTP API "
                      "(/v1/models, /v1/chat/completions, /v1/responses, /v1/completions), without the app's page; "
                      "it takes the app's flags, of which --share, --openai-api, --no-train-tab, --train-max-steps, "
                      "--no-upload and --no-push concern that page alone.")
    try:
        config = parse_config(argv, command=command)
        check_listening(config.host, config.port)
        app = build_api(load_engines(config), config.api_key)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    keyed = "; requests present the API key" if config.api_key else ""
    print(f"OpenAI-compatible API on http://{config.host}:{config.port}/v1 (models: GET /v1/models{keyed})")
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    return 0


if __name__ == "__main__":  # run by the package's copy of this module: the one whose RequestError the routes
    from adapter.openai_api import main as served_main  # in other modules (completions, tokenizer) raise

    sys.exit(served_main())
