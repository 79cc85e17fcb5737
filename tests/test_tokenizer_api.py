"""vLLM's tokenizer endpoints (adapter.tokenizer_api) on the tiny model: ids are the served tokenizer's own, and
lm-evaluation-harness's check for a remote tokenizer (the two requests it makes) is answered as it expects."""

from __future__ import annotations

import json

import pytest

from adapter.app_config import tiny_available

from .openai_helpers import client, engines  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(not tiny_available(), reason="assets/tiny not built yet")

TEXT = "There is a small red circle in the centre.</s>"


def test_tokenize_gives_the_served_tokenizers_ids(client, engines):
    tokenizer = engines.get("tiny-text").model.tokenizer
    bare = client.post("/tokenize", json={"prompt": TEXT, "add_special_tokens": False}).json()
    assert bare["tokens"] == tokenizer.encode(TEXT, bos=False, eos=False)
    assert bare["tokens"][-1] == tokenizer.eos_id  # a special token written in the text is its id
    assert bare["count"] == len(bare["tokens"])
    assert bare["max_model_len"] == engines.get("tiny-text").model.args.max_seq_len
    assert bare["token_strs"] == [tokenizer.token_text(t) for t in bare["tokens"]]
    with_bos = client.post("/tokenize", json={"prompt": TEXT, "model": "tiny-image"}).json()["tokens"]
    assert with_bos == [tokenizer.bos_id, *bare["tokens"]]
    assert client.post("/detokenize", json={"tokens": bare["tokens"][:-1]}).json() == {
        "prompt": "There is a small red circle in the centre."}
    assert client.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


def test_a_conversation_is_tokenized_as_a_chat_completion_reads_it(client, engines):
    """vLLM's /tokenize takes a chat's messages too; ours refused them ("prompt: expected a text")."""
    from adapter.engine import Settings

    text = engines.get("tiny-text")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "What colour is the star?"}]
    counted = client.post("/tokenize", json={"messages": messages}).json()
    assert counted["tokens"] == text.model.tokenizer.encode(
        text.chat_prompt([("Hi", "Hello")], "What colour is the star?", Settings()), bos=True, eos=False)
    chat = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()
    assert counted["count"] == chat["usage"]["prompt_tokens"]
    refused = client.post("/tokenize", json={"messages": [{"role": "assistant", "content": "Hello"}]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages"


def test_tokenizer_info_names_the_special_tokens_as_lm_eval_reads_them(client, engines):
    """lm-eval asks GET /tokenizer_info (needs `eos_token`) and POST /tokenize {"prompt": "test", ...} (needs a
    list of `tokens`), then takes the EOS id as the first id of the EOS token's text."""
    info = client.get("/tokenizer_info").json()
    tokenizer = engines.get("tiny-text").model.tokenizer
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>" and info["tokenizer_class"] == "SentencePiece"
    check = client.post("/tokenize", json={"prompt": "test", "add_special_tokens": False}).json()
    assert isinstance(check["tokens"], list) and check["tokens"]
    eos = client.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert eos["tokens"][0] == tokenizer.eos_id


@pytest.mark.parametrize("path, body, param, message", [
    ("/tokenize", {}, "prompt", "prompt: expected a text, got NoneType"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens",
     "add_special_tokens: expected true or false, got 'yes'"),
    ("/tokenize", {"prompt": "a", "model": "gpt-4"}, "model", "model: no adapter 'gpt-4' is served"),
    ("/tokenize", {"prompt": "a\ud800"}, "prompt", "prompt: holds '\\ud800', half of a character"),  # was a 500
    ("/detokenize", {"tokens": "1 2"}, "tokens", "tokens: expected a list of token ids, got '1 2'"),
    ("/detokenize", {"tokens": [1, -4]}, "tokens", "tokens: token id -4 (place 1) is not in the vocabulary of"),
    ("/detokenize", [1, 2], None, "the body must be a JSON object"),
])
def test_bad_tokenizer_requests_name_their_field(client, path, body, param, message):
    # json.dumps escapes a lone surrogate as JSON may ("\\ud800"); the client's own encoder cannot write one
    response = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    error = response.json()["error"]
    assert response.status_code in (400, 404) and error["param"] == param and message in error["message"]


def test_the_harness_task_tokenizes_to_the_ids_adapter_choices_scores(tmp_path):
    """bench.lm_eval_task writes BOS and the answer's end as text; the served tokenizer reads them back as those
    ids, so the harness sends [BOS] + prompt + choice + [end], which is what adapter.choices scores."""
    import json

    import adapter
    from adapter.choices import read_questions
    from adapter.finetune.encode import encode_example
    from adapter.finetune.records import Example
    from adapter.prompts import format_named
    from bench.lm_eval_task import write_task

    data = tmp_path / "mc.jsonl"
    data.write_text(json.dumps({"question": "There is a small red circle. What colour is the circle?",
                                "choices": ["red", "blue", "green"], "answer": 0}) + "\n")
    task = write_task("tiny", "tiny-text", data, tmp_path / "task")
    assert "doc_to_text: prompt" in task.read_text() and 'target_delimiter: ""' in task.read_text()
    row = json.loads((tmp_path / "task" / "questions.jsonl").read_text())
    model = adapter.load("tiny", "tiny-text", device="cpu")
    tokenizer, written = model.tokenizer, format_named(model.prompt_format)
    question = read_questions(data, written)[0]
    assert row["answer"] == 0 and len(row["choices"]) == 3
    context = tokenizer.encode(row["prompt"], bos=False)
    for text, choice in zip(row["choices"], question.choices):
        sent = tokenizer.encode(row["prompt"] + text, bos=False)
        scored, _ = encode_example(Example(question.prompt, choice), tokenizer, model.args.max_seq_len,
                                   written.answer_end_id(tokenizer))
        assert sent[:len(context)] == context and sent == list(scored.tokens)
