"""Prompt templates: the Alpaca text the official adapters were trained on, a multi-turn chat built from
the same turns, and the image-question form of the official multimodal demo."""

from __future__ import annotations

from collections.abc import Sequence

ALPACA_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
INSTRUCTION = "### Instruction:\n"
INPUT = "### Input:\n"
RESPONSE = "### Response:"
# what an Alpaca-trained model writes when it starts a new turn on its own
STOP_STRINGS = ("### Instruction:", "### Input:", "### Response:")
TEMPLATES = ("none", "alpaca", "chat", "image")


def alpaca(instruction: str, input: str | None = None) -> str:
    """The official Alpaca prompt, with or without an input."""
    if input:
        return f"{ALPACA_HEADER_WITH_INPUT}{INSTRUCTION}{instruction}\n\n{INPUT}{input}\n\n{RESPONSE}"
    return f"{ALPACA_HEADER}{INSTRUCTION}{instruction}\n\n{RESPONSE}"


def chat(history: Sequence[tuple[str, str]], message: str) -> str:
    """Earlier (user, assistant) turns as answered Alpaca instructions, then the new message."""
    turns = "".join(f"{INSTRUCTION}{user}\n\n{RESPONSE}\n{answer}\n\n" for user, answer in history)
    return f"{ALPACA_HEADER}{turns}{INSTRUCTION}{message}\n\n{RESPONSE}"


def image_question(question: str) -> str:
    """The official v2 multimodal demo asks about an image with the plain Alpaca prompt."""
    return alpaca(question)


def apply_template(template: str | None, prompt: str, input: str | None = None) -> str:
    """Format `prompt` with a named template; "none" (or None) feeds it as given."""
    if template in (None, "none"):
        if input:
            raise ValueError("input: only the 'alpaca' template takes an input")
        return prompt
    if template == "alpaca":
        return alpaca(prompt, input)
    if input:
        raise ValueError(f"input: the '{template}' template takes no input")
    if template == "chat":
        return chat((), prompt)
    if template == "image":
        return image_question(prompt)
    raise ValueError(f"template: unknown template {template!r}; choose from {TEMPLATES}")
