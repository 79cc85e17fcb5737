"""Multiple-choice evaluation (adapter.choices, `python -m adapter.evaluate --choices`): each choice's summed
log-probability as the answer, per gate scale, checked against a plain forward pass per choice; the record layouts
(ours, MMLU's, ARC's two); and on the tiny model, that the adapter moves the base's choices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import adapter
from adapter.choices import ChoiceQuestion, choice_log_probs, evaluate_choices, read_questions
from adapter.config import AdapterArgs
from adapter.evaluate import main as evaluate_main
from adapter.finetune.records import DataError
from adapter.prompts import PROMPT_FORMATS
from adapter.tiny.cli import main as tiny_main

from .conftest import randomize_adapter

ALPACA = PROMPT_FORMATS["alpaca"]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def model(base_folder) -> adapter.Transformer:
    loaded = adapter.load(base_folder, adapter=AdapterArgs(prompt_len=4, prompt_layers=2), device="cpu")
    return randomize_adapter(loaded, seed=3, std=0.5)


def reference_log_prob(model, question: ChoiceQuestion, choice: str, scale: float) -> float:
    """log P(choice, then EOS | prompt) from one plain forward pass over prompt + choice."""
    tokenizer = model.tokenizer
    prompt = tokenizer.encode(question.prompt)
    tokens = tokenizer.encode(question.prompt + choice) + [tokenizer.eos_id]
    with torch.no_grad():
        log_probs = model(torch.tensor([tokens]), gate_scale=scale)[0].float().log_softmax(-1)
    return sum(float(log_probs[t - 1, tokens[t]]) for t in range(len(prompt), len(tokens)))


def test_each_choice_scores_its_log_probability_as_the_answer_at_each_gate(model, tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [
        {"question": "Which colour is the sky?", "choices": ["blue", "green", "a deep red"], "answer": 0},
        {"instruction": "Pick a shape.", "input": "round", "choices": ["circle", "square"], "answer": "circle"},
        {"question": "Two plus two?", "choices": ["3", "4", "5", "22"], "answer": "B"},
    ])
    questions = read_questions(path, ALPACA)
    scales = [0.0, 0.5, 1.5]
    found = choice_log_probs(model, questions, scales, 1.0, 3, None, ALPACA)  # batches cut across questions
    for question, table in zip(questions, found):
        assert table.shape == (len(scales), len(question.choices))
        for s, scale in enumerate(scales):
            for c, choice in enumerate(question.choices):
                assert table[s, c].item() == pytest.approx(reference_log_prob(model, question, choice, scale),
                                                           abs=2e-4)
    assert not torch.allclose(found[0][0], found[0][2])  # the gate moves the choices' probabilities

    evaluation = evaluate_choices(model, path, gate_scales=scales, micro_batch_size=2)
    for s, score in enumerate(evaluation.scores):
        picked = [int(table[s].argmax()) == q.answer for q, table in zip(questions, found)]
        per_byte = [int((table[s] / torch.tensor([len(c.strip().encode()) for c in q.choices])).argmax()) == q.answer
                    for q, table in zip(questions, found)]
        right = [float(table[s].softmax(0)[q.answer]) for q, table in zip(questions, found)]
        assert score.accuracy == pytest.approx(sum(picked) / 3)
        assert score.accuracy_per_byte == pytest.approx(sum(per_byte) / 3)
        assert score.right_probability == pytest.approx(sum(right) / 3)
    assert evaluation.picks[2]["answer"] == 1 and len(evaluation.picks[2]["log_probs"]) == 3


def test_mmlu_and_arc_layouts_read_as_the_same_question(tmp_path):
    choices = ["red", "green", "blue"]
    records = [
        {"question": "Colour of grass?", "choices": choices, "answer": 1},  # MMLU on the hub
        {"question": "Colour of grass?", "choices": {"text": choices, "label": ["A", "B", "C"]}, "answerKey": "B"},
        {"question": {"stem": "Colour of grass?", "choices": [{"text": c, "label": str(i + 1)}
                                                              for i, c in enumerate(choices)]}, "answerKey": "2"},
        {"question": "Colour of grass?", "choices": choices, "answer": "green"},
        {"question": "Colour of grass?", "choices": choices, "answer": "B"},
    ]
    questions = read_questions(write_jsonl(tmp_path / "mc.jsonl", records), ALPACA)
    assert len(set(questions)) == 1
    assert questions[0] == ChoiceQuestion(ALPACA.instruction("Colour of grass?"), (" red", " green", " blue"), 1)
    llama3 = read_questions(tmp_path / "mc.jsonl", PROMPT_FORMATS["llama3"])[0]  # its answers are stripped
    assert llama3.choices == tuple(choices)
    assert read_questions(tmp_path / "mc.jsonl", ALPACA, delimiter="")[0].choices == tuple(choices)


def test_every_bad_record_is_named_at_once(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"question": "Q?", "choices": ["a"], "answer": 0},
        {"question": "Q?", "choices": ["a", "b"], "answer": 2},
        {"question": "", "choices": ["a", "b"], "answer": 0},
        {"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"},
        {"question": "Q?", "choices": ["a", "b"], "answer": "a", "system": "Be brief."},
        ["not", "a", "record"],
    ])
    with pytest.raises(DataError) as error:
        read_questions(path, ALPACA)
    message = str(error.value)
    assert f"--data: {path} has 6 bad record(s)" in message
    for line, reason in [(1, "needs 'choices': a list of two or more non-empty strings"),
                         (2, "'answer' 2 names none of the 2 choices (an index from 0, a letter A-B"),
                         (3, "needs a 'question' (or 'instruction'): a non-empty string"),
                         (4, "'answerKey' 'C' names none of the 2 choices (an index from 0, a label A/B"),
                         (5, "system prompt"), (6, "expected a JSON object, got a list")]:
        assert f"{path}:{line}: " in message and reason in message


def tiny_questions(path: Path, per_category: int = 12) -> Path:
    """The tiny model's held-out colour, shape, position and count questions, as `adapter.tiny held-out` writes
    them."""
    assert tiny_main(["held-out", "text", str(path), "--choices", "--per-category", str(per_category)]) == 0
    return path


def test_the_tiny_adapter_picks_the_right_choice_where_its_base_does_not(tmp_path):
    text = adapter.load("tiny", device="cpu")
    evaluation = evaluate_choices(text, tiny_questions(tmp_path / "tiny.jsonl"), gate_scales=[0.0, 1.0],
                                  micro_batch_size=16)
    base, adapted = evaluation.scores
    assert evaluation.questions == 48
    assert adapted.accuracy >= base.accuracy + 0.2 and adapted.right_probability >= base.right_probability + 0.2


def test_the_command_line_prints_writes_and_refuses(tmp_path, capsys):
    data = tiny_questions(tmp_path / "tiny.jsonl", per_category=2)
    out, png = tmp_path / "scores.json", tmp_path / "scores.png"
    code = evaluate_main(["--base", "tiny", "--adapter", "tiny-text", "--data", str(data), "--choices",
                          "--gate-sweep", "0,1", "--json", str(out), "--plot", str(png), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0 and "8 multiple-choice questions" in printed and "P(right choice)" in printed
    written = json.loads(out.read_text())
    assert [s["gate_scale"] for s in written[0]["scores"]] == [0.0, 1.0] and png.stat().st_size > 0
    assert evaluate_main(["--base", "tiny", "--data", str(data), "--choices", "--exact"]) == 2
    assert "--choices scores whole choices: --exact, --max-seq-len and --text do not apply" in capsys.readouterr().err


def test_questions_about_pictures_are_scored_with_the_pictures_visual_prompt(tmp_path):
    from adapter.visual import encode_images

    data = tmp_path / "images.jsonl"
    assert tiny_main(["held-out", "image", str(data), "--choices", "--per-category", "10"]) == 0
    image = adapter.load_many("tiny", ["tiny-image"], device="cpu")[0]
    written = PROMPT_FORMATS[image.prompt_format]
    questions = read_questions(data, written, image_folder=tmp_path / "images")
    assert len(questions) == 40 and all(q.image is not None for q in questions)
    found = choice_log_probs(image, questions[:3], [0.0, 1.0], 1.0, 4, None, written)
    for question, table in zip(questions[:3], found):
        tokenizer = image.tokenizer
        visual = encode_images(image, [str(question.image)])
        for c, choice in enumerate(question.choices):
            tokens = tokenizer.encode(question.prompt + choice) + [tokenizer.eos_id]
            start = len(tokenizer.encode(question.prompt))
            with torch.no_grad():
                logprobs = image(torch.tensor([tokens]), visual_prompt=visual)[0].float().log_softmax(-1)
            expected = sum(float(logprobs[t - 1, tokens[t]]) for t in range(start, len(tokens)))
            assert table[1, c].item() == pytest.approx(expected, abs=2e-4)
    evaluation = evaluate_choices(image, data, gate_scales=[0.0, 1.0], image_folder=tmp_path / "images")
    assert evaluation.scores[1].accuracy > evaluation.scores[0].accuracy + 0.1  # the picture speaks through the gate
    text = adapter.load("tiny", device="cpu")
    with pytest.raises(ValueError, match="has questions about pictures; they need an adapter with a visual prompt"):
        evaluate_choices(text, data, image_folder=tmp_path / "images")


def test_a_question_too_long_for_the_context_is_named_by_file_and_line(model, tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [
        {"question": "Which colour is the sky?", "choices": ["blue", "green"], "answer": 0},
        {"question": "sky " * model.args.max_seq_len, "choices": ["blue", "green"], "answer": 0},
    ])
    with pytest.raises(ValueError, match=rf"^--data: {tmp_path}/mc.jsonl:2: with the choice 'blue' the question is "
                                         rf"longer than the model's {model.args.max_seq_len} tokens$"):
        evaluate_choices(model, path)


@pytest.mark.parametrize("options, message", [  # (each failed deep inside: slicing, range(), a str + None)
    ({"micro_batch_size": None}, "micro_batch_size: expected a whole number, got None"),
    ({"micro_batch_size": 2.5}, "micro_batch_size: expected a whole number, got 2.5"),
    ({"limit": 1.5}, "limit: expected a whole number, got 1.5"),
    ({"limit": True}, "limit: expected a whole number, got True"),
    ({"delimiter": None}, "delimiter: expected text"),
])
def test_bad_python_arguments_are_named(model, tmp_path, options, message):
    path = write_jsonl(tmp_path / "mc.jsonl", [{"question": "Sky?", "choices": ["blue", "green"], "answer": 0}])
    with pytest.raises(ValueError, match=message):
        evaluate_choices(model, path, **options)
    if "delimiter" not in options:
        from adapter.evaluate import evaluate

        with pytest.raises(ValueError, match=message):
            evaluate(model, path, **options)
