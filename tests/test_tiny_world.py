"""The tiny model's world: reproducible from a seed, train and held-out scenes disjoint, answers exact."""

from __future__ import annotations

import dataclasses
import random

import pytest

from adapter.tiny.corpus import corpus
from adapter.tiny.language import describe
from adapter.tiny.questions import IMAGE_CATEGORIES, TEXT_CATEGORIES, facts, image_questions, text_questions
from adapter.tiny.world import COLOURS, SHAPES, SLOTS, Scene, Thing, render, scenes, split_of, twin


def test_scenes_and_pictures_are_the_same_for_a_seed_and_differ_across_seeds():
    first, again, other = scenes(3, "train", 50), scenes(3, "train", 50), scenes(4, "train", 50)
    assert first == again and first != other
    assert render(first[0]).tobytes() == render(again[0]).tobytes()
    assert corpus(3, 20) == corpus(3, 20)
    assert text_questions(3, "train", 30) == text_questions(3, "train", 30)


def test_train_and_held_out_scenes_never_overlap():
    train = {s.key for s in scenes(0, "train", 3000)}
    held_out = {s.key for s in scenes(0, "held-out", 300)}
    assert not train & held_out
    assert all(split_of(key) == "train" for key in train) and all(split_of(k) == "held-out" for k in held_out)
    assert 0.05 < len(held_out) / 300 and 0.05 < sum(split_of(f"k{i}") == "held-out" for i in range(2000)) / 2000 < 0.15
    # what the adapters train on comes from train scenes only; what they are measured on, from held-out ones
    assert all(q.scene.split == "train" for q in image_questions(0, "train", 200))
    assert all(q.scene is None or q.scene.split == "train" for q in text_questions(0, "train", 200))
    assert all(q.scene.split == "held-out" for q in image_questions(0, "held-out", 50))


def test_the_split_is_a_fixed_property_of_the_scene():
    """The shipped model was trained on one side of this split: it must never move."""
    assert split_of("large red star left") == "train"
    sums = [f"{a} {sign} {b}" for a in range(10) for b in range(10) for sign in "+-" if sign == "+" or a >= b]
    assert [s for s in sums if split_of(s) == "held-out"] == [
        "0 + 5", "0 + 9", "1 + 7", "3 + 6", "5 - 2", "5 - 3", "6 - 1", "7 - 0", "7 - 1", "7 + 7", "8 - 8", "9 - 0",
        "9 - 3", "9 - 5"]


def _differences(scene: Scene, other: Scene) -> list[tuple[str, str, str]]:
    """(slot, attribute, value in `other`) for every attribute that differs, a moved thing as its slot."""
    if [t.slot for t in scene.things] != [t.slot for t in other.things]:
        moved = {t.slot for t in other.things} - {t.slot for t in scene.things}
        return [(slot, "slot", slot) for slot in moved]
    return [(a.slot, attribute, getattr(b, attribute)) for a, b in zip(scene.things, other.things)
            for attribute in ("shape", "colour", "size") if getattr(a, attribute) != getattr(b, attribute)]


def test_a_twin_differs_in_one_detail_or_one_swap_and_stays_in_its_split():
    rng, again = random.Random(5), random.Random(5)
    originals = scenes(1, "train", 200)
    twins = [twin(scene, rng) for scene in originals]
    assert twins == [twin(scene, again) for scene in originals]
    kinds = set()
    for scene, changed in zip(originals, twins):
        assert changed is not None and changed.split == scene.split and changed.key != scene.key
        assert len(changed.things) == len(scene.things)
        diff = _differences(scene, changed)
        kinds.add(tuple(sorted(attribute for _, attribute, _ in diff)))
        if len(diff) == 2:  # a swap: two things trade the same attribute
            (slot_a, attribute, value_a), (slot_b, attribute_b, value_b) = diff
            assert attribute == attribute_b and attribute in ("colour", "shape")
            assert getattr(scene.at(slot_a), attribute) == value_b and getattr(scene.at(slot_b), attribute) == value_a
        else:
            assert len(diff) == 1
    assert kinds == {("colour",), ("shape",), ("size",), ("slot",), ("colour", "colour"), ("shape", "shape")}
    held_out = [twin(scene, rng) for scene in scenes(1, "held-out", 30)]  # 1 in 10 changes stays held out
    assert all(t is None or t.split == "held-out" for t in held_out) and sum(t is not None for t in held_out) > 20
    full = Scene(tuple(Thing("star", "red", "large", slot) for slot in list(SLOTS)[:4]))
    assert all(twin(full, rng).key != full.key for _ in range(20))  # all alike, nothing to swap: still a twin


def test_a_scene_keeps_its_things_in_reading_order_and_refuses_shared_slots():
    scene = Scene((Thing("star", "red", "large", "bottom"), Thing("circle", "blue", "small", "top")))
    assert scene.key == "small blue circle top; large red star bottom"
    with pytest.raises(ValueError, match="distinct slots"):
        Scene((Thing("star", "red", "large", "left"), Thing("circle", "blue", "small", "left")))
    with pytest.raises(ValueError, match="unknown attribute"):
        Thing("hexagon", "red", "large", "left")


def test_answers_are_short_exact_strings_of_their_category():
    allowed = {"colour": set(COLOURS), "shape": set(SHAPES), "position": set(SLOTS),
               "count": {str(n) for n in range(5)}, "arithmetic": {str(n) for n in range(19)}}
    questions = text_questions(1, "train", 700) + image_questions(1, "train", 300)
    assert {q.category for q in questions} == set(TEXT_CATEGORIES) | set(IMAGE_CATEGORIES)
    for q in questions:
        if q.category in allowed:
            assert q.answer in allowed[q.category], q
        elif q.category == "comparison":
            assert q.answer in {"yes", "no", "large", "small"} | set(SHAPES), q
        else:
            assert all(word in set(COLOURS) | set(SHAPES) for word in q.answer.split(", ")), q


def test_answers_are_true_of_the_scene():
    scene = Scene((Thing("star", "red", "large", "left"), Thing("star", "blue", "small", "right"),
                   Thing("circle", "red", "small", "top")))
    for q in text_questions(2, "train", 400):
        if q.scene is None:
            a, sign, b = q.question.rstrip("?.").split()[-3:]
            assert int(q.answer) == (int(a) + int(b) if sign == "+" else int(a) - int(b))
        elif q.question == "How many shapes are there?":
            assert q.answer == str(len(q.scene.things))
    stated = {f.question: f.answer for seed in range(30) for c in TEXT_CATEGORIES[:-1]
              for f in facts(scene, random.Random(seed), c)}
    assert stated["What colour is the circle?"] == "red"
    assert stated["Where is the circle?"] == "top"
    assert "Where is the star?" not in stated, "two stars: the question would be ambiguous"
    assert stated["How many red shapes are there?"] == "2"
    assert stated["Is the circle large or small?"] == "small"
    assert stated["List the colours of the shapes."] == "red, red, blue"


def test_every_description_style_names_each_thing_with_its_size_colour_shape_and_place():
    scene = Scene((Thing("star", "red", "large", "left"), Thing("circle", "blue", "small", "top")))
    wordings = {describe(scene, random.Random(seed)) for seed in range(60)}
    assert len(wordings) == 4, wordings
    for text in wordings:
        lowered = text.lower()
        assert "large red star" in lowered and "small blue circle" in lowered, text
        assert "on the left" in lowered and "at the top" in lowered, text


def test_clip_batches_hold_twins_beside_their_scenes_only_when_asked():
    from adapter.tiny.clip import batches
    from adapter.tiny.recipe import MICRO

    plain = dataclasses.replace(MICRO.clip, steps=3, batch_size=16)
    assert list(batches(plain, 0)) == [scenes(3, "train", 48)[i: i + 16] for i in (0, 16, 32)]
    twinned = list(batches(dataclasses.replace(plain, twin_share=1.0), 0))
    assert len(twinned) == 3 and all(len(batch) == 16 for batch in twinned)
    for batch in twinned:
        for scene, changed in zip(batch[::2], batch[1::2]):
            assert len(_differences(scene, changed)) in (1, 2)
    assert twinned == list(batches(dataclasses.replace(plain, twin_share=1.0), 0))
