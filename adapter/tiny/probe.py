"""How well the tiny BASE reads scenes on its own, asked in the forms of its pretraining text (no adapter).

An adapter changes how the base answers, not what it can read: text-question accuracy at gate 1 is bounded by
what the base gets right when asked the way its corpus asks. This measures that bound on held-out scenes, in
two orders:

    dialogue  the scene, then the question, then the answer ("Ana and Ben looked at a card. S Ana asked: Q Ben
              answered:"), as the corpus's dialogues and quizzes ask
    quiz      the question, then the scene ("Ana asked: Q Here is the picture. S Ben answered:"), an order the
              corpus does not use (a base pretrained with it read it no better: docs/tiny.md)

A category's score can hide how it is read: `template_scores` splits it by the word a question names its
thing by (scenes are always described in reading order, so a question by place can be answered from that
order without finding anything).

    python -m adapter.tiny probe [--out assets/tiny] [--wrong 5] [--by-template]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ..generate import generate_batch
from ..model import Transformer
from .evaluate import held_out, shares
from .language import PLACES
from .questions import Question
from .world import COLOURS, SHAPES

FORMS = {
    "quiz": "Ana asked: {question} Here is the picture. {scene} Ben answered:",
    "dialogue": "Ana and Ben looked at a card. {scene} Ana asked: {question} Ben answered:",
}


def native_prompt(form: str, question: Question) -> str:
    """A text question (with its scene in words) asked the way the corpus asks."""
    return FORMS[form].format(question=question.question, scene=question.scene_text)


def native_answers(model: Transformer, questions: Sequence[Question], form: str, batch_size: int = 64,
                   ) -> list[tuple[Question, str]]:
    """(question, the base's greedy continuation up to its first full stop) for each scene question. Runs at
    gate scale 0, so any adapter loaded is switched off."""
    scene_questions = [q for q in questions if q.scene_text]
    prompts = [native_prompt(form, q) for q in scene_questions]
    got: list[str] = []
    for start in range(0, len(prompts), batch_size):
        got += generate_batch(model, prompts[start: start + batch_size], gate_scale=0.0, temperature=0.0,
                              max_new_tokens=10, stop=["."])
    return [(q, a.strip().rstrip(".")) for q, a in zip(scene_questions, got)]


def wrong_answers(answered: Sequence[tuple[Question, str]], per_category: int) -> list[str]:
    """Up to `per_category` wrong answers of each category, one line each (category, scene, question, answer
    wanted, answer given): what a base gets wrong says which reading it has not learnt."""
    lines, shown = [], {}
    for question, got in answered:
        if got != question.answer and shown.get(question.category, 0) < per_category:
            shown[question.category] = shown.get(question.category, 0) + 1
            lines.append(f"{question.category} | {question.scene_text} | {question.question} | "
                         f"wanted {question.answer!r}, got {got!r}")
    return lines


_SCENE_WORDS = ((re.compile(rf"\b({'|'.join(PLACES.values())})\b"), "<place>"),
                (re.compile(rf"\b({'|'.join(COLOURS)})\b"), "<colour>"),
                (re.compile(rf"\b({'|'.join(SHAPES)})(?=s?\b)"), "<shape>"))


def template(question: Question) -> str:
    """The question with its scene words named by kind ("What colour is the <shape>?"). Which word a question
    finds its thing by decides whether a base reads it: one category can be read perfectly by one template
    and at chance by another."""
    text = question.question
    for pattern, kind in _SCENE_WORDS:
        text = pattern.sub(kind, text)
    return text


def template_scores(answered: Sequence[tuple[Question, str]]) -> list[tuple[str, str, int, int]]:
    """(category, template, right, asked) for every template of `native_answers`, sorted."""
    counts: dict[tuple[str, str], list[int]] = {}
    for question, got in answered:
        row = counts.setdefault((question.category, template(question)), [0, 0])
        row[0] += got == question.answer
        row[1] += 1
    return [(category, text, right, asked) for (category, text), (right, asked) in sorted(counts.items())]


def probe(root: Path, seed: int, per_category: int, forms: Sequence[str] = tuple(FORMS),
          ) -> dict[str, list[tuple[Question, str]]]:
    """The base in `root` answering the held-out text questions, per form (`native_answers`)."""
    from ..loading import load
    from .assets import BASE

    model = load(root / BASE, device="cpu")
    questions = held_out("text", seed, per_category)
    return {form: native_answers(model, questions, form) for form in forms}


def scores(answered: Sequence[tuple[Question, str]]) -> dict[str, float]:
    """Per category (and "all"): the share of `native_answers` that are exactly right."""
    return shares([q for q, _ in answered], [got == q.answer for q, got in answered])
