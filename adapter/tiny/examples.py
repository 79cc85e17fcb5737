"""A few held-out pictures and questions shipped beside the model, for the app and for people trying it:
OUT/examples/NN.png and OUT/examples/examples.json."""

from __future__ import annotations

import json
from pathlib import Path

from ..formats.common import write_text_atomically
from .questions import image_questions, text_questions
from .world import render

FILE = "examples.json"


def write_examples(folder: Path, seed: int, count: int = 6) -> int:
    """`count` image questions (one per picture) and `count` text questions, all about held-out scenes."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for index, question in enumerate(image_questions(seed + 100, "held-out", count)):
        name = f"{index:02d}.png"
        render(question.scene).save(folder / name)
        images.append({"image": name, "question": question.question, "answer": question.answer,
                       "category": question.category})
    texts = [{"instruction": q.instruction, "answer": q.answer, "category": q.category}
             for q in text_questions(seed + 100, "held-out", count)]
    write_text_atomically(folder / FILE, json.dumps({"image": images, "text": texts}, indent=2) + "\n")
    return len(images) + len(texts)


def read_examples(folder: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    """(picture, question) pairs and text instructions from a folder `write_examples` wrote."""
    examples = json.loads((folder / FILE).read_text(encoding="utf-8"))
    return ([(folder / e["image"], e["question"]) for e in examples["image"]],
            [e["instruction"] for e in examples["text"]])
