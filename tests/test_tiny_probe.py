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
    result = probe.native_accuracy(None, questions + [Question("arithmetic", "What is 2 + 2?", "4")], "dialogue")
    assert result["all"] == pytest.approx(sum(i % 2 == 0 for i in range(len(questions))) / len(questions))
    assert seen["prompts"] == [probe.native_prompt("dialogue", q) for q in questions], "arithmetic is not asked"
    assert set(result) == {q.category for q in questions} | {"all"}
