"""Answers to a file of questions, each at every gate scale, decoded in batches and written as JSONL.

`python -m adapter.generate --base B [--adapter A ...] --prompts-file questions.jsonl --out answers.jsonl`.
The file is a JSON list or JSONL of questions: a string (the instruction), an object with "instruction" and
optionally "input", "system" and "image" (a file under --image-folder), or a LLaVA record (its last human turn
asked after the turns before it, as fine-tuning writes them; a last gpt turn is taken as the reference); any
other key (an id, a reference answer) is copied to the output. Every question is checked before anything is
decoded, all bad ones listed together. The output has one line per question, adapter and gate scale: the
question's object with "adapter", "gate_scale" and "answer" added, written atomically once all are answered.
Meanwhile each batch's answers are kept in OUT.partial (`PartialAnswers`), so that a run stopped midway (Ctrl-C, a
crash, the device out of memory) and started again with the same settings answers only what is left.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .finetune.records import (
    ChatLayout,
    DataError,
    chat_layout,
    image_field,
    kind,
    read_checked,
    read_conversation,
    string_field,
)
from .formats.common import atomic_write, write_text_atomically, writing
from .gate_layers import Speaker, gate_scale_rows
from .generate import GenerationRequest, fitting_batches, generate_batch, prompt_writer, require_tokenizer
from .prompts import PromptFormat, apply_template

if TYPE_CHECKING:
    from .model import Transformer

ADDED = ("adapter", "gate_scale", "gate_layers", "answer")  # the keys an output line adds to its question


@dataclass(frozen=True)
class Question:
    """One question as read: where it is in the file, its record (a string becomes {"instruction": ...}), and
    its parts."""

    location: str
    record: dict[str, Any]
    instruction: str
    input: str | None = None
    system: str | None = None
    image: Path | None = None
    history: tuple[tuple[str, str], ...] | None = None  # a conversation's earlier turns (() for its first question)


def read_questions(path: str | os.PathLike, image_folder: str | os.PathLike | None = None,
                   flag: str = "--prompts-file") -> list[Question]:
    """Every question of a JSON list or JSONL file; a DataError listing every bad one (file and line or index)."""
    return read_checked(path, image_folder, flag, _question, noun="question", outcome="none answered")


def _question(location: str, value: Any, folder: Path | None, reasons: list[str]) -> Question | None:
    record = {"instruction": value} if isinstance(value, str) else value
    if not isinstance(record, dict):
        reasons.append(f"expected a string or a JSON object, got {kind(value)}")
        return None
    layout = chat_layout(record, reasons)
    if layout is not None:
        return _conversation_question(location, record, folder, reasons, layout)
    instruction = string_field(record, "instruction", reasons)
    if instruction is not None and not instruction.strip():
        reasons.append("empty 'instruction'")
    optional = {}
    for key in ("input", "system"):
        optional[key] = record.get(key)
        if optional[key] is not None and not isinstance(optional[key], str):
            reasons.append(f"'{key}' must be a string, got {kind(optional[key])}")
    image = image_field(record, folder, reasons)
    _check_added_keys(record, reasons)
    if reasons:
        return None
    return Question(location, record, instruction, optional["input"], optional["system"], image)


def _check_added_keys(record: dict, reasons: list[str]) -> None:
    taken = [key for key in ADDED if key in record]
    if taken:
        reasons.append(f"{', '.join(map(repr, taken))}: the output adds this key; rename it in the question")


def _conversation_question(location: str, record: dict, folder: Path | None, reasons: list[str],
                           layout: ChatLayout) -> Question | None:
    """A conversation record (LLaVA's `conversations` or chat `messages`): its last question turn is the question,
    the turns before it the history; a last answer turn is the reference answer, kept in the record."""
    turns = record[layout.key]
    asked = (isinstance(turns, list) and turns and isinstance(turns[-1], dict)
             and turns[-1].get(layout.role) == layout.asking)
    padded = {**record, layout.key: [*turns, {layout.role: layout.answering, layout.text: ""}]} if asked else record
    system, pairs = read_conversation(padded, reasons, layout)
    image = image_field(record, folder, reasons)
    for key in ("instruction", "input"):
        if key in record:
            reasons.append(f"{key!r}: not with '{layout.key}' (the question is its last {layout.asking} turn)")
    _check_added_keys(record, reasons)
    if reasons:  # (an empty conversation is one of them)
        return None
    *history, (question, _) = pairs
    return Question(location, record, question, system=system, image=image, history=tuple(history))


def answer_questions(
    model: Transformer,
    questions: Sequence[Question],
    *,
    gate_scales: Sequence[float] = (1.0,),
    template: str | None = "auto",
    system: str | None = None,
    batch_size: int = 8,
    stop: Sequence[str] = (),
    progress: Callable[[int, int], None] | None = None,
    layers: Sequence[Speaker] | None = None,
    answered: Mapping[int, list[str]] | None = None,
    on_answers: Callable[[dict[int, list[str]]], None] | None = None,
    **options: Any,
) -> list[list[str]]:
    """answers[i][j]: question i at gate scale j. Questions are written in `template` ("auto": the adapter's
    prompt format; `system` for those without their own), checked all before any is decoded, and answered
    `batch_size` at a time, each with a row per gate scale, the longest first (a batch pads to its longest). A
    model that cannot see answers image questions from their text alone, as the app's image tab does.
    Greedy answers do not depend on the batching, nor do sampled ones with a seed (each row draws from its own
    generator; only padding's float rounding could tip a draw on the edge). With `layers`, only those adapter
    layers' prompts speak (adapter.gate_layers). `options` are generation's
    (max_new_tokens, temperature, top_p, top_k, the penalties, seed, delta_scale, compile);
    `progress(done, total)` is told after each batch, and `on_answers` that batch's answers by question index.
    `answered`: answers kept from an earlier run (question index -> one per scale), not asked again."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be a whole number >= 1, got {batch_size!r}")
    scales = list(gate_scales)
    if not scales:
        raise ValueError("gate_scales: give at least one")
    answered = answered or {}
    prompts, lengths, stops = checked_prompts(model, questions, template, system, answered)
    stops = [*stop, *stops]
    sees = can_see(model)
    left, limit = list(lengths), model.args.max_seq_len
    answers: list[list[str]] = [list(answered.get(index, ())) for index in range(len(questions))]
    done = 0
    room = options.get("max_new_tokens", GenerationRequest.max_new_tokens)
    for chunk in fitting_batches(sorted(left, key=lambda index: -lengths[index]), lengths,
                                 dict.fromkeys(left, room), limit, batch_size):
        rows = [(index, scale) for index in chunk for scale in scales]
        images = [questions[index].image if sees else None for index, _ in rows]
        gate_scale = gate_scale_rows(model, [s for _, s in rows], layers)
        found = generate_batch(model, [prompts[index] for index, _ in rows], gate_scale=gate_scale,
                               images=images if any(images) else None, stop=stops, **options)
        for (index, _), answer in zip(rows, found):
            answers[index].append(answer)
        if on_answers is not None:
            on_answers({index: answers[index] for index in chunk})
        done += len(chunk)
        if progress is not None:
            progress(done, len(left))
    return answers


def checked_prompts(model: Transformer, questions: Sequence[Question], template: str | None = "auto",
                    system: str | None = None, answered: Mapping[int, list[str]] | None = None,
                    ) -> tuple[list[str], dict[int, int], tuple[str, ...]]:
    """Every question written in `template` for `model` and checked to leave room for an answer: (prompts, the
    token count of each not yet `answered`, the format's stop strings); a ValueError naming every question at
    fault, before anything is decoded (callers with several models check them all first)."""
    tokenizer = require_tokenizer(model)
    written = prompt_writer(model, template, None)
    prompts = _written(model, questions, template, written, system)
    lengths = {index: len(tokenizer.encode(prompts[index], bos=True)) for index in range(len(questions))
               if index not in (answered or {})}
    limit = model.args.max_seq_len
    too_long = [f"{questions[index].location}: {length} tokens as asked" for index, length in lengths.items()
                if length >= limit]  # each needs room for one answer token
    if too_long:
        raise ValueError(f"{len(too_long)} question(s) do not fit this model's context of {limit} tokens (room for "
                         "an answer left); shorten them:\n  " + "\n  ".join(too_long))
    return prompts, lengths, written.stop_strings if written is not None else ()


def can_see(model: Transformer) -> bool:
    """Whether `model` reads images: an adapter with a visual prompt, and its CLIP tower."""
    return model.visual_prompt is not None and model.image_encoder is not None


def _written(model: Transformer, questions: Sequence[Question], template: str | None,
             written: PromptFormat | None, system: str | None) -> list[str]:
    """Each question's prompt; a DataError listing every question the template cannot write."""
    prompts, problems = [], []
    for question in questions:
        try:
            if question.history is None:
                prompts.append(apply_template(template, question.instruction, question.input, model.prompt_format,
                                              question.system or system))
            elif written is None:
                raise ValueError("a conversation needs a prompt format to be written in (not --template none)")
            else:  # as fine-tuning writes a conversation's turns
                prompts.append(written.chat(list(question.history), question.instruction, question.system or system))
        except ValueError as error:
            problems.append((question.location, str(error)))
    if problems:
        named = f"auto, {model.prompt_format}" if template == "auto" else template
        reasons = {reason for _, reason in problems}
        listed = [f"every one: {reasons.pop()}"] if len(problems) > 1 and len(reasons) == 1 else \
            [f"{location}: {reason}" for location, reason in problems]  # (a --system the format has no place for)
        raise DataError(f"{len(problems)} question(s) cannot be written in template {named!r}, none answered:\n  "
                        + "\n  ".join(listed))
    return prompts


def write_answers(path: str | os.PathLike, questions: Sequence[Question], gate_scales: Sequence[float],
                  answers_by_adapter: Sequence[tuple[str | None, list[list[str]]]],
                  gate_layers: str | None = None) -> int:
    """One JSONL line per question, adapter and gate scale (in that order), written atomically; the line count.
    `gate_layers` (the layers that spoke, as asked) is written into each line when given."""
    layers = {} if gate_layers is None else {"gate_layers": gate_layers}
    lines = [json.dumps({**question.record, "adapter": adapter, "gate_scale": scale, **layers,
                         "answer": answers[index][j]}, ensure_ascii=False)
             for index, question in enumerate(questions)
             for adapter, answers in answers_by_adapter
             for j, scale in enumerate(gate_scales)]
    write_text_atomically(Path(path), "".join(line + "\n" for line in lines))
    return len(lines)


PARTIAL = ".partial"  # OUT + this: the answers of a run so far


class PartialAnswers:
    """A --prompts-file run's answers so far, beside its output (OUT.partial: a line of `settings`, then a line per
    adapter and question answered), kept batch by batch so that the run, stopped and started again with the same
    `settings` (whatever decides the answers), goes on from them; removed once the output is written."""

    def __init__(self, out: str | os.PathLike, settings: dict[str, Any]) -> None:
        out = Path(out)
        self.path = out.with_name(out.name + PARTIAL)
        self.settings = json.loads(json.dumps(settings, default=str))  # as it reads back
        self.started = False  # the file written anew for this run

    def load(self) -> tuple[dict[tuple[int, int], list[str]], str | None]:
        """The answers an earlier run with these settings kept ((adapter position, question index) -> one per
        gate scale), and a line saying what was found (None: nothing)."""
        if not self.path.is_file():
            return {}, None
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            settings = json.loads(lines[0]).get("settings") if lines else None
        except (json.JSONDecodeError, AttributeError):
            settings = None
        if settings != self.settings:
            return {}, f"note: {self.path} holds answers of a run with other settings; starting over"
        kept: dict[tuple[int, int], list[str]] = {}
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the line being written when the run was stopped
                break
            kept[row["adapter"], row["question"]] = row["answers"]
        if not kept:
            return {}, None
        return kept, f"resuming: {len(kept)} answered question(s) kept in {self.path} are not asked again"

    def begin(self, kept: Mapping[tuple[int, int], list[str]]) -> None:
        """Write the file anew: the settings line and the answers `kept` (less a line cut short by a stop); with
        none kept, only once answers come (a run refused before it answers leaves no file)."""
        self.started = False
        if kept:
            self._start(kept)

    def _start(self, kept: Mapping[tuple[int, int], list[str]]) -> None:
        lines = [json.dumps({"settings": self.settings})]
        lines += [self._line(adapter, index, found) for (adapter, index), found in kept.items()]
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in lines),
                                                                  encoding="utf-8"))
        self.started = True

    def add(self, adapter: int, answers: Mapping[int, list[str]]) -> None:
        """Keep the answers of adapter number `adapter` (in the order given) to these questions."""
        if not self.started:
            self._start({})
        with writing(self.path), self.path.open("a", encoding="utf-8") as file:
            file.write("".join(self._line(adapter, index, found) + "\n" for index, found in answers.items()))

    @staticmethod
    def _line(adapter: int, index: int, answers: list[str]) -> str:
        return json.dumps({"adapter": adapter, "question": index, "answers": answers}, ensure_ascii=False)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
