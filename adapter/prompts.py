"""Prompt formats: how an adapter's questions are written, the same at training and at answering.

"alpaca" is the text the official adapters were trained on (a multi-turn chat replays earlier turns as
answered instructions; the official v2 multimodal demo asks about an image with the same text). "llama3" is
Llama 3 Instruct's own chat format (header tokens, each turn ended by <|eot_id|>; "llama3.1" is Llama 3.1's and
3.3's, whose system turn is always there, dated, "llama3.2" the same with today's date) and "llama2" Llama 2 Chat's
([INST] ... [/INST], each answered turn ended by EOS and the next begun by BOS), for adapters trained on
those chat models, so that at gate 0 the base is asked as it was tuned to be; "mistral" and "mistral-v3" are
Mistral Instruct's ([INST] ... [/INST] as plain text for Mistral 7B v0.1/v0.2, as control tokens for v0.3),
written as mistral-common encodes a conversation; "v2-dialog" is the official V2 dialog demo's ("###Human:"
turns after a one-shot example). The chat formats take a system prompt, Alpaca has none. An
adapter trained with `adapter.finetune --prompt-format` records its format; the app and `generate --template
auto` use it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

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


class PromptFormat:
    """One way of writing instructions, chats and image questions, and of ending an answer."""

    name: str
    stop_strings: tuple[str, ...] = ()  # what a model trained so writes when it starts a new turn on its own
    answer_end: str | None = None  # the special token that ends an answer; None: the tokenizer's EOS

    def instruction(self, instruction: str, input: str | None = None, system: str | None = None) -> str:
        """One question (an input follows the instruction), after the system prompt if given."""
        raise NotImplementedError

    def chat(self, history: Sequence[tuple[str, str]], message: str, system: str | None = None) -> str:
        """Earlier (user, assistant) turns, then the new message, after the system prompt if given."""
        raise NotImplementedError

    def image_question(self, question: str, system: str | None = None) -> str:
        return self.instruction(question, system=system)

    def answer(self, text: str) -> str:
        """An answer as the format writes it in a training example (before the answer end)."""
        return text

    def answer_end_id(self, tokenizer: "Tokenizer") -> int:
        """The token a training answer ends with; ValueError when `tokenizer` cannot write this format."""
        if self.answer_end is None:
            return tokenizer.eos_id
        self.check(tokenizer)
        return tokenizer.encode(self.answer_end, bos=False)[0]

    def check(self, tokenizer: "Tokenizer") -> None:
        """A ValueError naming the tokenizer file unless it holds this format's special tokens, each as one
        id, and generation with it stops at the answer end."""

    def check_system(self, system: str | None) -> None:
        """A ValueError when `system` is given and this format has no place for a system prompt."""


class AlpacaFormat(PromptFormat):
    name = "alpaca"
    stop_strings = STOP_STRINGS

    def instruction(self, instruction: str, input: str | None = None, system: str | None = None) -> str:
        self.check_system(system)
        return alpaca(instruction, input)

    def chat(self, history: Sequence[tuple[str, str]], message: str, system: str | None = None) -> str:
        self.check_system(system)
        return chat(history, message)

    def check_system(self, system: str | None) -> None:
        if system:
            raise ValueError("system: the alpaca prompt format has no system prompt (its header is fixed); a system "
                             f"prompt needs a chat format ({', '.join(chat_formats())})")


LLAMA3_HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"
LLAMA3_TURN_END = "<|eot_id|>"
# what Llama 3.1+ Instruct's chat template opens every system turn with: 3.1's and 3.3's date is fixed, 3.2's is
# the day it renders on (`strftime_now("%d %b %Y")`)
LLAMA31_SYSTEM_DATES = "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
LLAMA31_DATE = "26 Jul 2024"


class Llama3Format(PromptFormat):
    """Llama 3 Instruct's chat format, as its own chat template writes it: each message stripped of surrounding
    whitespace; Llama 3.0's has a system turn only when a system prompt is given, Llama 3.1+'s ("llama3.1",
    "llama3.2") always has one, opened by the knowledge cutoff and a date (3.2's: the day it is written). An
    Alpaca input follows the instruction after a blank line."""

    answer_end = LLAMA3_TURN_END

    def __init__(self, name: str, dated_system: bool, today: bool = False) -> None:
        self.name = name
        self.dated_system = dated_system
        self.today = today  # Llama 3.2's template dates the system turn with the day it is written on

    def date(self) -> str:
        return time.strftime("%d %b %Y") if self.today else LLAMA31_DATE

    def instruction(self, instruction: str, input: str | None = None, system: str | None = None) -> str:
        return self.chat((), f"{instruction}\n\n{input}" if input else instruction, system)

    def chat(self, history: Sequence[tuple[str, str]], message: str, system: str | None = None) -> str:
        if self.dated_system:
            turns = (LLAMA3_HEADER.format(role="system") + LLAMA31_SYSTEM_DATES.format(date=self.date())
                     + (system or "").strip() + LLAMA3_TURN_END)
        else:
            turns = _llama3_turn("system", system) if system else ""
        turns += "".join(_llama3_turn("user", user) + _llama3_turn("assistant", answer) for user, answer in history)
        return f"{turns}{_llama3_turn('user', message)}{LLAMA3_HEADER.format(role='assistant')}"

    def answer(self, text: str) -> str:
        return text.strip()

    def check(self, tokenizer: "Tokenizer") -> None:
        for token in ("<|start_header_id|>", "<|end_header_id|>", LLAMA3_TURN_END):
            ids = tokenizer.encode(token, bos=False)
            if len(ids) != 1:
                raise ValueError(f"prompt format {self.name}: tokenizer {tokenizer.path} has no {token} token (it "
                                 f"becomes {len(ids)} ids); the format needs a Llama 3 tokenizer")
        if ids[0] not in tokenizer.stop_ids:
            raise ValueError(f"prompt format {self.name}: tokenizer {tokenizer.path} does not stop at "
                             f"{LLAMA3_TURN_END}")


def _llama3_turn(role: str, content: str) -> str:
    return f"{LLAMA3_HEADER.format(role=role)}{content.strip()}{LLAMA3_TURN_END}"


class Llama2Format(PromptFormat):
    """Llama 2 Chat's format, token for token as Meta's chat code writes it: each earlier turn
    `[INST] {user} [/INST] {answer} ` between BOS and EOS, then `[INST] {message} [/INST]` after a BOS; a system
    prompt goes into the first user turn between `<<SYS>>` and `<</SYS>>`. The BOS/EOS between turns are
    written "<s>"/"</s>", which the SentencePiece tokenizer reads as those ids."""

    name = "llama2"

    def instruction(self, instruction: str, input: str | None = None, system: str | None = None) -> str:
        return self.chat((), f"{instruction}\n\n{input}" if input else instruction, system)

    def chat(self, history: Sequence[tuple[str, str]], message: str, system: str | None = None) -> str:
        users = [user for user, _ in history] + [message]
        if system:
            users[0] = f"<<SYS>>\n{system}\n<</SYS>>\n\n{users[0]}"
        turns = "".join(f"[INST] {user.strip()} [/INST]{self.answer(answer)}</s><s>"
                        for user, (_, answer) in zip(users, history))
        return f"{turns}[INST] {users[-1].strip()} [/INST]"

    def answer(self, text: str) -> str:
        return f" {text.strip()} "

    def check(self, tokenizer: "Tokenizer") -> None:
        ids = tokenizer.encode("</s><s>", bos=False)
        if ids != [tokenizer.eos_id, tokenizer.bos_id] or tokenizer.bos_id < 0:
            raise ValueError(f"prompt format llama2: tokenizer {tokenizer.path} does not read '</s><s>' as its EOS "
                             f"and BOS ids (it becomes {len(ids)} ids); the format needs LLaMA 1/2's SentencePiece "
                             "tokenizer")


class MistralFormat(PromptFormat):
    """Mistral Instruct's format, token for token as mistral-common encodes a conversation: BOS, then each user
    message between [INST] and [/INST], each answer after it followed by EOS, no BOS between turns. Tokenizer V1
    (Mistral 7B Instruct v0.1/v0.2, Mixtral 8x7B) has no tokens for [INST]/[/INST]: they are text, spaced
    `[INST] {message} [/INST] {answer}`, and a system prompt opens the first user message. V3 (Mistral 7B
    Instruct v0.3) has control tokens for both, read from the text as they are written: `[INST]{message}[/INST]`
    (SentencePiece puts its word-start space before each message and answer), and a system prompt opens the last
    user message. Either way the system prompt is followed by a blank line. Messages and the system prompt are
    written as given, not stripped (tested against mistral-common itself)."""

    def __init__(self, name: str, control_tokens: bool) -> None:
        self.name = name
        self.control_tokens = control_tokens

    def instruction(self, instruction: str, input: str | None = None, system: str | None = None) -> str:
        return self.chat((), f"{instruction}\n\n{input}" if input else instruction, system)

    def chat(self, history: Sequence[tuple[str, str]], message: str, system: str | None = None) -> str:
        users = [user for user, _ in history] + [message]  # as given: mistral-common strips none of them
        if system:
            opened = -1 if self.control_tokens else 0
            users[opened] = f"{system}\n\n{users[opened]}"
        turns = "".join(f"{self._user(user)}{self.answer(answer)}</s>" for user, (_, answer) in zip(users, history))
        return turns + self._user(users[-1])

    def _user(self, message: str) -> str:
        return f"[INST]{message}[/INST]" if self.control_tokens else f"[INST] {message} [/INST]"

    def answer(self, text: str) -> str:
        # as mistral-common encodes an answer: as given with V1, its trailing spaces dropped with V3
        return text.rstrip(" ") if self.control_tokens else f" {text}"

    def check(self, tokenizer: "Tokenizer") -> None:
        eos = tokenizer.encode("</s>", bos=False)
        if eos != [tokenizer.eos_id]:
            raise ValueError(f"prompt format {self.name}: tokenizer {tokenizer.path} does not read '</s>' as its EOS "
                             "id; the format needs Mistral's SentencePiece tokenizer")
        tokens = [len(tokenizer.encode(mark, bos=False)) == 1 for mark in ("[INST]", "[/INST]")]
        if self.control_tokens and not all(tokens):
            raise ValueError(f"prompt format {self.name}: tokenizer {tokenizer.path} has no [INST] and [/INST] "
                             "tokens (Mistral's tokenizer V3, as in Mistral 7B v0.3); without them use 'mistral'")
        if not self.control_tokens and any(tokens):
            raise ValueError(f"prompt format {self.name}: tokenizer {tokenizer.path} has [INST] and [/INST] tokens "
                             "(Mistral's tokenizer V3, as in Mistral 7B v0.3): use 'mistral-v3'")


DIALOG_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
DIALOG_SEPARATOR = "###"
# the one-shot exchange the official V2 dialog demo's default conversation ("v1", FastChat's conv_v1_2) opens with
DIALOG_EXAMPLE = (
    "What are the key differences between renewable and non-renewable energy sources?",
    "Renewable energy sources are those that can be replenished naturally in a relatively short amount of time, "
    "such as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the other hand, are "
    "finite and will eventually be depleted, such as coal, oil, and natural gas. Here are some key differences "
    "between renewable and non-renewable energy sources:\n"
    "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable energy sources "
    "are finite and will eventually run out.\n"
    "2. Environmental impact: Renewable energy sources have a much lower environmental impact than non-renewable "
    "sources, which can lead to air and water pollution, greenhouse gas emissions, and other negative effects.\n"
    "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically have lower "
    "operational costs than non-renewable sources.\n"
    "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote locations "
    "than non-renewable sources.\n"
    "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different situations "
    "and needs, while non-renewable sources are more rigid and inflexible.\n"
    "6. Sustainability: Renewable energy sources are more sustainable over the long term, while non-renewable "
    "sources are not, and their depletion can lead to economic and social instability.\n")


class DialogFormat(PromptFormat):
    """The official V2 dialog demo's conversation (llama_adapter_v2_chat65b's default, FastChat's "v1"): the
    system text and `###`, its one-shot example exchange, then each turn `Human: {message}###Assistant:
    {answer}###`, the open one ending `Assistant:`. A model asked so starts its next turn with `###`, where
    generation stops. A system prompt replaces the default system text."""

    name = "v2-dialog"
    stop_strings = (DIALOG_SEPARATOR,)

    def instruction(self, instruction: str, input: str | None = None, system: str | None = None) -> str:
        return self.chat((), f"{instruction}\n\n{input}" if input else instruction, system)

    def chat(self, history: Sequence[tuple[str, str]], message: str, system: str | None = None) -> str:
        turns = [DIALOG_EXAMPLE, *((user.strip(), answer.strip()) for user, answer in history)]  # the example as is
        text = (system.strip() if system else DIALOG_SYSTEM) + DIALOG_SEPARATOR
        for user, answer in turns:
            text += f"Human: {user}{DIALOG_SEPARATOR}Assistant: {answer}{DIALOG_SEPARATOR}"
        return f"{text}Human: {message.strip()}{DIALOG_SEPARATOR}Assistant:"

    def answer(self, text: str) -> str:
        return f" {text.strip()}"


PROMPT_FORMATS: dict[str, PromptFormat] = {f.name: f for f in (
    AlpacaFormat(), Llama2Format(), Llama3Format("llama3", dated_system=False),
    Llama3Format("llama3.1", dated_system=True), Llama3Format("llama3.2", dated_system=True, today=True),
    MistralFormat("mistral", control_tokens=False),
    MistralFormat("mistral-v3", control_tokens=True), DialogFormat())}
# generate's templates: "none" feeds the prompt as given, "auto" is the model's own prompt format, "chat" and
# "image" are the Alpaca forms the app uses (for one question, the same text as "alpaca")
TEMPLATES = ("auto", "none", *PROMPT_FORMATS, "chat", "image")


def chat_formats() -> list[str]:
    """The formats with a place for a system prompt: all but Alpaca."""
    return [name for name in PROMPT_FORMATS if name != AlpacaFormat.name]


def format_named(name: str, source: str = "prompt_format") -> PromptFormat:
    """The format called `name`; a ValueError naming `source` (a flag, a file) for an unknown one."""
    if not isinstance(name, str) or name not in PROMPT_FORMATS:  # (a list: "unhashable type")
        raise ValueError(f"{source}: unknown prompt format {name!r}; choose from {tuple(PROMPT_FORMATS)}")
    return PROMPT_FORMATS[name]


def apply_template(template: str | None, prompt: str, input: str | None = None, model_format: str = "alpaca",
                   system: str | None = None) -> str:
    """Format `prompt` with a named template ("auto": `model_format`), after `system` when given (chat formats
    only); "none" (or None) feeds it as given."""
    if template in (None, "none"):
        if input:
            raise ValueError("input: 'none' takes no input (the prompt is fed as given)")
        if system:
            raise ValueError("system: 'none' takes no system prompt (the prompt is fed as given)")
        return prompt
    if input and template in ("chat", "image"):
        raise ValueError(f"input: the '{template}' template takes no input")
    return template_format(template, model_format).instruction(prompt, input, system)


def template_format(template: str | None, model_format: str = "alpaca") -> PromptFormat | None:
    """The prompt format a template writes with (None for "none"), for its text and its stop strings."""
    if template in (None, "none"):
        return None
    if template == "auto":
        return format_named(model_format)
    if template in ("chat", "image"):
        return PROMPT_FORMATS["alpaca"]
    if not isinstance(template, str) or template not in PROMPT_FORMATS:  # (a dict or list: "unhashable type")
        raise ValueError(f"template: unknown template {template!r}; choose from {TEMPLATES}")
    return PROMPT_FORMATS[template]


CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 4.5x+ saves a chat template of its own
# what tells each format's chat template from the others' (marks it has, marks it has not), and the formats it may
# be written in (Mistral's [INST] template has no <<SYS>> block, and no [SYSTEM_PROMPT] turn as Mistral Small 3's
# and later ones have, which no format here writes; which of its formats, the tokenizer says)
LLAMA31_MARKS = ("<|start_header_id|>", "<|eot_id|>", "Cutting Knowledge Date")
TEMPLATE_MARKS = (((*LLAMA31_MARKS, "strftime_now"), (), ("llama3.2",)),
                  (LLAMA31_MARKS, (), ("llama3.1",)),
                  (("<|start_header_id|>", "<|eot_id|>"), (), ("llama3",)),
                  (("[INST]", "<<SYS>>"), (), ("llama2",)),
                  (("[INST]",), ("[SYSTEM_PROMPT]",), ("mistral", "mistral-v3")))


def chat_template_formats(folder: str | os.PathLike) -> tuple[str, ...]:
    """The prompt formats a base folder's own chat template may be written in ("llama3.2"; "llama3.1"; "llama3";
    "llama2"; "mistral" or "mistral-v3"), which is how its chat model answers best without an adapter: HF folders
    of Llama 3 Instruct, Llama 2 Chat and Mistral Instruct ship one (`chat_template.jinja`, or
    `tokenizer_config.json`'s "chat_template", a text or a list of named ones). Empty when the folder has none,
    or one written in no format here."""
    template = _chat_template(Path(folder))
    if template is None:
        return ()
    return next((names for marks, unlike, names in TEMPLATE_MARKS
                 if all(mark in template for mark in marks) and not any(mark in template for mark in unlike)), ())


def base_prompt_format(folder: str | os.PathLike, tokenizer: "Tokenizer") -> str | None:
    """The format a bare base is asked in: the first of its chat template's (`chat_template_formats`) that
    `tokenizer` can write, else None (Alpaca)."""
    for name in chat_template_formats(folder):
        try:
            format_named(name).check(tokenizer)
        except ValueError:
            continue
        return name
    return None


def chat_template_source(tokenizer_path: Path) -> Path:
    """Where a base keeps its chat template: beside its tokenizer, or in a GGUF file's metadata (the file itself)."""
    from .formats.gguf import is_gguf_file

    return tokenizer_path if is_gguf_file(tokenizer_path) else tokenizer_path.parent


def _chat_template(folder: Path) -> str | None:
    """The chat template of a base folder, or of a GGUF file (`chat_template_source`)."""
    from .formats.gguf import is_gguf_file, open_gguf
    from .formats.meta import read_json

    if is_gguf_file(folder):
        template = open_gguf(folder).value("tokenizer.chat_template")
        return template if isinstance(template, str) else None

    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8", errors="replace")
    settings = folder / "tokenizer_config.json"
    template = read_json(settings).get("chat_template") if settings.is_file() else None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
