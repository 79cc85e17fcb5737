"""OpenAI's Responses API (`POST /v1/responses`) for the served adapters, as OpenAI's newer clients ask
(`client.responses.create`): the `input` (a text, or messages whose parts are `input_text`, `input_image` with a
`data:` URL, or an earlier answer's `output_text`) and the `instructions` (a system prompt) make the conversation a
chat completion answers; the answer comes back as one `message` output item, whole or streamed as the API's typed
events (`response.created` ... `response.output_text.delta` ... `response.completed`, or `response.incomplete` when
`max_output_tokens` ran out). `include: ["message.output_text.logprobs"]` (with `top_logprobs`) gives each token's
log-probability, as chat's `logprobs`. The sampling fields and this project's `gate_scale`, `delta_scale` and
`gate_layers` are read as in chat completions. Nothing is stored: `previous_response_id` and `conversation` are
refused (send the earlier turns in `input`), as are tools, reasoning and a text format other than plain text.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from typing import Any

from .engine import Engines
from .openai_api import (
    SETTING_FIELDS,
    Call,
    Conversation,
    RequestError,
    answer_calls,
    finished,
    read_messages,
)

LOGPROBS = "message.output_text.logprobs"  # the one `include` served
# read, refused by name when they ask what is not served, or OpenAI's that change no answer
RESPONSE_FIELDS = frozenset({"model", "input", "instructions", "stream", "top_logprobs", "include", "text", "tools",
                             "tool_choice", "parallel_tool_calls", "reasoning", "previous_response_id", "conversation",
                             "background", "truncation", "store", "metadata", "user", "safety_identifier",
                             "prompt_cache_key", "service_tier",
                             *(set(SETTING_FIELDS) - {"max_tokens", "max_completion_tokens"})})
PARTS = {"input_text": "text", "output_text": "text", "input_image": "image_url"}  # as chat's content parts


def response_calls(engines: Engines, body: dict) -> tuple[str, list[Call]]:
    """The adapter's name and the checked (lazy) answer of a Responses API body; RequestError naming the field."""
    _refuse_unserved(body)
    asked = body.get("include") or []
    if not isinstance(asked, list) or any(item != LOGPROBS for item in asked):
        raise RequestError(f"include: only {LOGPROBS!r} is served, got {asked!r:.80}", "include")
    if body.get("top_logprobs") is not None and LOGPROBS not in asked:
        raise RequestError(f"top_logprobs: needs include: [{LOGPROBS!r}]", "top_logprobs")
    chat = {key: value for key, value in body.items() if key not in ("input", "instructions", "include")}
    chat["logprobs"] = LOGPROBS in asked
    try:
        return answer_calls(engines, chat, read_input(body))
    except RequestError as error:
        raise _in_own_terms(error, body) from None


def _refuse_unserved(body: dict) -> None:
    """What a Responses request may ask that is not served, by name (a stored conversation, tools, reasoning,
    structured output, a run in the background)."""
    for field, why in (("previous_response_id", "nothing is stored: send the earlier turns in input"),
                       ("conversation", "nothing is stored: send the earlier turns in input"),
                       ("reasoning", "the served adapters do not reason"),
                       ("background", "answers are given while the request waits")):
        if body.get(field):
            raise RequestError(f"{field}: {why}", field)
    shape = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else body.get("text")
    if shape and not (isinstance(shape, dict) and shape.get("type") == "text"):
        raise RequestError(f"text: only plain text answers are served, got {body.get('text')!r:.80}", "text")


def read_input(body: dict) -> Conversation:
    """The conversation of a Responses body: `instructions` and its `input` read as chat's messages, refusals
    naming `input[i]` (as chat's name `messages[i]`)."""
    given = body.get("input")
    items = [{"role": "user", "content": given}] if isinstance(given, str) else given
    if not isinstance(items, list) or not items:
        raise RequestError("input: give a text or a list of messages ending with the user's", "input")
    messages = [_message(item, index) for index, item in enumerate(items)]
    try:
        system, history, question, image = read_messages(messages)
    except RequestError as error:  # "messages[2]: ...", "messages: ..."
        raise RequestError("input" + str(error).removeprefix("messages"), "input") from None
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise RequestError(f"instructions: expected a text, got {instructions!r:.80}", "instructions")
    if instructions:
        system = instructions if system is None else f"{instructions}\n{system}"
    return system, history, question, image


def _message(item: Any, index: int) -> Any:
    """An input item as chat's message: its parts renamed (`input_text` -> `text`, `input_image` ->
    `image_url`); what is not a message (a function call, its output) is refused."""
    if not isinstance(item, dict) or item.get("type", "message") != "message":
        kind = item.get("type") if isinstance(item, dict) else type(item).__name__
        raise RequestError(f"input[{index}]: only messages are read, got {kind!r:.80} (tool calls and their "
                           "results are not served)", "input")
    content = item.get("content")
    if isinstance(content, list):
        content = [_part(part, index) for part in content]
    return {"role": item.get("role"), "content": content}


def _part(part: Any, index: int) -> Any:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in PARTS:
        raise RequestError(f"input[{index}].content: parts must be input_text, input_image or output_text, got "
                           f"{part!r:.120}", "input")
    if PARTS[kind] == "text":
        return {"type": "text", "text": part.get("text")}
    return {"type": "image_url", "image_url": {"url": part.get("image_url")}}


def _in_own_terms(error: RequestError, body: dict) -> RequestError:
    """A refusal of the chat request a Responses body became, naming the Responses API's fields: `instructions`
    (chat's system prompt) and `input` (chat's `messages`)."""
    text = str(error)
    if body.get("instructions") and text.startswith("system:"):
        return RequestError("instructions:" + text.removeprefix("system:"), "instructions")
    if error.param == "messages":
        return RequestError("input" + text.removeprefix("messages"), "input", error.status, error.code)
    return error


class Answer:
    """What a response object says of one call's answer, as its text grows: the output message, the status, the
    settings it was answered with."""

    def __init__(self, name: str, call: Call) -> None:
        self.name, self.call = name, call
        self.id, self.message_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())

    def output_text(self, text: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [],
                **({} if logprobs is None else {"logprobs": logprobs})}

    def message(self, status: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": parts}

    def response(self, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        """The response object; `status` "in_progress" while streaming, then "completed" or "incomplete"."""
        settings = self.call.settings
        usage = None if status == "in_progress" else self.call.usage()
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "model": self.name, "output": output, "error": None, "instructions": settings.system,
                "max_output_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                "top_p": settings.top_p, "top_logprobs": self.call.top_logprobs, "metadata": {},
                "parallel_tool_calls": False, "tool_choice": "none", "tools": [], "text": {"format": {"type": "text"}},
                "truncation": "auto", "store": False, "background": False, "previous_response_id": None,
                "usage": None if usage is None else {
                    "input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                    "total_tokens": usage["total_tokens"], "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens_details": {"reasoning_tokens": 0}}}

    def status(self) -> str:
        return "incomplete" if self.call.finish_reason() == "length" else "completed"


def whole_response(name: str, calls: list[Call]) -> dict[str, Any]:
    """The response object of an answer decoded to its end."""
    (call, text), = finished(calls)
    answer = Answer(name, call)
    scored = call.logprobs(text)
    status = answer.status()
    return answer.response(status, [answer.message(status, [
        answer.output_text(text, None if scored is None else scored["content"])])])


def response_events(name: str, calls: list[Call], _usage_chunk: bool = False) -> Iterator[str]:
    """The Responses API's server-sent events of a streamed answer, each numbered (`sequence_number`)."""
    call, = calls
    answer = Answer(name, call)
    asked = call.scores is not None
    number = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal number
        number += 1
        data = json.dumps({"type": kind, "sequence_number": number - 1, **fields}, ensure_ascii=False)
        return f"event: {kind}\ndata: {data}\n\n"

    place = {"item_id": answer.message_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=answer.response("in_progress", []))
    yield event("response.in_progress", response=answer.response("in_progress", []))
    yield event("response.output_item.added", output_index=0, item=answer.message("in_progress", []))
    yield event("response.content_part.added", **place, part=answer.output_text("", [] if asked else None))
    text, scored = "", []
    with closing(call):  # a client gone mid-answer ends its decoding now
        for piece, text in call.pieces():
            new = call.streamed_logprobs(text)["content"] if asked else []
            scored += new
            yield event("response.output_text.delta", **place, delta=piece, logprobs=new)
    if asked:
        scored += call.streamed_logprobs(text)["content"]
    part = answer.output_text(text, scored if asked else None)
    status = answer.status()
    item = answer.message(status, [part])
    yield event("response.output_text.done", **place, text=text, logprobs=scored)
    yield event("response.content_part.done", **place, part=part)
    yield event("response.output_item.done", output_index=0, item=item)
    yield event(f"response.{status}", response=answer.response(status, [item]))

