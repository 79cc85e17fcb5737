"""`python -m adapter.terminal_chat`: the app's chat in the terminal: each answer is the engine's for the
conversation so far and the settings the commands set, bad lines are said and the chat goes on, Ctrl-C stops one
answer (and at the prompt, or while loading, ends the chat without a traceback)."""

from __future__ import annotations

import io
import json

import pytest

import adapter
from adapter.app_config import TINY_FOLDER, tiny_available
from adapter.engine import Engine, Settings
from adapter.terminal_chat import Conversation, main

pytestmark = pytest.mark.skipif(not tiny_available(), reason="assets/tiny not built yet")

QUESTION = "There is a large red star on the left. What colour is the star?"
GREEDY = dict(temperature=0.0, max_new_tokens=30, seed=None)


def chat(lines: list[str], capsys, *flags: str) -> tuple[int, list[str], str]:
    code = main(["--temperature", "0", "--max-new-tokens", "30", *flags], stdin=io.StringIO("\n".join(lines) + "\n"))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def last(answers) -> str:
    return list(answers)[-1]


def test_each_answer_is_the_engines_for_the_conversation_and_the_gate_set(capsys):
    code, out, err = chat([QUESTION, "/gate 0", QUESTION, "/gate 5", "/system be brief", "/bogus", "/reset",
                           "/gate 1", QUESTION, "/quit", "never asked"], capsys)
    engine = Engine(adapter.load("tiny", device="cpu"), max_new_tokens=30)
    first = last(engine.chat([], QUESTION, Settings(**GREEDY)))
    second = last(engine.chat([(QUESTION, first)], QUESTION, Settings(gate_scale=0.0, **GREEDY)))
    assert code == 0 and first == "red" and second != first
    assert out == [first, "gate scale 0", second, "conversation forgotten", "gate scale 1", first]
    assert err.splitlines() == [
        "error: gate_scale: must be in [0, 2], got 5.0",
        "error: system: the alpaca prompt format has no system prompt (its header is fixed); a system prompt needs a "
        "chat format (llama2, llama3, llama3.1, llama3.2, mistral, mistral-v3, v2-dialog)",
        "error: /bogus: unknown command; /help lists them",
    ]


def test_next_shows_the_first_tokens_likelihood_at_gate_0_and_the_gate_set(capsys):
    from adapter.next_token import next_tokens

    code, out, err = chat(["/gate 0.5", f"/next {QUESTION}", "/next"], capsys)
    engine = Engine(adapter.load("tiny", device="cpu"), max_new_tokens=30)
    expected = next_tokens(engine.model, engine.chat_prompt([], QUESTION, Settings(**GREEDY)), [0.0, 0.5])
    assert code == 0 and out == ["gate scale 0.5", *expected.table().splitlines()]
    assert err == "error: /next: give the question, e.g. '/next What colour is the star?'\n"


def test_a_picture_is_asked_about_until_it_is_put_away(capsys, tmp_path):
    example = json.loads((TINY_FOLDER / "examples" / "examples.json").read_text())["image"][3]
    picture = TINY_FOLDER / "examples" / example["image"]
    follow_up = "What shape is it?"
    code, out, err = chat([f"/image {picture}", example["question"], follow_up, f"/image {picture}", follow_up,
                           "/image", f"/image {picture}"], capsys, "--adapter", "tiny-image")
    engine = Engine(adapter.load("tiny", "tiny-image", device="cpu"), max_new_tokens=30)
    turns = [(example["question"], example["answer"])]
    in_turn = last(engine.ask_image(str(picture), follow_up, Settings(**GREEDY), turns))
    alone = last(engine.ask_image(str(picture), follow_up, Settings(**GREEDY)))
    assert code == 0 and err == "" and in_turn != alone  # a conversation until another picture is shown
    assert out == [f"asking about {picture}", example["answer"], in_turn, f"asking about {picture}", alone,
                   "back to the chat", f"asking about {picture}"]
    code, out, err = chat([f"/image {picture}", example["question"], f"/save {tmp_path / 'c.jsonl'}"], capsys,
                          "--adapter", "tiny-image")
    assert err == ("error: /save: saves the chat, not a picture's questions (a chat record holds no picture); /image "
                   "alone goes back to the chat\n")  # it said "no answered question to save yet"
    code, out, err = chat([f"/image {picture}", "/image nowhere.png"], capsys)  # the text adapter cannot see
    blind = "error: /image: this adapter cannot see images (it needs a visual prompt and --clip)"
    assert err.splitlines() == [blind] * 2


def test_ctrl_c_stops_one_answer_and_keeps_the_conversation(monkeypatch):
    engine = Engine(adapter.load("tiny", device="cpu"), max_new_tokens=30)
    decoded = []

    def decoding(history, message, settings):
        try:
            for answer in ("re", "red", "red star"):
                decoded.append(answer)
                yield answer
        finally:
            decoded.append("closed")

    class CtrlCOnFirstFlush(io.StringIO):
        def flush(self):
            if not self.getvalue().endswith("[stopped]"):
                raise KeyboardInterrupt

    monkeypatch.setattr(engine, "chat", decoding)
    conversation, out = Conversation(engine, Settings(**GREEDY)), CtrlCOnFirstFlush()
    assert conversation.answer(QUESTION, out) == "re"
    assert out.getvalue() == "re [stopped]\n" and decoded == ["re", "closed"], "decoding stopped at once"
    assert conversation.history == [(QUESTION, "re")]


def test_ctrl_c_at_the_prompt_or_while_loading_ends_quietly(monkeypatch, capsys):
    class CtrlCAtThePrompt(io.StringIO):
        def __iter__(self):
            yield "/help"
            raise KeyboardInterrupt

    assert main([], stdin=CtrlCAtThePrompt()) == 130
    assert "Traceback" not in capsys.readouterr().err

    def loading(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("adapter.loading.load_many", loading)
    assert main([], stdin=io.StringIO("")) == 130
    assert capsys.readouterr().err == "\n"


def test_the_sampling_flags_are_generates_and_reach_each_answer(capsys):
    """(The chat took --temperature and --top-p only.) At gate 0 and temperature 2 the frozen base babbles; top-k 1
    leaves it the greedy answer, and a penalty or min-p is the engine's answer at the same settings."""
    engine = Engine(adapter.load("tiny", device="cpu"), max_new_tokens=30)
    hot = dict(temperature=2.0, max_new_tokens=30, seed=3, gate_scale=0.0)
    flags = ["--temperature", "2", "--seed", "3", "--gate-scale", "0"]
    greedy = last(engine.chat([], QUESTION, Settings(**{**GREEDY, "gate_scale": 0.0})))
    assert chat([QUESTION], capsys, *flags, "--top-k", "1")[1] == [greedy]
    for extra, chosen in ((["--min-p", "0.2"], {"min_p": 0.2}),
                          (["--frequency-penalty", "1.5", "--repetition-penalty", "1.3"],
                           {"frequency_penalty": 1.5, "repetition_penalty": 1.3})):
        assert chat([QUESTION], capsys, *flags, *extra)[1] == [last(engine.chat([], QUESTION, Settings(**hot, **chosen)))]
    assert main(["--min-p", "2"], stdin=io.StringIO("")) == 2
    assert capsys.readouterr().err == "error: --min-p: must be in [0, 1], got 2.0\n"


def test_bad_flags_stop_before_the_chat(capsys):
    assert main(["--gate-scale", "3"], stdin=io.StringIO("")) == 2
    assert capsys.readouterr().err == "error: --gate-scale: must be in [0, 2], got 3.0\n"
    assert main(["--system", "Be brief."], stdin=io.StringIO("")) == 2
    assert "error: --system: the alpaca prompt format has no system prompt" in capsys.readouterr().err
    assert main(["--gate-layers", "top 7"], stdin=io.StringIO("")) == 2
    assert capsys.readouterr().err == "error: --gate-layers: the top N layers needs N from 0 to 4 (this adapter's " \
                                      "prompt layers), got 7\n"


def test_layers_lets_only_some_adapter_layers_speak_until_set_back(capsys):
    from adapter.next_token import next_tokens

    code, out, err = chat(["/layers top 1", QUESTION, f"/next {QUESTION}", "/layers 9", "/reset", "/layers",
                           QUESTION], capsys)
    engine = Engine(adapter.load("tiny", device="cpu"), max_new_tokens=30)
    top = Settings(gate_layers="top 1", **GREEDY)
    first = last(engine.chat([], QUESTION, top))
    expected = next_tokens(engine.model, engine.chat_prompt([(QUESTION, first)], QUESTION, top), [0.0, 1.0],
                           layers=[3])
    everyone = last(engine.chat([], QUESTION, Settings(**GREEDY)))
    assert code == 0 and first != everyone == "red"
    assert out == ["the prompts speak in layers 3 only, of this adapter's 0-3", first, *expected.table().splitlines(),
                   "conversation forgotten", "every adapter layer's prompt speaks", everyone]
    assert err == "error: gate_layers: layer(s) 9 have no adaption prompt; this adapter's prompts are in layers 0-3\n"


def test_save_appends_the_chat_as_a_training_record_that_fine_tuning_reads(capsys, tmp_path):
    from adapter.finetune.records import read_records
    from adapter.prompts import format_named

    saved = tmp_path / "chats.jsonl"
    code, out, err = chat([f"/save {saved}", QUESTION, "What is 3 + 4?", f"/save {saved}", "/reset", QUESTION,
                           f"/save {saved}", f"/save {tmp_path / 'chats.json'}", f"/save {tmp_path}/no/such.jsonl"],
                          capsys)
    engine = Engine(adapter.load("tiny", device="cpu"), max_new_tokens=30)
    first = last(engine.chat([], QUESTION, Settings(**GREEDY)))
    second = last(engine.chat([(QUESTION, first)], "What is 3 + 4?", Settings(**GREEDY)))
    assert code == 0 and out == [first, second, f"saved 2 answered turn(s) to {saved} as one training record",
                                 "conversation forgotten", first,
                                 f"saved 1 answered turn(s) to {saved} as one training record"]
    records = [json.loads(line) for line in saved.read_text().splitlines()]
    assert records[0] == {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first},
                                       {"role": "user", "content": "What is 3 + 4?"},
                                       {"role": "assistant", "content": second}]}
    assert len(records) == 2, "each /save appends one record"
    examples = read_records(saved, None, format_named("alpaca", "--prompt-format"))
    assert [[e.response for e in record] for record in examples] == [[first, second], [first]]
    assert err.splitlines() == [
        "error: conversation: no answered question to save yet; ask something first",
        f"error: /save: name a .jsonl file (a record a line, each /save appending one), got "
        f"'{tmp_path / 'chats.json'}'",
        f"error: /save: cannot write {tmp_path}/no/such.jsonl: No such file or directory",
    ]


def test_save_says_how_many_turns_without_an_answer_it_left_out(tmp_path):
    """A turn stopped before its first word (Ctrl-C) has no answer to train on: it was dropped without a word."""
    import io

    from adapter.terminal_chat import Conversation

    conversation = Conversation(Engine(adapter.load("tiny", device="cpu")), Settings(**GREEDY),
                                history=[(QUESTION, "red"), ("What is 3 + 4?", ""), ("And 2 + 2?", "4")])
    out = io.StringIO()
    assert conversation.command(f"/save {tmp_path / 'chats.jsonl'}", out)
    assert out.getvalue() == f"saved 2 answered turn(s) to {tmp_path / 'chats.jsonl'} as one training record " \
                             "(1 without an answer left out)\n"


def test_save_puts_its_record_on_a_line_of_its_own_after_a_file_whose_last_line_has_no_newline(tmp_path):
    """(The record was appended to that line: '{"a": 1}{"messages": ...}', a file no reader takes.)"""
    import io

    from adapter.terminal_chat import Conversation

    conversation = Conversation(Engine(adapter.load("tiny", device="cpu")), Settings(**GREEDY),
                                history=[(QUESTION, "red")])
    saved = tmp_path / "chats.jsonl"
    saved.write_text('{"messages": []}')
    for _ in range(2):
        assert conversation.command(f"/save {saved}", io.StringIO())
    lines = saved.read_text().splitlines()
    assert saved.read_text().endswith("\n") and [json.loads(line) for line in lines][0] == {"messages": []}
    assert len(lines) == 3 and json.loads(lines[1]) == json.loads(lines[2])
