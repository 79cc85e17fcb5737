"""Multiple-choice questions scored at each gate scale: which of a question's choices the model finds likeliest as
its answer, as lm-evaluation-harness scores ARC or MMLU, so that one table shows how far the adapter moves a
base's choices (`python -m adapter.evaluate --choices`).

Each choice is written as the answer to the question in the adapter's prompt format, as fine-tuning writes an
instruction and its answer, after a space (lm-evaluation-harness's target delimiter: "### Response:" then " red",
as a model writes its answer; formats that strip answers drop it; `delimiter` changes it), and scored by the
summed log-probability of its tokens and the answer's end. The
accuracy takes the likeliest choice; the accuracy per byte takes the likeliest per UTF-8 byte of the choice
(lm-evaluation-harness's acc_norm: long choices are not penalised for being long); the right choice's probability
is its share among the choices (a softmax over their summed log-probabilities), which moves smoothly with the
gate where the accuracy jumps.

Records (JSON list or JSONL): {"question" (or "instruction"), "input"?, "system"?, "choices": [...], "answer":
index, letter or the choice's text}; MMLU's as the hub has it ({"question", "choices", "answer": index}); ARC's
({"question", "choices": {"text": [...], "label": [...]}, "answerKey"}, or its original {"question": {"stem",
"choices": [{"text", "label"}]}, "answerKey"}). A record with an "image" (a file under the image folder) is a
question about that picture, asked as the image tab asks it, its choices scored with the picture's visual prompt
(an adapter that sees, and its CLIP tower, are needed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .finetune.batching import collate
from .finetune.encode import encode_example
from .finetune.records import Example, first_record, image_field, kind, read_checked
from .finetune.step import scored_positions
from .gate_layers import Speaker, describe, gate_scale_rows, normalized
from .progress import terminal_progress
from .prompts import PromptFormat, format_named

if TYPE_CHECKING:
    from .model import Transformer

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class ChoiceQuestion:
    """One question: its prompt as the format writes it, its choices as the format writes answers, the right one."""

    prompt: str
    choices: tuple[str, ...]
    answer: int
    image: Path | None = None
    location: str = field(default="", compare=False)  # where its file holds it ("FILE:LINE"), for messages


@dataclass(frozen=True)
class ChoiceScore:
    """One gate scale's figures over all questions."""

    gate_scale: float
    accuracy: float
    accuracy_per_byte: float
    right_probability: float  # mean probability of the right choice among the choices


@dataclass(frozen=True)
class ChoiceEvaluation:
    """One adapter on one file of multiple-choice questions."""

    adapter: str | None
    prompt_format: str
    questions: int
    delta_scale: float
    scores: list[ChoiceScore]
    # per question: its prompt, choices, right answer and each choice's summed log-probability at each gate scale
    picks: list[dict]
    gate_layers: list[Speaker] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


DELIMITER = " "


def holds_choices(path: str | os.PathLike) -> bool:
    """Whether a data file's first record is a multiple-choice question (it has "choices"), not a fine-tuning
    record: how the app's Score tab tells the two apart."""
    first = first_record(path)  # None when unreadable: the fine-tuning reader then says what is wrong with the file
    return isinstance(first, dict) and "choices" in first


def read_questions(path: str | os.PathLike, written: PromptFormat, flag: str = "--data",
                   delimiter: str = DELIMITER, image_folder: str | os.PathLike | None = None) -> list[ChoiceQuestion]:
    """The questions of a file (see the module docstring), each choice written as `written` writes an answer after
    `delimiter`, pictures found under `image_folder`; a DataError naming every bad record."""
    return read_checked(path, image_folder, flag,
                        lambda location, value, folder, reasons: _question(location, value, written, delimiter,
                                                                           folder, reasons))


def _question(location: str, record: Any, written: PromptFormat, delimiter: str, folder: Path | None,
              reasons: list[str]) -> ChoiceQuestion | None:
    if not isinstance(record, dict):
        reasons.append(f"expected a JSON object, got {kind(record)}")
        return None
    question = record.get("question", record.get("instruction"))
    choices, labels = record.get("choices"), None
    if isinstance(question, dict):  # ARC's original layout: the choices inside the question
        question, choices = question.get("stem"), question.get("choices")
    if isinstance(choices, dict):  # ARC on the hub: {"text": [...], "label": [...]}
        choices, labels = choices.get("text"), choices.get("label")
    elif isinstance(choices, list) and choices and all(isinstance(c, dict) for c in choices):
        choices, labels = [c.get("text") for c in choices], [c.get("label") for c in choices]
    if not isinstance(question, str) or not question.strip():
        reasons.append("needs a 'question' (or 'instruction'): a non-empty string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        reasons.append("needs 'choices': a list of two or more non-empty strings")
        return None
    if labels is not None and (len(labels) != len(choices) or not all(isinstance(label, str) for label in labels)):
        reasons.append("the choices' labels must be one string per choice")
        return None
    extra, system = record.get("input"), record.get("system")
    for key, value in (("input", extra), ("system", system)):
        if value is not None and not isinstance(value, str):
            reasons.append(f"'{key}' must be a string, got {kind(value)}")
    answer = _answer(record, choices, labels, reasons)
    image = image_field(record, folder, reasons)
    if image is not None and extra is not None:
        reasons.append("'input' is not read with an 'image' (the question is asked about the picture)")
    if reasons:
        return None
    try:
        prompt = written.instruction(question, extra, system) if image is None else \
            written.image_question(question, system)
    except ValueError as error:
        reasons.append(str(error))
        return None
    return ChoiceQuestion(prompt, tuple(written.answer(delimiter + choice) for choice in choices), answer, image,
                          location)


def _answer(record: dict, choices: list[str], labels: list[str] | None, reasons: list[str]) -> int:
    """The right choice's index from 'answer' (an index, a label or letter, or the choice's text) or ARC's
    'answerKey' (a label)."""
    key = "answerKey" if "answerKey" in record else "answer"
    value = record.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(choices):
            return value
    elif isinstance(value, str):
        for names in (labels, choices, LETTERS[:len(choices)]):
            if names is not None and value.strip() in names:
                return list(names).index(value.strip())
    reasons.append(f"'{key}' {value!r} names none of the {len(choices)} choices (an index from 0, "
                   + ("a label " + "/".join(labels) if labels else "a letter A-" + LETTERS[len(choices) - 1])
                   + ", or a choice's text)")
    return -1


def evaluate_choices(
    model: "Transformer",
    data: str | Path,
    *,
    gate_scales: Sequence[float] = (0.0, 1.0),
    delta_scale: float = 1.0,
    micro_batch_size: int = 8,
    limit: int | None = None,
    prompt_format: str | None = None,
    layers: Sequence[Speaker] | None = None,
    delimiter: str = DELIMITER,
    image_folder: str | Path | None = None,
) -> ChoiceEvaluation:
    """Score `model` on the multiple-choice questions of `data` at each of `gate_scales` (module docstring);
    `micro_batch_size` choices go through the model at once (each repeated once per gate scale); `delimiter` goes
    before each choice; image records find their pictures in `image_folder`."""
    from .evaluate import checked_request  # evaluate imports this module for --choices

    scales = checked_request(gate_scales, micro_batch_size, None, limit, model)
    if not isinstance(delimiter, str):
        raise ValueError(f"delimiter: expected text (\" \" before each choice, or \"\"), got {delimiter!r:.80}")
    written, questions = scorable_questions(model, data, prompt_format, delimiter, image_folder, limit)
    layers = None if layers is None else normalized(model, layers)
    log_probs = choice_log_probs(model, questions, scales, delta_scale, micro_batch_size, layers, written)
    scores, picks = [], [{"prompt": q.prompt, "choices": list(q.choices), "answer": q.answer, "log_probs": []}
                         for q in questions]
    for index, scale in enumerate(scales):
        right = picked = picked_per_byte = 0.0
        for question, found, pick in zip(questions, log_probs, picks):
            row = found[index]
            per_byte = row / torch.tensor([max(len(c.strip().encode("utf-8")), 1) for c in question.choices])
            picked += int(row.argmax()) == question.answer
            picked_per_byte += int(per_byte.argmax()) == question.answer
            right += float(row.softmax(0)[question.answer])
            pick["log_probs"].append([round(float(v), 4) for v in row])
        count = max(len(questions), 1)
        scores.append(ChoiceScore(scale, picked / count, picked_per_byte / count, right / count))
    return ChoiceEvaluation(model.adapter_path, written.name, len(questions), delta_scale, scores, picks, layers)


def scorable_questions(model: "Transformer", data: str | Path, prompt_format: str | None, delimiter: str,
                       image_folder: str | Path | None, limit: int | None) -> tuple[PromptFormat, list[ChoiceQuestion]]:
    """The prompt format and the questions of `data` that `evaluate_choices` scores `model` on, once checked that
    the format can write them for the model's tokenizer and their pictures can be seen (ValueError or DataError
    naming the file): the command line checks every adapter so before scoring any."""
    written = format_named(prompt_format or model.prompt_format)
    written.check(model.tokenizer)
    questions = read_questions(data, written, delimiter=delimiter, image_folder=image_folder)[:limit]
    if any(q.image is not None for q in questions) and (model.visual_prompt is None or model.image_encoder is None):
        raise ValueError(f"--data: {data} has questions about pictures; they need an adapter with a visual prompt "
                         "and its CLIP tower (--clip)")
    return written, questions


def choice_log_probs(model: "Transformer", questions: Sequence[ChoiceQuestion], scales: Sequence[float],
                     delta_scale: float, micro_batch_size: int, layers: list[Speaker] | None,
                     written: PromptFormat) -> list[torch.Tensor]:
    """Per question, a [scales, choices] tensor of each choice's summed log-probability (its tokens and the
    answer's end) as the answer to the question (about its picture, if it has one)."""
    from .visual import encode_images

    tokenizer, length = model.tokenizer, model.args.max_seq_len
    end = written.answer_end_id(tokenizer)
    rows = []
    for question in questions:
        for choice in question.choices:
            encoded, cut = encode_example(Example(question.prompt, choice, question.image), tokenizer, length, end)
            if cut:
                raise ValueError(f"--data: {question.location}: with the choice {choice.strip()[:40]!r} the question "
                                 f"is longer than the model's {length} tokens")
            rows.append(encoded)
    device = model.tok_embeddings.weight.device
    sums = torch.zeros(len(scales), len(rows), dtype=torch.float64)
    for start in terminal_progress(range(0, len(rows), micro_batch_size), "scoring the choices", "batch"):
        batch = collate(rows[start:start + micro_batch_size], device)
        count = batch.tokens.shape[0]
        positions, targets = scored_positions(batch.labels)
        copies = len(scales)
        gate_rows = gate_scale_rows(model, [scale for scale in scales for _ in range(count)], layers)
        with torch.no_grad():
            visual = encode_images(model, batch.images) if batch.images is not None else None
            loss, _ = model.score(batch.tokens.repeat(copies, 1), positions.repeat(copies, 1),
                                  targets.repeat(copies), gate_scale=gate_rows, delta_scale=delta_scale,
                                  visual_prompt=None if visual is None else visual.repeat(copies, 1, 1))
        owner = positions.repeat(copies, 1).nonzero()[:, 0].cpu()
        summed = torch.zeros(copies * count, dtype=torch.float64).index_add_(0, owner, -loss.double().cpu())
        sums[:, start:start + count] = summed.view(copies, count)
    found, start = [], 0
    for question in questions:
        found.append(sums[:, start:start + len(question.choices)])
        start += len(question.choices)
    return found


def table(evaluation: ChoiceEvaluation) -> str:
    """The figures as text, one line per gate scale."""
    e = evaluation
    lines = [f"adapter {e.adapter or 'none (the base)'}, prompt format {e.prompt_format}: {e.questions} "
             f"multiple-choice questions, delta scale {e.delta_scale:g}"
             + ("" if e.gate_layers is None else f", prompts only in layers {describe(e.gate_layers)}"
                if e.gate_layers else ", every prompt silent"),
             f"{'gate scale':>10}  {'accuracy':>8}  {'per byte':>8}  {'P(right choice)':>15}"]
    lines += [f"{s.gate_scale:>10g}  {s.accuracy:>8.1%}  {s.accuracy_per_byte:>8.1%}  {s.right_probability:>15.1%}"
              for s in e.scores]
    return "\n".join(lines)
