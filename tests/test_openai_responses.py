"""OpenAI's Responses API (`POST /v1/responses`, adapter.openai_responses): each answer is the chat-completions
answer to the same conversation and settings, whole or as the API's typed events; what it cannot serve is refused
by name."""

from __future__ import annotations

import json

import pytest

from adapter.app_config import tiny_available

from .openai_helpers import client, engines  # noqa: F401  (fixtures)
from .test_openai_api import PIXEL, SCENE

pytestmark = pytest.mark.skipif(not tiny_available(), reason="assets/tiny not built yet")

LOGPROBS = ["message.output_text.logprobs"]


def respond(client, body: dict) -> dict:
    reply = client.post("/v1/responses", json={"temperature": 0, "max_output_tokens": 30, **body})
    assert reply.status_code == 200, reply.text
    return reply.json()


def chat(client, messages: list, **options) -> dict:
    return client.post("/v1/chat/completions", json={"messages": messages, "temperature": 0, "max_tokens": 30,
                                                     **options}).json()


def only_text(response: dict) -> dict:
    message, = response["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    part, = message["content"]
    assert part["type"] == "output_text" and part["annotations"] == []
    return part


def test_a_response_is_the_chat_answer_with_its_usage_and_log_probabilities(client):
    response = respond(client, {"input": SCENE, "include": LOGPROBS, "top_logprobs": 2})
    answer = chat(client, [{"role": "user", "content": SCENE}], logprobs=True, top_logprobs=2)
    part = only_text(response)
    assert part["text"] == answer["choices"][0]["message"]["content"] == "red"
    assert part["logprobs"] == answer["choices"][0]["logprobs"]["content"]
    assert (response["object"], response["status"], response["incomplete_details"]) == ("response", "completed", None)
    usage = answer["usage"]
    assert response["usage"] == {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                                 "total_tokens": usage["total_tokens"], "input_tokens_details": {"cached_tokens": 0},
                                 "output_tokens_details": {"reasoning_tokens": 0}}
    assert "logprobs" not in only_text(respond(client, {"input": SCENE}))  # not asked, not given


def test_an_answer_cut_by_max_output_tokens_is_incomplete(client):
    response = respond(client, {"input": SCENE, "max_output_tokens": 3, "gate_scale": 0})
    assert (response["status"], response["incomplete_details"]) == ("incomplete", {"reason": "max_output_tokens"})
    assert response["output"][0]["status"] == "incomplete"
    expected = chat(client, [{"role": "user", "content": SCENE}], max_tokens=3, gate_scale=0)
    assert only_text(response)["text"] == expected["choices"][0]["message"]["content"]
    assert response["usage"]["output_tokens"] == 3


def test_earlier_turns_and_a_picture_in_the_input_are_a_chats_messages(client):
    turns = [{"role": "user", "content": SCENE}, {"role": "assistant", "content": "red"},
             {"role": "user", "content": "What colour is the star?"}]
    items = [{"role": "user", "content": [{"type": "input_text", "text": SCENE}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "red"}]},
             {"role": "user", "content": "What colour is the star?"}]
    assert only_text(respond(client, {"input": items}))["text"] == \
        chat(client, turns)["choices"][0]["message"]["content"]
    question = "What colour is the shape?"
    seen = respond(client, {"model": "tiny-image", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": question}, {"type": "input_image", "image_url": PIXEL}]}]})
    expected = chat(client, [{"role": "user", "content": [{"type": "text", "text": question},
                                                          {"type": "image_url", "image_url": {"url": PIXEL}}]}],
                    model="tiny-image")
    assert only_text(seen)["text"] == expected["choices"][0]["message"]["content"]


def test_a_streamed_response_is_the_apis_numbered_events_ending_in_the_whole_response(client):
    body = {"input": SCENE, "gate_scale": 0, "include": LOGPROBS, "temperature": 0, "max_output_tokens": 30}
    whole = respond(client, body)
    with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as reply:
        lines = [line for line in reply.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines[0::2]]
    events = [json.loads(line.removeprefix("data: ")) for line in lines[1::2]]
    assert [event["type"] for event in events] == names
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    deltas = [event for event in events if event["type"] == "response.output_text.delta"]
    assert names == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     f"response.{whole['status']}"]
    text = only_text(whole)["text"]
    assert len(deltas) > 1 and "".join(event["delta"] for event in deltas) == text
    done = events[-4]
    assert done["text"] == text and done["logprobs"] == only_text(whole)["logprobs"]
    assert [t for event in deltas for t in event["logprobs"]] == done["logprobs"]
    final = events[-1]["response"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["usage"] is None
    for key in ("status", "incomplete_details", "usage", "model"):
        assert final[key] == whole[key], key
    assert only_text(final) == only_text(whole)


@pytest.mark.parametrize("body, param, message", [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "previous_response_id: nothing is stored: send the "
                                                                 "earlier turns in input"),
    ({"conversation": "conv_1"}, "conversation", "conversation: nothing is stored"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "reasoning: the served adapters do not reason"),
    ({"background": True}, "background", "background: answers are given while the request waits"),
    ({"text": {"format": {"type": "json_object"}}}, "text", "text: only plain text answers are served"),
    ({"tools": [{"type": "function", "name": "f"}]}, "tools", "tools: function calling is not served"),
    ({"include": ["reasoning.encrypted_content"]}, "include", "include: only 'message.output_text.logprobs' is"),
    ({"top_logprobs": 2}, "top_logprobs", "top_logprobs: needs include: ['message.output_text.logprobs']"),
    ({"input": []}, "input", "input: give a text or a list of messages ending with the user's"),
    ({"input": [{"type": "function_call_output", "output": "4"}]}, "input",
     "input[0]: only messages are read, got 'function_call_output' (tool calls and their results are not served)"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input",
     "input[0].content: parts must be input_text, input_image or output_text"),
    ({"input": [{"role": "assistant", "content": "hi"}]}, "input", "input[0]: expected a user message"),
    ({"instructions": "Be brief."}, "instructions", "instructions: the alpaca prompt format has no system prompt"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": PIXEL}]}]}, "input",
     "input: tiny-text cannot see pictures"),
    ({"max_output_tokens": 0}, "max_output_tokens", "max_output_tokens: must be"),
    ({"max_tokens": 5}, "max_tokens", "max_tokens: not a field this API reads (did you mean 'max_output_tokens'?)"),
])
def test_what_the_responses_api_cannot_serve_is_refused_by_name(client, body, param, message):
    reply = client.post("/v1/responses", json={"input": SCENE, **body})
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == param and error["message"].startswith(message), error
