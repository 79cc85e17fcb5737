"""Exact-answer accuracy of the tiny model on held-out scenes, at several gate scales.

Greedy decoding; an answer counts when the generated text, stripped of surrounding whitespace, is exactly
the expected string. Text questions are one Alpaca instruction (the scene in words, then the question);
image questions get the picture and the plain question (`adapter.image_question`).

The gate scale moves the prompts (and so the picture) only; an adapter with v2 parts (biases, norms, LoRA)
keeps them at gate 0. For such an adapter one more row, `FROZEN` (gate 0 and delta scale 0), is the frozen
base itself: what "the base does not follow the instructions" is measured on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ..generate import generate_batch
from ..loading import load
from ..model import Transformer
from ..prompts import STOP_STRINGS, alpaca, image_question
from .assets import ASSETS, BASE_NAME, IMAGE, IMAGE_NAME, TEXT_NAME, resolve
from .questions import IMAGE_CATEGORIES, TEXT_CATEGORIES, Question, image_questions, text_questions
from .world import render

MAX_NEW_TOKENS = 16
FROZEN = "frozen"  # the row of the frozen base (gate 0, delta scale 0), beside the gate scales
FROZEN_LABEL = "frozen base (gate 0, delta scale 0)"  # how tables, plot and card name it
Accuracy = dict[str, dict[str, float]]  # gate scale (as text) or FROZEN -> category (and "all") -> fraction correct


def held_out(kind: str, seed: int, per_category: int) -> list[Question]:
    """Up to `per_category` distinct held-out questions of each category (arithmetic has few distinct sums)."""
    categories = TEXT_CATEGORIES if kind == "text" else IMAGE_CATEGORIES
    make = text_questions if kind == "text" else image_questions
    pool = make(seed + 10, "held-out", per_category * len(categories) * 3)
    chosen: dict[str, list[Question]] = {c: [] for c in categories}
    seen = set()
    for question in pool:
        key = (question.instruction, question.scene)
        bucket = chosen[question.category]
        if key not in seen and len(bucket) < per_category:
            seen.add(key)
            bucket.append(question)
    return [q for c in categories for q in chosen[c]]


def answers(model: Transformer, questions: Sequence[Question], gate_scale: float, images: bool,
            batch_size: int = 64, delta_scale: float = 1.0) -> list[str]:
    """Greedy answers, stripped, in the order of `questions`."""
    out = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start: start + batch_size]
        if images:
            prompts = [image_question(q.question) for q in chunk]
            pictures = [render(q.scene) for q in chunk]
        else:
            prompts = [alpaca(q.instruction) for q in chunk]
            pictures = None
        got = generate_batch(model, prompts, images=pictures, gate_scale=gate_scale, delta_scale=delta_scale,
                             temperature=0.0, max_new_tokens=MAX_NEW_TOKENS, stop=list(STOP_STRINGS))
        out += [a.strip() for a in got]
    return out


def shares(questions: Sequence[Question], right: Sequence[bool]) -> dict[str, float]:
    """The fraction right per category (in the questions' order) and over all of them ("all")."""
    by_category: dict[str, list[bool]] = {}
    for question, ok in zip(questions, right):
        by_category.setdefault(question.category, []).append(ok)
    row = {c: sum(v) / len(v) for c, v in by_category.items()}
    row["all"] = sum(right) / max(1, len(right))
    return row


def accuracy(model: Transformer, questions: Sequence[Question], gate_scales: Sequence[float], images: bool,
             log: Callable[[str], None] = print) -> Accuracy:
    """Per gate scale: the fraction answered exactly, per category and over all questions; and the frozen
    base's (`FROZEN`) when the adapter has parts that the gate scale leaves on."""
    args = model.adapter_args
    runs = [(f"{scale:g}", scale, 1.0) for scale in gate_scales]
    if args.has_deltas:
        runs.append((FROZEN, 0.0, 0.0))
    result: Accuracy = {}
    for key, scale, delta in runs:
        got = answers(model, questions, scale, images, delta_scale=delta)
        row = shares(questions, [answer == question.answer for question, answer in zip(questions, got)])
        result[key] = row
        log(f"{'image' if images else 'text'} questions, gate scale {scale:g}, delta scale {delta:g}: "
            f"{row['all']:.1%} exact")
    return result


def evaluate(seed: int, per_category: int, gate_scales: Sequence[float], root: Path = ASSETS,
             log: Callable[[str], None] = print) -> tuple[dict[str, Accuracy], dict[str, int]]:
    """(accuracy, number of questions) of text and image questions for the tiny model in `root` (the shipped
    one by default); an image adapter that has not been built yet is skipped."""
    results, counts = {}, {}
    kinds = ["text"] + (["image"] if (root / IMAGE).exists() else [])
    if len(kinds) == 1:
        log(f"no image adapter in {root}; image questions skipped")
    for kind in kinds:
        base, adapter, clip, clip_model = resolve(BASE_NAME, TEXT_NAME if kind == "text" else IMAGE_NAME, None, None,
                                                  root=root)
        model = load(base, adapter=adapter, clip=clip, clip_model=clip_model, device="cpu")
        questions = held_out(kind, seed, per_category)
        results[kind] = accuracy(model, questions, gate_scales, images=kind == "image", log=log)
        counts[kind] = len(questions)
    return results, counts
