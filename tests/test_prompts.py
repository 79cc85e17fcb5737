"""Templates must match the official Alpaca text character for character."""

import pytest

from adapter.prompts import alpaca, apply_template, chat, image_question

NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nName a colour.\n\n### Response:")
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\nCount the shapes."
              "\n\n### Input:\na red star and a blue circle\n\n### Response:")


def test_alpaca_templates_are_the_official_text():
    assert alpaca("Name a colour.") == NO_INPUT
    assert alpaca("Count the shapes.", "a red star and a blue circle") == WITH_INPUT
    assert apply_template("alpaca", "Count the shapes.", "a red star and a blue circle") == WITH_INPUT
    assert image_question("Name a colour.") == NO_INPUT == apply_template("image", "Name a colour.")


def test_chat_template_replays_earlier_turns():
    assert chat([], "Name a colour.") == NO_INPUT
    text = chat([("Hi", "Hello!"), ("Name a shape.", "A star.")], "Name a colour.")
    assert text == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                    "the request.\n\n### Instruction:\nHi\n\n### Response:\nHello!\n\n### Instruction:\nName a "
                    "shape.\n\n### Response:\nA star.\n\n### Instruction:\nName a colour.\n\n### Response:")


def test_template_errors_name_the_argument():
    with pytest.raises(ValueError, match="template"):
        apply_template("vicuna", "x")
    with pytest.raises(ValueError, match="input"):
        apply_template("chat", "x", "y")
    assert apply_template(None, "as given") == "as given"
