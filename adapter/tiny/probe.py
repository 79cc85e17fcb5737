"""How well the tiny BASE reads scenes on its own, asked in the forms of its pretraining text (no adapter).

An adapter changes how the base answers, not what it can read: text-question accuracy at gate 1 is bounded by
what the base gets right when asked the way its corpus asks. This measures that bound on held-out scenes, in
two orders:

    dialogue  the scene, then the question, then the answer ("Ana and Ben looked at a card. S Ana asked: Q Ben
              answered:"), as the corpus's dialogues and quizzes ask
    quiz      the question, then the scene ("Ana asked: Q Here is the picture. S Ben answered:"), an order the
              corpus no longer uses: a small model reads a scene for a question it has already seen far better
              than it holds a question while reading

    python -m adapter.tiny probe [--out assets/tiny]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..generate import generate_batch
from ..model import Transformer
from .evaluate import held_out, shares
from .questions import Question

FORMS = {
    "quiz": "Ana asked: {question} Here is the picture. {scene} Ben answered:",
    "dialogue": "Ana and Ben looked at a card. {scene} Ana asked: {question} Ben answered:",
}


def native_prompt(form: str, question: Question) -> str:
    """A text question (with its scene in words) asked the way the corpus asks."""
    return FORMS[form].format(question=question.question, scene=question.scene_text)


def native_accuracy(model: Transformer, questions: Sequence[Question], form: str, batch_size: int = 64,
                    ) -> dict[str, float]:
    """Per category (and "all"): the share of scene questions whose greedy continuation, up to its first
    full stop, is exactly the answer. Runs at gate scale 0, so any adapter loaded is switched off."""
    scene_questions = [q for q in questions if q.scene_text]
    prompts = [native_prompt(form, q) for q in scene_questions]
    got: list[str] = []
    for start in range(0, len(prompts), batch_size):
        got += generate_batch(model, prompts[start: start + batch_size], gate_scale=0.0, temperature=0.0,
                              max_new_tokens=10, stop=["."])
    return shares(scene_questions, [a.strip().rstrip(".") == q.answer for q, a in zip(scene_questions, got)])


def probe(root: Path, seed: int, per_category: int, forms: Sequence[str] = tuple(FORMS),
          ) -> dict[str, dict[str, float]]:
    """Native accuracy of the base in `root` on held-out text questions, per form."""
    from ..loading import load
    from .assets import BASE

    model = load(root / BASE, device="cpu")
    questions = held_out("text", seed, per_category)
    return {form: native_accuracy(model, questions, form) for form in forms}
