"""`adapter.next_token`: the next token's probabilities at several gate scales are the softmax of each scale's own
logits (the whole-sequence forward, a second path), the first greedy token of generation is each scale's top
token, an image reaches them only through the gate, and tokens are written as they read on their own."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import adapter
from adapter.app_config import TINY_FOLDER, tiny_available
from adapter.generate import GenerationRequest, decode_tokens, main
from adapter.next_token import OTHERS, answer_logprobs, next_tokens
from adapter.random_model import write_random_base
from adapter.sampling import SamplingParams
from adapter.tokenizer import open_tokenizer

from .conftest import TINY, V2, randomize_adapter

PROMPT = "Name three shapes and a colour."
SCALES = [0.0, 0.5, 1.0, 2.0]
needs_tiny = pytest.mark.skipif(not tiny_available(), reason="assets/tiny not built yet")


@pytest.fixture(scope="module")
def model(base_folder):
    return randomize_adapter(adapter.load(base_folder, adapter=V2, device="cpu"), std=0.3)


def full_distribution(model, prompt: str, gate_scale: float, delta_scale: float, visual=None) -> torch.Tensor:
    """The last position's softmax from `model(tokens)` (no cache, the training path), one scale at a time."""
    tokens = torch.tensor([model.tokenizer.encode(prompt, bos=True)])
    with torch.no_grad():
        logits = model(tokens, gate_scale=gate_scale, delta_scale=delta_scale, visual_prompt=visual)
    return logits[0, -1].softmax(-1)


def test_probabilities_are_each_scales_softmax_and_each_scales_top_k_is_kept(model):
    found = next_tokens(model, PROMPT, SCALES, delta_scale=0.7, top_k=3)
    reference = torch.stack([full_distribution(model, PROMPT, s, 0.7) for s in SCALES])  # [scale, vocab]
    expected = {int(i) for row in reference.topk(3, dim=-1).indices for i in row}
    assert set(found.ids) == expected and len(found.ids) == len(expected)
    got = torch.tensor(found.probabilities)  # [token, scale]
    torch.testing.assert_close(got, reference[:, found.ids].T, rtol=1e-4, atol=1e-6)
    highest = got.max(dim=1).values
    assert highest.tolist() == sorted(highest.tolist(), reverse=True), "likeliest first"
    others = found.others()
    assert others == pytest.approx((1 - reference[:, found.ids].sum(-1)).tolist(), abs=1e-5)
    assert found.texts == [model.tokenizer.token_text(i) for i in found.ids]
    rows = found.rows()
    assert found.headers() == ["token", "gate 0", "gate 0.5", "gate 1", "gate 2"]
    assert rows[-1] == [OTHERS, *(round(100 * p, 2) for p in others)]
    assert rows[0] == [json.dumps(found.texts[0]), *(round(100 * p, 2) for p in found.probabilities[0])]


def test_gate_and_delta_zero_are_the_frozen_base(model, base_folder):
    base = adapter.load(base_folder, device="cpu")
    found = next_tokens(model, PROMPT, [0.0], delta_scale=0.0, top_k=4)
    expected = full_distribution(base, PROMPT, 1.0, 1.0)
    assert found.ids == expected.topk(4).indices.tolist()
    torch.testing.assert_close(torch.tensor(found.probabilities)[:, 0], expected[found.ids], rtol=1e-4, atol=1e-6)


def test_the_first_greedy_token_at_each_scale_is_that_scales_likeliest(model):
    found = next_tokens(model, PROMPT, SCALES, top_k=1)
    request = GenerationRequest(max_new_tokens=1, sampling=SamplingParams(temperature=0.0))
    ids = model.tokenizer.encode(PROMPT, bos=True)
    first = next(decode_tokens(model, [ids] * len(SCALES), request, gate_scale=SCALES, delta_scale=1.0))
    probabilities = torch.tensor(found.probabilities)
    assert first == [found.ids[int(column.argmax())] for column in probabilities.T]


def test_the_prompt_is_written_as_generate_writes_it(model):
    written = next_tokens(model, PROMPT, [1.0], template="alpaca")
    assert written == next_tokens(model, adapter.alpaca(PROMPT), [1.0])
    assert written != next_tokens(model, PROMPT, [1.0])


@pytest.mark.parametrize("call, message", [
    (lambda m: next_tokens(m, PROMPT, [], top_k=3), r"gate_scales: expected a non-empty list of numbers, got \[\]"),
    (lambda m: next_tokens(m, PROMPT, "0, 1"), "gate_scales: expected a non-empty list of numbers, got '0, 1'"),
    (lambda m: next_tokens(m, PROMPT, [0, float("nan")]), "gate_scales: nan is not a finite number >= 0"),
    (lambda m: next_tokens(m, PROMPT, [-1.0, 1.0]), "gate_scales: -1.0 is not a finite number >= 0"),
    (lambda m: next_tokens(m, PROMPT, [1], top_k=0), "top_k: must be a whole number from 1 to 50, got 0"),
    (lambda m: answer_logprobs(m, PROMPT, " red", top_k=2.0), "top_k: must be a whole number from 0 to 50, got 2.0"),
    (lambda m: next_tokens(m, 42, [1]), "prompt: expected a string, got int"),
    (lambda m: next_tokens(m, PROMPT, [1], system="Be brief."), "system: a system prompt needs a template"),
    (lambda m: next_tokens(m, PROMPT, [1], template="alpaca", system="Be brief."),
     "system: the alpaca prompt format has no system prompt"),
    (lambda m: next_tokens(m, "word " * 600, [1]), r"prompt: 2401 tokens do not fit max_seq_len=2048"),
    # no room left for the answer: [] came back, read as an empty answer
    (lambda m: answer_logprobs(m, "word " * 600, " red"), r"prompt: 2401 tokens do not fit max_seq_len=2048 \(need "
                                                           r"room for one more\)"),
    (lambda m: next_tokens(m, PROMPT, [1], image=Image.new("RGB", (8, 8))), "image: this adapter has no visual prompt"),
    (lambda m: answer_logprobs(m, PROMPT, None), "answer: expected a text or a list of token ids, got None"),
    (lambda m: answer_logprobs(m, PROMPT, [5, 2.5]), r"answer: expected a text or a list of token ids, got \[5, 2.5\]"),
])
def test_bad_arguments_are_named(model, call, message):
    with pytest.raises(ValueError, match=message):
        call(model)


def test_tokens_read_as_they_do_on_their_own(base_folder, tmp_path):
    pieces = open_tokenizer(base_folder / "tokenizer.model")
    ids = pieces.encode("red star €", bos=True, eos=True)
    texts = [pieces.token_text(i) for i in ids]
    assert texts == ["<s>", " red", " star", " ", "<0xE2>", "<0x82>", "<0xAC>", "</s>"], \
        "the word-start mark is a space; a byte of a multi-byte character is shown by its name"
    assert pieces.token_text(pieces.processor.PieceToId("<0x0A>")) == "\n", "a one-byte character is itself"
    llama3 = write_random_base(tmp_path / "l3", TINY, seed=1, tokenizer="tiktoken")
    bpe = open_tokenizer(llama3 / "tokenizer.model")
    ids = bpe.encode(" red star", bos=True) + [bpe.eos_id]
    texts = [bpe.token_text(i) for i in ids]
    assert texts[0] == "<|begin_of_text|>" and texts[-1] == bpe.backend.id_to_token(bpe.eos_id)
    assert "".join(texts[1:-1]) == " red star"


def test_the_command_line_prints_the_table(base_folder, capsys):
    argv = ["--base", str(base_folder), "--prompt", PROMPT, "--template", "none", "--next-tokens", "2"]
    assert main(argv + ["--gate-sweep", "0,1.5"]) == 0
    base = adapter.load(base_folder, device="cpu")
    assert capsys.readouterr().out == next_tokens(base, PROMPT, [0.0, 1.5], top_k=2).table() + "\n"
    assert main(argv + ["--gate-scale", "0.5"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["token", "gate", "0", "gate", "0.5"]
    assert main(argv[:-1] + ["0"]) == 2
    assert capsys.readouterr().err == "error: --next-tokens: must be from 1 to 50, got 0\n"


@needs_tiny
def test_the_tiny_text_adapter_makes_the_answer_likely_and_the_base_does_not():
    model = adapter.load("tiny", adapter="tiny-text", device="cpu")
    found = next_tokens(model, "There is a large red star on the left. What colour is the star?", [0.0, 1.0],
                        template="auto")
    assert found.texts[0] == " red"
    at_base, at_one = found.probabilities[0]
    assert at_base < 0.01 and at_one > 0.9, found.probabilities[0]


@needs_tiny
def test_an_image_speaks_only_through_the_gate():
    model = adapter.load("tiny", adapter="tiny-image", device="cpu")
    example = json.loads((TINY_FOLDER / "examples" / "examples.json").read_text())["image"][3]
    picture = Image.open(TINY_FOLDER / "examples" / example["image"])
    prompt = adapter.image_question(example["question"])
    seen = next_tokens(model, prompt, [0.0, 1.0], image=picture, top_k=3)
    blind = next_tokens(model, prompt, [0.0, 1.0], top_k=3)
    assert seen.ids[int(torch.tensor(seen.probabilities)[:, 1].argmax())] == \
        model.tokenizer.encode(example["answer"], bos=False)[0], "at gate 1 the likeliest is the answer's first token"
    at_zero = [{i: p[0] for i, p in zip(found.ids, found.probabilities)} for found in (seen, blind)]
    common = sorted(set(seen.ids) & set(blind.ids))
    assert len(common) >= 3 and [at_zero[0][i] for i in common] == pytest.approx([at_zero[1][i] for i in common],
                                                                                 abs=1e-6), "the picture is silent at 0"
    with torch.no_grad():
        from adapter.visual import encode_images

        visual = encode_images(model, [picture])
    expected = full_distribution(model, prompt, 1.0, 1.0, visual)
    torch.testing.assert_close(torch.tensor(seen.probabilities)[:, 1], expected[seen.ids], rtol=1e-4, atol=1e-6)
