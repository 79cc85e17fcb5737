"""Generation: exact tokens against a plain argmax loop, batching, per-row gates, stops, streaming."""

from __future__ import annotations

import pytest
import torch

import adapter
from adapter.app_config import TINY_FOLDER, tiny_available
from adapter.generate import GenerationRequest, decode_tokens, fitting_groups, generate_batch, main
from adapter.model import Transformer
from adapter.sampling import SamplingParams, penalize_answer, penalize_repeats, sample
from adapter.text_stream import TextStream
from adapter.tokenizer import open_tokenizer
from tests.conftest import V1, V2, randomize_adapter

GREEDY = dict(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def model(base_folder):
    """The random base with a randomized v2 adapter attached (weights from the folder)."""
    base = adapter.load(base_folder, device="cpu", max_seq_len=96)
    torch.manual_seed(0)
    m = Transformer(base.args, V2).eval()
    m.load_state_dict(base.state_dict(), strict=False)
    m.tokenizer = base.tokenizer
    return randomize_adapter(m)


def argmax_loop(model, ids: list[int], steps: int, gate_scale: float = 1.0) -> list[int]:
    """No cache, no batching: the obvious reference."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([out]), gate_scale=gate_scale)
            out.append(int(logits[0, -1].argmax()))
    return out[len(ids):]


def test_greedy_tokens_equal_a_plain_argmax_loop(model):
    ids = model.tokenizer.encode("The red circle is", bos=True)
    request = GenerationRequest(max_new_tokens=10, sampling=SamplingParams(temperature=0.0))
    got = [step[0] for step in decode_tokens(model, [ids], request)]
    assert got == argmax_loop(model, ids, 10)


def test_batch_of_different_lengths_and_gates_equals_separate_runs(model):
    prompts = ["Where is the star?", "Count", "The small blue square is left of the large green circle and"]
    scales = [0.0, 1.0, 1.6]
    batched = generate_batch(model, prompts, gate_scale=scales, **GREEDY)
    for prompt, scale, answer in zip(prompts, scales, batched):
        assert model.generate(prompt, gate_scale=scale, **GREEDY) == answer
    ids = model.tokenizer.encode(prompts[1], bos=True)
    request = GenerationRequest(max_new_tokens=6, sampling=SamplingParams(temperature=0.0))
    rows = list(decode_tokens(model, [model.tokenizer.encode(p, bos=True) for p in prompts], request,
                              gate_scale=scales))
    assert [r[1] for r in rows] == argmax_loop(model, ids, 6, gate_scale=1.0)
    assert [r[0] for r in rows] == argmax_loop(model, model.tokenizer.encode(prompts[0], bos=True), 6, 0.0)


def test_log_probabilities_kept_as_rows_decode_are_those_of_scoring_each_answer_afterwards(model):
    """`logprobs` keeps each token's log-probability as the step draws it (what a streamed answer sends): the very
    numbers a forward over prompt and answer gives (adapter.next_token.answer_logprobs), the likeliest tokens at
    each place too, for the rows that ask, each with its own count, beside rows that do not ask and rows sampled."""
    from adapter.next_token import answer_logprobs

    prompts = ["Where is the star?", "Count", "The small blue square is left of the large green circle and"]
    scales = [0.0, 1.0, 1.6]
    rows = [dict(logprobs=3), dict(), dict(logprobs=0, temperature=1.0, top_p=1.0, seed=5)]
    generated, scores = [[] for _ in prompts], [[] for _ in prompts]
    list(adapter.generate.stream_batch(model, prompts, gate_scale=scales, rows=rows, generated=generated,
                                       scores=scores, **GREEDY))
    assert scores[1] == [] and len(scores[0]) == len(generated[0]) and len(scores[2]) == len(generated[2]) > 1
    for row in (0, 2):
        prompt_ids = model.tokenizer.encode(prompts[row], bos=True)
        expected = answer_logprobs(model, prompt_ids, generated[row], scales[row], top_k=rows[row]["logprobs"])
        assert [token.text for token in scores[row]] == [token.text for token in expected]
        assert [token.logprob for token in scores[row]] == pytest.approx([t.logprob for t in expected], abs=1e-4)
        for kept, scored in zip(scores[row], expected):
            assert [text for text, _ in kept.top] == [text for text, _ in scored.top]
            assert [value for _, value in kept.top] == pytest.approx([value for _, value in scored.top], abs=1e-4)
    assert all(len(token.top) == 3 and token.top[0][0] == token.text for token in scores[0])  # greedy: likeliest


def test_token_id_prompts_are_fed_as_they_are(model):
    """Ids continue as the text they encode (with its BOS) does; without a BOS they are a prompt of their own, the
    plain argmax loop over exactly those ids; a template, or an id outside the vocabulary, is refused by name."""
    ids = model.tokenizer.encode("The red circle is", bos=True)
    texts = generate_batch(model, ["The red circle is"], max_new_tokens=6, temperature=0.0)
    assert generate_batch(model, [ids], max_new_tokens=6, temperature=0.0) == texts
    bare = generate_batch(model, [tuple(ids[1:])], max_new_tokens=6, temperature=0.0)[0]
    assert bare == model.tokenizer.decode(argmax_loop(model, ids[1:], 6))
    with pytest.raises(ValueError, match=r"prompts: token ids are fed as they are; they take no template"):
        generate_batch(model, [ids], template="alpaca")
    with pytest.raises(ValueError, match=rf"prompts\[1\]: token id {model.args.vocab_size} \(place 2\) is not in"):
        generate_batch(model, ["Hi", [1, 2, model.args.vocab_size]])


def test_short_prompts_beside_one_that_fills_the_context_get_the_room_they_get_alone(model):
    """The batch's context holds its longest prompt for every row: rows that would get less room beside it are
    decoded after it (they got 96 - 80 = 16 tokens instead of 30); per-row scales follow their rows."""
    long, short, shorter = list(range(5, 85)), [1, 7, 9, 11, 13], [1, 8]
    prompts, scales = [short, long, shorter], [1.6, 1.0, 0.0]
    options = dict(temperature=0.0, max_new_tokens=30, logit_bias=[(model.tokenizer.eos_id, -100.0)])
    told = [[], [], []]
    batched = generate_batch(model, prompts, gate_scale=scales, generated=told, **options)
    assert [len(ids) for ids in told] == [30, 96 - 80, 30]
    for prompt, scale, answer in zip(prompts, scales, batched):
        assert model.generate(prompt, gate_scale=scale, **options) == answer
    assert fitting_groups([long, short, shorter], [GenerationRequest(max_new_tokens=30)] * 3, 96) == [[0], [1, 2]]
    assert fitting_groups([long, short], [GenerationRequest(max_new_tokens=10)] * 2, 96) == [[0, 1]], \
        "room for both: one batch, in order"


def test_generate_and_stream_take_token_ids_as_the_readme_says(model):
    ids = model.tokenizer.encode("The red circle is", bos=True)
    assert model.generate(ids, **GREEDY) == generate_batch(model, [ids], **GREEDY)[0] == \
        "".join(model.stream(ids, **GREEDY))
    with pytest.raises(ValueError, match=r"^prompt: expected a text or a list of token ids, got \['a'\]$"):
        model.generate(["a"])


def test_stream_pieces_join_to_generate(model):
    pieces = list(model.stream("What colour is the star?", **GREEDY))
    assert len(pieces) > 1
    assert "".join(pieces) == model.generate("What colour is the star?", **GREEDY)


def test_eos_ends_the_answer(model, monkeypatch):
    tokenizer = model.tokenizer
    full = model.generate("Hello", temperature=0.0, max_new_tokens=8)
    ids = argmax_loop(model, tokenizer.encode("Hello"), 8)
    # make the 4th generated token EOS by boosting its logit, as a trained model would
    original = model.step
    count = {"n": 0}

    def step(tokens, cache, **kw):
        logits = original(tokens, cache, **kw)
        count["n"] += 1
        if count["n"] == 4:
            logits[:, tokenizer.eos_id] = 1e9
        return logits

    monkeypatch.setattr(model, "step", step)
    answer = model.generate("Hello", temperature=0.0, max_new_tokens=8)
    assert answer == tokenizer.decode(ids[:3]) and len(answer) < len(full)


def test_min_tokens_ignore_eos_and_stop_token_ids_as_vllm_reads_them(model, monkeypatch):
    """min_tokens keeps the end of text (and stop_token_ids) from being drawn before that many tokens; ignore_eos
    decodes on past it to max_new_tokens; a stop token id ends the answer as the end of text does."""
    tokenizer = model.tokenizer
    ids = argmax_loop(model, tokenizer.encode("Hello"), 8)
    original = model.step

    def step(tokens, cache, **kw):  # the end of text is the likeliest 4th token on, as a trained model's would be
        logits = original(tokens, cache, **kw)
        step.count += 1
        if step.count >= 4:
            logits[:, tokenizer.eos_id] = 1e9
        return logits

    def answer(**options) -> tuple[str, list[int]]:
        step.count, told = 0, [[]]
        text = generate_batch(model, ["Hello"], temperature=0.0, max_new_tokens=8, generated=told, **options)[0]
        return text, told[0]

    monkeypatch.setattr(model, "step", step)
    assert answer() == (tokenizer.decode(ids[:3]), ids[:3] + [tokenizer.eos_id])
    held, held_ids = answer(min_tokens=6)
    assert held_ids[:3] == ids[:3] and tokenizer.eos_id not in held_ids[:6] and held_ids[6:] == [tokenizer.eos_id]
    assert held == tokenizer.decode(held_ids[:6])
    past, past_ids = answer(ignore_eos=True)
    assert past_ids == ids[:3] + [tokenizer.eos_id] * 5 and past == tokenizer.decode(ids[:3])  # the ends not shown
    cut, cut_ids = answer(stop_token_ids=[ids[1]])
    assert (cut, cut_ids) == (tokenizer.decode(ids[:1]), ids[:2])
    _, late_ids = answer(stop_token_ids=[ids[1]], min_tokens=3)  # a stop id is held back too
    assert late_ids[0] == ids[0] and ids[1] not in late_ids[:3] and len(late_ids) > 3
    with pytest.raises(ValueError, match=r"^stop_token_ids: token id 99999 \(place 0\) is not in the vocabulary"):
        answer(stop_token_ids=[99999])


def test_stop_strings_cut_the_answer_and_are_never_shown(model):
    full = model.generate("The", temperature=0.0, max_new_tokens=16)
    stop = full[5:8]
    assert stop and stop not in full[:5]
    pieces = list(model.stream("The", temperature=0.0, max_new_tokens=16, stop=[stop]))
    # had a partial stop string been shown early, it would appear past the cut
    assert "".join(pieces) == full[: full.index(stop)]


def test_text_stream_holds_back_partial_stop_strings():
    class Letters:  # a tokenizer whose ids are characters
        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    stream = TextStream(Letters(), stop_strings=["###"])
    shown = [stream.push(ord(c)) for c in "ab##c#"]
    assert shown == ["a", "b", "", "", "##c", ""]
    assert stream.push(ord("#")) == "" and stream.push(ord("#")) == ""
    assert stream.stopped and stream.text == "ab##c"


def test_streaming_never_splits_a_multi_byte_character(base_folder):
    tokenizer = open_tokenizer(base_folder / "tokenizer.model")
    text = "A café 🙂 in 東京 costs €5 🚀"
    ids = tokenizer.encode(text, bos=False)
    assert any(tokenizer.processor.IsByte(i) for i in ids), "fixture must use byte-fallback pieces"
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    for piece in pieces:
        piece.encode("utf-8")  # every piece is whole characters


def test_sampling_rules():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.5, 0.1, 0.2, 4.0]])
    greedy = sample(logits, SamplingParams(temperature=0.0))
    assert greedy.tolist() == [1, 3]
    g = torch.Generator().manual_seed(0)
    assert sample(logits, SamplingParams(temperature=5.0, top_k=1, top_p=1.0), generator=g).tolist() == [1, 3]
    assert sample(logits, SamplingParams(temperature=5.0, top_p=0.01), generator=g).tolist() == [1, 3]
    draws = {tuple(sample(logits, SamplingParams(temperature=5.0, top_k=2, top_p=1.0), generator=g).tolist())
             for _ in range(200)}
    assert {d[0] for d in draws} == {1, 2} and {d[1] for d in draws} == {3, 0}
    seen = torch.tensor([[False, True, False, True], [False] * 4])
    penalized = penalize_repeats(logits, seen, 2.0)
    assert torch.equal(penalized, torch.tensor([[1.0, 1.5, 2.0, -2.0], [0.5, 0.1, 0.2, 4.0]]))


def test_min_p_keeps_the_tokens_transformers_min_p_warper_keeps():
    """min-p (vLLM's, llama.cpp's, transformers'): the tokens at least min_p times as likely as the likeliest, after
    the temperature, are drawn from; the rest never."""
    from transformers import MinPLogitsWarper

    logits = torch.tensor([[2.0, 1.6, 0.9, -0.5, 1.95, -3.0], [0.0, 0.1, -0.2, 3.0, 2.2, 1.5]])
    for min_p, temperature in ((0.5, 1.0), (0.2, 1.0), (0.5, 2.0), (0.05, 0.7)):
        warped = MinPLogitsWarper(min_p)(None, logits / temperature)
        for row in range(2):
            kept = {int(i) for i in torch.nonzero(warped[row] > float("-inf"))}
            draws = {int(sample(logits[row:row + 1], SamplingParams(temperature=temperature, top_p=1.0, min_p=min_p),
                                generator=torch.Generator().manual_seed(seed))) for seed in range(300)}
            assert draws == kept and len(kept) < logits.shape[1], (min_p, temperature, row)


def test_sampling_edges_match_transformers_and_never_overflow():
    """top-p keeps the smallest set whose mass reaches it (an exact tie kept one token too many, against
    transformers' TopPLogitsWarper); a tiny temperature or repetition penalty made logits inf, softmax nan."""
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.5, 0.3, 0.2, 0.0]])
    logits = probs.clamp(min=1e-30).log()
    for top_p, row, kept in ((0.5, 0, {0}), (0.8, 1, {0, 1}), (0.75, 0, {0, 1})):
        draws = {int(sample(logits[row:row + 1], SamplingParams(temperature=1.0, top_p=top_p),
                            generator=torch.Generator().manual_seed(seed))) for seed in range(60)}
        assert draws == kept, (top_p, row)
    wide = torch.tensor([[3.0, 2.9, -1.0], [0.0, 1.0, 0.5]])
    tiny = SamplingParams(temperature=1e-39)
    assert sample(wide, tiny).tolist() == [0, 1], "as greedy"
    seen = torch.ones(2, 3, dtype=torch.bool)  # positive logits divided by 1e-39: inf, a tie between them
    first, second = sample(wide, SamplingParams(temperature=1.0, repetition_penalty=1e-39), seen=seen).tolist()
    assert first in (0, 1) and second in (1, 2)


def test_a_logit_bias_may_be_openais_mapping_with_whole_numbers(model):
    eos = model.tokenizer.eos_id
    assert model.generate("Red", temperature=0.0, max_new_tokens=8, logit_bias={str(eos): -100}) == \
        model.generate("Red", temperature=0.0, max_new_tokens=8, logit_bias=[(eos, -100.0)])


def test_seed_makes_sampling_reproducible(model):
    kwargs = dict(temperature=1.0, top_p=0.9, max_new_tokens=10)
    assert model.generate("Red", seed=3, **kwargs) == model.generate("Red", seed=3, **kwargs)


def test_a_seeded_row_samples_as_it_would_alone_whatever_the_batch(model):
    sampled = dict(temperature=1.0, top_p=0.9, max_new_tokens=10)
    prompts = ["Red", "A long prompt about a blue square on the left", "Red"]
    together = generate_batch(model, prompts, gate_scale=[1.0, 0.5, 0.0], seed=3, **sampled)
    alone = [model.generate(p, gate_scale=g, seed=3, **sampled) for p, g in zip(prompts, [1.0, 0.5, 0.0])]
    assert together == alone
    assert generate_batch(model, ["Red", "Red"], seed=3, **sampled) == [alone[0]] * 2, "same seed, same answer"
    assert model.generate("Red", seed=4, **sampled) != alone[0]
    with pytest.raises(ValueError, match="generator: 2 given for a batch of 3 rows"):
        sample(torch.zeros(3, 5), SamplingParams(temperature=1.0), generator=[torch.Generator()] * 2)


def test_repetition_penalty_discourages_repeats(model):
    def repeats(prompt: str, penalty: float) -> int:
        request = GenerationRequest(max_new_tokens=24, sampling=SamplingParams(temperature=0.0,
                                                                               repetition_penalty=penalty))
        ids = [row[0] for row in decode_tokens(model, [model.tokenizer.encode(prompt)], request)]
        return len(ids) - len(set(ids))

    # the prompt whose greedy answer repeats most (which one depends on the float rounding of this machine)
    prompt = max(["star star", "Red", "the the the", "1 2 1 2"], key=lambda p: repeats(p, 1.0))
    assert repeats(prompt, 1.0) > 0, "the random model repeats itself somewhere"
    assert repeats(prompt, 5.0) < repeats(prompt, 1.0)


def test_a_seeded_top_p_draw_does_not_depend_on_the_order_of_near_equal_tokens():
    """Rounding that flips two near-equal tokens' order (a row padded in a batch) must not swap which one a seeded
    draw picks: top-p keeps its set by sorted mass but draws in vocabulary order."""
    logits = torch.tensor([1.0, 1.0, 0.9, 0.8, 0.5, -2.0])
    flipped = logits.clone()
    flipped[1] += 1e-6
    params = SamplingParams(temperature=1.0, top_p=0.95)
    pairs = [tuple(sample(row[None], params, generator=torch.Generator().manual_seed(seed)).item()
                   for row in (logits, flipped)) for seed in range(40)]
    assert all(a == b for a, b in pairs)
    assert {a for a, _ in pairs} == {0, 1, 2, 3, 4}, "the least likely token is cut by top_p, the others drawn"


def test_openais_penalties_lower_each_chosen_tokens_logit(model):
    """logit - frequency x count - presence x (count > 0), the count over the answer so far (not the prompt): the
    greedy loop with those logits written out gives the same tokens, in a batch beside an unpenalized row too."""
    logits = torch.tensor([[3.0, 2.9, 1.0]])
    counts = torch.tensor([[2.0, 0.0, 1.0]])
    assert torch.equal(penalize_answer(logits, counts, 0.5, 0.25), torch.tensor([[2.0, 2.9, 0.25]]))
    assert sample(logits, SamplingParams(temperature=0.0, frequency_penalty=0.1), counts=counts).tolist() == [1]
    assert sample(logits, SamplingParams(temperature=0.0, presence_penalty=0.05), counts=counts).tolist() == [0]

    ids = model.tokenizer.encode("star star", bos=True)
    out, chosen = list(ids), torch.zeros(model.args.vocab_size)
    with torch.no_grad():
        for _ in range(12):
            row = model(torch.tensor([out]))[0, -1].float() - 0.7 * chosen - 0.4 * (chosen > 0).float()
            out.append(int(row.argmax()))
            chosen[out[-1]] += 1
    penalized = GenerationRequest(max_new_tokens=12, sampling=SamplingParams(
        temperature=0.0, frequency_penalty=0.7, presence_penalty=0.4))
    plain = GenerationRequest(max_new_tokens=12, sampling=SamplingParams(temperature=0.0))
    rows = list(decode_tokens(model, [ids, ids], [penalized, plain]))
    assert [r[0] for r in rows] == out[len(ids):]
    assert [r[1] for r in rows] == argmax_loop(model, ids, 12) != out[len(ids):]


def test_a_logit_bias_is_added_to_its_tokens_logits(model):
    logits = torch.tensor([[3.0, 2.9, 1.0], [0.0, 1.0, 2.0]])
    assert sample(logits, SamplingParams(temperature=0.0, logit_bias=((1, 0.2),))).tolist() == [1, 2]
    assert sample(logits, SamplingParams(temperature=0.0, logit_bias=((0, 2.5), (2, -100.0)))).tolist() == [0, 0]
    ids = model.tokenizer.encode("The red circle is", bos=True)
    with torch.no_grad():
        row = model(torch.tensor([ids]))[0, -1].float()
    first = int(row.argmax())
    row[first] -= 100
    biased = SamplingParams(temperature=0.0, logit_bias=((first, -100.0),))
    request = GenerationRequest(max_new_tokens=1, sampling=biased)
    assert next(decode_tokens(model, [ids], request)) == [int(row.argmax())] != [first]


@pytest.mark.parametrize("kwargs, argument", [
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(template="poem"), "template"),
    (dict(gate_scale=[1.0, 2.0]), "gate_scale"),
    (dict(seed=2**64), "seed: must be a whole number from 0 to 9223372036854775807, got 18446744073709551616"),
    (dict(seed=-1), "seed: must be a whole number"),
    # each was a TypeError or RuntimeError from inside the decode loop, or accepted
    (dict(temperature=float("inf")), r"temperature: must be a finite number >= 0"),
    (dict(repetition_penalty=float("inf")), r"repetition_penalty: must be a finite number > 0"),
    (dict(stop=5), r"^stop: expected a string or a list of non-empty strings, got 5$"),
    (dict(stop=["ok", 5]), r"^stop: expected a string or a list of non-empty strings"),
    (dict(logit_bias=[(99999, 1.0)]), r"^logit_bias: token id 99999 \(place 0\) is not in the vocabulary"),
    (dict(logit_bias=[(1, float("nan"))]), r"^logit_bias: expected \{token id: bias\} or \(token id, bias\) pairs"),
    (dict(logit_bias={"one": 2.0}), r"^logit_bias: expected \{token id: bias\} or \(token id, bias\) pairs"),
    (dict(logit_bias=[1]), r"^logit_bias: expected \{token id: bias\} or \(token id, bias\) pairs"),
    (dict(min_tokens=9, max_new_tokens=8), r"^min_tokens: must be a whole number from 0 to max_new_tokens \(8\)"),
    (dict(ignore_eos="yes"), r"^ignore_eos: must be True or False, got 'yes'$"),
    (dict(stop_token_ids=[1.5]), r"^stop_token_ids: expected a list of token ids"),
    (dict(min_p=1.5), r"^min_p: must be in \[0, 1\] \(0 = off\), got 1.5$"),
    (dict(logprobs=-1), r"^logprobs: must be a whole number from 0 to 50 \(the likeliest tokens kept beside each "
                        r"token's own\) or None, got -1$"),
    (dict(logprobs=True), r"^logprobs: must be a whole number from 0 to 50"),
])
def test_bad_generation_arguments_name_the_argument(model, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        model.generate("Hello", **kwargs)


def test_prompt_longer_than_max_seq_len_is_refused(model):
    with pytest.raises(ValueError, match="prompt.*max_seq_len"):
        model.generate("star " * model.args.max_seq_len)


def test_generation_stops_at_max_seq_len(model):
    ids = model.tokenizer.encode("red " * 40)
    room = model.args.max_seq_len - len(ids)
    request = GenerationRequest(max_new_tokens=500, sampling=SamplingParams(temperature=0.0))
    assert len(list(decode_tokens(model, [ids], request))) == room


def test_command_line_streams_an_answer(base_folder, capsys):
    code = main(["--base", str(base_folder), "--prompt", "What is left of the star?", "--temperature", "0",
                 "--max-new-tokens", "8", "--gate-scale", "0"])
    assert code == 0
    out = capsys.readouterr().out
    model = adapter.load(base_folder, device="cpu")
    expected = model.generate(adapter.alpaca("What is left of the star?"), temperature=0.0, max_new_tokens=8,
                              stop=list(adapter.prompts.STOP_STRINGS))
    assert out == expected + "\n"


@pytest.mark.skipif(not tiny_available(), reason="assets/tiny not built yet")
def test_template_none_continues_the_text_as_it_reads(capsys):
    """A raw text's continuation is decoded after the text, so its first word keeps its space ("The star is" ->
    " large", where decoded alone SentencePiece drops it and the two would run together)."""
    prompt = "There is a large red star on the left. The star is"
    assert main(["--base", "tiny", "--adapter", "tiny-text", "--template", "none", "--prompt", prompt,
                 "--temperature", "0", "--max-new-tokens", "6", "--gate-scale", "0"]) == 0
    out = capsys.readouterr().out.removesuffix("\n")
    model = adapter.load("tiny", adapter="tiny-text", device="cpu")
    alone = model.generate(prompt, temperature=0.0, max_new_tokens=6, gate_scale=0.0)
    assert out == model.generate(prompt, temperature=0.0, max_new_tokens=6, gate_scale=0.0, continued=True)
    assert out.startswith(" ") and out[1:] == alone


@pytest.mark.skipif(not tiny_available(), reason="assets/tiny not built yet")
def test_an_adapter_that_cannot_see_the_image_is_named_before_any_answers(capsys):
    picture = str(TINY_FOLDER / "examples" / "00.png")
    assert main(["--base", "tiny", "--adapter", "tiny-image", "tiny-text", "--image", picture, "--prompt",
                 "What colour is the star?", "--temperature", "0", "--max-new-tokens", "5"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == ("error: --adapter tiny-text: image: this adapter has no visual prompt; it cannot "
                                 "see images\n")


def test_command_line_gate_sweep_prints_each_scales_answer(base_folder, capsys, tmp_path):
    from adapter.random_demo import write_random_demo

    demo = write_random_demo(tmp_path, base=base_folder)
    question = "What is left of the star?"
    code = main(["--base", str(demo.base), "--adapter", str(demo.adapter), "--prompt", question,
                 "--temperature", "0", "--max-new-tokens", "8", "--delta-scale", "0.5", "--gate-sweep", "0, 1.5"])
    assert code == 0
    model = adapter.load(demo.base, adapter=demo.adapter, device="cpu")
    alone = [model.generate(adapter.alpaca(question), temperature=0.0, max_new_tokens=8, gate_scale=gate,
                            delta_scale=0.5, stop=list(adapter.prompts.STOP_STRINGS)) for gate in (0.0, 1.5)]
    assert alone[0] != alone[1]
    assert capsys.readouterr().out == f"--- gate scale 0\n{alone[0]}\n--- gate scale 1.5\n{alone[1]}\n"


def test_command_line_reports_bad_input_in_one_line(base_folder, capsys, tmp_path):
    assert main(["--base", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert main(["--base", str(base_folder), "--prompt", "x", "--top-p", "2"]) == 2
    assert main(["--base", str(tmp_path / "nope"), "--prompt", "x", "--gate-sweep", "0,one"]) == 2
    assert main(["--base", str(tmp_path / "nope"), "--prompt", "  "]) == 2
    assert main(["--base", str(base_folder), "--prompt", "x", "--seed", str(2**64)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: --base:") and "nope" in err[0]
    assert err[1].startswith("error: --top-p:")
    assert err[2] == "error: --gate-sweep: 'one' is not a number", "checked before loading the base"
    assert err[3] == ("error: --prompt: empty; give an instruction to answer (or --template none to let the model "
                      "write from nothing)"), "checked before loading the base"
    assert err[4] == f"error: --seed: must be a whole number from 0 to {2**63 - 1}, got {2**64}"  # not torch's overflow
    assert main(["--base", str(base_folder), "--prompt", "", "--template", "none", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0, "the base writing from its BOS alone"
    assert capsys.readouterr().out


def test_command_line_answers_with_each_adapter_on_one_shared_base(base_folder, capsys, tmp_path):
    one = adapter.save_adapter(randomize_adapter(adapter.load(base_folder, adapter=V1, device="cpu"), seed=1),
                               tmp_path / "one").parent
    two = adapter.save_adapter(randomize_adapter(adapter.load(base_folder, adapter=V2, device="cpu"), seed=2),
                               tmp_path / "two").parent
    question, greedy = "What is left of the star?", dict(temperature=0.0, max_new_tokens=8,
                                                         stop=list(adapter.prompts.STOP_STRINGS))
    alone = {path: [adapter.load(base_folder, adapter=path, device="cpu").generate(
        adapter.alpaca(question), gate_scale=gate, **greedy) for gate in (0.0, 1.0)] for path in (one, two)}
    assert alone[one][1] != alone[two][1]
    flags = ["--base", str(base_folder), "--adapter", str(one), str(two), "--prompt", question, "--temperature", "0",
             "--max-new-tokens", "8"]
    assert main(flags) == 0
    assert capsys.readouterr().out == f"--- adapter {one}\n{alone[one][1]}\n--- adapter {two}\n{alone[two][1]}\n"
    assert main([*flags, "--gate-sweep", "0 1"]) == 0
    assert capsys.readouterr().out == "\n".join(f"--- adapter {path}, gate scale {gate}\n{alone[path][gate]}"
                                                for path in (one, two) for gate in (0, 1)) + "\n"
    assert main([*flags, "--clip", str(tmp_path / "clip.safetensors")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --clip: none of the adapters ({one}, {two}) has a visual " \
                                              "prompt to feed"


def test_an_empty_list_of_prompts_is_refused_by_name(model):
    """(was "max() arg is an empty sequence")"""
    with pytest.raises(ValueError, match="^prompts: give at least one prompt$"):
        generate_batch(model, [])


@pytest.mark.parametrize("option, message", [
    ("max_new_tokens", "max_new_tokens: must be an integer >= 1, got True"),  # decoded one token
    ("top_k", "top_k: expected a number, got True"),  # passed, then failed inside torch.topk when sampling
    ("temperature", "temperature: expected a number, got True"),
    ("gate_scale", "gate_scale: expected a number or one number per row, got True"),
])
def test_a_bool_where_a_number_is_expected_is_refused_by_name(model, option, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        generate_batch(model, ["Hi"], **{"temperature": 1.0, option: True})


def test_a_refusal_does_not_repeat_a_huge_value_whole():
    """A 100,000-character scales text (or hub repository id) came back whole in the error: 100 KB messages."""
    from adapter.generate import scales_from_text
    from adapter.hub import repo_id

    for refused in (lambda: scales_from_text("x" * 100_000, "scales"), lambda: repo_id("y" * 100_000, "repo")):
        with pytest.raises(ValueError) as error:
            refused()
        assert len(str(error.value)) < 300


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_scores_that_are_not_finite_are_refused_by_name(model, temperature):
    """(A gate scale too large for the dtype, or NaN weights: sampled, torch.multinomial raised "probability tensor
    contains either inf, nan or element < 0" from deep inside; greedy, the first token was taken without a word.)"""
    for broken in (float("nan"), float("inf")):
        logits = torch.zeros(2, 16)
        logits[1, 3] = broken
        with pytest.raises(ValueError, match=r"^logits: the model's scores for the next token are not finite"):
            sample(logits, SamplingParams(temperature=temperature))
    kept = model.norm.weight.detach().clone()
    try:
        with torch.no_grad():
            model.norm.weight[0] = float("nan")  # a base holding a NaN
        with pytest.raises(ValueError, match="^logits: "):
            model.generate("Name a colour.", temperature=temperature, max_new_tokens=3)
    finally:
        with torch.no_grad():
            model.norm.weight.copy_(kept)
