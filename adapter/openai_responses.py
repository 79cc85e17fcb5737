"""OpenAI's Responses API for the served adapters, as OpenAI's newer clients ask (`client.responses.create`,
`.retrieve`, `.delete`, `.input_items.list`).

`POST /v1/responses`: the `input` (a text, or messages whose parts are `input_text`, `input_image` with a `data:`
URL, or an earlier answer's `output_text`) and the `instructions` (a system prompt) make the conversation a chat
completion answers; the answer comes back as one `message` output item, whole or streamed as the API's typed events
(`response.created` ... `response.output_text.delta` ... `response.completed`, or `response.incomplete` when
`max_output_tokens` ran out). `include: ["message.output_text.logprobs"]` (with `top_logprobs`) gives each token's
log-probability, as chat's `logprobs`. The sampling fields and this project's `gate_scale`, `delta_scale` and
`gate_layers` are read as in chat completions.

Responses are kept (adapter.response_store; `store: false` keeps none): `previous_response_id` continues one, its
input and answer before the new input (its `instructions` are not carried over, as OpenAI's are not);
`GET /v1/responses/{id}` gives it again, `GET /v1/responses/{id}/input_items` lists what it was answered from, and
`DELETE /v1/responses/{id}` forgets it. Stored conversations (`conversation`), tools, reasoning, a run in the
background and text formats other than plain text are refused by name.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

from fastapi import APIRouter, Request

from .engine import Engines
from .openai_api import (
    SETTING_FIELDS,
    Call,
    Conversation,
    RequestError,
    answer_calls,
    answered,
    finished,
    read_messages,
    refusal,
)
from .response_store import MAX_STORED, ResponseStore

LOGPROBS = "message.output_text.logprobs"  # the one `include` served
# read, refused by name when they ask what is not served, or OpenAI's that change no answer
RESPONSE_FIELDS = frozenset({"model", "input", "instructions", "stream", "top_logprobs", "include", "text", "tools",
                             "tool_choice", "parallel_tool_calls", "reasoning", "previous_response_id", "conversation",
                             "background", "truncation", "store", "metadata", "user", "safety_identifier",
                             "prompt_cache_key", "service_tier",
                             *(set(SETTING_FIELDS) - {"max_tokens", "max_completion_tokens"})})
# the parts each role's messages may carry, as OpenAI's input and output messages
ROLE_PARTS = {"user": ("input_text", "input_image"), "system": ("input_text",), "developer": ("input_text",),
              "assistant": ("output_text",)}
IMAGE_DETAILS = ("auto", "low", "high", "original")
TRUNCATIONS = ("auto", "disabled")
MAX_METADATA = 16  # OpenAI's bounds: pairs, a key's and a value's characters
MAX_METADATA_KEY, MAX_METADATA_VALUE = 64, 512
MAX_LISTED = 100  # input items in one page of GET .../input_items (OpenAI's `limit`)


def add_response_routes(router: APIRouter, view: Callable[[Request], Engines],
                        owner: Callable[[Request], str | None]) -> None:
    """The Responses API's routes on `router`, for the adapters `view(request)` says a request may name; the
    responses they keep are each found only with the key `owner(request)` that asked for it."""
    from .openai_schema import request_body

    store = ResponseStore()

    @router.post("/v1/responses", openapi_extra=request_body("response"))
    async def responses(request: Request):
        seen, turn = view(request), ResponseTurn(store, owner(request))
        return await answered(request, RESPONSE_FIELDS, lambda body: turn.calls(seen, body), turn.events, turn.whole)

    def stored(request: Request, response_id: str):
        found = store.get(response_id, owner(request))
        if found is None:
            raise not_stored(response_id)
        return found

    @router.get("/v1/responses/{response_id}")
    def response(request: Request, response_id: str) -> Any:
        try:
            if request.query_params.get("stream", "").lower() in ("true", "1"):
                raise RequestError("stream: a stored response is given whole", "stream")
            return stored(request, response_id).response
        except RequestError as error:
            return refusal(error)

    @router.delete("/v1/responses/{response_id}")
    def delete(request: Request, response_id: str) -> Any:
        if store.delete(response_id, owner(request)):
            return {"id": response_id, "object": "response", "deleted": True}
        return refusal(not_stored(response_id))

    @router.get("/v1/responses/{response_id}/input_items")
    def input_items(request: Request, response_id: str) -> Any:
        try:
            return listed(stored(request, response_id).items, request.query_params)
        except RequestError as error:
            return refusal(error)


def not_stored(response_id: Any, param: str | None = None) -> RequestError:
    """The refusal of a response id the store does not hold: a 404 for its own routes, a request's field at fault
    (`previous_response_id`) otherwise."""
    message = (f"no stored response {response_id!r:.80} (responses asked with store: false are not kept, and past "
               f"{MAX_STORED} the least recently used go)")
    if param is None:
        return RequestError(message, status=404, code="not_found")
    return RequestError(f"{param}: {message}", param, code="previous_response_not_found")


def listed(items: list[dict[str, Any]], query: Any) -> dict[str, Any]:
    """A page of `items` as OpenAI lists them: `order` (desc, newest first, unless asc), those `after` the item of
    that id, `limit` of them (20 unless asked)."""
    order, after, limit = query.get("order", "desc"), query.get("after"), query.get("limit", "20")
    if order not in ("asc", "desc"):
        raise RequestError(f"order: asc or desc, got {order!r:.40}", "order")
    if not limit.isdigit() or not 1 <= int(limit) <= MAX_LISTED:
        raise RequestError(f"limit: a whole number from 1 to {MAX_LISTED}, got {limit!r:.40}", "limit")
    ordered = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise RequestError(f"after: no input item {after!r:.80} in this response", "after")
        ordered = ordered[ids.index(after) + 1:]
    page = ordered[:int(limit)]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > len(page)}


class ResponseTurn:
    """One `POST /v1/responses`: its checked answer, the items it is answered from (those of the response it
    continues, then its own input) and, once answered to its end, the response kept in `store` (unless asked with
    `store: false`) for the key `owner` presented."""

    def __init__(self, store: ResponseStore, owner: str | None = None) -> None:
        self.store, self.owner = store, owner
        self.items: list[dict[str, Any]] = []
        self.echoed: dict[str, Any] = {"store": True, "previous_response_id": None, "metadata": {},
                                       "instructions": None}

    def calls(self, engines: Engines, body: dict) -> tuple[str, list[Call]]:
        """The adapter's name and the checked (lazy) answer of a Responses API body; RequestError naming the
        field."""
        _refuse_unserved(body)
        asked = body.get("include") or []
        if not isinstance(asked, list) or any(item != LOGPROBS for item in asked):
            raise RequestError(f"include: only {LOGPROBS!r} is served, got {asked!r:.80}", "include")
        if body.get("top_logprobs") is not None and LOGPROBS not in asked:
            raise RequestError(f"top_logprobs: needs include: [{LOGPROBS!r}]", "top_logprobs")
        keep = body.get("store", True)
        if not isinstance(keep, bool):
            raise RequestError(f"store: must be true or false, got {keep!r:.80}", "store")
        if body.get("truncation", "auto") not in TRUNCATIONS:
            raise RequestError(f"truncation: auto or disabled, got {body['truncation']!r:.80}", "truncation")
        self.echoed = {"store": keep, "previous_response_id": body.get("previous_response_id"),
                       "metadata": _metadata(body.get("metadata")), "instructions": body.get("instructions")}
        earlier = self._continued(body.get("previous_response_id"))
        conversation, self.items = read_input(body, earlier)
        chat = {key: value for key, value in body.items() if key not in ("input", "instructions", "include")}
        chat["logprobs"] = LOGPROBS in asked
        try:
            return answer_calls(engines, chat, conversation)
        except RequestError as error:
            raise _in_own_terms(error, body) from None

    def _continued(self, previous: Any) -> list[dict[str, Any]]:
        """The items a continued response was answered from, and its answer after them."""
        if previous is None:
            return []
        found = self.store.get(previous, self.owner) if isinstance(previous, str) else None
        if found is None:
            raise not_stored(previous, "previous_response_id")
        return found.items + [_as_input(item) for item in found.response["output"]]

    def whole(self, name: str, calls: list[Call]) -> dict[str, Any]:
        """The response object of an answer decoded to its end, kept."""
        (call, text), = finished(calls)
        answer = Answer(name, call, self.echoed)
        scored = call.logprobs(text)
        status = answer.status()
        response = answer.response(status, [answer.message(status, [
            answer.output_text(text, None if scored is None else scored["content"])])])
        gone = call.left is not None and call.left.is_set()  # its client left: an answer cut short, for no one
        return response if gone else self._kept(response)

    def events(self, name: str, calls: list[Call], _usage_chunk: bool = False) -> Iterator[str]:
        """The Responses API's server-sent events of a streamed answer, each numbered (`sequence_number`); the
        response is kept once its last is sent (not when its client left before)."""
        call, = calls
        answer = Answer(name, call, self.echoed)
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
        yield event(f"response.{status}", response=self._kept(answer.response(status, [item])))

    def _kept(self, response: dict[str, Any]) -> dict[str, Any]:
        if self.echoed["store"]:
            self.store.put(response, self.items, self.owner)
        return response


def _refuse_unserved(body: dict) -> None:
    """What a Responses request may ask that is not served, by name (a stored conversation, tools, reasoning,
    structured output, a run in the background)."""
    for field, why in (("conversation", "stored conversations are not served: continue a response with "
                                        "previous_response_id, or send the earlier turns in input"),
                       ("reasoning", "the served adapters do not reason"),
                       ("background", "answers are given while the request waits")):
        if body.get(field):
            raise RequestError(f"{field}: {why}", field)
    shape = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else body.get("text")
    if shape and not (isinstance(shape, dict) and shape.get("type") == "text"):
        raise RequestError(f"text: only plain text answers are served, got {body.get('text')!r:.80}", "text")


def _metadata(given: Any) -> dict[str, str]:
    """OpenAI's `metadata`, echoed and kept with the response: up to 16 pairs of texts."""
    if given is None:
        return {}
    if not isinstance(given, dict) or len(given) > MAX_METADATA or not all(
            isinstance(key, str) and isinstance(value, str) and len(key) <= MAX_METADATA_KEY and
            len(value) <= MAX_METADATA_VALUE for key, value in given.items()):
        raise RequestError(f"metadata: up to {MAX_METADATA} pairs of a key of up to {MAX_METADATA_KEY} characters "
                           f"and a text of up to {MAX_METADATA_VALUE}, got {given!r:.80}", "metadata")
    return given


def read_input(body: dict, earlier: list[dict[str, Any]] = ()) -> tuple[Conversation, list[dict[str, Any]]]:
    """The conversation of a Responses body (`instructions`, the `earlier` items of the response it continues,
    then its `input` read as chat's messages, refusals naming `input[i]` as chat's name `messages[i]`) and the
    items it is answered from, each as input_items lists it."""
    given = body.get("input")
    listed_input = [{"role": "user", "content": given}] if isinstance(given, str) else given
    if not isinstance(listed_input, list) or not listed_input:
        raise RequestError("input: give a text or a list of messages ending with the user's", "input")
    items = [*earlier, *(_item(item, index) for index, item in enumerate(listed_input))]
    _refuse_repeated_ids(items, len(earlier))
    try:
        system, history, question, image = read_messages([_chat_message(item) for item in items])
    except RequestError as error:  # "messages[2]: ...", "messages: ..."
        raise _input_error(error, len(earlier)) from None
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise RequestError(f"instructions: expected a text, got {instructions!r:.80}", "instructions")
    if instructions:
        system = instructions if system is None else f"{instructions}\n{system}"
    return (system, history, question, image), items


def _item(given: Any, index: int) -> dict[str, Any]:
    """An input message as input_items lists it (an id, typed parts: a text content is one `input_text`, or
    `output_text` in an assistant's); what is not a message (a function call, its output) is refused."""
    if not isinstance(given, dict) or given.get("type", "message") != "message":
        kind = given.get("type") if isinstance(given, dict) else type(given).__name__
        raise RequestError(f"input[{index}]: only messages are read, got {kind!r:.80} (tool calls and their "
                           "results are not served)", "input")
    role, content = given.get("role"), given.get("content")
    if isinstance(content, str):
        content = [{"type": "output_text" if role == "assistant" else "input_text", "text": content}]
    if not isinstance(content, list):
        raise RequestError(f"input[{index}].content: expected a text or a list of parts", "input")
    named = given.get("id")
    return {"id": named if isinstance(named, str) and named else f"msg_{uuid.uuid4().hex}", "type": "message",
            "role": role,
            "status": "completed", "content": [_part(part, index, role) for part in content]}


def _part(part: Any, index: int, role: Any) -> dict[str, Any]:
    """A message's part as its role's (a user's `input_text` or `input_image`, an assistant's `output_text`)."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in ("input_text", "output_text", "input_image"):
        raise RequestError(f"input[{index}].content: parts must be input_text, input_image or output_text, got "
                           f"{part!r:.120}", "input")
    # (an unknown role is refused as chat's messages refuse it)
    allowed = ROLE_PARTS.get(role, (kind,)) if isinstance(role, str) else (kind,)
    if kind not in allowed:
        article = "an" if role == "assistant" else "a"
        raise RequestError(f"input[{index}].content: {article} {role} message's parts are {' or '.join(allowed)}, "
                           f"got {kind!r}", "input")
    if kind != "input_image":
        return {"type": kind, "text": part.get("text"), **({"annotations": []} if kind == "output_text" else {})}
    detail = part.get("detail") or "auto"
    if detail not in IMAGE_DETAILS:
        raise RequestError(f"input[{index}].content: an input_image's detail is {', '.join(IMAGE_DETAILS)}, got "
                           f"{detail!r:.40}", "input")
    return {"type": kind, "image_url": part.get("image_url"), "detail": detail}


def _refuse_repeated_ids(items: list[dict[str, Any]], earlier: int) -> None:
    """Each item once (a client that continues a response and sends its output again repeats its ids; listed
    twice, `after` an id would page back to its first place for ever)."""
    continued = {item["id"] for item in items[:earlier]}
    seen = set(continued)
    for index, item in enumerate(items[earlier:]):
        if item["id"] in seen:
            why = "previous_response_id brings it already" if item["id"] in continued else "given twice"
            raise RequestError(f"input[{index}]: item id {item['id']!r:.80} repeated ({why})", "input")
        seen.add(item["id"])


def _chat_message(item: dict[str, Any]) -> dict[str, Any]:
    """An input item as chat's message (`input_text` / `output_text` -> `text`, `input_image` -> `image_url`)."""
    return {"role": item["role"], "content": [
        {"type": "image_url", "image_url": {"url": part["image_url"]}} if part["type"] == "input_image" else
        {"type": "text", "text": part["text"]} for part in item["content"]]}


def _as_input(output: dict[str, Any]) -> dict[str, Any]:
    """A response's output message as an item of the next response's input (its texts without log-probabilities)."""
    return {**output, "content": [{key: part[key] for key in ("type", "text", "annotations")}
                                  for part in output["content"]]}


def _input_error(error: RequestError, earlier: int) -> RequestError:
    """A refusal of the messages the items became, naming the item at fault in `input` (after the `earlier` items
    of a continued response)."""
    text = str(error)
    place = re.match(r"messages\[(\d+)\]", text)
    if place is None:
        return RequestError("input" + text.removeprefix("messages"), "input")
    index = int(place[1]) - earlier
    if index < 0:
        return RequestError(f"previous_response_id: its item {place[1]}{text[place.end():]}", "previous_response_id")
    return RequestError(f"input[{index}]{text[place.end():]}", "input")


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
    settings it was answered with and what the request asked to be echoed (`store`, `previous_response_id`,
    `metadata`)."""

    def __init__(self, name: str, call: Call, echoed: dict[str, Any]) -> None:
        self.name, self.call, self.echoed = name, call, echoed
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
                "model": self.name, "output": output, "error": None,
                "max_output_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                "top_p": settings.top_p, "top_logprobs": self.call.top_logprobs or 0, **self.echoed,
                "parallel_tool_calls": False, "tool_choice": "none", "tools": [], "text": {"format": {"type": "text"}},
                "truncation": "auto", "background": False,
                "usage": None if usage is None else {
                    "input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                    "total_tokens": usage["total_tokens"],
                    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                    "output_tokens_details": {"reasoning_tokens": 0}}}

    def status(self) -> str:
        return "incomplete" if self.call.finish_reason() == "length" else "completed"
