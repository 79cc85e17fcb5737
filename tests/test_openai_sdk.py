"""The OpenAI-compatible API read by OpenAI's own Python client (the `openai` package), over HTTP from a live
server: every field it parses (answers, log-probabilities, several answers, streamed chunks, the usage, errors)
is where the client looks for it, and holds what the API answers to a plain HTTP request."""

from __future__ import annotations

import pytest

from adapter.app_config import tiny_available

from .openai_helpers import client, engines, live_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(not tiny_available(), reason="assets/tiny not built yet")

SCENE = "There is a large red star on the left. What colour is the star?"
ASKED = {"temperature": 1.0, "top_p": 1.0, "seed": 5, "max_tokens": 12}


@pytest.fixture(scope="module")
def sdk(live_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{live_url}/v1", api_key="unused", max_retries=0)


def test_the_client_lists_the_adapters_and_reads_a_chat_answer_with_its_log_probabilities(sdk, client):
    assert [model.id for model in sdk.models.list()] == ["tiny-text", "tiny-image"]
    messages = [{"role": "user", "content": SCENE}]
    reply = sdk.chat.completions.create(model="tiny-text", messages=messages, n=2, logprobs=True, top_logprobs=2,
                                        extra_body={"gate_scale": 0}, **ASKED)
    plain = client.post("/v1/chat/completions", json={"model": "tiny-text", "messages": messages, "n": 2,
                                                      "logprobs": True, "top_logprobs": 2, "gate_scale": 0,
                                                      **ASKED}).json()
    assert [choice.message.content for choice in reply.choices] == \
        [choice["message"]["content"] for choice in plain["choices"]]
    assert [choice.finish_reason for choice in reply.choices] == [c["finish_reason"] for c in plain["choices"]]
    read = [[(token.token, token.logprob, [(top.token, top.logprob) for top in token.top_logprobs])
             for token in choice.logprobs.content] for choice in reply.choices]
    assert read == [[(token["token"], token["logprob"], [(top["token"], top["logprob"])
                                                         for top in token["top_logprobs"]])
                     for token in choice["logprobs"]["content"]] for choice in plain["choices"]]
    assert reply.usage.model_dump(exclude_none=True) == plain["usage"]


def test_the_client_reads_streamed_answers_each_under_its_index_with_log_probabilities_and_usage(sdk, client):
    messages = [{"role": "user", "content": SCENE}]
    whole = client.post("/v1/chat/completions", json={"messages": messages, "n": 2, "logprobs": True,
                                                      "gate_scale": 0, **ASKED}).json()
    texts, tokens, finishes, usage = {}, {}, {}, None
    for chunk in sdk.chat.completions.create(model="tiny-text", messages=messages, n=2, logprobs=True, stream=True,
                                             stream_options={"include_usage": True}, extra_body={"gate_scale": 0},
                                             **ASKED):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            tokens.setdefault(choice.index, []).extend(
                (token.token, token.logprob) for token in (choice.logprobs.content if choice.logprobs else []))
            finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
    assert [texts[0], texts[1]] == [choice["message"]["content"] for choice in whole["choices"]]
    assert [tokens[0], tokens[1]] == [[(t["token"], t["logprob"]) for t in choice["logprobs"]["content"]]
                                      for choice in whole["choices"]]
    assert [finishes[0], finishes[1]] == [choice["finish_reason"] for choice in whole["choices"]]
    assert usage.model_dump(exclude_none=True) == whole["usage"]


def test_the_client_streams_a_text_completion_with_vllms_fields_in_extra_body(sdk, client):
    body = {"prompt": "There is a small blue", "max_tokens": 8, "temperature": 0, "logprobs": 2}
    vllm = {"ignore_eos": True, "min_p": 0.1}
    whole = client.post("/v1/completions", json={**body, **vllm}).json()["choices"][0]
    text, tokens, finish = "", [], None
    for chunk in sdk.completions.create(model="tiny-text", stream=True, extra_body=vllm, **body):
        choice = chunk.choices[0]
        text += choice.text
        tokens += choice.logprobs.tokens if choice.logprobs else []
        finish = choice.finish_reason or finish
    assert (text, tokens, finish) == (whole["text"], whole["logprobs"]["tokens"], "length")
    assert len(tokens) == 8, "ignore_eos: decoded on past the end of text to max_tokens"


def test_the_client_reads_a_response_whole_and_streamed_as_its_own_helper_assembles_it(sdk, client):
    """The Responses API (`client.responses`): its `output_text`, status, usage and log-probabilities; streamed,
    its typed events, from which `responses.stream` assembles the final response itself."""
    asked = {"input": SCENE, "temperature": 0, "max_output_tokens": 30, "include": ["message.output_text.logprobs"],
             "top_logprobs": 2}
    plain = client.post("/v1/responses", json=asked).json()
    response = sdk.responses.create(model="tiny-text", **asked)
    text = plain["output"][0]["content"][0]
    assert response.output_text == text["text"] and response.status == plain["status"]
    read = [(t.token, t.logprob) for t in response.output[0].content[0].logprobs]
    assert read == [(t["token"], t["logprob"]) for t in text["logprobs"]]
    assert response.usage.output_tokens == plain["usage"]["output_tokens"]
    with sdk.responses.stream(model="tiny-text", **asked) as stream:  # (its final response: a completed one)
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == text["text"] == "red"
    assert final.status == plain["status"] == "completed"
    assert final.usage.total_tokens == plain["usage"]["total_tokens"]
    cut = list(sdk.responses.create(model="tiny-text", stream=True, extra_body={"gate_scale": 0},
                                    **{**asked, "max_output_tokens": 4}))
    assert cut[-1].type == "response.incomplete" and cut[-1].response.incomplete_details.reason == "max_output_tokens"


def test_the_client_continues_retrieves_lists_and_deletes_a_stored_response(sdk):
    """`previous_response_id`, `responses.retrieve`, `responses.input_items.list` (its pages followed by the client
    itself, `after` the last id) and `responses.delete`, whose response the client then reads as NotFoundError."""
    from openai import NotFoundError

    first = sdk.responses.create(model="tiny-text", input=SCENE, temperature=0, metadata={"run": "sdk"})
    second = sdk.responses.create(model="tiny-text", input="What colour is the star?", temperature=0,
                                  previous_response_id=first.id)
    assert first.output_text == second.output_text == "red" and first.metadata == {"run": "sdk"}
    again = sdk.responses.retrieve(second.id)
    assert (again.id, again.output_text, again.previous_response_id) == (second.id, "red", first.id)
    items = list(sdk.responses.input_items.list(second.id, limit=1, order="asc"))  # three pages of one
    assert [(item.role, item.content[0].text) for item in items] == [
        ("user", SCENE), ("assistant", "red"), ("user", "What colour is the star?")]
    sdk.responses.delete(second.id)
    with pytest.raises(NotFoundError):
        sdk.responses.retrieve(second.id)


def test_a_refused_request_is_the_clients_bad_request_error_naming_the_field(sdk):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as refused:
        sdk.chat.completions.create(model="tiny-text", messages=[{"role": "user", "content": SCENE}],
                                    extra_body={"gate_scale": 7})
    assert refused.value.status_code == 400 and refused.value.param == "gate_scale"
    assert refused.value.message == "Error code: 400 - gate_scale: must be in [0, 2], got 7"  # error.message read
