"""Questions written as the files `python -m adapter.finetune` reads: Alpaca records for the text adapter,
LLaVA records (one rendered PNG each) for the image adapter; and held-out plain text of the base's corpus.

Answers are stored with a leading space (" red"): the response then starts a new word right after
"### Response:", so it tokenizes as the word the base model knows ("▁red") rather than as pieces of it;
decoding drops that space again, so generated answers are exactly "red".
"""

from __future__ import annotations

import json
from pathlib import Path

from ..formats.common import atomic_folder, write_text_atomically
from .questions import Question
from .world import COLOURS, MAX_OBJECTS, SHAPES, SLOTS, render

# the closed answer sets of the questions that have one, each the choices of a multiple-choice question
CHOICES = {"colour": tuple(COLOURS), "shape": SHAPES, "position": tuple(SLOTS),
           "count": tuple(str(n) for n in range(MAX_OBJECTS + 1))}


def alpaca_record(question: Question) -> dict[str, str]:
    return {"instruction": question.instruction, "output": " " + question.answer}


def write_text_records(questions: list[Question], path: Path) -> Path:
    _write_lines(path, [json.dumps(alpaca_record(q)) for q in questions])
    return path


def write_corpus_records(seed: int, documents: int, path: Path) -> Path:
    """The first `documents` of the base's corpus about held-out scenes as plain-text records (`{"text"}`), for
    `python -m adapter.evaluate --text` and the app's Score tab: how well each gate reads what the base learnt. A
    `.txt` path gets them as one text instead, a line each: one document longer than the context (`--stride`)."""
    from .corpus import corpus

    texts = corpus(seed, documents, "held-out")
    _write_lines(path, texts if path.suffix == ".txt" else [json.dumps({"text": text}) for text in texts])
    return path


def write_choice_records(questions: list[Question], path: Path, image_folder: Path | None = None) -> int:
    """The questions with a closed answer set as multiple-choice records (`python -m adapter.evaluate --choices`):
    every colour, shape, place or count a scene may have is a choice; image questions (`image_folder`: where
    their PNGs go) ask about the rendered scene. Returns how many were written."""
    chosen = [q for q in questions if q.category in CHOICES]
    names = _pictures(chosen, image_folder) if image_folder is not None else [None] * len(chosen)
    records = [{"question": q.question if name else q.instruction, "choices": list(CHOICES[q.category]),
                "answer": q.answer, **({"image": name} if name else {})} for q, name in zip(chosen, names)]
    _write_lines(path, [json.dumps(record) for record in records])
    return len(records)


def write_image_records(questions: list[Question], path: Path, image_folder: Path) -> Path:
    """One record and one PNG per question (scenes repeat rarely; a shared file would save little)."""
    names = _pictures(questions, image_folder)
    _write_lines(path, [json.dumps({"id": str(index), "image": name, "conversations": [
        {"from": "human", "value": f"<image>\n{question.question}"}, {"from": "gpt", "value": " " + question.answer}]})
        for index, (question, name) in enumerate(zip(questions, names))])
    return path


def _pictures(questions: list[Question], image_folder: Path) -> list[str]:
    """Each question's scene rendered as a PNG in `image_folder` (the folder appears whole, replacing an earlier
    one, or not at all: an interrupted run left thousands of pictures, and a shorter rerun kept the rest); their
    file names."""
    names = [f"{index:06d}.png" for index in range(len(questions))]

    def render_all(folder: Path) -> None:
        for question, name in zip(questions, names):
            render(question.scene).save(folder / name)

    atomic_folder(image_folder, render_all, replace=True)
    return names


def _write_lines(path: Path, lines: list[str]) -> None:
    write_text_atomically(path, "".join(line + "\n" for line in lines))
