"""What the app offers to click: the pictures shipped in assets/, and for the embedded tiny model its held-out
questions (chat, image, Score tab) and training records (Train tab), written into the temporary folder.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .app_config import ASSETS, ServeConfig, serves_tiny

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
EXAMPLE_QUESTION = "What is in the picture?"
TINY_HELD_OUT_PER_CATEGORY = 25  # the Score tab's example for the tiny model: 175 held-out text questions
TINY_HELD_OUT_DOCUMENTS = 200  # and its plain-text example: held-out documents of its base's corpus
TINY_HELD_OUT_IMAGES = 10  # and 40 held-out image questions (10 per category) with their pictures
TINY_FILES = Path(tempfile.gettempdir()) / "llama-adapter"  # the tiny model's records the app offers, written there
TINY_TRAINING_RECORDS = 2000  # the Train tab's example for the tiny model: its text adapter's kind of questions
TINY_TRAINING_IMAGES = 1000  # and its image adapter's: questions about rendered scenes, with their pictures


def example_images() -> list[str]:
    """Images shipped in assets/ (never any other server file)."""
    if not ASSETS.is_dir():
        return []
    return sorted(str(p) for p in ASSETS.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:8]


def examples(config: ServeConfig) -> tuple[list[list[str]], list[str]]:
    """[picture, question] pairs for the image tab and messages for the chat tab: the tiny model's own held-out
    examples when it is served (questions it was trained to answer), else the shipped pictures."""
    if serves_tiny(config):
        from .tiny.assets import ASSETS as TINY
        from .tiny.assets import EXAMPLES
        from .tiny.examples import read_examples

        pictures, messages = read_examples(TINY / EXAMPLES)
        return [[str(path), question] for path, question in pictures], messages
    return [[path, EXAMPLE_QUESTION] for path in example_images()], []


def tiny_held_out(config: ServeConfig) -> tuple[Path, Path, Path] | None:
    """The tiny model's held-out text questions as fine-tuning records, those with a closed answer set as
    multiple-choice records, and held-out documents of its base's corpus as plain text, for the Score tab to offer
    (None for other models): three files in the temporary folder, rewritten atomically at each start (their content
    never changes, so apps starting together agree)."""
    if not serves_tiny(config):
        return None
    from .formats.common import atomic_write
    from .tiny.evaluate import held_out
    from .tiny.recipe import RECIPES
    from .tiny.records import write_choice_records, write_corpus_records, write_text_records

    seed = RECIPES["full"].seed
    questions = held_out("text", seed, TINY_HELD_OUT_PER_CATEGORY)
    records, choices = TINY_FILES / "tiny_held_out.jsonl", TINY_FILES / "tiny_held_out_choices.jsonl"
    text = TINY_FILES / "tiny_held_out_text.jsonl"
    atomic_write(records, lambda tmp: write_text_records(questions, Path(tmp)))
    atomic_write(choices, lambda tmp: write_choice_records(questions, Path(tmp)))
    atomic_write(text, lambda tmp: write_corpus_records(seed, TINY_HELD_OUT_DOCUMENTS, Path(tmp)))
    return records, choices, text


def tiny_held_out_images(config: ServeConfig) -> tuple[Path, list[str]] | None:
    """The tiny model's held-out image questions as LLaVA records and their pictures, for the Score tab to offer
    with its image adapter (None for other models)."""
    if not serves_tiny(config):
        return None
    from .tiny.evaluate import held_out
    from .tiny.recipe import RECIPES

    seed = RECIPES["full"].seed
    return tiny_image_records("tiny_held_out_images", seed, TINY_HELD_OUT_IMAGES,
                              lambda: held_out("image", seed, TINY_HELD_OUT_IMAGES))


def tiny_training_images(config: ServeConfig) -> tuple[Path, list[str]] | None:
    """Training questions of the kind the tiny image adapter learnt (rendered scenes) as LLaVA records and their
    pictures, for the Train tab to offer (None for other models)."""
    if not serves_tiny(config):
        return None
    from .tiny.questions import image_questions
    from .tiny.recipe import RECIPES

    seed = RECIPES["full"].seed
    return tiny_image_records("tiny_training_images", seed, TINY_TRAINING_IMAGES,
                              lambda: image_questions(seed, "train", TINY_TRAINING_IMAGES))


def tiny_image_records(kind: str, seed: int, count: int, questions: Callable[[], list[Any]]) -> tuple[Path, list[str]]:
    """`questions()` as LLaVA records (KIND.jsonl) and their pictures, written once into a folder of the temporary
    folder named by their content (KIND-SEED-COUNT), made beside it and renamed into place, so apps starting
    together agree."""
    from .tiny.records import write_image_records

    folder = TINY_FILES / f"{kind}-{seed}-{count}"
    records = folder / f"{kind}.jsonl"
    if not records.is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        write_image_records(questions(), building / records.name, building)
        try:
            building.rename(folder)
        except OSError:  # another app put it in place first
            shutil.rmtree(building, ignore_errors=True)
    return records, sorted(str(p) for p in folder.glob("*.png"))


def tiny_training_records(config: ServeConfig) -> Path | None:
    """Training questions of the kind the tiny text adapter learnt (scenes in words, then a question; sums) for the
    Train tab to offer (None for other models): a file in the temporary folder, rewritten atomically at each
    start, its content always the same."""
    if not serves_tiny(config):
        return None
    from .formats.common import atomic_write
    from .tiny.questions import text_questions
    from .tiny.recipe import RECIPES
    from .tiny.records import write_text_records

    questions = text_questions(RECIPES["full"].seed, "train", TINY_TRAINING_RECORDS)
    records = TINY_FILES / "tiny_training.jsonl"
    atomic_write(records, lambda tmp: write_text_records(questions, Path(tmp)))
    return records
