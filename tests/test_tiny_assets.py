"""The shipped tiny model (assets/tiny/): loads by name, answers fixed held-out questions exactly at gate 1
and not at gate 0, stays small. Skipped until `python -m adapter.tiny build` has written the files.

The fixed questions are ones the shipped weights get right (the model card gives its accuracy over all held-
out questions, which is far from perfect); what they pin down is that these weights, loaded by name, give these
exact greedy answers with the gates open and not with them closed."""

from __future__ import annotations

import json

import pytest

import adapter
from adapter.tiny.assets import ASSETS, IMAGE
from adapter.tiny.evaluate import answers, held_out
from adapter.tiny.world import Scene, Thing, render

pytestmark = pytest.mark.skipif(not (ASSETS / "base" / "params.json").is_file(), reason="assets/tiny not built yet")

SCENE = Scene((Thing("triangle", "yellow", "small", "left"), Thing("circle", "red", "small", "centre"),
               Thing("star", "blue", "small", "bottom")))
SCENE_TEXT = "There is a small yellow triangle on the left. There is a small red circle in the centre. There is a small " \
        "blue star at the bottom."
TEXT = [("How many shapes are there?", "3"), ("What shape is in the centre?", "circle"),
        ("What colour is the circle?", "red"), ("List the colours of the shapes.", "yellow, red, blue")]
BLUE_STAR = Scene((Thing("star", "blue", "small", "left"),))
IMAGE_QUESTIONS = [(SCENE, "How many shapes are there?", "3"), (BLUE_STAR, "What colour is the star?", "blue"),
                   (BLUE_STAR, "What shape is on the left?", "star"),
                   (Scene((Thing("circle", "red", "small", "top"),)), "How many shapes are there?", "1")]
GREEDY = dict(temperature=0.0, max_new_tokens=16)


@pytest.fixture(scope="module")
def text_model():
    return adapter.load("tiny", device="cpu")


def test_the_fixed_questions_are_about_held_out_scenes():
    assert all(scene.split == "held-out" for scene in [SCENE] + [scene for scene, _, _ in IMAGE_QUESTIONS])


def test_text_questions_are_answered_exactly_at_gate_1_and_not_at_gate_0(text_model):
    for question, answer in TEXT:
        prompt = adapter.alpaca(f"{SCENE_TEXT} {question}")
        assert text_model.generate(prompt, gate_scale=1.0, **GREEDY) == answer, question
        assert text_model.generate(prompt, gate_scale=0.0, **GREEDY) != answer, question


@pytest.mark.skipif(not (ASSETS / IMAGE).is_dir(), reason="the image adapter is not built yet")
def test_image_questions_are_answered_exactly_at_gate_1_and_not_at_gate_0():
    model = adapter.load("tiny", adapter="tiny-image", device="cpu")
    for scene, question, answer in IMAGE_QUESTIONS:
        picture, prompt = render(scene), adapter.image_question(question)
        assert model.generate(prompt, image=picture, gate_scale=1.0, **GREEDY) == answer, question
        assert model.generate(prompt, image=picture, gate_scale=0.0, **GREEDY) != answer, question


def test_opening_the_gates_turns_no_exact_answers_into_some(text_model):
    questions = held_out("text", 0, 4)
    closed = answers(text_model, questions, 0.0, images=False)
    opened = answers(text_model, questions, 1.0, images=False)
    assert sum(a == q.answer for q, a in zip(questions, closed)) == 0, "the frozen base never answers in a word"
    assert sum(a == q.answer for q, a in zip(questions, opened)) >= len(questions) // 2, opened


def test_the_assets_are_small_and_match_their_manifest():
    manifest = json.loads((ASSETS / "manifest.json").read_text())
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total < 40e6
    for name, entry in manifest["files"].items():
        assert (ASSETS / name).stat().st_size == entry["bytes"], name


@pytest.mark.parametrize("kind", ["text", IMAGE])
def test_each_adapter_ships_the_plot_of_its_gates_opening_for_the_apps_gates_tab(kind):
    from adapter.engine import Engine

    folder = ASSETS / kind
    engine = Engine(adapter.load(ASSETS / "base", adapter=folder, device="cpu"))
    plot = engine.training_plot()
    assert plot == folder / "gates.png" and plot.read_bytes().startswith(b"\x89PNG")
