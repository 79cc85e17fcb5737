"""The base-reading probe: the prompts it asks in the corpus's forms, and how it scores the continuations."""

from __future__ import annotations

import pytest

from adapter.tiny import probe
from adapter.tiny.evaluate import held_out
from adapter.tiny.questions import Question
from adapter.tiny.world import Scene, Thing

SCENE = Scene((Thing("star", "red", "large", "left"),))
QUESTION = Question("colour", "What colour is the star?", "red", SCENE, "There is a large red star on the left.")


def test_the_forms_put_the_scene_before_or_after_the_question():
    assert probe.native_prompt("dialogue", QUESTION) == (
        "Ana and Ben looked at a card. There is a large red star on the left. Ana asked: What colour is the star? "
        "Ben answered:")
    assert probe.native_prompt("quiz", QUESTION) == (
        "Ana asked: What colour is the star? Here is the picture. There is a large red star on the left. "
        "Ben answered:")


def test_a_continuation_counts_when_it_is_the_answer_up_to_its_full_stop(monkeypatch):
    questions = [q for q in held_out("text", 0, 3) if q.category != "arithmetic"]
    seen = {}

    def fake_generate(model, prompts, **kwargs):
        seen.setdefault("prompts", []).extend(prompts)
        assert kwargs["gate_scale"] == 0.0 and kwargs["temperature"] == 0.0
        # right (with the stop's full stop and a leading space) for even indexes, wrong for odd ones
        return [f" {q.answer}." if i % 2 == 0 else f" {q.answer} too." for i, q in enumerate(questions)]

    monkeypatch.setattr(probe, "generate_batch", fake_generate)
    answered = probe.native_answers(None, questions + [Question("arithmetic", "What is 2 + 2?", "4")], "dialogue")
    assert [got for _, got in answered] == [q.answer if i % 2 == 0 else f"{q.answer} too"
                                            for i, q in enumerate(questions)], "stripped of space and full stop"
    result = probe.scores(answered)
    assert result["all"] == pytest.approx(sum(i % 2 == 0 for i in range(len(questions))) / len(questions))
    assert seen["prompts"] == [probe.native_prompt("dialogue", q) for q in questions], "arithmetic is not asked"
    assert set(result) == {q.category for q in questions} | {"all"}


def test_wrong_answers_lists_at_most_n_per_category_with_what_was_wanted():
    other = Question("position", "Where is the star?", "left", SCENE, "There is a large red star on the left.")
    answered = [(QUESTION, "red"), (QUESTION, "blue"), (QUESTION, "green"), (other, "right"), (other, "left")]
    assert probe.wrong_answers(answered, 1) == [
        "colour | There is a large red star on the left. | What colour is the star? | wanted 'red', got 'blue'",
        "position | There is a large red star on the left. | Where is the star? | wanted 'left', got 'right'"]
    assert len(probe.wrong_answers(answered, 5)) == 3 and probe.wrong_answers(answered, 0) == []


def test_the_probe_command_prints_every_wrong_answer_its_score_counts(capsys):
    from adapter.tiny import cli

    assert cli.main(["probe", "--scale", "micro", "--wrong", "1000"]) == 0  # the shipped base, 2 per category
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["quiz", "dialogue"]
    share_right = float(lines[1].split("all ")[1].rstrip("%")) / 100
    asked = [q for q in held_out("text", 0, 2) if q.scene_text]
    wrong = [line for line in lines[2:] if " | wanted " in line]
    assert len(wrong) == len(lines) - 2 == round((1 - share_right) * len(asked))


def test_a_template_names_the_scene_words_by_kind():
    asked = {"What colour is the shape on the left?": "What colour is the shape <place>?",
             "How many stars are there?": "How many <shape>s are there?",
             "Where is the red shape?": "Where is the <colour> shape?",
             "Which is bigger, the circle or the star?": "Which is bigger, the <shape> or the <shape>?",
             "What shape is in the centre?": "What shape is <place>?",
             "How many shapes are in the picture?": "How many shapes are in the picture?",
             "List the shapes.": "List the shapes."}
    assert {q: probe.template(Question("x", q, "a")) for q in asked} == asked


def test_template_scores_count_right_and_asked_per_template():
    by_place = Question("colour", "What colour is the shape on the left?", "red", SCENE, QUESTION.scene_text)
    answered = [(QUESTION, "red"), (QUESTION, "blue"), (by_place, "red"), (QUESTION, "red")]
    assert probe.template_scores(answered) == [("colour", "What colour is the <shape>?", 2, 3),
                                               ("colour", "What colour is the shape <place>?", 1, 1)]


def test_the_probe_command_prints_template_scores_that_add_up_to_its_score(capsys):
    from adapter.tiny import cli

    assert cli.main(["probe", "--scale", "micro", "--by-template"]) == 0
    lines = capsys.readouterr().out.splitlines()
    share_right = float(lines[1].split("all ")[1].rstrip("%")) / 100
    counts = [line.split()[-2].split("/") for line in lines[2:]]
    right, asked = sum(int(r) for r, _ in counts), sum(int(a) for _, a in counts)
    assert asked == len([q for q in held_out("text", 0, 2) if q.scene_text])
    assert right == round(share_right * asked)
