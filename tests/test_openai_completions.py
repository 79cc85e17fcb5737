"""OpenAI's legacy `POST /v1/completions` (adapter.openai_completions) on the tiny model through FastAPI's test
client: continuations equal `generate` of the same raw text, echoed prompts are scored as a plain forward pass
scores them, and bad requests name their field."""

from __future__ import annotations

import json

import pytest
import torch

import adapter
from adapter.app_config import tiny_available

from .openai_helpers import client, engines  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(not tiny_available(), reason="assets/tiny not built yet")

PROMPT = adapter.alpaca("There is a large red star on the left. What colour is the star?")
GREEDY = {"temperature": 0, "max_tokens": 12, "seed": 0}


def complete(client, **body):
    return client.post("/v1/completions", json={**GREEDY, **body})


def reference_logprobs(model, text: str, gate: float) -> list[float]:
    ids = model.tokenizer.encode(text)
    with torch.no_grad():
        logprobs = model(torch.tensor([ids]), gate_scale=gate)[0].float().log_softmax(-1)
    return [float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids))]


@pytest.mark.parametrize("gate", [0.0, 1.0])
def test_a_completion_continues_the_text_as_written(client, engines, gate):
    model = engines.get("tiny-text").model
    reply = complete(client, prompt=PROMPT, gate_scale=gate, echo=True).json()
    expected = model.generate(PROMPT, temperature=0.0, max_new_tokens=12, gate_scale=gate, continued=True)
    assert reply["object"] == "text_completion" and reply["model"] == "tiny-text"
    assert reply["choices"][0]["text"] == PROMPT + expected
    # read on from the prompt: the continuation keeps the space its first word starts with (alone, decoding drops it)
    assert expected.startswith(" ") and expected[1:] == model.generate(PROMPT, temperature=0.0, max_new_tokens=12,
                                                                       gate_scale=gate)
    if gate == 1.0:
        assert expected.startswith(" red")  # the adapter answers; no prompt format's stop strings cut it
    usage = reply["usage"]
    assert usage["prompt_tokens"] == len(model.tokenizer.encode(PROMPT))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("gate", [0.0, 1.0])
def test_an_echoed_prompt_is_scored_as_a_forward_pass_scores_it(client, engines, gate):
    model = engines.get("tiny-text").model
    reply = complete(client, prompt=PROMPT, echo=True, logprobs=3, max_tokens=0, gate_scale=gate).json()
    choice = reply["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    found = choice["logprobs"]
    assert found["token_logprobs"] == pytest.approx(reference_logprobs(model, PROMPT, gate), abs=1e-4)
    assert len(found["tokens"]) == len(found["text_offset"]) == len(model.tokenizer.encode(PROMPT)) - 1
    assert found["text_offset"][0] == 0 and found["text_offset"] == sorted(found["text_offset"])
    for token, logprob, top in zip(found["tokens"], found["token_logprobs"], found["top_logprobs"]):
        assert len(top) in (3, 4) and max(top.values()) >= logprob - 1e-6
        assert top[token] == pytest.approx(logprob)  # the token's own always, as OpenAI's (logprobs + 1 at most)
    text = choice["text"]  # each offset indexes the text returned (SentencePiece's first space, \n read as a space)
    assert all(text[offset:].lstrip().startswith(token.strip()[:1]) for token, offset in
               zip(found["tokens"], found["text_offset"]) if token.strip())
    assert reply["usage"]["completion_tokens"] == 0


def test_a_greedy_continuations_tokens_are_each_the_likeliest(client):
    choice = complete(client, prompt=PROMPT, logprobs=2).json()["choices"][0]
    found = choice["logprobs"]
    assert found["tokens"] and found["text_offset"][0] == len(PROMPT)
    for token, logprob, top in zip(found["tokens"], found["token_logprobs"], found["top_logprobs"]):
        assert logprob == pytest.approx(max(top.values()), abs=1e-5)


@pytest.mark.parametrize("gate", [0.0, 1.0])
def test_token_ids_are_read_as_they_are_sent(client, engines, gate):
    """A text's ids with its BOS continue as the text does; ids are scored exactly as sent (the first has nothing
    before it), as lm-evaluation-harness asks (`echo`, `logprobs`, one new token, several prompts of ids)."""
    model = engines.get("tiny-text").model
    ids = model.tokenizer.encode(PROMPT, bos=True, eos=False)
    as_text = complete(client, prompt=PROMPT, gate_scale=gate).json()["choices"][0]["text"]
    as_ids = complete(client, prompt=ids, gate_scale=gate).json()
    assert as_ids["choices"][0]["text"] == as_text and as_ids["usage"]["prompt_tokens"] == len(ids)

    without_bos = ids[1:]
    with torch.no_grad():
        logprobs = model(torch.tensor([without_bos]), gate_scale=gate)[0].float().log_softmax(-1)
    expected = [float(logprobs[t - 1, without_bos[t]]) for t in range(1, len(without_bos))]
    scored = complete(client, prompt=[without_bos, ids], echo=True, logprobs=1, max_tokens=0, gate_scale=gate).json()
    found = scored["choices"][0]["logprobs"]
    assert scored["choices"][0]["text"] == model.tokenizer.decode(without_bos)
    assert found["tokens"] == [model.tokenizer.token_text(t) for t in without_bos]
    assert found["token_logprobs"][0] is None and found["top_logprobs"][0] is None
    assert scored["choices"][1]["logprobs"]["text_offset"][:3] == [0, 0, 1]  # <s> takes no room, then " B", "e"
    assert found["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    with_bos = scored["choices"][1]["logprobs"]["token_logprobs"]
    assert with_bos[0] is None and with_bos[1:] == pytest.approx(reference_logprobs(model, PROMPT, gate), abs=1e-4)

    harness = complete(client, prompt=[without_bos], echo=True, logprobs=1, max_tokens=1, gate_scale=gate).json()
    harness_found = harness["choices"][0]["logprobs"]
    assert harness_found["token_logprobs"][:len(without_bos)] == found["token_logprobs"]
    assert len(harness_found["tokens"]) == len(without_bos) + 1  # the new token after the prompt's


def test_a_continuation_ended_by_eos_returns_that_token_too(client, engines):
    """As OpenAI's and vLLM's legacy completions do (lm-evaluation-harness drops the last returned token as the
    one generated): the end is in `tokens` and scored, not in the text."""
    model = engines.get("tiny-text").model
    tokenizer = model.tokenizer
    choice = complete(client, prompt=PROMPT, logprobs=1, echo=True).json()["choices"][0]
    answer = choice["text"][len(PROMPT):]
    assert answer == " red" and choice["finish_reason"] == "stop"
    found = choice["logprobs"]
    ids = tokenizer.encode(PROMPT, bos=True) + tokenizer.encode(answer, bos=False) + [tokenizer.eos_id]
    with torch.no_grad():
        logprobs = model(torch.tensor([ids]))[0].float().log_softmax(-1)
    assert found["tokens"][-1] == tokenizer.token_text(tokenizer.eos_id) == "</s>"
    assert found["token_logprobs"][-1] == pytest.approx(float(logprobs[-2, tokenizer.eos_id]), abs=1e-5)
    assert found["text_offset"][-1] > found["text_offset"][-2]  # after the answer's tokens
    continued = complete(client, prompt=PROMPT, logprobs=1).json()["choices"][0]
    alone = continued["logprobs"]
    assert continued["text"] == "".join(alone["tokens"][:-1]) == " red"  # the tokens spell the text returned
    assert [continued["text"][offset - len(PROMPT):] for offset in alone["text_offset"]] == [" red", ""]
    assert alone["tokens"] == found["tokens"][-len(alone["tokens"]):] and alone["tokens"][-1] == "</s>"
    assert alone["token_logprobs"] == pytest.approx(found["token_logprobs"][-len(alone["tokens"]):], abs=1e-5)
    cut = complete(client, prompt=PROMPT, logprobs=1, stop=["red"]).json()["choices"][0]["logprobs"]
    assert cut["tokens"] == []  # cut by a stop string: nothing of it, nor an end, is returned


def test_the_served_gate_is_what_a_request_that_sets_none_gets(engines):
    """`--gate-scale 0` serves the frozen base to a client that cannot set the gate (lm-evaluation-harness)."""
    from fastapi.testclient import TestClient

    from adapter.engine import Engines, Settings
    from adapter.openai_api import build_api

    frozen = TestClient(build_api(Engines(engines.by_name, Settings(gate_scale=0.0))))
    unset = frozen.post("/v1/completions", json={**GREEDY, "prompt": PROMPT}).json()["choices"][0]["text"]
    model = engines.get("tiny-text").model
    assert unset == model.generate(PROMPT, temperature=0.0, max_new_tokens=12, gate_scale=0.0, continued=True)
    asked = frozen.post("/v1/completions", json={**GREEDY, "prompt": PROMPT, "gate_scale": 1}).json()
    assert asked["choices"][0]["text"] == model.generate(PROMPT, temperature=0.0, max_new_tokens=12, gate_scale=1.0,
                                                         continued=True)


def test_n_continuations_are_those_of_the_next_seeds(client):
    """Each prompt's n choices, in order (prompt 0's first): choice j is what a request with seed + j gets; the
    prompt's tokens are counted once."""
    sampled = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 8}
    prompts = [PROMPT, "There is a small blue"]
    reply = complete(client, prompt=prompts, n=2, seed=7, **sampled).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    alone = [complete(client, prompt=p, seed=7 + j, **sampled).json() for p in prompts for j in range(2)]
    assert [c["text"] for c in reply["choices"]] == [a["choices"][0]["text"] for a in alone]
    assert reply["usage"]["prompt_tokens"] == alone[0]["usage"]["prompt_tokens"] + alone[2]["usage"]["prompt_tokens"]
    assert reply["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)


def test_several_prompts_streaming_and_stop_strings(client):
    prompts = [PROMPT, "There is a small blue"]
    reply = complete(client, prompt=prompts).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    alone = [complete(client, prompt=p).json()["choices"][0]["text"] for p in prompts]
    assert [c["text"] for c in reply["choices"]] == alone
    with client.stream("POST", "/v1/completions", json={**GREEDY, "prompt": prompts[1], "stream": True}) as events:
        lines = [line for line in events.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == alone[1]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "usage" in chunks[-1]
    word = alone[1].split()[1]
    cut = complete(client, prompt=prompts[1], stop=[word]).json()["choices"][0]
    assert cut["text"] == alone[1][:alone[1].index(word)] and cut["finish_reason"] == "stop"


@pytest.mark.parametrize("prompt, options", [(PROMPT, {}), ("There is a small blue", {}),
                                             ("There is a small blue", {"stop": [" circle"]}),
                                             ("There is a small blue", {"stop": ["urple"]})])
def test_a_streamed_continuation_sends_each_chunks_log_probabilities_in_the_legacy_layout(client, prompt, options):
    """(Refused before: "stream: only one prompt's continuation streams, without logprobs or echo".) Each chunk
    carries its tokens' `tokens`, `token_logprobs`, `top_logprobs` and `text_offset`, kept as the decode drew them;
    together they are the whole continuation's, the end of text that ended it included."""
    whole = complete(client, prompt=prompt, logprobs=2, **options).json()["choices"][0]
    expected = whole["logprobs"]
    with client.stream("POST", "/v1/completions",
                       json={**GREEDY, "prompt": prompt, "logprobs": 2, **options, "stream": True}) as events:
        chunks = [json.loads(line[6:]) for line in events.iter_lines() if line.startswith("data: {")]
    choices = [chunk["choices"][0] for chunk in chunks]
    sent = {key: [value for choice in choices for value in choice["logprobs"][key]] for key in expected}
    assert "".join(choice["text"] for choice in choices) == whole["text"]
    assert sent["tokens"] == expected["tokens"] and sent["text_offset"] == expected["text_offset"]
    assert sent["token_logprobs"] == pytest.approx(expected["token_logprobs"], abs=1e-4)
    assert [sorted(top) for top in sent["top_logprobs"]] == [sorted(top) for top in expected["top_logprobs"]]
    assert len([choice for choice in choices if choice["logprobs"]["tokens"]]) > 1
    if prompt == PROMPT:
        assert expected["tokens"] == [" red", "</s>"] and choices[-1]["logprobs"]["tokens"] == ["</s>"]
    if options == {"stop": [" circle"]}:  # cut by the stop string: its tokens and the end of text not sent
        assert whole["text"] == " triangle, purple" and sent["tokens"] == [" triangle", ",", " purple"]
    if options == {"stop": ["urple"]}:  # cut inside a token: the token sampled (" p" was scored, never drawn)
        assert whole["text"] == " triangle, p" and expected["tokens"] == [" triangle", ",", " purple"]


@pytest.mark.parametrize("body, param, message", [
    ({}, "prompt", "prompt: expected a text, a list of token ids, or a list of 1 to 20 of either"),
    ({"prompt": [1, 2.5, 3]}, "prompt", "prompt: expected a text, a list of token ids"),
    ({"prompt": [[1, 2], []]}, "prompt", "prompt: expected a text, a list of token ids"),
    ({"prompt": [1, True]}, "prompt", "prompt: expected a text, a list of token ids"),
    ({"prompt": [5, 10 ** 6]}, "prompt", "prompt: token id 1000000 (place 1) is not in the vocabulary of"),
    ({"prompt": ["a"] * 21}, "prompt", "1 to 20 of either"),
    ({"prompt": "a", "n": 9}, "n", "n: must be a whole number from 1 to 8, got 9"),
    ({"prompt": "a", "best_of": 3}, "best_of", "best_of: only 1 is served, got 3"),
    ({"prompt": "a", "logprobs": 6}, "logprobs", "logprobs: must be a whole number from 0 to 5"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", "max_tokens: 0 returns nothing without echo"),
    ({"prompt": "a", "stream": True, "echo": True}, "stream", "stream: a continuation streams without echo"),
    ({"prompt": "a", "suffix": "b"}, "suffix", "suffix: text after the insertion point"),
    ({"prompt": "a", "temperature": -1}, "temperature", "temperature"),
    ({"prompt": "   "}, "prompt", "prompt: is empty"),
    ({"prompt": "a", "model": "nope"}, "model", "model: no adapter 'nope' is served"),
    ({"prompt": "a", "stop": []}, "stop", "stop: expected a string of 1 to 200 characters or a list of up to 4"),
    ({"prompt": "a", "echo": "yes"}, "echo", "echo: must be true or false, got 'yes'"),  # was read as true
    ({"prompt": "a", "messages": []}, "messages", "messages: not a field this API reads"),  # chat's, not this one's
    ({"prompt": "a", "max_tokens": 10**6}, "max_tokens", "max_tokens: must be between 1 and"),
])
def test_bad_requests_name_their_field(client, body, param, message):
    reply = client.post("/v1/completions", json=body)
    assert reply.status_code in (400, 404)
    error = reply.json()["error"]
    assert error["param"] == param and message in error["message"]


def test_finish_reason_and_usage_count_the_tokens_decoded(client, engines):
    """"length" when max_tokens ran out, whatever the text re-encodes to; "stop" at the end of text; the
    tokens counted are those decoded (the end of text included)."""
    model = engines.get("tiny-text").model
    frozen = {"prompt": PROMPT, "gate_scale": 0, "temperature": 0}
    for max_tokens in (1, 5, 20):
        choice = client.post("/v1/completions", json={**frozen, "max_tokens": max_tokens, "logprobs": 0}).json()
        assert len(choice["choices"][0]["logprobs"]["tokens"]) == choice["usage"]["completion_tokens"] == max_tokens
        assert choice["choices"][0]["finish_reason"] == "length"
    ended = complete(client, prompt=PROMPT).json()
    assert ended["choices"][0]["finish_reason"] == "stop" and ended["usage"]["completion_tokens"] == 2  # " red", end
    room = model.args.max_seq_len - len(model.tokenizer.encode(PROMPT))
    assert complete(client, prompt=PROMPT, max_tokens=room).status_code == 200
    reply = complete(client, prompt=PROMPT, max_tokens=room + 1)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_tokens"
    assert reply.json()["error"]["code"] == "context_length_exceeded"  # OpenAI's, which clients look for
    assert reply.json()["error"]["message"] == (f"max_tokens: the prompt's {model.args.max_seq_len - room} tokens and "
                                                f"{room + 1} new ones exceed this model's context of "
                                                f"{model.args.max_seq_len} tokens")


def test_a_text_longer_than_the_context_is_not_scored_cut(client, engines):
    long = "There is a small red circle. " * (engines.get("tiny-text").model.args.max_seq_len // 4)
    reply = client.post("/v1/completions", json={"prompt": long, "echo": True, "max_tokens": 0, "logprobs": 0})
    assert reply.status_code == 400 and "prompt: too long for this model's context" in reply.json()["error"]["message"]
    assert reply.json()["error"]["code"] == "context_length_exceeded"


def test_offsets_read_on_from_the_settled_tokens_are_those_read_from_the_start(engines):
    """A stream places each chunk's tokens reading on from the last settled one (reading every token again at every
    chunk was quadratic): whatever the text shown at each chunk (behind the tokens sent, as a held-back stop
    string's beginning keeps it; whitespace the tokens write otherwise: a newline read as a space, two spaces),
    each chunk's offsets are those of a reading of every token from the start."""
    tokenizer = engines.get("tiny-text").model.tokenizer
    text = "There is a  small\nblue circle. Where is the red star?\n\nOn the left, beside the square."
    tokenized = [tokenizer.token_text(token) for token in tokenizer.encode(text, bos=False, eos=False)]
    # (the tiny tokenizer writes no whitespace of its own: a byte-level one's tokens, a BOS and an end of text)
    written = ["<s>", "There", " is", " a", " ", " small", "\n", "blue", " circle.", " Where is the", " red", " star",
               "?", "\n\n", "On", " the", " left", ",", " beside", " the", " square", ".", "</s>"]
    for pieces in (tokenized, written):
        check_offsets_read_on(text, pieces)


def check_offsets_read_on(text: str, pieces: list[str]) -> None:
    from adapter.openai_completions import text_offsets

    prompt = "Once upon a time"
    for held_back in (0, 2, 5, 9):
        settled, end, shown = 0, len(prompt), 0
        for count in range(1, len(pieces) + 1):  # a chunk per token
            shown = len(text) if count == len(pieces) else \
                min(len(text), max(shown, len("".join(pieces[:count]).lstrip()) - held_back))
            whole = prompt + text[:shown]
            offsets, newly, end = text_offsets(whole, pieces[settled:count], end)
            expected = text_offsets(whole, pieces[:count], len(prompt))[0]
            assert offsets == expected[settled:], (held_back, count)
            settled += newly
        assert settled == len(pieces) - (pieces[-1] == "</s>"), "all settled but an end of text the text lacks"
    for sent in range(1, len(pieces)):  # two chunks: the first `sent` tokens with the text cut anywhere, the rest
        for cut in range(len(text) + 1):
            _, settled, end = text_offsets(prompt + text[:cut], pieces[:sent], len(prompt))
            offsets = text_offsets(prompt + text, pieces[settled:], end)[0]
            assert offsets == text_offsets(prompt + text, pieces, len(prompt))[0][settled:], (sent, cut)


def test_offsets_of_a_character_split_over_byte_tokens(client, engines):
    """A character the tokenizer spells in bytes ("\u00e9": "<0xC3>", "<0xA9>") is written by the token that
    completes it: the word after it is placed after it (it was placed on the "\u00e9", every byte token's name being
    found nowhere in the text)."""
    tokenizer = engines.get("tiny-text").model.tokenizer
    prompt = "caf\u00e9 is red"
    assert [tokenizer.token_text(t) for t in tokenizer.encode(prompt, bos=False)] == \
        [" c", "af", "<0xC3>", "<0xA9>", " is", " red"]
    scored = complete(client, prompt=prompt, echo=True, max_tokens=0, logprobs=0).json()["choices"][0]["logprobs"]
    assert scored["text_offset"] == [0, 1, 3, 3, 4, 7]
