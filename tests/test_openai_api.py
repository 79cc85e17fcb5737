"""`python -m adapter.openai_api`: the tiny model's adapters behind the OpenAI chat-completions API (through
FastAPI's test client: real HTTP requests, no port); each answer is the engine's for the same settings."""

from __future__ import annotations

import base64
import gc
import json

import pytest

from adapter.app_config import TINY_FOLDER, tiny_available
from adapter.engine import Settings
from adapter.openai_api import CHAT_FIELDS, COMPLETION_FIELDS, main
from adapter.openai_responses import RESPONSE_FIELDS
from adapter.sampling import MAX_SEED

from .openai_helpers import client, engines, live_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(not tiny_available(), reason="assets/tiny not built yet")

SCENE = "There is a large red star on the left. What colour is the star?"
GREEDY = {"temperature": 0, "max_tokens": 30, "seed": 0}
EXAMPLES = TINY_FOLDER / "examples"
PIXEL = "data:image/png;base64," + base64.b64encode((EXAMPLES / json.loads(
    (EXAMPLES / "examples.json").read_text())["image"][0]["image"]).read_bytes()).decode() if tiny_available() else ""


def ask(client, messages, **options):
    return client.post("/v1/chat/completions", json={"messages": messages, **GREEDY, **options})


def user(text: str, picture=None) -> dict:
    if picture is None:
        return {"role": "user", "content": text}
    data = base64.b64encode(picture.read_bytes()).decode()
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}]}


def engine_answer(engine, history, question, picture=None, **settings) -> str:
    chosen = Settings(temperature=0.0, max_new_tokens=30, seed=0, **settings)
    answers = engine.chat(history, question, chosen) if picture is None else \
        engine.ask_image(str(picture), question, chosen, history)
    return list(answers)[-1]


def test_the_served_adapters_are_the_models(client, engines):
    listed = client.get("/v1/models").json()
    assert [model["id"] for model in listed["data"]] == ["tiny-text", "tiny-image"]
    assert [model["max_model_len"] for model in listed["data"]] == [engines.get("tiny-text").model.args.max_seq_len] * 2
    assert client.get("/v1/models/tiny-image").json() == listed["data"][1]  # `client.models.retrieve`
    for missing in (client.get("/v1/models/gpt-4"), client.get("/v1/models/")):  # (no name: not the first's)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    for response, status in ((client.get("/v1/nowhere"), 404), (client.get("/v1/chat/completions"), 405)):
        assert response.status_code == status and response.json()["error"]["message"].startswith(
            f"GET {response.request.url.path}: "), response.text  # OpenAI's error object, not FastAPI's detail


@pytest.mark.parametrize("route, fields", [("/v1/chat/completions", CHAT_FIELDS),
                                           ("/v1/completions", COMPLETION_FIELDS),
                                           ("/v1/responses", RESPONSE_FIELDS)])
def test_the_api_page_lists_every_field_a_route_reads_with_a_body_it_answers(client, route, fields):
    """/docs showed no request body (the routes read their JSON themselves): nothing to fill in, no field named."""
    body = client.get("/openapi.json").json()["paths"][route]["post"]["requestBody"]["content"]["application/json"]
    properties = body["schema"]["properties"]
    assert set(properties) == fields and all(field["description"] for field in properties.values())
    assert body["schema"]["additionalProperties"] is False  # as a misspelt field is refused
    reply = client.post(route, json=body["example"])
    assert reply.status_code == 200 and (reply.json().get("choices") or reply.json()["output"]), reply.text
    assert "swagger" in client.get("/docs").text.lower()


def test_a_chat_completion_is_the_engines_answer_at_the_gate_asked(client, engines):
    text = engines.get("tiny-text")
    reply = ask(client, [user(SCENE)]).json()
    answer = reply["choices"][0]["message"]["content"]
    assert answer == engine_answer(text, [], SCENE) == "red"
    assert reply["model"] == "tiny-text" and reply["choices"][0]["finish_reason"] == "stop"
    prompt = len(text.model.tokenizer.encode(text.chat_prompt([], SCENE, Settings())))
    # " red" and the end of text that ended it: the tokens decoded, as vLLM counts them
    assert reply["usage"] == {"prompt_tokens": prompt, "completion_tokens": 2, "total_tokens": prompt + 2}
    frozen = ask(client, [user(SCENE)], gate_scale=0).json()["choices"][0]["message"]["content"]
    assert frozen == engine_answer(text, [], SCENE, gate_scale=0.0) != answer  # the frozen base writes on
    turns = [user(SCENE), {"role": "assistant", "content": answer}, user("What colour is the star?")]
    follow_up = ask(client, turns).json()["choices"][0]["message"]["content"]
    assert follow_up == engine_answer(text, [(SCENE, answer)], "What colour is the star?")


def test_a_logit_bias_steers_the_answer_as_in_the_engine(client, engines):
    text = engines.get("tiny-text")
    red = text.model.tokenizer.encode(" red", bos=False)[0]
    banned = ask(client, [user(SCENE)], logit_bias={str(red): -100}).json()["choices"][0]["message"]["content"]
    assert banned != "red" and banned == engine_answer(text, [], SCENE, logit_bias={red: -100.0})
    plain = ask(client, [user(SCENE)], logit_bias={}, response_format={"type": "text"}, n=1).json()
    assert plain["choices"][0]["message"]["content"] == "red"


def test_n_answers_are_those_of_the_next_seeds(client, engines):
    text = engines.get("tiny-text")
    sampled = {"temperature": 1.0, "top_p": 1.0, "seed": 11}
    reply = client.post("/v1/chat/completions", json={"messages": [user(SCENE)], "n": 3, "max_tokens": 30,
                                                      "gate_scale": 0, **sampled}).json()
    answers = [choice["message"]["content"] for choice in reply["choices"]]
    assert [choice["index"] for choice in reply["choices"]] == [0, 1, 2]
    assert answers == [list(text.chat([], SCENE, Settings(max_new_tokens=30, gate_scale=0.0, **{
        **sampled, "seed": 11 + j})))[-1] for j in range(3)]
    assert len(set(answers)) > 1  # sampled at the base's gate: the seeds differ, so do the answers
    prompt = len(text.model.tokenizer.encode(text.chat_prompt([], SCENE, Settings())))
    assert reply["usage"]["prompt_tokens"] == prompt
    # the largest seed is taken with n > 1 too (its second answer's seed + 1 was refused as out of range): 0 next
    last = {**sampled, "seed": MAX_SEED}
    reply = client.post("/v1/chat/completions", json={"messages": [user(SCENE)], "n": 2, "max_tokens": 30,
                                                      "gate_scale": 0, **last}).json()
    assert [choice["message"]["content"] for choice in reply["choices"]] == [list(text.chat([], SCENE, Settings(
        max_new_tokens=30, gate_scale=0.0, **{**sampled, "seed": seed})))[-1] for seed in (MAX_SEED, 0)]


@pytest.mark.parametrize("route, asked", [("/v1/chat/completions", {"messages": [user(SCENE)]}),
                                          ("/v1/completions", {"prompt": "There is a"})])
def test_without_a_seed_each_request_samples_afresh(client, route, asked):
    """The served default seed 0 made every unseeded request the same answer (a client sampling several for
    variety got copies), and `"seed": null` could not undo it."""
    sampled = {**asked, "temperature": 2.0, "top_p": 1.0, "max_tokens": 16, "gate_scale": 0}

    def texts(**seed):
        return [client.post(route, json={**sampled, **seed}).json()["choices"][0] for _ in range(3)]

    for unseeded in ({}, {"seed": None}):
        assert len({json.dumps(choice) for choice in texts(**unseeded)}) > 1
    assert len({json.dumps(choice) for choice in texts(seed=5)}) == 1


def test_penalties_and_top_k_are_the_engines_at_the_same_settings(client, engines):
    frozen = engines.get("tiny-text")
    chosen = {"frequency_penalty": 1.5, "presence_penalty": 0.5, "top_k": 3, "repetition_penalty": 1.2}
    penalized = ask(client, [user(SCENE)], gate_scale=0, **chosen).json()["choices"][0]["message"]["content"]
    assert penalized == engine_answer(frozen, [], SCENE, gate_scale=0.0, **chosen)
    assert penalized != engine_answer(frozen, [], SCENE, gate_scale=0.0)  # the frozen base's rambling is cut back


def test_min_p_is_the_engines_at_the_same_settings_and_narrows_a_hot_sample(client, engines):
    """(A request giving min_p, as vLLM's clients and chat front-ends send it, was refused as a field not read.)"""
    frozen = engines.get("tiny-text")
    hot = {"temperature": 2.0, "top_p": 1.0, "seed": 7, "max_tokens": 16, "gate_scale": 0}

    def answer(**chosen) -> str:
        settings = Settings(temperature=2.0, top_p=1.0, seed=7, max_new_tokens=16, gate_scale=0.0, **chosen)
        return list(frozen.chat([], SCENE, settings))[-1]

    narrowed = ask(client, [user(SCENE)], **hot, min_p=0.3).json()["choices"][0]["message"]["content"]
    assert narrowed == answer(min_p=0.3) != answer()  # at temperature 2 the frozen base babbles; min-p reins it in


def test_vllms_ignore_eos_min_tokens_and_stop_token_ids(client, engines):
    """(Each was refused as a field not read; serving benchmarks send ignore_eos for answers of a set length.)"""
    tokenizer = engines.get("tiny-text").model.tokenizer

    def answered(**options) -> tuple[str, str, int]:
        reply = ask(client, [user(SCENE)], max_tokens=12, **options).json()
        choice = reply["choices"][0]
        return choice["message"]["content"], choice["finish_reason"], reply["usage"]["completion_tokens"]

    assert answered() == ("red", "stop", 2)  # " red" and the end of text
    long, finish, tokens = answered(ignore_eos=True)
    assert long.startswith("red") and len(long) > len("red") and (finish, tokens) == ("length", 12)
    held, finish, tokens = answered(min_tokens=5)
    assert held.startswith("red") and tokens > 5 and finish == "stop"
    red = tokenizer.encode(" red", bos=False, eos=False)
    assert answered(stop_token_ids=red) == ("", "stop", 1)


def test_an_answer_cut_by_max_tokens_says_length_and_counts_the_tokens_decoded(client, engines):
    text = engines.get("tiny-text")
    for max_tokens in (3, 20):
        reply = ask(client, [user(SCENE)], gate_scale=0, max_tokens=max_tokens).json()
        assert reply["choices"][0]["finish_reason"] == "length"
        assert reply["usage"]["completion_tokens"] == max_tokens
    prompt = len(text.model.tokenizer.encode(text.chat_prompt([], SCENE, Settings())))
    room = text.model.args.max_seq_len - prompt
    refused = ask(client, [user(SCENE)], max_tokens=room + 1)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
    assert f"the prompt's {prompt} tokens and {room + 1} new ones exceed" in refused.json()["error"]["message"]
    assert refused.json()["error"]["code"] == "context_length_exceeded"  # OpenAI's, which clients look for
    too_long = ask(client, [user("There is a small red circle. " * (text.model.args.max_seq_len // 4))]).json()["error"]
    assert too_long["message"].startswith("message: too long for this model's context")
    assert (too_long["param"], too_long["code"]) == ("messages", "context_length_exceeded")


def test_a_streamed_answer_arrives_in_pieces_that_make_the_whole(client, engines):
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": [user(SCENE)], "stream": True, **GREEDY, "gate_scale": 0}) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [chunk["choices"][0]["delta"].get("content", "") for chunk in chunks[1:]]
    assert len([piece for piece in pieces if piece]) > 1
    assert "".join(pieces) == engine_answer(engines.get("tiny-text"), [], SCENE, gate_scale=0.0)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["usage"]["completion_tokens"]


def streamed_chunks(client, route: str, body: dict) -> list[dict]:
    with client.stream("POST", route, json=body) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"messages": [user(SCENE)], "n": 3, "logprobs": True, "top_logprobs": 1}),
    ("/v1/completions", {"prompt": ["There is a small blue", "There is a large red"], "n": 2, "logprobs": 1})])
def test_several_answers_stream_each_under_its_index_as_they_are_answered_whole(client, route, body):
    """(Refused before: "stream: only one answer streams (n 1)", and one prompt's continuation only.) Each answer's
    chunks name its `index`; together they are the answers (and log-probabilities) a request not streamed gets."""
    asked = {**body, "temperature": 1.0, "top_p": 1.0, "seed": 5, "max_tokens": 12, "gate_scale": 0}
    whole = client.post(route, json=asked).json()
    chunks = streamed_chunks(client, route, {**asked, "stream": True})
    chat = route.endswith("chat/completions")
    texts, finishes, entries = {}, {}, {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            index = choice["index"]
            text = choice["delta"].get("content", "") if chat else choice["text"]
            texts[index] = texts.get(index, "") + text
            if choice["finish_reason"]:
                finishes[index] = choice["finish_reason"]
            scored = choice.get("logprobs") or {}
            entries.setdefault(index, []).extend(scored.get("content" if chat else "tokens", []))
    expected = whole["choices"]
    assert list(texts) == list(range(len(expected))) and len(expected) > 1
    assert [texts[i] for i in texts] == [c["message"]["content"] if chat else c["text"] for c in expected]
    assert len(set(texts.values())) > 1, "each answer with its own seed"
    assert [finishes[i] for i in texts] == [c["finish_reason"] for c in expected]
    assert [entries[i] for i in texts] == [c["logprobs"]["content"] if chat else c["logprobs"]["tokens"]
                                           for c in expected]
    assert chunks[-1]["usage"] == whole["usage"] and all("usage" not in chunk for chunk in chunks[:-1])
    if chat:
        assert [c["choices"][0]["delta"] for c in chunks if "role" in c["choices"][0]["delta"]] == \
            [{"role": "assistant", "content": ""}] * len(expected)


@pytest.mark.parametrize("route, body", [("/v1/chat/completions", {"messages": [user(SCENE)]}),
                                         ("/v1/completions", {"prompt": "The colour of the sky is"})])
def test_include_usage_streams_the_usage_in_a_chunk_of_its_own_as_openai_does(client, route, body):
    """(stream_options was ignored: the usage rode on the last answer chunk, where OpenAI's clients do not look
    for it when they asked for it)"""
    asked = {**body, **GREEDY, "stream": True}
    plain = streamed_chunks(client, route, asked)
    chunks = streamed_chunks(client, route, {**asked, "stream_options": {"include_usage": True}})
    whole = client.post(route, json={**body, **GREEDY}).json()
    *answer, last = chunks
    assert last["choices"] == [] and last["usage"] == whole["usage"] == plain[-1]["usage"]
    assert all(chunk["usage"] is None for chunk in answer) and answer[-1]["choices"][0]["finish_reason"]
    assert [chunk["choices"] for chunk in answer] == [chunk["choices"] for chunk in plain]
    assert all("usage" not in chunk for chunk in plain[:-1])
    unasked = streamed_chunks(client, route, {**asked, "stream_options": {"include_usage": False}})
    assert [chunk.get("usage") for chunk in unasked] == [None] * (len(unasked) - 1) + [whole["usage"]]


@pytest.mark.parametrize("options, message", [
    ({"stream_options": {"include_usage": True}}, "stream_options: only for streamed answers (stream: true)"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}},
     "stream_options: give {\"include_usage\": true or false}, got {'include_usage': 'yes'}"),
    ({"stream": True, "stream_options": [True]},
     "stream_options: give {\"include_usage\": true or false}, got [True]")])
def test_stream_options_that_cannot_be_followed_are_refused_by_name(client, options, message):
    refused = ask(client, [user(SCENE)], **options)
    assert refused.status_code == 400 and refused.json()["error"] | {"code": None} == {
        "message": message, "type": "invalid_request_error", "param": "stream_options", "code": None}


def test_a_client_that_leaves_mid_stream_frees_the_device_for_the_next(live_url, engines):
    import httpx

    url = f"{live_url}/v1/chat/completions"
    never_ends = {str(engines.get("tiny-text").model.tokenizer.eos_id): -100}
    long = {"messages": [user("Tell a long story")], "max_tokens": 150, "temperature": 1.0, "seed": 3,
            "gate_scale": 0, "logit_bias": never_ends}
    gc.disable()  # the answer left behind is closed by the server, not when a collection happens to find it
    try:
        with httpx.Client(timeout=30) as http, http.stream("POST", url, json={**long, "stream": True}) as response:
            lines = response.iter_lines()
            assert [next(lines).startswith("data: ") for _ in range(3)] == [True, False, True]
        # left after the first piece: the decoding stops and the next request is answered (it waited forever)
        reply = httpx.post(url, json={"messages": [user(SCENE)], **GREEDY}, timeout=30).json()
    finally:
        gc.enable()
    assert reply["choices"][0]["message"]["content"] == engine_answer(engines.get("tiny-text"), [], SCENE)


@pytest.mark.parametrize("route", ["chat", "completions", "responses"])
def test_a_closed_stream_ends_its_decoding_though_its_call_is_still_held(engines, route):
    """The server closes the stream of a client gone mid-answer; its decoding (and the device) must end then, not
    once nothing refers to the request's calls any more (an exception's traceback, a log record may)."""
    from adapter.openai_api import answer_calls, stream_events
    from adapter.openai_completions import completion_calls, stream_text_events

    engine = engines.get("tiny-text")
    long = {"max_tokens": 150, "temperature": 1.0, "seed": 3, "gate_scale": 0,
            "logit_bias": {str(engine.model.tokenizer.eos_id): -100}}
    if route == "chat":
        name, calls = answer_calls(engines, {"messages": [user("Tell a long story")], **long})
        events = stream_events(name, calls)
    elif route == "responses":
        from adapter.openai_responses import ResponseTurn
        from adapter.response_store import ResponseStore

        asked = {("max_output_tokens" if key == "max_tokens" else key): value for key, value in long.items()}
        turn = ResponseTurn(ResponseStore())
        name, calls = turn.calls(engines, {"input": "Tell a long story", **asked})
        events = turn.events(name, calls)
    else:
        name, calls = completion_calls(engines, {"prompt": "Once upon a time", **long})
        events = stream_text_events(name, calls)
    try:
        for _ in range(6 if route == "responses" else 3):  # (its first four events come before any answer)
            next(events)
        assert engine.lock.locked(), "decoding, the device held"
        events.close()
        assert not engine.lock.locked(), "the stream closed, its decoding ended and the device is free"
    finally:  # an answer left open is collected with its calls, so that it does not hold the device for later tests
        del calls
        gc.collect()


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_a_client_that_leaves_before_a_whole_answer_ends_its_decoding(live_url, engines, monkeypatch, route):
    """(an answer not streamed, 8 x 150 tokens here, went on decoding for no one while later requests waited)"""
    import time

    import httpx

    model = engines.get("tiny-text").model
    steps = []
    original = model.step
    monkeypatch.setattr(model, "step", lambda *args, **kwargs: steps.append(1) or original(*args, **kwargs))
    never_ends = {str(model.tokenizer.eos_id): -100}
    asked = {"messages": [user("Tell a long story")]} if "chat" in route else {"prompt": "Once upon a time"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live_url}{route}", json={**asked, "max_tokens": 150, "n": 8, "temperature": 1.0, "seed": 3,
                                               "gate_scale": 0, "logit_bias": never_ends}, timeout=0.3)
    time.sleep(1.0)  # the server notices within LEFT_POLL_S and the token being decoded ends
    after_leaving = len(steps)
    time.sleep(1.0)
    assert 0 < after_leaving == len(steps) < 8 * 150, "decoding went on after the client left"
    reply = httpx.post(f"{live_url}/v1/chat/completions", json={"messages": [user(SCENE)], **GREEDY}, timeout=30)
    assert reply.json()["choices"][0]["message"]["content"] == engine_answer(engines.get("tiny-text"), [], SCENE)


def test_half_a_character_is_refused_naming_the_field(client):
    """JSON may escape a lone surrogate, which no tokenizer reads (it was an HTTP 500)."""
    for path, body in (("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800"}]}'),
                       ("/v1/completions", '{"prompt": "a\\ud800"}')):
        reply = client.post(path, content=body, headers={"content-type": "application/json"})
        assert reply.status_code == 400 and "holds '\\ud800', half of a character" in reply.json()["error"]["message"]


def test_messages_of_one_role_in_a_row_are_one_turn(client, engines):
    """Two user messages in a row (OpenAI takes them) were refused as "turns must alternate"."""
    text = engines.get("tiny-text")
    split = ask(client, [user("There is a large red star on the left."), user("What colour is the star?"),
                         {"role": "assistant", "content": "red"}, {"role": "assistant", "content": "It is red."},
                         user("What shape is it?")]).json()
    answer = split["choices"][0]["message"]["content"]
    assert answer == engine_answer(text, [(SCENE.replace(". ", ".\n"), "red\nIt is red.")], "What shape is it?")


def test_a_picture_in_a_data_url_is_asked_about_as_in_the_image_tab(client, engines):
    example = json.loads((TINY_FOLDER / "examples" / "examples.json").read_text())["image"][3]
    picture = TINY_FOLDER / "examples" / example["image"]
    image = engines.get("tiny-image")
    first = ask(client, [user(example["question"], picture)], model="tiny-image").json()
    answer = first["choices"][0]["message"]["content"]
    assert answer == engine_answer(image, [], example["question"], picture) == example["answer"]
    turns = [user(example["question"], picture), {"role": "assistant", "content": answer}, user("What shape is it?")]
    follow_up = ask(client, turns, model="tiny-image").json()["choices"][0]["message"]["content"]
    assert follow_up == engine_answer(image, [(example["question"], answer)], "What shape is it?", picture)


@pytest.mark.parametrize("body, status, param, message", [
    ({"model": "gpt-4"}, 404, "model", "model: no adapter 'gpt-4' is served (served: tiny-text, tiny-image)"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": PIXEL}}]},
                   {"role": "user", "content": "a"}]}, 400, "messages",
     "messages[0]: a system message may not carry a picture (image_url); give it in a user message"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": PIXEL}}]},
                   {"role": "user", "content": "b"}]}, 400, "messages",
     "messages[1]: an assistant message may not carry a picture"),
    ({"messages": [{"role": "user", "content": "a"}], "seed": 2**64}, 400, "seed",
     f"seed: must be a whole number from 0 to {2**63 - 1}, got {2**64}"),
    ({"messages": [{"role": "user", "content": "a"}], "seed": 1e30}, 400, "seed", "seed: must be a whole number from 0 to"),
    ({"messages": []}, 400, "messages", "messages: give a list of {role, content} messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages",
     "messages[0]: expected a user message, got 'assistant'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400, "messages",
     "messages: the last message must be the user's (an assistant's to continue is not served)"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "user", "content": "c"}]}, 400, "messages",
     "messages[1]: only the first message may be the system's"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [{}]},
                   {"role": "tool", "content": "5"}]}, 400, "messages",
     "messages[1]: tool calls and their results are not served (function calling)"),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}, 400, "messages",
     "system: the alpaca prompt format has no system prompt"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     400, "messages", "messages[0].image_url: only data: URLs with base64 pictures are read"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                  "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}]},
     400, "messages", "messages[0].image_url is not an image file"),
    ({"max_tokens": 5000}, 400, "max_tokens", "max_tokens: must be between 1 and 256, got 5000"),
    ({"max_completion_tokens": 0}, 400, "max_completion_tokens", "max_completion_tokens: must be >= 1, got 0"),
    ({"model": "tiny-text", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": PIXEL}}]}]}, 400, "messages",
     "messages: tiny-text cannot see pictures (no visual prompt, or no CLIP tower); ask tiny-image"),
    ({"gate_scale": 3}, 400, "gate_scale", "gate_scale: must be in [0, 2], got 3"),
    ({"frequency_penalty": 2.5}, 400, "frequency_penalty", "frequency_penalty: must be in [-2, 2], got 2.5"),
    ({"logit_bias": {"5": 101}}, 400, "logit_bias", "logit_bias: expected {token id: bias from -100 to 100}"),
    ({"logit_bias": {"red": 1}}, 400, "logit_bias", "logit_bias: expected {token id: bias from -100 to 100}"),
    ({"logit_bias": {"99999": 1}}, 400, "logit_bias", "logit_bias: token id 99999 (place 0) is not in the vocabulary"),
    # (both biases were added: 200 on one token, past the bound of 100)
    ({"logit_bias": {"5": 100, "05": 100}}, 400, "logit_bias", "logit_bias: token id 5 is given more than once"),
    ({"n": 0}, 400, "n", "n: must be a whole number from 1 to 8, got 0"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "tools: function calling is not served"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format", "response_format: only text answers"),
    ({"top_k": -1}, 400, "top_k", "top_k: must be >= 0, got -1"),
    ({"min_p": 1.5}, 400, "min_p", "min_p: must be in [0, 1], got 1.5"),
    ({"ignore_eos": "yes"}, 400, "ignore_eos", "ignore_eos: must be true or false, got 'yes'"),
    ({"min_tokens": 31, "max_tokens": 30}, 400, "min_tokens", "min_tokens: must be at most the answer's most tokens "
                                                              "(30), got 31"),
    ({"stop_token_ids": [5, 10**7]}, 400, "stop_token_ids", "stop_token_ids: token id 10000000 (place 1) is not in"),
    ({"stop_token_ids": "5"}, 400, "stop_token_ids", "stop_token_ids: expected a list of up to 64 token ids"),
    ({"gate_layers": "top 9"}, 400, "gate_layers", "gate_layers: "),
    # a misspelt or unserved field was answered as if it were not asked; a switch given as text read as true
    ({"gate_scal": 0}, 400, "gate_scal", "gate_scal: not a field this API reads (did you mean 'gate_scale'?)"),
    ({"typical_p": 0.9}, 400, "typical_p", "typical_p: not a field this API reads"),
    ({"input": "hi"}, 400, "input", "input: not a field this API reads (did you mean 'messages'?)"),
    ({"stream": "no"}, 400, "stream", "stream: must be true or false, got 'no'"),
    ({"logprobs": "yes"}, 400, "logprobs", "logprobs: must be true or false, got 'yes'"),
    ({"stop": "x" * 201}, 400, "stop", "stop: expected a string of 1 to 200 characters"),
])
def test_bad_requests_get_openais_error_naming_the_field(client, body, status, param, message):
    response = client.post("/v1/chat/completions", json={"messages": [user(SCENE)], **body})
    error = response.json()["error"]
    assert response.status_code == status and error["param"] == param and error["type"] == "invalid_request_error"
    assert error["code"] == ("model_not_found" if status == 404 else None)
    assert message in error["message"], error["message"]
    assert client.post("/v1/chat/completions", content=b"{not json").json()["error"]["message"].startswith(
        "the body is not JSON")


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/tokenize"])
def test_a_body_nested_too_deeply_or_of_a_huge_number_is_a_400(client, route):
    """(a 500, plain text, and a traceback in the server's log)"""
    for body, message in ((b"[" * 100_000 + b"]" * 100_000, "the body's JSON is nested too deeply"),
                          (b'{"n": ' + b"9" * 5000 + b"}", "the body is not JSON (Exceeds the limit")):
        response = client.post(route, content=body)
        assert response.status_code == 400 and response.json()["error"]["message"].startswith(message)


def test_a_request_is_checked_off_the_event_loop_and_a_body_too_large_is_refused(client, monkeypatch):
    """Checking a request (writing and fitting a long conversation's prompt, reading its picture) ran on the event
    loop, stalling every other request and stream meanwhile; a body of any size was read."""
    import asyncio

    import adapter.openai_api as api

    loops = []
    checked = api.answer_calls

    def check(engines, body):
        try:
            loops.append(asyncio.get_running_loop())
        except RuntimeError:
            loops.append(None)
        return checked(engines, body)

    monkeypatch.setattr(api, "answer_calls", check)
    assert ask(client, [user(SCENE)]).status_code == 200 and loops == [None]
    monkeypatch.setattr(api, "MAX_BODY_BYTES", 2**20)
    for sent in (dict(json={"messages": [user("red " * 2**18)]}),  # its Content-Length says so
                 dict(content=(b'{"messages": []}' + b" " * 2**20 for _ in range(1)))):  # chunked: counted as read
        response = client.post("/v1/chat/completions", **sent)
        assert response.status_code == 413 and response.json()["error"]["message"] == \
            "the body is larger than 1 MiB", response.text


@pytest.mark.filterwarnings("ignore:'adapter.openai_api' found in sys.modules")  # imported by this test file
def test_run_as_a_command_every_route_refuses_with_openais_error_object(monkeypatch, engines):
    """`python -m` runs the module as __main__ beside the package's copy, which the completions and tokenizer
    routes import: their refusals were that copy's RequestError, which __main__'s routes did not catch (a 500)."""
    import runpy
    import sys

    import uvicorn
    from fastapi.testclient import TestClient

    import adapter.app_config

    served = []
    monkeypatch.setattr(adapter.app_config, "load_engines", lambda config: engines)
    monkeypatch.setattr(adapter.app_config, "check_listening", lambda host, port: None)
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.append(app))
    monkeypatch.setattr(sys, "argv", ["openai_api"])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_module("adapter.openai_api", run_name="__main__")
    assert stopped.value.code == 0
    client = TestClient(served[0])
    for route, body in (("/v1/completions", {"model": "nope", "prompt": "Hi"}),
                        ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "Hi"}]})):
        response = client.post(route, json=body)
        assert response.status_code == 404 and response.json()["error"]["param"] == "model", response.text
    assert client.post("/tokenize", json={"prompt": 5}).status_code == 400


def test_a_picture_with_too_many_pixels_is_refused_before_it_is_decoded(client, monkeypatch):
    """A 22 KB PNG of 182 megapixels was a 500 (PIL's DecompressionBombError), and one of 100 was decoded whole
    before the app's limit refused it."""
    import io

    from PIL import Image

    import adapter.images

    urls = []
    for size in ((13_000, 14_000), (10_000, 10_000)):
        png = io.BytesIO()
        Image.new("1", size).save(png, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(png.getvalue()).decode())
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self, load=Image.Image.load: decoded.append(self.size) or
                        load(self))
    for url in urls:
        reply = ask(client, [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                                          {"type": "image_url", "image_url": {"url": url}}]}],
                    model="tiny-image")
        assert reply.status_code == 400, reply.text
        message = reply.json()["error"]["message"]
        assert message.startswith("messages[0].image_url has ") and \
            f"than the limit of {adapter.images.MAX_PIXELS:,}" in message, message
    assert decoded == []


def test_the_command_line_stops_with_one_line_on_bad_flags(capsys):
    assert main(["--adapter", "/nowhere/adapter"]) == 2
    assert capsys.readouterr().err.startswith("error: --adapter: /nowhere/adapter")
    with pytest.raises(SystemExit, match="^0$"):  # (it was the app's help: "usage: python app.py", its page's flags)
        main(["--help"])
    shown = capsys.readouterr().out
    assert shown.startswith("usage: python -m adapter.openai_api ") and "OpenAI-compatible HTTP API" in shown
    assert "--no-upload and --no-push concern that page alone" in " ".join(shown.split())


def test_the_app_serves_the_api_beside_its_ui_when_asked(engines):
    import httpx

    from tests.app_helpers import running_app

    with running_app(["--openai-api"]) as app:
        reply = httpx.post(f"{app.url}v1/chat/completions", json={"messages": [user(SCENE)], **GREEDY}, timeout=60)
        assert reply.json()["choices"][0]["message"]["content"] == engine_answer(engines.get("tiny-text"), [], SCENE)
        refused = httpx.post(f"{app.url}v1/chat/completions", json={"messages": [], **GREEDY}, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages"
        assert httpx.get(f"{app.url}gradio_api/info", timeout=60).status_code == 200  # the app's own API still there
        assert httpx.get(f"{app.url}tokenizer_info", timeout=60).json()["eos_token"] == "</s>"  # at the root
    with running_app([]) as app:
        assert httpx.get(f"{app.url}v1/models", timeout=60).status_code == 404  # only when asked


def test_log_probabilities_are_the_models_for_each_answer_token(client, engines):
    import torch

    text = engines.get("tiny-text")
    question = "There is a small blue square at the top. What shape is at the top?"
    choice = ask(client, [user(question)], logprobs=True, top_logprobs=3).json()["choices"][0]
    answer, content = choice["message"]["content"], choice["logprobs"]["content"]
    prompt_ids = text.model.tokenizer.encode(text.chat_prompt([], question, Settings()), bos=True, eos=False)
    answer_ids = text.model.tokenizer.encode(answer, bos=False, eos=False)
    assert answer and len(content) == len(answer_ids)
    with torch.no_grad():  # the plain forward, written out here
        logits = text.model(torch.tensor([prompt_ids + answer_ids]))[0]
    expected = torch.log_softmax(logits[len(prompt_ids) - 1:-1].float(), dim=-1)
    for token, row, token_id in zip(content, expected, answer_ids):
        assert token["logprob"] == pytest.approx(float(row[token_id]), abs=1e-4)
        tops = token["top_logprobs"]
        assert len(tops) == 3 and tops[0]["token"] == token["token"]  # a greedy answer takes the likeliest
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert token["bytes"] == list(token["token"].encode())
    frozen = ask(client, [user(question)], logprobs=True, gate_scale=0).json()["choices"][0]["logprobs"]["content"]
    assert frozen[0]["top_logprobs"] == [] and frozen[0]["token"] != content[0]["token"]
    assert "".join(token["token"] for token in content).strip() == answer  # its first token reads " square"


def test_log_probabilities_score_the_tokens_sampled_even_where_a_stop_string_cut_one(client, engines):
    """The answer's text was tokenized again: cut by a stop string ("or" of " orange"), the token scored was " or",
    never sampled (logprob -14.7 where the model gave " orange" -1.0), and sampled answers got more or fewer
    entries than tokens decoded."""
    import torch

    text = engines.get("tiny-text")
    tokenizer = text.model.tokenizer
    question = "What colour is the star?"  # the scene left out: greedy, " orange"
    prompt_ids = tokenizer.encode(text.chat_prompt([], question, Settings()), bos=True, eos=False)
    for options in ({"temperature": 0, "stop": "an"}, {"temperature": 2.0, "top_p": 1.0, "seed": 3, "max_tokens": 12}):
        reply = ask(client, [user(question)], logprobs=True, **options).json()
        choice = reply["choices"][0]
        content = choice["logprobs"]["content"]
        ids = [tokenizer.encode(token["token"], bos=False, eos=False)[-1] for token in content]
        decoded = reply["usage"]["completion_tokens"] - (choice["finish_reason"] == "stop" and "stop" not in options)
        assert len(content) == decoded, (content, reply["usage"])
        with torch.no_grad():
            logits = text.model(torch.tensor([prompt_ids + ids]))[0]
        expected = torch.log_softmax(logits[len(prompt_ids) - 1:-1].float(), dim=-1)
        for token, row, token_id in zip(content, expected, ids):
            assert token["logprob"] == pytest.approx(float(row[token_id]), abs=1e-4), token
        if "stop" in options:
            assert choice["message"]["content"] == "or" and content[0]["token"] == " orange"


@pytest.mark.parametrize("question, options", [
    ("There is a small blue square at the top. What shape is at the top?", {}),
    (SCENE, {"gate_scale": 0}),  # the frozen base: a long answer, many chunks
    (SCENE, {"temperature": 2.0, "top_p": 1.0, "seed": 3, "max_tokens": 12}),
    ("What colour is the star?", {"stop": "an"}),  # "or" of " orange": the token it was cut in
])
def test_a_streamed_answer_sends_each_chunks_log_probabilities_as_the_whole_answer_gives_them(client, question,
                                                                                               options):
    """(Refused before: "logprobs: only for answers that are not streamed".) As OpenAI's and vLLM's chunks: each
    carries the tokens that wrote its text, kept as the decode drew them; together they are the whole answer's
    entries (which test_log_probabilities_* check against a plain forward)."""
    asked = {"logprobs": True, "top_logprobs": 2, **options}
    whole = ask(client, [user(question)], **asked).json()["choices"][0]
    expected = whole["logprobs"]["content"]
    chunks = streamed_chunks(client, "/v1/chat/completions",
                             {"messages": [user(question)], **GREEDY, **asked, "stream": True})
    assert "logprobs" not in chunks[0]["choices"][0]  # the role's chunk
    choices = [chunk["choices"][0] for chunk in chunks[1:]]
    shown, sent = "", []
    for choice in choices:
        shown += choice["delta"].get("content", "")
        sent += choice["logprobs"]["content"]
        assert "".join(token["token"] for token in sent).strip().startswith(shown.strip()), (shown, sent)
    assert shown == whole["message"]["content"] and sent == expected and expected
    assert len([choice for choice in choices if choice["logprobs"]["content"]]) >= min(3, len(expected))
    plain = streamed_chunks(client, "/v1/chat/completions", {"messages": [user(question)], **GREEDY, "stream": True})
    assert not any("logprobs" in chunk["choices"][0] for chunk in plain)  # not asked, not sent


@pytest.mark.parametrize("body, param, message", [
    ({"top_logprobs": 2}, "top_logprobs", "top_logprobs: needs logprobs: true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "top_logprobs: must be a whole number from 0 to 20"),
])
def test_log_probability_requests_are_checked(client, body, param, message):
    error = client.post("/v1/chat/completions", json={"messages": [user(SCENE)], **body}).json()["error"]
    assert error["param"] == param and message in error["message"]


def test_stop_strings_end_the_answer_where_they_start(client, engines):
    frozen = engine_answer(engines.get("tiny-text"), [], SCENE, gate_scale=0.0)  # the base writes on
    stop = frozen.split()[3]  # a word in the middle of it
    cut = frozen[:frozen.find(stop)]
    reply = ask(client, [user(SCENE)], gate_scale=0, stop=[stop, "never said"]).json()["choices"][0]
    assert reply["message"]["content"] == cut and reply["finish_reason"] == "stop"
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": [user(SCENE)], "stream": True, **GREEDY, "gate_scale": 0,
                             "stop": stop}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == cut  # no piece of the stop shown
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    error = ask(client, [user(SCENE)], stop=["a", "b", "c", "d", "e"]).json()["error"]
    assert error["param"] == "stop" and "a list of up to 4" in error["message"]


def test_a_tail_that_may_become_a_stop_string_is_held_back_until_it_is_known():
    from adapter.openai_api import Call

    def answers(*grown):
        yield from grown

    shown = list(Call(None, "", answers("Hel", "Hello wo", "Hello world!"), [], Settings(), None, None,
                      ("world",)).texts())
    assert shown == ["Hel", "Hello ", "Hello "]  # "wo" waits; "world" ends it
    call = Call(None, "", answers("Hello w", "Hello wide"), [], Settings(), None, None, ("world",))
    assert list(call.texts()) == ["Hello ", "Hello wide", "Hello wide"] and not call.stopped


def test_an_api_key_guards_every_route_and_a_sessions_own_key_opens_them_too(engines):  # noqa: F811
    """`--api-key` (ADAPTER_API_KEY): a server reachable by others answered anyone who found it."""
    from fastapi.testclient import TestClient

    from adapter.openai_api import build_api

    key = "k3y-" + "x" * 20
    guarded, open_server = TestClient(build_api(engines, key)), TestClient(build_api(engines))
    chat = {"messages": [user(SCENE)], **GREEDY, "max_tokens": 2}
    routes = [("GET", "/v1/models", None), ("GET", "/v1/models/tiny-text", None),
              ("POST", "/v1/chat/completions", chat), ("POST", "/v1/completions", {"prompt": SCENE, "max_tokens": 2}),
              ("POST", "/tokenize", {"prompt": SCENE}), ("POST", "/detokenize", {"tokens": [1, 2]}),
              ("GET", "/tokenizer_info", None)]
    session_key = engines.api_key("a page's session")
    try:
        for method, path, body in routes:
            for headers, said in (({}, "no API key presented (Authorization: Bearer KEY;"),
                                  ({"Authorization": "Bearer " + key[:-1]}, "the API key presented is not this "
                                                                            "server's"),
                                  ({"Authorization": key}, "no API key presented")):  # not as Bearer
                refused = guarded.request(method, path, json=body, headers=headers)
                assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", path
                assert refused.json()["error"]["message"].startswith(f"{method} {path}: {said}"), refused.text
                assert refused.json()["error"]["code"] == "invalid_api_key", "OpenAI's code for it"
            for presented in (key, session_key):
                answered = guarded.request(method, path, json=body, headers={"Authorization": f"bearer {presented}"})
                assert answered.status_code == 200, (path, answered.text)
                if not path.endswith("completions"):  # (those carry ids and times of their own)
                    assert answered.json() == open_server.request(method, path, json=body).json(), path
    finally:
        engines.revoke_key("a page's session")
    assert guarded.get("/v1/models", headers={"Authorization": f"Bearer {session_key}"}).status_code == 401, \
        "a revoked session key opens nothing"
    assert guarded.get("/health").json() == {"status": "ok"}, "a container's health check needs no key"


@pytest.mark.parametrize("flags, message", [
    (["--api-key", "short"], "--api-key: give a key of at least 16 characters, without spaces"),
    (["--api-key", "a key with spaces in it"], "--api-key: give a key of at least 16 characters, without spaces"),
])
def test_a_weak_api_key_is_refused(flags, message, capsys):
    assert main(flags) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


def test_a_byte_tokens_bytes_are_its_byte_not_its_name(client, engines):
    """(OpenAI's `bytes`, which clients join to spell a character split over tokens: "<0xC3>" gave the bytes of
    those six characters.)"""
    tokenizer = engines.get("tiny-text").model.tokenizer
    byte = next(t for t in range(tokenizer.n_words) if tokenizer.token_text(t) == "<0xC3>")
    reply = client.post("/v1/chat/completions", json={
        "messages": [user(SCENE)], "max_tokens": 1, "temperature": 0, "logit_bias": {str(byte): 100},
        "logprobs": True, "top_logprobs": 3}).json()
    entry, = reply["choices"][0]["logprobs"]["content"]
    assert (entry["token"], entry["bytes"]) == ("<0xC3>", [0xC3])
    assert [bytes(top["bytes"]) for top in entry["top_logprobs"]] == [top["token"].encode()  # (no byte among them)
                                                                     for top in entry["top_logprobs"]]
