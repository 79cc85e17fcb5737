"""`generate --prompts-file`: every question answered at every gate scale, exactly as one at a time (greedy; any
batch size), written as JSONL with the question's own keys; bad questions and flags named before any decoding,
and never a half-written output."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

import adapter
from adapter import answer_file
from adapter.answer_file import answer_questions, read_questions
from adapter.app_config import TINY_FOLDER, tiny_available
from adapter.finetune.records import DataError
from adapter.generate import generate, main
from adapter.prompts import STOP_STRINGS, alpaca

from .conftest import V2, randomize_adapter

QUESTIONS = [
    "Name a colour.",
    {"id": 7, "instruction": "Add the numbers below and say the sum in words, please.", "input": "2 3 4"},
    {"instruction": "Hi", "reference": "Hello"},
    "Write one long sentence about a red star that sits on the left of a grey square.",
]
GREEDY = dict(temperature=0.0, max_new_tokens=6)


@pytest.fixture(scope="module")
def model(base_folder):
    return randomize_adapter(adapter.load(base_folder, adapter=V2, device="cpu"), std=0.3)


@pytest.fixture
def questions_file(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def one_at_a_time(model, question, scale: float) -> str:
    record = {"instruction": question} if isinstance(question, str) else question
    return generate(model, alpaca(record["instruction"], record.get("input")), gate_scale=scale, stop=STOP_STRINGS,
                    **GREEDY)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_answers_are_each_questions_own_at_each_scale(model, questions_file, batch_size):
    questions = read_questions(questions_file)
    seen = []
    answers = answer_questions(model, questions, gate_scales=[0.0, 1.0, 2.0], batch_size=batch_size,
                               progress=lambda done, total: seen.append((done, total)), **GREEDY)
    assert answers == [[one_at_a_time(model, q, s) for s in (0.0, 1.0, 2.0)] for q in QUESTIONS]
    assert seen[-1] == (4, 4) and len(seen) == -(-4 // batch_size)
    assert any(row[0] != row[2] for row in answers), "the gate changes answers (else this test would show little)"


def test_the_command_line_writes_a_line_per_question_adapter_and_scale(model, base_folder, questions_file, tmp_path,
                                                                       capsys):
    saved = adapter.save_adapter(model, tmp_path / "v2")
    out = tmp_path / "answers.jsonl"
    argv = ["--base", str(base_folder), "--adapter", str(saved), "--prompts-file", str(questions_file),
            "--out", str(out), "--gate-sweep", "0,1", "--temperature", "0", "--max-new-tokens", "6",
            "--batch-size", "2"]
    assert main(argv) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    expected = [{**({"instruction": q} if isinstance(q, str) else q), "adapter": str(saved), "gate_scale": s,
                 "answer": one_at_a_time(model, q, s)} for q in QUESTIONS for s in (0.0, 1.0)]
    assert lines == expected
    assert capsys.readouterr().err.splitlines() == ["answered 2/4", "answered 4/4", f"wrote 8 answers to {out}"]


def test_a_llava_record_asks_its_last_human_turn_after_the_turns_before_it(model, tmp_path):
    chat = [{"from": "human", "value": "<image>\nName a colour."}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "And a shape?"}]
    path = tmp_path / "llava.jsonl"
    path.write_text(json.dumps({"id": "a", "conversations": chat}) + "\n"
                    + json.dumps({"id": "b", "conversations": [*chat, {"from": "gpt", "value": "A star."}]}) + "\n"
                    + json.dumps({"conversations": chat[:1]}) + "\n")
    questions = read_questions(path)
    assert [(q.instruction, q.history) for q in questions] == [
        ("And a shape?", (("Name a colour.", "Red."),)), ("And a shape?", (("Name a colour.", "Red."),)),
        ("Name a colour.", ())]
    answers = answer_questions(model, questions, gate_scales=[1.0], **GREEDY)
    expected = [generate(model, adapter.chat(list(q.history), q.instruction), stop=STOP_STRINGS, **GREEDY)
                for q in questions]
    assert [row[0] for row in answers] == expected and expected[2] == one_at_a_time(model, "Name a colour.", 1.0)
    with pytest.raises(DataError, match=r"3 question\(s\) cannot be written in template 'none', none answered:\n"
                                        r"  every one: a conversation needs a prompt format to be written in"):
        answer_questions(model, questions, template="none")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "conversations": chat}) + "\n"
                   + json.dumps({"answer": "x", "conversations": chat}) + "\n" + json.dumps({"conversations": []}))
    with pytest.raises(DataError) as caught:
        read_questions(bad)
    assert str(caught.value).splitlines()[1:] == [
        f"  {bad}:1: 'instruction': not with 'conversations' (the question is its last human turn)",
        f"  {bad}:2: 'answer': the output adds this key; rename it in the question",
        f"  {bad}:3: 'conversations' must be a non-empty list of turns, got an empty list"]


def test_chat_messages_are_asked_as_llava_conversations_are(tmp_path):
    """OpenAI's and HF chat datasets' {"role", "content"} messages, a system message first."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Red."}, {"role": "user", "content": "And a shape?"}]
    path = tmp_path / "messages.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"messages": messages[1:2]}) + "\n")
    (first, second) = read_questions(path)
    assert (first.instruction, first.history, first.system) == ("And a shape?", (("Name a colour.", "Red."),),
                                                                 "Be brief.")
    assert (second.instruction, second.history, second.system) == ("Name a colour.", (), None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}) + "\n"
                   + json.dumps({"messages": messages, "conversations": [{"from": "human", "value": "x"}]}) + "\n")
    with pytest.raises(DataError) as caught:
        read_questions(bad)
    assert str(caught.value).splitlines()[1:] == [
        f"  {bad}:1: messages[1]: 'role' must be 'user' or 'assistant', got 'bot'",
        f"  {bad}:2: both 'conversations' and 'messages': give the conversation once"]


def test_bad_questions_are_all_named_and_nothing_is_written(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        json.dumps({"input": "no instruction"}),
        json.dumps({"instruction": "Hi", "input": 3}),
        json.dumps({"instruction": "Hi", "answer": "old"}),
        json.dumps({"instruction": "What is it?", "image": "a.png"}),
        json.dumps(["not", "an", "object"]),
        "{broken",
        '{"instruction": "cut',
        json.dumps("fine"),
    ]) + "\n")
    with pytest.raises(DataError) as caught:
        read_questions(path)
    assert str(caught.value).splitlines() == [
        f"--prompts-file: {path} has 7 bad question(s), none answered:",
        f"  {path}:1: missing 'instruction'",
        f"  {path}:2: 'input' must be a string, got a number",
        f"  {path}:3: 'answer': the output adds this key; rename it in the question",
        f"  {path}:4: image 'a.png' needs --image-folder",
        f"  {path}:5: expected a string or a JSON object, got a list",
        f"  {path}:6: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"  {path}:7: not valid JSON (Unterminated string starting at column 17)",  # (was "at at column")
    ]


@pytest.mark.parametrize("flags, message", [
    (["--input", "x"], r"--input: not with --prompts-file \(give it per question in the file\)"),
    (["--next-tokens", "3"], "--next-tokens: not with --prompts-file"),
    (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    # answered (and recorded as gate_scale -1) where evaluate and the app refuse them
    (["--gate-sweep", "0,-1"], r"--gate-sweep: give finite gate scales >= 0 \(0 = the frozen base\), got 0, -1"),
    (["--gate-scale", "nan"], r"--gate-scale: give finite gate scales >= 0 \(0 = the frozen base\), got nan"),
    (["--system", "Be brief."], r"1 question\(s\) cannot be written in template 'auto, alpaca', none answered:\n"
                                r"  .*q.json \[index 0\]: system: the alpaca prompt format has no system prompt"),
])
def test_bad_flags_are_named_before_anything_is_written(base_folder, tmp_path, capsys, flags, message):
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps(["Name a colour."]))
    out = tmp_path / "out.jsonl"
    assert main(["--base", str(base_folder), "--prompts-file", str(questions), "--out", str(out), *flags]) == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["q.json"], "no output, no OUT.partial"
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err


def test_questions_too_long_for_the_context_are_all_named_before_any_is_answered(base_folder, tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in ["Name a colour.", "star " * 2100, "Hi.", "red " * 2500]))
    out = tmp_path / "out.jsonl"
    assert main(["--base", str(base_folder), "--prompts-file", str(questions), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: 2 question(s) do not fit this model's context of 2048 tokens (room for an answer " \
                     "left); shorten them:"
    assert re.fullmatch(rf"  {re.escape(str(questions))}:2: \d+ tokens as asked", err[1]), err
    assert re.fullmatch(rf"  {re.escape(str(questions))}:4: \d+ tokens as asked", err[2]), err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["q.jsonl"], "no output, no OUT.partial"


def test_every_adapters_questions_are_checked_before_any_is_answered(base_folder, questions_file, tmp_path, capsys):
    """Each adapter's questions were checked in its turn: the first answered every question before the second's
    refusal (a system prompt its format cannot write), and OUT.partial was left behind."""
    chat = adapter.load(base_folder, adapter=V2, device="cpu")
    chat.prompt_format = "llama2"
    adapter.save_adapter(chat, tmp_path / "llama2")
    adapter.save_adapter(adapter.load(base_folder, adapter=V2, device="cpu"), tmp_path / "alpaca")
    out = tmp_path / "out.jsonl"
    assert main(["--base", str(base_folder), "--adapter", str(tmp_path / "llama2"), str(tmp_path / "alpaca"),
                 "--prompts-file", str(questions_file), "--out", str(out), "--system", "Be brief."]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --adapter {tmp_path / 'alpaca'}: ") and not re.search(r"answered \d+/", err), err
    # one reason for every question is said once (it was a line per question, the same each time)
    assert err.splitlines()[1:] == ["  every one: system: the alpaca prompt format has no system prompt (its header is "
                                    "fixed); a system prompt needs a chat format (llama2, llama3, llama3.1, llama3.2, "
                                    "mistral, mistral-v3, v2-dialog)"], err
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_out_and_prompts_file_go_together(base_folder, tmp_path, capsys):
    assert main(["--base", str(base_folder), "--prompts-file", str(tmp_path / "q.json")]) == 2
    assert capsys.readouterr().err == "error: --out: give the file --prompts-file's answers are written to\n"
    assert main(["--base", str(base_folder), "--prompt", "Hi", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert capsys.readouterr().err == "error: --out: only with --prompts-file\n"


def test_an_out_that_is_the_prompts_file_is_refused_and_the_questions_kept(base_folder, tmp_path, capsys):
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps(["Name a colour."]))
    spelt_otherwise = tmp_path / "sub" / ".." / "q.json"
    (tmp_path / "sub").mkdir()
    assert main(["--base", str(base_folder), "--prompts-file", str(questions), "--out", str(spelt_otherwise)]) == 2
    assert capsys.readouterr().err == (f"error: --out: {spelt_otherwise} is the file --prompts-file names; it "
                                       "would be overwritten\n")
    assert json.loads(questions.read_text()) == ["Name a colour."]


def test_an_out_or_json_where_no_file_can_be_written_is_named_before_any_model_is_loaded(tmp_path, capsys):
    from adapter.evaluate import main as evaluate_main

    questions = tmp_path / "q.json"
    questions.write_text(json.dumps(["Name a colour."]))
    no_base = str(tmp_path / "no-base")  # loading it would fail: the target is named first
    assert main(["--base", no_base, "--prompts-file", str(questions), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: --out: {tmp_path} is a folder; name a file to write\n"
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"instruction": "Name a colour.", "output": "red"}) + "\n")
    assert evaluate_main(["--base", no_base, "--data", str(records), "--json", str(records / "scores.json")]) == 2
    assert capsys.readouterr().err == f"error: --json: {records} is a file, not a folder to write scores.json into\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["q.json", "records.jsonl"]


def test_a_failure_midway_leaves_the_old_output_as_it_was(base_folder, questions_file, tmp_path, monkeypatch):
    out = tmp_path / "answers.jsonl"
    out.write_text("old\n")
    calls = []

    def failing(model, prompts, **options):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return ["x"] * len(prompts)

    monkeypatch.setattr(answer_file, "generate_batch", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        main(["--base", str(base_folder), "--prompts-file", str(questions_file), "--out", str(out),
              "--batch-size", "2"])
    assert calls == [2, 2] and out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl", "answers.jsonl.partial", "questions.jsonl"]


def test_a_run_stopped_midway_goes_on_from_the_answers_it_kept(model, base_folder, questions_file, tmp_path,
                                                               monkeypatch, capsys):
    saved = adapter.save_adapter(model, tmp_path / "v2")
    argv = ["--base", str(base_folder), "--adapter", str(saved), str(saved),  # two adapters in turn
            "--prompts-file", str(questions_file), "--gate-sweep", "0,1", "--temperature", "0",
            "--max-new-tokens", "6", "--batch-size", "2"]
    whole = tmp_path / "whole.jsonl"
    assert main([*argv, "--out", str(whole)]) == 0
    out, partial = tmp_path / "answers.jsonl", tmp_path / "answers.jsonl.partial"
    real, asked, stop_at = answer_file.generate_batch, [], [3]

    def stopped(model, prompts, **options):
        asked.append(len(prompts))
        if len(asked) in stop_at:
            raise KeyboardInterrupt
        return real(model, prompts, **options)

    monkeypatch.setattr(answer_file, "generate_batch", stopped)
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 130  # stopped in the second adapter's first batch
    assert capsys.readouterr().err.splitlines()[-1] == (f"interrupted: the answers so far are kept in {partial}; "
                                                        "the same command goes on from them")
    assert not out.exists() and len(partial.read_text().splitlines()) == 1 + 4, "settings, then 4 questions"
    with partial.open("a") as file:
        file.write('{"adapter": 1, "quest')  # the line being written when it was stopped
    asked.clear()
    stop_at[:] = [2]
    assert main([*argv, "--out", str(out)]) == 130, "stopped again, in the second adapter's second batch"
    assert capsys.readouterr().err.splitlines()[0] == (f"resuming: 4 answered question(s) kept in {partial} are "
                                                       "not asked again")
    asked.clear()
    stop_at.clear()
    assert main([*argv, "--out", str(out), "--batch-size", "3"]) == 0, "the batch size does not change answers"
    assert asked == [4], "only the last two questions of the second adapter are asked (at two gate scales)"
    assert capsys.readouterr().err.splitlines()[0] == (f"resuming: 6 answered question(s) kept in {partial} are "
                                                       "not asked again")
    assert out.read_text() == whole.read_text() and not partial.exists()

    def started_over() -> None:
        """The next run, not stopped, asks every question again and says why."""
        asked.clear()
        stop_at.clear()
        capsys.readouterr()
        assert main([*argv, "--out", str(out)]) == 0
        assert capsys.readouterr().err.splitlines()[0] == (f"note: {partial} holds answers of a run with other "
                                                           "settings; starting over")
        assert asked == [4, 4, 4, 4]

    asked.clear()
    stop_at.append(2)
    assert main([*argv, "--out", str(out), "--max-new-tokens", "5"]) == 130, "stopped with other settings"
    started_over()
    assert out.read_text() == whole.read_text()

    asked.clear()
    stop_at[:] = [2]
    assert main([*argv, "--out", str(out)]) == 130, "stopped again, its answers kept"
    newer = randomize_adapter(adapter.load(base_folder, adapter=V2, device="cpu"), seed=5)
    adapter.save_adapter(newer, saved)  # a newer adapter at the same path: the answers kept are not its
    started_over()


@pytest.mark.skipif(not tiny_available(), reason="assets/tiny not built yet")
def test_image_questions_see_their_picture_and_a_blind_adapter_is_told_of(tmp_path, capsys):
    example = json.loads((TINY_FOLDER / "examples" / "examples.json").read_text())["image"][3]
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"instruction": example["question"], "image": example["image"]}) + "\n")
    out = tmp_path / "a.jsonl"
    assert main(["--base", "tiny", "--adapter", "tiny-image", "tiny-text", "--prompts-file", str(questions),
                 "--image-folder", str(TINY_FOLDER / "examples"), "--out", str(out), "--temperature", "0"]) == 0
    answers = {line["adapter"]: line["answer"] for line in map(json.loads, out.read_text().splitlines())}
    seeing, blind = adapter.load_many("tiny", ["tiny-image", "tiny-text"])
    picture = Image.open(TINY_FOLDER / "examples" / example["image"])
    assert answers["tiny-image"] == example["answer"] == generate(seeing, example["question"], image=picture,
                                                                   template="auto", temperature=0.0)
    assert answers["tiny-text"] == generate(blind, example["question"], template="auto", temperature=0.0)
    assert ("note (tiny-text): this model cannot see (no visual prompt, or no --clip); it answers the 1 image "
            "question(s) from their text alone") in capsys.readouterr().err


@pytest.mark.skipif(not tiny_available(), reason="assets/tiny not built yet")
def test_the_tiny_bases_own_adapter_is_named_in_the_answers(tmp_path):
    """`--base tiny` alone answers with tiny-text, which each line recorded as "adapter": null."""
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps("Which colour is the red circle?") + "\n")
    out = tmp_path / "a.jsonl"
    assert main(["--base", "tiny", "--prompts-file", str(questions), "--out", str(out), "--gate-sweep", "0,1",
                 "--max-new-tokens", "4"]) == 0
    assert [json.loads(line)["adapter"] for line in out.read_text().splitlines()] == ["tiny-text", "tiny-text"]


def test_a_short_question_is_not_batched_where_a_long_one_would_cut_its_answer(base_folder, tmp_path):
    """A batch pads to its longest prompt, which the context then holds for every row: beside a long question, a
    short one's answer ran out of context sooner than alone."""
    model = randomize_adapter(adapter.load(base_folder, adapter=V2, device="cpu", max_seq_len=96), std=0.3)
    endless = dict(temperature=0.0, max_new_tokens=40, logit_bias=((model.tokenizer.eos_id, -100.0),))
    long_question = "the red star"
    while len(model.tokenizer.encode(alpaca(long_question + " is red"), bos=True)) < 90:
        long_question += " is red"
    asked = [long_question, "Hi", "Name a colour."]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in asked))
    answers = answer_questions(model, read_questions(tmp_path / "q.jsonl"), batch_size=3, **endless)
    alone = [generate(model, alpaca(q), stop=STOP_STRINGS, **endless) for q in asked]
    assert [row[0] for row in answers] == alone
    short = len(model.tokenizer.encode(alone[1], bos=False))
    assert short > 96 - len(model.tokenizer.encode(alpaca(long_question), bos=True)), "more than the long one leaves"
