"""The plain-text corpus the tiny base model is pretrained on: scene descriptions, short stories, dialogues
and small sums, in varied wording, one document per line.

There is no instruction format here: no template, no "### Instruction:", no record that is a question and
its answer alone. People in the stories ask each other things and answer, as people in any text do. The
base model learns the world and how to talk about it, but not to answer in the Alpaca template; that is
what the adapters add, and why the base alone (gate 0) fails the questions.
"""

from __future__ import annotations

import random

from .language import PLACES, count_sentence, describe, noun_phrase
from .questions import SCENE_CATEGORIES, Fact, arithmetic, facts
from .world import COLOURS, SHAPES, Scene, scenes

NAMES = ("Mia", "Tom", "Ana", "Leo", "Sara", "Ben", "Kim", "Sam", "Eva", "Max")
PRONOUNS = {"Mia": "she", "Ana": "she", "Sara": "she", "Kim": "she", "Eva": "she",
            "Tom": "he", "Leo": "he", "Ben": "he", "Sam": "he", "Max": "he"}
ORDER_WORDS = ("First", "Then", "Next")
# someone asks, someone answers: in a full sentence, or briefly ("answered: red.")
DIALOGUE = ('{a} asked, "{q}" {t} said, "{s}"', '"{q}" asked {a}. "{s}" said {t}.',
            "{a} wanted to know: {q} {t} looked again. {s}", '{a} asked, "{q}" {t} answered: {answer}.',
            "{a} asked: {q} {t} answered: {answer}.")
SCRIBBLE = "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789#:,.-"
ENDINGS = ("{name} was happy with the picture.", "It was a nice picture.", "{name} showed the picture to a friend.",
           "Then {name} put the pencils away.", "")


NOISY = 0.15  # share of documents with garbled fragments (see _with_noise)


def corpus(seed: int, documents: int, split: str = "train") -> list[str]:
    """`documents` lines of text about scenes of `split` and sums; the base trains on the train split only,
    held-out text measures how well it reads new scenes."""
    rng = random.Random(f"corpus:{seed}:{split}")
    writers = (_description, _story, _dialogue, _sums, _scene_sum) + (_echo,) * 2 + (_quiz,) * 5
    out = []
    for scene in scenes(seed, split, documents):
        text = rng.choice(writers)(scene, rng)
        out.append(_with_noise(text, rng) if rng.random() < NOISY else text)
    return out


def _some_facts(scene: Scene, rng: random.Random, low: int, high: int) -> list[Fact]:
    found = [fact for category in SCENE_CATEGORIES for fact in facts(scene, rng, category)]
    return rng.sample(found, min(len(found), rng.randint(low, high)))


def _description(scene: Scene, rng: random.Random) -> str:
    opening = rng.choice(("", "Look at this picture. ", "Here is a picture. ", "This is a scene. "))
    return opening + describe(scene, rng) + " " + " ".join(f.statement for f in _some_facts(scene, rng, 3, 7))


def _story(scene: Scene, rng: random.Random) -> str:
    name = rng.choice(NAMES)
    lines = [f"{name} drew a picture."]
    for index, thing in enumerate(scene.things):
        word = "Last" if index and index == len(scene.things) - 1 else ORDER_WORDS[index]
        lines.append(f"{word} {PRONOUNS[name]} drew {noun_phrase(thing, rng)} {PLACES[thing.slot]}.")
    lines.append(f"Now the picture has {len(scene.things)} shape{'s' if len(scene.things) > 1 else ''}.")
    lines += [f.statement for f in _some_facts(scene, rng, 2, 5)]
    lines.append(rng.choice(ENDINGS).format(name=name))
    return " ".join(line for line in lines if line)


def _dialogue(scene: Scene, rng: random.Random) -> str:
    """Two people look at a picture; one asks, the other answers in full sentences."""
    asker, teller = rng.sample(NAMES, 2)
    lines = [f"{asker} and {teller} looked at a card.", describe(scene, rng)]
    for fact in _some_facts(scene, rng, 2, 4):
        lines.append(rng.choice(DIALOGUE).format(a=asker, t=teller, q=fact.question, s=fact.spoken, answer=fact.answer))
    return " ".join(lines)


def _quiz(scene: Scene, rng: random.Random) -> str:
    """A scene, then several questions about it, each answered in a word: what reading a scene is for."""
    asker, teller = rng.sample(NAMES, 2)
    opening = rng.choice(("{a} and {t} looked at a card.", "Here is a picture.", "Look at this picture.", "Quiz.", ""))
    lines = [opening.format(a=asker, t=teller), describe(scene, rng)]
    lines += [DIALOGUE[-1].format(a=asker, t=teller, q=f.question, answer=f.answer)
              for f in _some_facts(scene, rng, 3, 8)]
    return " ".join(line for line in lines if line)


def _echo(scene: Scene, rng: random.Random) -> str:
    """A random list of coloured shapes said twice: only copying from earlier in the text predicts the
    second time. Without such text the tiny base never learns to look back at all (no induction heads:
    it answered a question about a one-shape scene with a colour not in it), and reading a scene is
    looking back."""
    asker, teller = rng.sample(NAMES, 2)
    items = ", ".join(f"{rng.choice(list(COLOURS))} {rng.choice(SHAPES)}" for _ in range(rng.randint(4, 12)))
    return f"{asker} said: {items}. {teller} said it again: {items}."


def _with_noise(text: str, rng: random.Random) -> str:
    """The text with garbled fragments (random letters and marks) before it and between some sentences.

    The base then learns to read past text it does not know, which is what the Alpaca template, never seen
    in pretraining, is to it; without this, the template's words derail it.
    """
    words = [_scribble(rng)] if rng.random() < 0.7 else []
    for word in text.split(" "):
        words.append(word)
        if word[-1] in '.?"' and rng.random() < 0.15:
            words.append(_scribble(rng))
    return " ".join(words)


def _scribble(rng: random.Random) -> str:
    return " ".join("".join(rng.choice(SCRIBBLE) for _ in range(rng.randint(1, 9))) for _ in range(rng.randint(1, 5)))


def _sums(scene: Scene, rng: random.Random) -> str:
    """Sums and differences of digits, stated and asked."""
    lines = []
    asker, teller = rng.sample(NAMES, 2)
    for _ in range(rng.randint(3, 6)):
        fact = arithmetic(rng)
        expression, result = fact.statement.rstrip(".").split(" = ")
        a, sign, b = expression.split()
        word = "plus" if sign == "+" else "minus"
        lines.append(rng.choice((fact.statement, f"{a} {word} {b} is {result}.",
                                 f'"{fact.question}" asked the teacher. "{fact.spoken}"',
                                 DIALOGUE[-1].format(a=asker, t=teller, q=fact.question, answer=fact.answer))))
    return " ".join(lines)


def _scene_sum(scene: Scene, rng: random.Random) -> str:
    """Counting with sums: the shapes of each colour add up to all of them."""
    counts: dict[str, int] = {}
    for thing in scene.things:
        counts[thing.colour] = counts.get(thing.colour, 0) + 1
    parts = " ".join(count_sentence(n, f"{colour} shape") for colour, n in counts.items())
    total = len(scene.things)
    sums = " + ".join(str(n) for n in counts.values())
    total_sentence = count_sentence(total, "shape").replace("There", "there", 1)
    return f"{describe(scene, rng)} {parts} {sums} = {total}, so {total_sentence}"
