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
                                 "total_tokens": usage["total_tokens"],
                                 "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                                 "output_tokens_details": {"reasoning_tokens": 0}}
    assert (response["top_logprobs"], response["instructions"]) == (2, None)
    unasked = respond(client, {"input": SCENE})
    assert "logprobs" not in only_text(unasked) and unasked["top_logprobs"] == 0  # not asked, not given


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
    ({"previous_response_id": "resp_1"}, "previous_response_id", "previous_response_id: no stored response 'resp_1' "
                                                                 "(responses asked with store: false are not kept"),
    ({"conversation": "conv_1"}, "conversation", "conversation: stored conversations are not served: continue a "
                                                 "response with previous_response_id"),
    ({"store": "yes"}, "store", "store: must be true or false, got 'yes'"),
    ({"metadata": {"k": 1}}, "metadata", "metadata: up to 16 pairs of a key of up to 64 characters and a text"),
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
    ({"input": [{"role": "user", "content": [{"type": "output_text", "text": "Hi"}]}]}, "input",
     "input[0].content: a user message's parts are input_text or input_image, got 'output_text'"),
    ({"input": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [
        {"type": "input_text", "text": "Hello"}]}, {"role": "user", "content": "Bye"}]}, "input",
     "input[1].content: an assistant message's parts are output_text, got 'input_text'"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": PIXEL, "detail": "max"}]}]},
     "input", "input[0].content: an input_image's detail is auto, low, high, original, got 'max'"),
    ({"input": [{"id": "msg_1", "role": "user", "content": "Hi"}, {"id": "msg_1", "role": "assistant",
                                                                    "content": "Hello"},
                {"role": "user", "content": "Bye"}]}, "input", "input[1]: item id 'msg_1' repeated (given twice)"),
    ({"truncation": "middle"}, "truncation", "truncation: auto or disabled, got 'middle'"),
    ({"max_tokens": 5}, "max_tokens", "max_tokens: not a field this API reads (did you mean 'max_output_tokens'?)"),
])
def test_what_the_responses_api_cannot_serve_is_refused_by_name(client, body, param, message):
    reply = client.post("/v1/responses", json={"input": SCENE, **body})
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == param and error["message"].startswith(message), error


def test_a_continued_response_is_the_chat_answer_to_the_earlier_turns_and_its_own_input(client):
    """`previous_response_id`: the earlier response's input and answer come before the new input, as if sent in
    it; GET gives the response again and input_items lists what it was answered from, newest first unless asked."""
    first = respond(client, {"input": SCENE, "metadata": {"topic": "shapes"}})
    assert (first["store"], first["previous_response_id"], first["metadata"]) == (True, None, {"topic": "shapes"})
    question = "What colour is the star?"
    second = respond(client, {"input": question, "previous_response_id": first["id"]})
    turns = [{"role": "user", "content": SCENE}, {"role": "assistant", "content": only_text(first)["text"]},
             {"role": "user", "content": question}]
    assert only_text(second)["text"] == chat(client, turns)["choices"][0]["message"]["content"]
    assert second["previous_response_id"] == first["id"] and second["metadata"] == {}
    assert client.get(f"/v1/responses/{second['id']}").json() == second
    listed = client.get(f"/v1/responses/{second['id']}/input_items", params={"order": "asc"}).json()
    assert [(item["role"], item["content"][0]["type"], item["content"][0]["text"]) for item in listed["data"]] == [
        ("user", "input_text", SCENE), ("assistant", "output_text", only_text(first)["text"]),
        ("user", "input_text", question)]
    assert listed["data"][1]["id"] == first["output"][0]["id"] and not listed["has_more"]
    assert (listed["first_id"], listed["last_id"]) == (listed["data"][0]["id"], listed["data"][-1]["id"])
    newest = client.get(f"/v1/responses/{second['id']}/input_items", params={"limit": 2}).json()
    assert newest["data"] == listed["data"][:0:-1] and newest["has_more"]
    rest = client.get(f"/v1/responses/{second['id']}/input_items",
                      params={"limit": 2, "after": newest["last_id"]}).json()
    assert rest["data"] == listed["data"][:1] and not rest["has_more"]


def test_a_continued_picture_is_still_the_conversations_picture(client):
    question = "What colour is the shape?"
    image = {"type": "input_image", "image_url": PIXEL}
    first = respond(client, {"model": "tiny-image", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": question}, image]}]})
    second = respond(client, {"model": "tiny-image", "input": "Say it again.", "previous_response_id": first["id"]})
    expected = chat(client, [{"role": "user", "content": [{"type": "text", "text": question},
                                                          {"type": "image_url", "image_url": {"url": PIXEL}}]},
                             {"role": "assistant", "content": only_text(first)["text"]},
                             {"role": "user", "content": "Say it again."}], model="tiny-image")
    assert only_text(second)["text"] == expected["choices"][0]["message"]["content"]
    item = client.get(f"/v1/responses/{second['id']}/input_items", params={"order": "asc"}).json()["data"][0]
    assert item["content"][1] == {**image, "detail": "auto"}


def test_a_streamed_response_is_kept_as_its_last_event_gives_it(client):
    with client.stream("POST", "/v1/responses", json={"input": SCENE, "temperature": 0, "stream": True}) as reply:
        lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    final = json.loads(lines[-1].removeprefix("data: "))["response"]
    assert final["status"] == "completed" and client.get(f"/v1/responses/{final['id']}").json() == final


def test_a_response_asked_not_to_be_stored_is_not_and_a_deleted_one_is_gone(client):
    unkept = respond(client, {"input": SCENE, "store": False})
    assert unkept["store"] is False
    missing = client.get(f"/v1/responses/{unkept['id']}")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    refused = client.post("/v1/responses", json={"input": "Why?", "previous_response_id": unkept["id"]}).json()
    assert refused["error"]["code"] == "previous_response_not_found"
    kept = respond(client, {"input": SCENE})
    gone = client.delete(f"/v1/responses/{kept['id']}")
    assert gone.json() == {"id": kept["id"], "object": "response", "deleted": True}
    assert client.get(f"/v1/responses/{kept['id']}").status_code == 404
    assert client.delete(f"/v1/responses/{kept['id']}").status_code == 404


def test_a_stored_response_is_found_only_with_the_key_that_asked_for_it(client):
    mine = client.post("/v1/responses", json={"input": SCENE, "max_output_tokens": 5},
                       headers={"Authorization": "Bearer one"}).json()
    assert client.get(f"/v1/responses/{mine['id']}", headers={"Authorization": "Bearer one"}).status_code == 200
    for other in ({"Authorization": "Bearer two"}, {}):
        assert client.get(f"/v1/responses/{mine['id']}", headers=other).status_code == 404
        assert client.delete(f"/v1/responses/{mine['id']}", headers=other).status_code == 404
        continued = client.post("/v1/responses", headers=other,
                                json={"input": "Why?", "previous_response_id": mine["id"]})
        assert continued.json()["error"]["param"] == "previous_response_id"


@pytest.mark.parametrize("query, message", [
    ({"order": "up"}, "order: asc or desc, got 'up'"),
    ({"limit": "0"}, "limit: a whole number from 1 to 100, got '0'"),
    ({"after": "msg_x"}, "after: no input item 'msg_x' in this response"),
])
def test_a_bad_input_items_query_is_refused_by_name(client, query, message):
    kept = respond(client, {"input": SCENE, "max_output_tokens": 3})
    reply = client.get(f"/v1/responses/{kept['id']}/input_items", params=query)
    assert reply.status_code == 400 and reply.json()["error"]["message"] == message


def test_a_refusal_of_a_continued_input_names_the_item_in_this_input(client):
    first = respond(client, {"input": SCENE, "max_output_tokens": 3})
    reply = client.post("/v1/responses", json={"previous_response_id": first["id"], "input": [
        {"role": "user", "content": "Why?"}, {"role": "system", "content": "Be brief."}]})
    error = reply.json()["error"]
    assert error["message"] == "input[1]: only the first message may be the system's" and error["param"] == "input"
    again = client.post("/v1/responses", json={"previous_response_id": first["id"],  # its output sent again
                                               "input": [*first["output"], {"role": "user", "content": "Why?"}]})
    assert again.json()["error"]["message"] == (f"input[0]: item id {first['output'][0]['id']!r} repeated "
                                                "(previous_response_id brings it already)")


def test_an_answer_whose_client_left_is_not_kept(engines):
    """(cut short when its client went away, it would be kept as if completed)"""
    import threading

    from adapter.openai_responses import ResponseTurn
    from adapter.response_store import ResponseStore

    store = ResponseStore()
    for gone in (False, True):
        turn = ResponseTurn(store)
        name, calls = turn.calls(engines, {"input": SCENE, "temperature": 0, "max_output_tokens": 30})
        calls[0].left = threading.Event()
        if gone:
            calls[0].left.set()
        turn.whole(name, calls)
        assert len(store) == 1, "only the answer whose client stayed is kept"
