"""`adapter.evaluate`: the loss is fine-tuning's validation loss at every gate scale (and the frozen base's at
gate and delta scale 0), token accuracy is the argmax of the full logits, exact answers are what the tiny
model's own evaluation counts, and the command line writes what it prints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

import adapter
from adapter.evaluate import EXACT_SLACK, evaluate, evaluate_text, main, table
from adapter.finetune import train
from adapter.finetune.batching import collate, eval_batches
from adapter.finetune.dataset import build_dataset
from adapter.finetune.distributed import Processes
from adapter.finetune.encode import IGNORE_INDEX
from adapter.finetune.records import read_records
from adapter.finetune.step import evaluate as validation_loss
from adapter.formats.native import save_adapter
from adapter.tiny.evaluate import answers, held_out
from adapter.tiny.records import alpaca_record, write_image_records, write_text_records

from .conftest import V2, randomize_adapter
from .finetune_helpers import alpaca_records, one_thread_and_own_rng, tiny_config, write_json, write_jsonl  # noqa: F401


@pytest.fixture(scope="module")
def v2_adapter(base_folder, tmp_path_factory):
    model = randomize_adapter(adapter.load(base_folder, adapter=V2, device="cpu"), std=0.2)
    return save_adapter(model, tmp_path_factory.mktemp("v2") / "adapter")


@pytest.fixture
def data(tmp_path):
    return write_json(tmp_path / "data.json", alpaca_records(10, seed=3, with_input=True))


def finetune_loss(model, data, **scales) -> float:
    """What adapter.finetune logs as the validation loss, at the model's own gate/delta scales."""
    model.set_gate_scale(scales.get("gate_scale", 1.0))
    model.set_delta_scale(scales.get("delta_scale", 1.0))
    encoded = build_dataset(read_records(data), model.tokenizer, model.args.max_seq_len, 0, 0).train
    batches = [collate([encoded[i] for i in b]) for b in eval_batches([len(e.tokens) for e in encoded], 3, 0, 1)]
    targets = sum(e.targets for e in encoded)
    try:
        return validation_loss(model, batches, targets, Processes())
    finally:
        model.set_gate_scale(1.0)
        model.set_delta_scale(1.0)


def argmax_hits(model, data, gate_scale: float) -> int:
    """Answer tokens whose target is the argmax of the whole sequence's logits, one example at a time."""
    hits = 0
    for item in build_dataset(read_records(data), model.tokenizer, model.args.max_seq_len, 0, 0).train:
        with torch.no_grad():
            logits = model(torch.tensor([item.tokens]), gate_scale=gate_scale)[0]
        for t in range(len(item.tokens) - 1):
            if item.labels[t + 1] != IGNORE_INDEX:
                hits += int(logits[t].argmax()) == item.labels[t + 1]
    return hits


def test_losses_and_token_accuracy_match_finetune_and_the_full_logits(base_folder, v2_adapter, data):
    model = adapter.load(base_folder, adapter=v2_adapter, device="cpu")
    result = evaluate(model, data, gate_scales=[0.0, 0.5, 1.0, 2.0], micro_batch_size=3)
    assert (result.examples, result.truncated, result.prompt_format) == (10, 0, "alpaca")
    assert result.tokens == sum(e.targets for e in build_dataset(read_records(data), model.tokenizer,
                                                                   model.args.max_seq_len, 0, 0).train)
    losses = [s.loss for s in result.scores]
    for score in result.scores:
        assert score.loss == pytest.approx(finetune_loss(model, data, gate_scale=score.gate_scale), rel=1e-5)
        assert round(score.token_accuracy * result.tokens) == argmax_hits(model, data, score.gate_scale)
    assert len(set(losses)) == 4, "the gate scale moves the loss"

    frozen = evaluate(model, data, gate_scales=[0.0], delta_scale=0.0).scores[0].loss
    base = adapter.load(base_folder, device="cpu")
    assert frozen == pytest.approx(finetune_loss(base, data), rel=1e-6)
    assert evaluate(base, data).scores[0].loss == pytest.approx(frozen, rel=1e-6)


def test_exact_answers_do_not_depend_on_a_long_question_in_the_same_micro_batch(tmp_path):
    """A question that fills most of the context left the short ones beside it 4 tokens or fewer of answer: their lists
    were cut (0 exact at micro-batch 8, 3 one at a time)."""
    model = adapter.load("tiny", adapter="tiny-text", device="cpu")
    questions = [q for q in held_out("text", seed=0, per_category=3) if q.question.startswith("List")]  # 5-7 tokens
    long = "What colour is the circle?"
    while len(model.tokenizer.encode(adapter.alpaca("red " + long))) <= model.args.max_seq_len - 4:
        long = "red " + long
    records = [{"instruction": long, "output": " red"}]
    records += [alpaca_record(q) for q in questions]
    data = write_json(tmp_path / "mixed.json", records)
    one, together = (evaluate(model, data, gate_scales=[1.0], exact=True, micro_batch_size=size) for size in (1, 8))
    assert together.answers == one.answers and together.scores[0].exact == one.scores[0].exact >= 3


def test_a_saved_answer_is_cut_at_its_own_reference_not_its_neighbours(tmp_path):
    """Answers were decoded up to the micro-batch's longest reference + 4 tokens: the JSON's answer to a question
    with a one-word reference ran on where a long reference shared its batch."""
    model = adapter.load("tiny", adapter="tiny-text", device="cpu")
    tokens = model.tokenizer.encode
    listing = held_out("text", seed=0, per_category=3)[16]  # its answer: 7 tokens, "red, purple, orange, green"
    records = [{**alpaca_record(listing), "output": " red"},
               {**alpaca_record(listing), "output": " " + " ".join(["red circle"] * 12)}]
    data = write_json(tmp_path / "mixed.json", records)
    one, together = (evaluate(model, data, gate_scales=[1.0], exact=True, micro_batch_size=size) for size in (1, 2))
    assert together.answers == one.answers
    assert len(tokens(one.answers[0]["answers"][0], bos=False)) <= len(tokens(" red", bos=False)) + EXACT_SLACK < \
        len(tokens(one.answers[1]["answers"][0], bos=False))  # the list, cut after 5 tokens there, whole here


def test_exact_answers_are_what_the_tiny_models_evaluation_counts(tmp_path):
    model = adapter.load("tiny", adapter="tiny-text", device="cpu")
    questions = held_out("text", seed=0, per_category=3)
    data = write_text_records(questions, tmp_path / "held_out.jsonl")  # as the adapter was trained: " red"
    result = evaluate(model, data, gate_scales=[0.0, 1.0], exact=True, micro_batch_size=8)
    theirs = [answers(model, questions, scale, images=False) for scale in (0.0, 1.0)]
    expected = [sum(a == q.answer for a, q in zip(said, questions)) for said in theirs]
    assert [s.exact for s in result.scores] == expected
    assert [row["reference"] for row in result.answers] == [" " + q.answer for q in questions]
    for index, said in enumerate(theirs):  # the same greedy answers, ours stopped a few tokens past the reference
        ours = [row["answers"][index].strip() for row in result.answers]
        assert all(their.startswith(mine) for mine, their in zip(ours, said)), (ours, said)
        assert [a == q.answer for a, q in zip(ours, questions)] == [a == q.answer for a, q in zip(said, questions)]
    assert expected[1] > expected[0], "the trained adapter answers held-out questions its base cannot"
    assert result.scores[1].loss < result.scores[0].loss


def test_a_long_evaluation_shows_its_progress_in_a_terminal(tmp_path, monkeypatch, capsys):
    """Hundreds of questions on a 7B base score and answer for minutes, silently: in a terminal, a bar per stage
    (adapter.progress), gone when done; none elsewhere."""
    import sys

    import adapter.progress
    from adapter.choices import evaluate_choices
    from tests.test_choices import tiny_questions

    model = adapter.load("tiny", adapter="tiny-text", device="cpu")
    data = write_text_records(held_out("text", seed=0, per_category=1), tmp_path / "held_out.jsonl")
    choices = tiny_questions(tmp_path / "choices.jsonl")
    evaluate(model, data, gate_scales=[0.0, 1.0], exact=True, micro_batch_size=4)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(adapter.progress, "BAR_DELAY_S", 0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    evaluate(model, data, gate_scales=[0.0, 1.0], exact=True, micro_batch_size=4)
    evaluate_choices(model, choices, gate_scales=[1.0], micro_batch_size=16)
    shown = capsys.readouterr().err
    for stage in ("scoring", "answering", "scoring the choices"):
        assert f"\r{stage}:   0%|          | 0/" in shown, (stage, shown)


def test_image_questions_score_with_their_pictures(tmp_path):
    model = adapter.load("tiny", adapter="tiny-image", device="cpu")
    questions = held_out("image", seed=0, per_category=4)
    data = write_image_records(questions, tmp_path / "images.jsonl", tmp_path / "pictures")
    result = evaluate(model, data, image_folder=tmp_path / "pictures", gate_scales=[0.0, 1.0], exact=True)
    expected = [sum(a == q.answer for a, q in zip(answers(model, questions, scale, images=True), questions))
                for scale in (0.0, 1.0)]
    assert [s.exact for s in result.scores] == expected
    blind = write_text_records(questions, tmp_path / "blind.jsonl")  # the same questions without their pictures
    assert evaluate(model, blind, gate_scales=[1.0]).scores[0].loss != result.scores[1].loss


def test_the_command_prints_and_writes_the_same_figures(base_folder, v2_adapter, data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--base", str(base_folder), "--adapter", str(v2_adapter), "--data", str(data), "--gate-sweep",
            "0, 1", "--json", str(out / "scores.json"), "--plot", str(out / "scores.png"), "--limit", "6"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "scores.json").read_text())
    model = adapter.load(base_folder, adapter=v2_adapter, device="cpu")
    result = evaluate(model, data, gate_scales=[0.0, 1.0], limit=6)
    assert printed == table(result) + "\n"
    assert saved == [result.to_dict()]
    assert saved[0]["scores"][1]["perplexity"] == pytest.approx(result.scores[1].perplexity)
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["scores.json", "scores.png"]  # no temp files left


@pytest.mark.parametrize("argv, message", [
    (["--data", "missing.json"], "--data: missing.json does not exist"),
    (["--data", "."], "--data: \\. is a folder, not a file"),
    (["--data", "/dev/null"], "--data: /dev/null is not a regular file"),
    (["--gate-sweep", "0, one"], "--gate-sweep: 'one' is not a number"),
    (["--gate-sweep", "-1"], "--gate-sweep: give one or more finite scales >= 0, got '-1'"),
    (["--limit", "0"], "limit: must be at least 1, got 0"),
    (["--max-seq-len", "100000"], "--max-seq-len: must be between 2 and the model's"),
    (["--max-seq-len", "8"], "--data: none of the .* examples of .* keeps an answer token within 8 tokens \\(each is "
                             "cut before its answer\\): there is nothing to score"),
    (["--prompt-format", "llama3"], "prompt format llama3: tokenizer .* has no <\\|start_header_id\\|> token"),
])
def test_bad_arguments_are_one_line_naming_the_flag(base_folder, data, capsys, argv, message):
    options = {"--data": str(data)}
    for flag, value in zip(argv[::2], argv[1::2]):
        options[flag] = value
    assert main(["--base", str(base_folder), *[x for pair in options.items() for x in pair]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert __import__("re").search(message, err), err


def test_an_output_that_is_the_data_or_the_other_output_is_refused_and_the_data_kept(base_folder, data, tmp_path,
                                                                                     capsys):
    """(--json naming the --data file replaced the questions with the figures; --json and --plot one file kept
    the plot alone.)"""
    kept = data.read_bytes()
    for outputs, message in ((["--json", str(data)], f"--json: {data} is the file --data names"),
                             (["--plot", str(data)], f"--plot: {data} is the file --data names"),
                             (["--json", str(tmp_path / "x.png"), "--plot", str(tmp_path / "x.png")],
                              f"--plot: {tmp_path / 'x.png'} is the file --json names")):
        assert main(["--base", str(base_folder), "--data", str(data), *outputs]) == 2
        assert capsys.readouterr().err == f"error: {message}; it would be overwritten\n"
    assert data.read_bytes() == kept and not (tmp_path / "x.png").exists()


def test_image_records_need_an_adapter_that_sees(base_folder, tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "a.png")
    data = write_jsonl(tmp_path / "images.jsonl", [{"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A star."}]}])
    with pytest.raises(ValueError, match=f"--data: {data} has image records; they need an adapter that sees images"):
        evaluate(adapter.load(base_folder, device="cpu"), data, image_folder=tmp_path)


def test_tiny_held_out_writes_the_questions_eval_asks_as_training_records(tmp_path, capsys):
    from adapter.tiny.cli import main as tiny_main
    from adapter.tiny.questions import IMAGE_CATEGORIES

    assert tiny_main(["held-out", "text", str(tmp_path / "text.jsonl"), "--per-category", "2"]) == 0
    records = [json.loads(line) for line in (tmp_path / "text.jsonl").read_text().splitlines()]
    assert records == [alpaca_record(q) for q in held_out("text", seed=0, per_category=2)]
    assert tiny_main(["held-out", "image", str(tmp_path / "image.jsonl"), "--per-category", "1"]) == 0
    assert capsys.readouterr().out.endswith(f"pass --image-folder {tmp_path / 'image'}\n")
    records = read_records(tmp_path / "image.jsonl", tmp_path / "image")
    (example,) = records[0]
    assert len(records) == len(IMAGE_CATEGORIES) and example.image.suffix == ".png"
    assert example.prompt == adapter.image_question(held_out("image", seed=0, per_category=1)[0].question)
    with pytest.raises(SystemExit, match="^2$"):  # refused as the command line is read
        tiny_main(["held-out", "text", str(tmp_path / "none.jsonl"), "--per-category", "0"])
    assert "argument --per-category: must be at least 1, got 0" in capsys.readouterr().err
    # options of another kind were ignored without a word
    assert tiny_main(["held-out", "text", str(tmp_path / "none.jsonl"), "--documents", "5"]) == 2
    assert capsys.readouterr().err == "error: --documents: only with corpus (questions are --per-category per " \
                                      "category)\n"
    for unused in (["--choices"], ["--per-category", "2"]):
        assert tiny_main(["held-out", "corpus", str(tmp_path / "none.jsonl"), *unused]) == 2
        assert capsys.readouterr().err == f"error: {unused[0]}: not with corpus (documents, not questions: " \
                                          "--documents says how many)\n"
    assert not (tmp_path / "none.jsonl").exists()
    # OUT without a suffix was the pictures' folder too: filled with pictures, then refused as a folder
    for choices in ([], ["--choices"]):
        assert tiny_main(["held-out", "image", str(tmp_path / "nosuffix"), "--per-category", "1", *choices]) == 2
        assert capsys.readouterr().err == (f"error: out: name a file such as {tmp_path / 'nosuffix'}.jsonl (the "
                                           f"pictures go in {tmp_path / 'nosuffix'}/ beside it)\n")
        assert not (tmp_path / "nosuffix").exists()


def test_a_validation_file_is_scored_as_evaluate_scores_it(base_folder, tmp_path):
    data = write_json(tmp_path / "train.json", alpaca_records(16, seed=1))
    val = write_jsonl(tmp_path / "val.jsonl", alpaca_records(5, seed=2, with_input=True))
    result = train(tiny_config(base_folder, data, tmp_path / "run", val_data=str(val), val_fraction=0.5, epochs=2))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    start = next(r for r in log if r.get("type") == "start")
    assert (start["train_examples"], start["val_examples"]) == (16, 5)  # all of --data trains
    step, loss = result.val_losses[-1]
    model = adapter.load(base_folder, adapter=result.adapter, device="cpu")
    assert loss == pytest.approx(evaluate(model, val).scores[1].loss, rel=1e-5)
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x"}\n')
    with pytest.raises(ValueError, match=f"--val-data: {tmp_path / 'bad.jsonl'} has 1 bad record"):
        train(tiny_config(base_folder, data, tmp_path / "run2", val_data=str(tmp_path / "bad.jsonl")))


def test_the_engine_scores_the_first_records_at_the_requests_delta_scale(base_folder, v2_adapter, data,
                                                                          monkeypatch):
    from adapter import engine as engine_module
    from adapter.engine import Engine, Settings

    engine = Engine(adapter.load(base_folder, adapter=v2_adapter, device="cpu"))
    monkeypatch.setattr(engine_module, "MAX_SCORE_RECORDS", 4)
    got = engine.score(data, "0, 1", Settings(delta_scale=0.5))
    assert got == evaluate(engine.model, data, gate_scales=[0.0, 1.0], delta_scale=0.5, limit=4)
    assert got.examples == 4 and not engine.lock.locked()
    with pytest.raises(ValueError, match="gate_scales: give 1 to 9 scales, got 10"):
        engine.score(data, ", ".join(["1"] * 10), Settings())


def test_the_score_tabs_exact_answers_hold_no_more_kv_cache_than_the_app_counts(base_folder, v2_adapter, data,
                                                                                 monkeypatch):
    """Exact answers decode micro-batch x scales rows (up to 36); the app's bound (Engine.max_cached_tokens, what
    the Space fit check counts) reached chats and sweeps but not them: rows beyond it now decode in turns."""
    from adapter.engine import Engine, Settings

    model = adapter.load(base_folder, adapter=v2_adapter, device="cpu")
    unbounded = evaluate(model, data, gate_scales=[0.0, 0.5, 1.0], exact=True)
    tokenizer = model.tokenizer
    longest = max(len(tokenizer.encode(row["prompt"])) + len(tokenizer.encode(row["reference"], bos=False)) + 4
                  for row in unbounded.answers)  # a row's prompt and the room its answer gets (reference + 4)
    bound = 2 * longest
    caches = []
    original = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda batch, max_len=None, **k: caches.append((batch, max_len))
                        or original(batch, max_len, **k))
    got = Engine(model, max_cached_tokens=bound).score(data, "0, 0.5, 1", Settings(), exact=True)
    assert sum(batch for batch, _ in caches) == 10 * 3  # every row decoded once (micro-batches of 4 x 3 scales)
    assert all(batch * length <= bound for batch, length in caches), (caches, bound)  # (12 rows at once)
    assert got.answers == unbounded.answers and got.scores == unbounded.scores


def text_nll(model, tokens: list[int], length: int, gate_scale: float) -> tuple[float, int, int]:
    """(summed negative log-likelihood, tokens, tokens ranked first) of a document's tokens but its first, each
    read after what comes before it in its window of `length` (windows overlapping by one)."""
    total, count, hits = 0.0, 0, 0
    for start in range(0, len(tokens) - 1, length - 1):
        window = torch.tensor([tokens[start:start + length]])
        with torch.no_grad():
            logits = model(window, gate_scale=gate_scale)[0, :-1].double()
        targets = window[0, 1:]
        total += -logits.log_softmax(-1).gather(1, targets[:, None]).sum().item()
        count, hits = count + len(targets), hits + (logits.argmax(-1) == targets).sum().item()
    return total, count, hits


def test_plain_text_scores_every_token_once_as_window_by_window_logits_give_it(base_folder, v2_adapter, tmp_path):
    model = adapter.load(base_folder, adapter=v2_adapter, device="cpu")
    documents = [" ".join(f"word{i} and more" for i in range(40)), "A short one.", "Another text, in a line."]
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": d} for d in documents])
    length = 32
    encoded = [model.tokenizer.encode(d, bos=True, eos=False) for d in documents]
    assert len(encoded[0]) > 2 * length, "the first document spans several windows"
    result = evaluate_text(model, data, gate_scales=[0.0, 1.0, 1.5], max_seq_len=length, micro_batch_size=2)
    assert result.tokens == sum(len(t) - 1 for t in encoded) and result.examples == 3
    for score in result.scores:
        sums = [text_nll(model, tokens, length, score.gate_scale) for tokens in encoded]
        total, hits = sum(s[0] for s in sums), sum(s[2] for s in sums)
        assert score.loss == pytest.approx(total / result.tokens, rel=1e-5)
        assert score.token_accuracy == pytest.approx(hits / result.tokens)
        assert result.bits_per_byte(score) == pytest.approx(total / math.log(2) / len("".join(documents).encode()),
                                                              rel=1e-5)
    assert result.scores[0].loss != pytest.approx(result.scores[1].loss), "the adapter changes the text's loss"

    (tmp_path / "one.txt").write_text(documents[0])  # a .txt file is one document
    alone = evaluate_text(model, tmp_path / "one.txt", gate_scales=[1.0], max_seq_len=length)
    total, count, _ = text_nll(model, encoded[0], length, 1.0)
    assert alone.tokens == count and alone.scores[0].loss == pytest.approx(total / count, rel=1e-5)


def strided_nll(model, tokens: list[int], length: int, stride: int, gate_scale: float) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens) as transformers' perplexity guide computes it: windows of `length`
    starting `stride` apart, each scoring only its tokens the previous window did not reach."""
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + length, len(tokens))
        window = torch.tensor([tokens[begin:end]])
        with torch.no_grad():
            logprobs = model(window, gate_scale=gate_scale)[0, :-1].double().log_softmax(-1)
        new = end - max(previous_end, 1)  # BOS is never a target
        picked = logprobs[-new:].gather(1, window[0, -new:, None])
        total, count = total - picked.sum().item(), count + new
        previous_end = end
        if end == len(tokens):
            break
    return total, count


def test_a_stride_reads_every_token_once_after_more_context(base_folder, v2_adapter, tmp_path):
    from adapter.finetune.encode import text_windows

    model = adapter.load(base_folder, adapter=v2_adapter, device="cpu")
    document = " ".join(f"word{i} and more" for i in range(40))
    (tmp_path / "one.txt").write_text(document)
    tokens = model.tokenizer.encode(document, bos=True, eos=False)
    length = 32
    assert text_windows(tokens, length, length - 1) == text_windows(tokens, length), "the default: overlap by one"
    for stride in (1, 8, 31):
        windows = text_windows(tokens, length, stride)
        scored = [window_start + i for window_start, window in zip(range(0, len(tokens), stride), windows)
                  for i, label in enumerate(window.labels) if label != -100]
        assert scored == list(range(1, len(tokens))), "every token but BOS, once, in order"
        firsts = [next(i for i, label in enumerate(w.labels) if label != -100) for w in windows[1:]]
        assert min(firsts) >= length - stride, "each read after at least length - stride tokens"
        result = evaluate_text(model, tmp_path / "one.txt", gate_scales=[0.0, 1.0], max_seq_len=length,
                               stride=stride, micro_batch_size=3)
        assert result.tokens == len(tokens) - 1
        for score in result.scores:
            total, count = strided_nll(model, tokens, length, stride, score.gate_scale)
            assert count == result.tokens and score.loss == pytest.approx(total / count, rel=1e-5)
    with pytest.raises(ValueError, match=r"^stride: must be between 1 and the window's 32 - 1, got 32$"):
        evaluate_text(model, tmp_path / "one.txt", max_seq_len=length, stride=length)


def test_the_tiny_text_adapter_reads_the_bases_own_held_out_text_worse_than_the_base(tmp_path):
    """What the zero-init gate keeps: at gate 0 the plain text the base learnt from, read as well as the base
    reads it; at gate 1 the instruction-tuned adapter makes it less likely."""
    from adapter.tiny.corpus import corpus

    data = write_jsonl(tmp_path / "text.jsonl", [{"text": d} for d in corpus(0, 40, "held-out")])
    result = evaluate_text(adapter.load("tiny", device="cpu"), data, gate_scales=[0.0, 0.5, 1.0])
    assert result.scores[0].perplexity < result.scores[1].perplexity < result.scores[2].perplexity
    from adapter.tiny.assets import ASSETS, BASE

    base = evaluate_text(adapter.load(ASSETS / BASE, device="cpu"), data, gate_scales=[1.0])  # no adapter
    assert result.scores[0].loss == pytest.approx(base.scores[0].loss, rel=1e-5), "gate 0 is the base"


def test_the_command_scores_text_and_refuses_what_does_not_apply(base_folder, tmp_path, capsys):
    (tmp_path / "text.txt").write_text("Some plain text to read, in one document.\n")
    assert main(["--base", str(base_folder), "--data", str(tmp_path / "text.txt"), "--text", "--json",
                 str(tmp_path / "scores.json")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("adapter none (the base), plain text: 1 document(s), ")
    assert "bits per byte" in printed.splitlines()[1]
    assert "bits_per_byte" in json.loads((tmp_path / "scores.json").read_text())[0]["scores"][0]
    for extra, message in ((["--exact"], "--text scores plain text: --exact, --image-folder and --prompt-format do "
                                         "not apply"),
                           (["--choices"], "--choices scores whole choices: --exact, --max-seq-len and --text")):
        assert main(["--base", str(base_folder), "--data", str(tmp_path / "text.txt"), "--text", *extra]) == 2
        assert message in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"instruction": "no text"}, ["a list"]])
    assert main(["--base", str(base_folder), "--data", str(bad), "--text"]) == 2
    err = capsys.readouterr().err
    assert f"--data: {bad} has 2 bad record(s), none read:" in err
    assert f"{bad}:2: missing 'text'" in err and f"{bad}:3: must be an object with a 'text' string, got a list" in err
    assert main(["--base", str(base_folder), "--data", str(tmp_path / "text.txt"), "--stride", "8"]) == 2
    assert "--stride: only with --text" in capsys.readouterr().err
    assert main(["--base", str(base_folder), "--data", str(tmp_path / "text.txt"), "--text", "--max-seq-len", "16",
                 "--stride", "8"]) == 0
    assert capsys.readouterr().out.startswith("adapter none (the base), plain text: 1 document(s), ")
    (tmp_path / "empty.txt").write_text(" \n")
    assert main(["--base", str(base_folder), "--data", str(tmp_path / "empty.txt"), "--text"]) == 2
    assert f"--data: {tmp_path / 'empty.txt'} holds no text" in capsys.readouterr().err


def test_tiny_held_out_corpus_writes_held_out_documents_as_text_records(tmp_path, capsys):
    from adapter.tiny.cli import main as tiny_main
    from adapter.tiny.corpus import corpus
    from adapter.tiny.recipe import RECIPES

    assert tiny_main(["held-out", "corpus", str(tmp_path / "corpus.jsonl"), "--documents", "3"]) == 0
    records = [json.loads(line) for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    assert records == [{"text": text} for text in corpus(RECIPES["full"].seed, 3, "held-out")]
    assert "score them with python -m adapter.evaluate --text" in capsys.readouterr().out
    assert tiny_main(["held-out", "corpus", str(tmp_path / "corpus.txt"), "--documents", "3"]) == 0
    assert (tmp_path / "corpus.txt").read_text() == "".join(f"{record['text']}\n" for record in records), \
        "a .txt file: one text, a document a line"
    with pytest.raises(SystemExit, match="^2$"):
        tiny_main(["held-out", "corpus", str(tmp_path / "none.jsonl"), "--documents", "0"])
    assert "argument --documents: must be at least 1, got 0" in capsys.readouterr().err


def test_several_delta_scales_give_a_table_each(base_folder, v2_adapter, data, capsys):
    assert main(["--base", str(base_folder), "--adapter", str(v2_adapter), "--data", str(data), "--gate-sweep",
                 "0,1", "--delta-scale", "0, 1"]) == 0
    model = adapter.load(base_folder, adapter=v2_adapter, device="cpu")
    tables = [table(evaluate(model, data, gate_scales=[0.0, 1.0], delta_scale=delta)) for delta in (0.0, 1.0)]
    assert capsys.readouterr().out == "\n\n".join(tables) + "\n"
    assert tables[0] != tables[1] and ", delta scale 0\n" in tables[0]
    assert main(["--base", str(base_folder), "--data", str(data), "--delta-scale", "nan"]) == 2
    assert "--delta-scale: give one or more finite numbers, got 'nan'" in capsys.readouterr().err


def test_the_command_reads_a_hub_datasets_file_as_fine_tuning_does(base_folder, tmp_path, monkeypatch, capsys):
    """`--data hf:owner/name` (the README says evaluation takes it): fetched before the model loads, then read as
    a local file is (here plain text, a wikitext-like dataset of one JSONL file)."""
    from tests.test_data_files import FakeHub

    local = write_jsonl(tmp_path / "test.jsonl", [{"text": "Some text to read."}, {"text": "And some more."}])
    hub = FakeHub({"data/test.jsonl": local}).install(monkeypatch)
    assert main(["--base", str(base_folder), "--data", "hf:owner/texts", "--text"]) == 0
    assert hub.asked == [("owner/texts", "data/test.jsonl", "dataset")]
    fetched = capsys.readouterr().out
    assert main(["--base", str(base_folder), "--data", str(local), "--text"]) == 0
    assert fetched == capsys.readouterr().out


@pytest.mark.parametrize("mode", [[], ["--choices"]])
def test_every_adapter_is_checked_before_any_is_scored(tmp_path, capsys, mode):
    Image.new("RGB", (2, 2)).save(tmp_path / "a.png")
    records = [{"image": "a.png", "question": "What is it?", "choices": ["a star", "a moon"], "answer": 0}] if mode \
        else [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                     {"from": "gpt", "value": "A star."}]}]
    data = write_jsonl(tmp_path / "images.jsonl", records)
    out = tmp_path / "scores.json"
    argv = ["--base", "tiny", "--adapter", "tiny-image", "tiny-text", "--data", str(data),
            "--image-folder", str(tmp_path), "--json", str(out), "--device", "cpu", *mode]
    assert main(argv) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and not out.exists()  # the seeing adapter's table is not printed, then refused
    assert printed.err.startswith(f"error: --data: {data} has ")
    assert "they need an adapter " in printed.err and printed.err.count("\n") == 1


@pytest.mark.parametrize("command", ["evaluate", "generate"])
def test_adapter_flag_given_twice_keeps_both(command):
    parser = __import__(f"adapter.{command}", fromlist=["build_parser"]).build_parser()
    asked = ["--data", "d.jsonl"] if command == "evaluate" else ["--prompt", "Hi"]
    args = parser.parse_args(["--base", "tiny", "--adapter", "a", "--adapter", "b", "c", *asked])
    assert args.adapter == ["a", "b", "c"]


def test_tiny_held_out_pictures_appear_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    """Ctrl-C left thousands of pictures and no records, with a traceback; a shorter rerun kept the longer one's."""
    from adapter.tiny import records
    from adapter.tiny.cli import main as tiny_main

    out = tmp_path / "img.jsonl"
    assert tiny_main(["held-out", "image", str(out), "--per-category", "2"]) == 0
    before = sorted(p.name for p in (tmp_path / "img").iterdir())
    drawn, render = [], records.render

    def interrupted(scene):
        drawn.append(scene)
        if len(drawn) == 3:
            raise KeyboardInterrupt
        return render(scene)

    monkeypatch.setattr(records, "render", interrupted)
    assert tiny_main(["held-out", "image", str(out), "--per-category", "1"]) == 130
    assert capsys.readouterr().err == "interrupted: no file or folder is left half-written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img", "img.jsonl"]  # no staging folder left
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == before  # the earlier run's, untouched
    monkeypatch.setattr(records, "render", render)
    assert tiny_main(["held-out", "image", str(out), "--per-category", "1"]) == 0
    assert len(list((tmp_path / "img").iterdir())) == len(out.read_text().splitlines()) < len(before)


def test_gate_scales_given_as_text_are_read_as_the_command_line_reads_them(base_folder, data):
    """A text was read one character at a time: "10" scored at gate scales 1 and 0, without a word."""
    model = adapter.load(base_folder, device="cpu")
    assert [s.gate_scale for s in evaluate(model, data, gate_scales="0, 1.5", limit=2).scores] == [0.0, 1.5]
    for wrong in ([True], 0.5, "0, x"):
        with pytest.raises(ValueError, match="^gate_scales: "):
            evaluate(model, data, gate_scales=wrong, limit=2)


def test_one_adapter_named_without_a_list_is_refused_by_name():
    """load_many read a single name letter by letter ("adapter: t does not exist")."""
    with pytest.raises(ValueError, match=r"^adapters: expected a list of adapters, got one: 'tiny-text'; give "
                                         r"\['tiny-text'\]$"):
        adapter.load_many("tiny", "tiny-text", device="cpu")


@pytest.mark.parametrize("call, message", [
    # each was a TypeError from deep inside (pathlib's, a comparison's, "'int' object is not iterable")
    (lambda model, data: evaluate(model, None), "--data: expected a file's path, got None"),
    (lambda model, data: evaluate_text(model, 5), "--data: expected a file's path, got 5"),
    (lambda model, data: evaluate(model, data, image_folder=(0,)),
     r"--image-folder: expected a folder's path, got \(0,\)"),
    (lambda model, data: evaluate(model, data, layers=2), "gate_layers: expected layer numbers or .* got 2"),
    (lambda model, data: evaluate(model, data, prompt_format=["alpaca"]), "prompt_format: unknown prompt format"),
    (lambda model, data: evaluate(model, data, exact=True, max_cached_tokens=[64]),
     r"max_cached_tokens: expected a whole number, got \[64\]"),
    (lambda model, data: evaluate_text(model, data, max_tokens="9"), "max_tokens: expected a whole number, got '9'"),
    (lambda model, data: evaluate_text(model, data, stride=1.5), "stride: expected a whole number, got 1.5"),
])
def test_arguments_of_the_wrong_kind_are_named_from_python(base_folder, data, call, message):
    with pytest.raises(ValueError, match=message):
        call(adapter.load(base_folder, device="cpu"), data)


def test_layers_may_be_given_as_the_command_lines_text(base_folder, v2_adapter, data):
    model = adapter.load(base_folder, adapter=v2_adapter, device="cpu")
    assert evaluate(model, data, layers="top 2").to_dict() == evaluate(model, data, layers=[2, 3]).to_dict()
