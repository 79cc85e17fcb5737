"""`python app.py` with no flags: the embedded tiny model, through gradio_client. The adapter answers in a word
where the frozen base (gate 0) writes on; compare and the gate sweeps show it. Skipped until assets/tiny is
built."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import adapter
from adapter.app_config import TINY_FOLDER, tiny_available
from adapter.engine import Engine, Settings
from adapter.prompts import STOP_STRINGS
from tests.app_helpers import GREEDY, controls, running_app

pytestmark = [pytest.mark.skipif(not tiny_available(), reason="assets/tiny not built yet"),
              pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword)")]

QUESTION = "What is 3 + 4?"


@pytest.fixture(scope="module")
def served():
    with running_app([]) as app:
        assert app.engine.base == str(TINY_FOLDER / "base")
        yield app


@pytest.fixture(scope="module")
def client(served):
    return Client(served.url, verbose=False)


def test_the_default_app_serves_the_tiny_model_and_compare_and_sweep_show_the_gate(client):
    base, adapted = client.predict(QUESTION, *controls(gate=1.0), api_name="/compare")
    tiny_base = adapter.load(TINY_FOLDER / "base", device="cpu")
    expected = tiny_base.generate(adapter.alpaca(QUESTION), temperature=0.0, max_new_tokens=GREEDY["max_new_tokens"],
                                  stop=STOP_STRINGS)
    assert base == expected, "the left answer is the frozen base's"
    assert adapted != base
    assert len(adapted.split()) <= 2 < len(base.split()), (adapted, base)
    sweep = client.predict(QUESTION, "0, 0.5, 1", *controls(gate=0.5), api_name="/sweep")
    assert sweep["data"][0] == [0.0, base] and sweep["data"][2] == [1.0, adapted], sweep
    assert sweep["data"][1][0] == 0.5


def test_the_default_app_serves_both_tiny_adapters_on_one_base(served, client):
    assert served.engines.names == ["tiny-text", "tiny-image"] and served.engines.for_images == "tiny-image"
    text, image = (served.engines.get(name).model for name in served.engines.names)
    assert image.tok_embeddings is text.tok_embeddings and image.image_encoder is not None
    example = json.loads((TINY_FOLDER / "examples" / "examples.json").read_text())["image"][3]
    picture = str(TINY_FOLDER / "examples" / example["image"])
    assert client.predict(handle_file(picture), example["question"], *controls(), api_name="/image") == \
        example["answer"], "the image tab answers with the image adapter unless told otherwise"
    question = "There is a large red star on the left. What colour is the star?"
    answers = {name: client.predict(question, *controls(), name, api_name="/compare")[1]
               for name in served.engines.names}
    assert answers == {name: list(served.engines.get(name).compare(question, Settings(**GREEDY)))[-1][1]
                       for name in served.engines.names}
    assert answers["tiny-text"] == "red" != answers["tiny-image"], answers
    every = client.predict(question, *controls(), api_name="/every_adapter")  # the Compare tab's "every adapter"
    assert every["headers"] == ["adapter", "answer"] and every["data"] == [[name, answer] for name, answer in
                                                                           answers.items()], "each its own answer"
    at_zero = client.predict(question, *controls(gate=0.0, delta=0.0), api_name="/every_adapter")["data"]
    assert at_zero[0][1] == at_zero[1][1] != "red", "at gate and delta scale 0 every adapter is the frozen base"
    refused = client.predict(question, *controls(), "tiny-text", "Answer in one word.", "all",
                             api_name="/every_adapter")["data"]
    with pytest.raises(ValueError, match="^system: the alpaca prompt format has no system prompt") as why:
        list(served.engines.get("tiny-text").sweep(question, [1.0], Settings(**GREEDY, system="Answer in one word.")))
    assert refused == [[name, f"(not asked: {why.value})"] for name in served.engines.names], refused
    with pytest.raises(AppError, match="^question: is empty; type a question first$"):
        client.predict(" ", *controls(), api_name="/every_adapter")
    assert client.predict("tiny-image", api_name="/model_info")["adapter"] == str(TINY_FOLDER / "image")
    heatmaps = [client.predict(1.0, name, api_name="/gates") for name in served.engines.names]
    assert heatmaps[0] and heatmaps[0] != heatmaps[1], "the Gates tab shows the chosen adapter's gates"


def test_the_next_token_panels_show_what_each_gate_makes_likely(served, client):
    question = "There is a large red star on the left. What colour is the star?"
    table, plot = client.predict(question, "0, 1", *controls(), api_name="/next_tokens")
    expected = served.engines.get("tiny-text").next_tokens(question, "0, 1", Settings(**GREEDY))
    assert table["headers"] == ["token", "gate 0", "gate 1"] and table["data"] == expected.rows()
    token, at_base, at_one = table["data"][0]
    assert token == '" red"' and at_base < 1 and at_one > 90, table["data"][0]
    assert plot["type"] == "matplotlib" and plot["plot"]
    example = json.loads((TINY_FOLDER / "examples" / "examples.json").read_text())["image"][3]
    picture = str(TINY_FOLDER / "examples" / example["image"])
    table, _ = client.predict(handle_file(picture), example["question"], "0, 1", *controls(),
                              api_name="/image_next_tokens")
    expected = served.engines.get("tiny-image").next_tokens_image(Image.open(picture), example["question"], "0, 1",
                                                                  Settings(**GREEDY))
    assert table["data"] == expected.rows(), "the image tab asks its own adapter about the picture"


def test_the_layer_sweep_shows_the_tiny_text_adapter_needs_more_than_its_top_layer(client):
    question = "There is a small red circle in the centre. What colour is the circle?"
    base, adapted = client.predict(question, *controls(), api_name="/compare")
    sweep = client.predict(question, *controls(), api_name="/layer_sweep")
    assert sweep["data"][0] == ["top 0: none", base] and sweep["data"][-1] == ["top 4: 0-3", adapted]
    assert adapted == "red" and sweep["data"][1][0] == "top 1: 3" and sweep["data"][1][1] != "red", sweep["data"]


def test_the_tiny_models_own_held_out_examples_are_offered_and_only_for_it(tmp_path):
    from adapter.app_config import ServeConfig
    from adapter.app_examples import examples
    from adapter.tiny.questions import image_questions, text_questions

    pictures, messages = examples(ServeConfig())
    assert [question for _, question in pictures] == [q.question for q in image_questions(100, "held-out", 6)]
    assert all((TINY_FOLDER / "examples").joinpath(path.rsplit("/", 1)[-1]).is_file() for path, _ in pictures)
    assert messages == [q.instruction for q in text_questions(100, "held-out", 6)]
    other = examples(ServeConfig(base=str(tmp_path)))
    assert other[1] == [] and all(question == "What is in the picture?" for _, question in other[0])


def test_the_score_tab_scores_held_out_records_at_each_gate(served, client, tmp_path):
    from adapter.app_config import ServeConfig
    from adapter.app_examples import TINY_HELD_OUT_PER_CATEGORY, tiny_held_out
    from adapter.evaluate import evaluate
    from adapter.tiny.evaluate import held_out
    from adapter.tiny.records import alpaca_record, write_text_records

    offered = tiny_held_out(ServeConfig())[0]
    assert [json.loads(line) for line in offered.read_text().splitlines()] == \
        [alpaca_record(q) for q in held_out("text", 0, TINY_HELD_OUT_PER_CATEGORY)]
    assert tiny_held_out(ServeConfig(base=str(tmp_path))) is None
    data = write_text_records(held_out("text", 0, 2), tmp_path / "held_out.jsonl")
    table, plot = client.predict(handle_file(str(data)), "0, 1", True, *controls(), api_name="/score")
    result = evaluate(served.engines.get("tiny-text").model, data, gate_scales=[0.0, 1.0], exact=True)
    assert table["headers"] == ["gate scale", "loss", "perplexity", "token accuracy %", "exact answers"]
    assert table["data"] == [[s.gate_scale, round(s.loss, 4), round(s.perplexity, 3), round(100 * s.token_accuracy, 1),
                              f"{s.exact} / {result.examples}"] for s in result.scores]
    assert result.scores[1].exact > result.scores[0].exact == 0
    assert plot["type"] == "matplotlib" and plot["plot"]


def test_the_score_tab_scores_multiple_choice_questions_by_their_likeliest_choice(served, client):
    from adapter.app_config import ServeConfig
    from adapter.app_examples import tiny_held_out
    from adapter.app_handlers import CHOICE_HEADERS
    from adapter.choices import evaluate_choices, holds_choices

    records, data, _ = tiny_held_out(ServeConfig())
    assert holds_choices(data) and not holds_choices(records)
    table, plot = client.predict(handle_file(str(data)), "0, 1", False, *controls(), api_name="/score")
    result = evaluate_choices(served.engines.get("tiny-text").model, data, gate_scales=[0.0, 1.0])
    assert table["headers"] == CHOICE_HEADERS
    assert table["data"] == [[s.gate_scale, round(100 * s.accuracy, 1), round(100 * s.accuracy_per_byte, 1),
                              round(100 * s.right_probability, 1)] for s in result.scores]
    assert result.scores[1].accuracy > result.scores[0].accuracy + 0.2
    assert plot["type"] == "matplotlib" and plot["plot"]


def test_the_score_tab_scores_plain_text_by_its_perplexity(served, client, tmp_path):
    from adapter.app_config import ServeConfig
    from adapter.app_examples import tiny_held_out
    from adapter.app_handlers import TEXT_HEADERS
    from adapter.evaluate import evaluate_text
    from adapter.finetune.records import holds_text

    records, choices, text = tiny_held_out(ServeConfig())
    assert holds_text(text) and not holds_text(records) and not holds_text(choices)
    model = served.engines.get("tiny-text").model
    table, plot = client.predict(handle_file(str(text)), "0, 1", False, *controls(), api_name="/score")
    result = evaluate_text(model, text, gate_scales=[0.0, 1.0])
    assert table["headers"] == TEXT_HEADERS
    assert table["data"] == [[s.gate_scale, round(s.loss, 4), round(s.perplexity, 3), round(100 * s.token_accuracy, 1),
                              round(result.bits_per_byte(s), 4)] for s in result.scores]
    assert result.scores[1].perplexity > 3 * result.scores[0].perplexity, "the base reads its own text best"
    assert plot["type"] == "matplotlib" and plot["plot"]

    (tmp_path / "long.txt").write_text("There is a small red circle in the centre. " * 5000)  # past the cap
    table, _ = client.predict(handle_file(str(tmp_path / "long.txt")), "1", False, *controls(), api_name="/score")
    capped = evaluate_text(model, tmp_path / "long.txt", gate_scales=[1.0], max_tokens=20_000)
    assert capped.tokens == 20_000
    assert table["data"] == [[1.0, round(capped.scores[0].loss, 4), round(capped.scores[0].perplexity, 3),
                              round(100 * capped.scores[0].token_accuracy, 1),
                              round(capped.bits_per_byte(capped.scores[0]), 4)]]


def test_the_score_tab_scores_image_records_with_their_uploaded_pictures(served, client, tmp_path):
    from adapter.app_config import ServeConfig
    from adapter.app_examples import TINY_HELD_OUT_IMAGES, tiny_held_out_images
    from adapter.evaluate import evaluate
    from adapter.tiny.evaluate import held_out
    from adapter.tiny.records import write_image_records

    records, pictures = tiny_held_out_images(ServeConfig())
    expected = write_image_records(held_out("image", 0, TINY_HELD_OUT_IMAGES), tmp_path / "r.jsonl", tmp_path / "p")
    assert records.read_text() == expected.read_text() and len(pictures) == 4 * TINY_HELD_OUT_IMAGES
    assert [Image.open(p).tobytes() for p in pictures] == [Image.open(p).tobytes()
                                                           for p in sorted((tmp_path / "p").glob("*.png"))]
    assert tiny_held_out_images(ServeConfig(base=str(tmp_path))) is None
    table, _ = client.predict(handle_file(str(records)), "0, 1", True, *controls(), "tiny-image", None,
                              [handle_file(p) for p in pictures], api_name="/score")
    result = evaluate(served.engines.get("tiny-image").model, records, image_folder=records.parent,
                      gate_scales=[0.0, 1.0], exact=True)
    assert table["data"] == [[s.gate_scale, round(s.loss, 4), round(s.perplexity, 3), round(100 * s.token_accuracy, 1),
                              f"{s.exact} / {result.examples}"] for s in result.scores]
    assert result.scores[1].exact > result.scores[0].exact, "the picture speaks through the gate"
    with pytest.raises(AppError, match=r"000000.png does not exist"):  # the records without their pictures
        client.predict(handle_file(str(records)), "0, 1", False, *controls(), "tiny-image", api_name="/score")
    twin = tmp_path / "twin" / "000000.png"
    twin.parent.mkdir()
    twin.write_bytes(Path(pictures[0]).read_bytes())
    with pytest.raises(ValueError, match="images: two uploads are named 000000.png; rename one"):
        served.engines.get("tiny-image").score(records, "0, 1", Settings(**GREEDY), images=[pictures[0], twin])


def test_an_image_sweep_gives_each_row_the_picture_at_its_own_gate():
    engine = Engine(adapter.load("tiny", adapter="tiny-image", device="cpu"))
    example = json.loads((TINY_FOLDER / "examples" / "examples.json").read_text())["image"][3]
    picture, greedy = Image.open(TINY_FOLDER / "examples" / example["image"]), dict(temperature=0.0, max_new_tokens=16)
    swept = list(engine.sweep_image(picture, example["question"], "0, 1", Settings(**greedy)))[-1]
    alone = [list(engine.ask_image(picture, example["question"], Settings(gate_scale=gate, **greedy)))[-1]
             for gate in (0.0, 1.0)]
    assert swept == alone and alone[1] == example["answer"] != alone[0], (example, alone)
    with pytest.raises(ValueError, match="image: upload an image first"):
        engine.sweep_image(None, example["question"], "0, 1", Settings(**greedy))


@pytest.mark.parametrize("ask", ["ask_image", "sweep_image", "next_tokens_image"])
def test_an_image_question_to_an_adapter_that_cannot_see_says_so(served, ask):
    from adapter.app_handlers import Handlers

    handlers = Handlers(served.engines)
    scales = () if ask == "ask_image" else ("0, 1",)
    blind = "This adapter cannot see images: the answer comes from the question alone."
    for name, warned in (("tiny-text", True), ("tiny-image", False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = getattr(handlers, ask)(None, Image.new("RGB", (8, 8)), "What colour is it?", *scales, *controls(),
                                            name, None, "all", [])  # no system prompt, every layer, no turns yet
            if ask != "next_tokens_image":
                list(result)  # the streamed ones check and warn as they start
        assert (blind in [str(w.message) for w in caught]) == warned, name


def test_an_image_follow_up_through_the_api_carries_the_conversation(served, client):
    example = json.loads((TINY_FOLDER / "examples" / "examples.json").read_text())["image"][3]
    picture = str(TINY_FOLDER / "examples" / example["image"])
    first = client.predict(handle_file(picture), example["question"], *controls(), api_name="/image")
    follow_up, turns = "What shape is it?", [(example["question"], first)]
    conversation = [{"role": role, "content": [{"type": "text", "text": text}]}  # Chatbot messages, as /chat's
                    for role, text in zip(("user", "assistant"), turns[0])]
    answer = client.predict(handle_file(picture), follow_up, *controls(), "tiny-image", "", "all", conversation,
                            api_name="/image")
    engine = served.engines.get("tiny-image")
    assert answer == list(engine.ask_image(picture, follow_up, Settings(**GREEDY), turns))[-1]
    assert answer != list(engine.ask_image(picture, follow_up, Settings(**GREEDY)))[-1], "the turn before counts"


def test_the_train_tab_trains_an_adapter_that_answers_held_out_questions_in_one_epoch(served, client, tmp_path):
    """Last in this module: it adds trained-1 to the served adapters."""
    from adapter.app_config import ServeConfig
    from adapter.app_examples import TINY_TRAINING_RECORDS, tiny_training_records
    from adapter.tiny.evaluate import held_out
    from adapter.tiny.questions import text_questions
    from adapter.tiny.records import alpaca_record, write_text_records

    offered = tiny_training_records(ServeConfig())
    assert [json.loads(line) for line in offered.read_text().splitlines()] == \
        [alpaca_record(q) for q in text_questions(0, "train", TINY_TRAINING_RECORDS)]
    assert tiny_training_records(ServeConfig(base=str(tmp_path))) is None
    status = client.predict(handle_file(str(offered)), "v1", 1, 16, 0.02, 20, 4, 8, "alpaca", 0,
                            api_name="/train")[0]  # the tab's starting settings: the tiny text adapter's recipe
    assert status.startswith("**Trained** (step 119 / 119 · ") and "served as **trained-1**" in status, status
    data = write_text_records(held_out("text", 0, 2), tmp_path / "held_out.jsonl")
    table, _ = client.predict(handle_file(str(data)), "0, 1", True, *controls(), "trained-1", api_name="/score")
    (zero, loss_zero, *_, exact_zero), (one, loss_one, *_, exact_one) = table["data"]
    assert loss_one < 1.0 < 5.0 < loss_zero, table["data"]
    assert exact_zero == "0 / 14" and int(exact_one.split()[0]) >= 4, table["data"]
