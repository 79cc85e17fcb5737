"""Reading training data: Alpaca-style instruction records, LLaVA-style (image) conversations and chat messages.

Every record is checked before training starts and all bad ones are reported together, each with its
file and line (JSONL) or index (JSON list), so that a 52k-record file is fixed in one pass rather than
one crash at a time. Each good record becomes one or more (prompt, response) examples, written in the run's
prompt format (adapter.prompts; Alpaca by default); a conversation gives one per answer (`gpt` or `assistant`
turn), prompted with the format's chat over the turns before it. A record's system prompt (a "system" string,
or a conversation's first turn from "system") goes to every example of the record; the chat formats take one,
Alpaca does not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..hub import resolve_data
from ..images import image_file_problem
from ..paths import not_a_file, require_path
from ..prompts import PROMPT_FORMATS, PromptFormat
from ..tokenizer import lone_surrogate

IMAGE_MARKER = "<image>"
T = TypeVar("T")


@dataclass(frozen=True)
class ChatLayout:
    """How a record writes a conversation: LLaVA's and ShareGPT's `conversations` ({"from": "human"/"gpt",
    "value": ...}) or the `messages` of OpenAI's chat API and HF chat datasets ({"role": "user"/"assistant",
    "content": ...}); either may open with a system turn."""

    key: str
    role: str
    text: str
    asking: str
    answering: str


CONVERSATIONS = ChatLayout("conversations", "from", "value", "human", "gpt")
MESSAGES = ChatLayout("messages", "role", "content", "user", "assistant")


def conversation_record(turns: Sequence[tuple[str, str]], system: str | None = None,
                        image: str | None = None) -> dict[str, Any]:
    """Answered turns (question, answer) as one record to train on, the system prompt first if there is one, which
    `read_records` reads back as one example per answer: in the `messages` layout, or about the picture `image`
    (its file name, under the image folder) in LLaVA's, the first question after its `<image>` marker."""
    if not turns:
        raise ValueError("conversation: no answered question to save yet; ask something first")
    layout = MESSAGES if image is None else CONVERSATIONS
    opening = [{layout.role: "system", layout.text: system}] if system and system.strip() else []
    asked = [(f"{IMAGE_MARKER}\n{question}" if image is not None and i == 0 else question, answer)
             for i, (question, answer) in enumerate(turns)]
    said = [{layout.role: role, layout.text: text} for question, answer in asked
            for role, text in ((layout.asking, question), (layout.answering, answer))]
    return {layout.key: opening + said} if image is None else {"image": image, layout.key: opening + said}


def chat_layout(record: dict, reasons: list[str]) -> ChatLayout | None:
    """The layout of a record's conversation (None: an instruction record); both keys at once is a reason."""
    found = [layout for layout in (CONVERSATIONS, MESSAGES) if layout.key in record]
    if len(found) > 1:
        reasons.append("both 'conversations' and 'messages': give the conversation once")
    return found[0] if found else None


@dataclass(frozen=True)
class Example:
    """One training sequence: the loss is taken on `response` (and the EOS after it) only. A document of plain
    text (`plain`) has no prompt: the loss is on all of it, in windows of the run's length (encode.encode_text)."""

    prompt: str
    response: str
    image: Path | None = None
    plain: bool = False


# what every data flag takes
DATA_HELP = "a JSON list, JSONL or Parquet file, or hf:owner/name[/FILE] (a hub dataset's file)"


MISSING_PICTURE = "image file"  # how a record naming a picture that is not there is reported


class DataError(ValueError):
    """Bad records in a data file; the message lists every one of them."""


def read_records(path: str | os.PathLike, image_folder: str | os.PathLike | None = None,
                 prompt_format: PromptFormat = PROMPT_FORMATS["alpaca"], flag: str = "--data") -> list[list[Example]]:
    """The examples of each record of a JSON list, JSONL or Parquet file (one list per record, in file order); a
    `.txt` file is one record, a document of plain text.

    Raises DataError naming `flag`, the file and every bad record (location and reason), or the file when it
    is unreadable.
    """
    require_path(path, flag)
    if Path(path).suffix == ".txt":
        return [[Example("", document, plain=True)] for document in read_documents(path, flag)]
    return read_checked(path, image_folder, flag,
                        lambda location, value, folder, reasons: _parse(value, folder, prompt_format, reasons))


def read_checked(path: str | os.PathLike, image_folder: str | os.PathLike | None, flag: str,
                 parse: Callable[[str, Any, Path | None, list[str]], T], noun: str = "record",
                 outcome: str = "none read") -> list[T]:
    """`parse(location, value, image folder, reasons)` of every entry of a JSON list or JSONL file, in order; a
    DataError naming `flag`, the file and every entry whose `reasons` it filled (all of them, in one message). A
    Parquet file's rows are entries too, and `hf:owner/name[/FILE]` is a hub dataset's file (adapter.hub)."""
    path = resolve_data(path, flag)
    found = _read_entries(path, flag)
    folder = _checked_folder(image_folder)
    parsed, problems = [], []
    for location, value, error in found:
        reasons = [error] if error else []
        item = None if error else parse(location, value, folder, reasons)
        if reasons:
            problems.append(f"{location}: {'; '.join(reasons)}")
        else:
            parsed.append(item)
    if problems:
        raise DataError(f"{flag}: {path} has {len(problems)} bad {noun}(s), {outcome}:\n  " + "\n  ".join(problems))
    if not parsed:
        raise DataError(f"{flag}: {path} holds no {noun}s")
    return parsed


def read_documents(path: str | os.PathLike, flag: str = "--data") -> list[str]:
    """Plain text to score: a `.txt` file (UTF-8) as one document, or the "text" field of each record of a JSON
    list, JSONL or Parquet file (as the hub's text datasets hold it, wikitext's among them). A DataError names
    `flag`, the file and every record without a text, or an empty file."""
    require_path(path, flag)
    if Path(path).suffix != ".txt":
        def text(location: str, value: Any, folder: Path | None, reasons: list[str]) -> str | None:
            if not isinstance(value, dict):
                reasons.append(f"must be an object with a 'text' string, got {kind(value)}")
                return None
            return string_field(value, "text", reasons)

        return read_checked(path, None, flag, text)
    path = resolve_data(path, flag)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: {not_a_file(path)}")
    try:
        document = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{flag}: cannot read {path} ({error})") from error
    if not document.strip():
        raise DataError(f"{flag}: {path} holds no text")
    return [document]


def holds_text(path: str | os.PathLike) -> bool:
    """Whether a data file is plain text to score (`read_documents`): a `.txt` file, or one whose first record has
    a "text" and none of the fine-tuning layouts' fields; how the app's Score tab tells it from records."""
    if Path(path).suffix == ".txt":
        return True
    first = first_record(path)
    return isinstance(first, dict) and _is_document(first)


def _is_document(record: dict) -> bool:
    """Whether a record is a document of plain text: a "text" and neither a conversation nor an instruction
    (tatsu-lab/alpaca's rows carry a "text" beside their instruction: they are Alpaca records)."""
    return "text" in record and not {"instruction", CONVERSATIONS.key, MESSAGES.key} & set(record)


def first_record(path: str | os.PathLike) -> Any:
    """A local data file's first entry, or None when it holds none or cannot be read: what kind of records it is."""
    try:
        for _, value, error in _read_entries(Path(path), "data"):
            return None if error else value
    except (OSError, ValueError):
        return None
    return None


def _read_entries(path: Path, flag: str) -> Iterator[tuple[str, Any, str | None]]:
    """The entries of a JSON list, JSONL or Parquet file (see `_entries`, `_parquet_entries`); the file's absence or
    unreadability raised now, naming `flag`."""
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: {not_a_file(path)}")
    if path.suffix == ".parquet":
        return _parquet_entries(path, flag)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some editors write, is not the text's
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{flag}: cannot read {path} ({error})") from error
    return _entries(path, text, flag)


def _parquet_entries(path: Path, flag: str) -> Iterator[tuple[str, Any, str | None]]:
    """(location, record, None) for each row of a Parquet file (as the hub's datasets are stored), its columns as
    the record's fields; a null field is left out, as a JSON record would leave it out."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as error:
        raise DataError(f"{flag}: reading {path} needs the pyarrow package (pip install pyarrow)") from error
    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (OSError, pyarrow.ArrowException) as error:
        raise DataError(f"{flag}: {path} is not a readable Parquet file ({error})") from error
    return ((f"{path} [row {index}]", {key: value for key, value in row.items() if value is not None}, None)
            for index, row in enumerate(rows))


def _checked_folder(image_folder: str | os.PathLike | None) -> Path | None:
    """The folder records' image paths are relative to (`--image-folder`), which must exist when given."""
    if image_folder is not None:
        require_path(image_folder, "--image-folder", "a folder's path")
    folder = Path(image_folder) if image_folder is not None else None
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(f"--image-folder: {folder} is not a folder")
    return folder


def _entries(path: Path, text: str, flag: str) -> Iterator[tuple[str, Any, str | None]]:
    """(location, record, parse error) for a JSON list (by index) or JSONL (by line, blank lines skipped)."""
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except (ValueError, RecursionError) as error:  # besides bad JSON: a 5,000-digit number, deep nesting
            raise DataError(f"{flag}: {path} is not valid JSON ({_json_problem(error, in_line=False)})") from error
        if not isinstance(values, list):
            raise DataError(f"{flag}: {path} must hold a JSON list of records")
        for index, value in enumerate(values):
            yield f"{path} [index {index}]", value, not_text(value)
        return
    lines = text.splitlines()
    if len([line for line in lines if line.strip()]) > 1 and text.lstrip().startswith("{"):
        try:
            whole = json.loads(text)
        except (ValueError, RecursionError):
            whole = None  # JSONL: one object a line
        if isinstance(whole, dict):  # one object written over several lines: each line read as a broken record
            raise DataError(f"{flag}: {path} holds one JSON object, not records: expected a JSON list of records "
                            f"or JSONL (one record a line); its keys: {', '.join(map(str, list(whole)[:6]))}")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError) as error:
            yield f"{path}:{number}", None, f"not valid JSON ({_json_problem(error)})"
        else:
            yield f"{path}:{number}", value, not_text(value)


def _json_problem(error: Exception, in_line: bool = True) -> str:
    """What json.loads found wrong, in a few words (`in_line`: of one line, so where is its column)."""
    if isinstance(error, json.JSONDecodeError):
        # ("Unterminated string starting at" ends as its position would follow: not "starting at at column 10")
        return f"{error.msg.removesuffix(' at')} at column {error.colno}" if in_line else str(error)
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error).split(";")[0]  # Python's cap on the digits of a number


def not_text(value: Any, where: str = "") -> str | None:
    """Where a record holds a string that is not text: a lone surrogate ("\\ud800"), which JSON may escape but
    no tokenizer can read; None when there is none."""
    if isinstance(value, str):
        problem = lone_surrogate(value)
        return None if problem is None else f"{where + ' ' if where else ''}{problem}"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = not_text(item, f"{where}[{key!r}]" if where or isinstance(key, int) else repr(key))
        if found is not None:
            return found
    return None


def _parse(record: Any, folder: Path | None, written: PromptFormat, reasons: list[str]) -> list[Example]:
    """The examples of one record; appends what is wrong with it to `reasons` instead of raising."""
    if not isinstance(record, dict):
        reasons.append(f"expected a JSON object, got {kind(record)}")
        return []
    layout = chat_layout(record, reasons)
    if layout is not None:
        image = image_field(record, folder, reasons)
        system, pairs = read_conversation(record, reasons, layout)
        if reasons:
            return []
        history: list[tuple[str, str]] = []
        examples = []
        for question, answer in pairs:
            prompt = _written(lambda: written.chat(history, question, system), reasons)
            if reasons:  # said once for the record, not once per turn
                return []
            examples.append(Example(prompt, written.answer(answer), image))
            history.append((question, answer))
        return examples
    if _is_document(record):
        text = string_field(record, "text", reasons)
        if text is not None and not text.strip():
            reasons.append("empty 'text'")
        return [] if reasons else [Example("", text, plain=True)]
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        reasons.append(f"'system' must be a string, got {kind(system)}")
    if "image" in record:
        reasons.append("'image' is only read with a conversation ('conversations', as LLaVA's, or 'messages')")
    instruction = string_field(record, "instruction", reasons)
    if instruction is not None and not instruction.strip():
        reasons.append("empty 'instruction'")
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        reasons.append(f"'input' must be a string, got {kind(extra)}")
    output = string_field(record, "output", reasons)
    if reasons:
        return []
    return [Example(_written(lambda: written.instruction(instruction, extra, system), reasons), written.answer(output))]


def _written(prompt: Callable[[], str], reasons: list[str]) -> str:
    """The prompt, or "" with the reason when the format cannot write it (a system prompt in Alpaca)."""
    try:
        return prompt()
    except ValueError as error:
        reasons.append(str(error))
        return ""


def string_field(record: dict, key: str, reasons: list[str]) -> str | None:
    """`record[key]`, which must be there and be a string; else None, the reason appended."""
    if key not in record:
        reasons.append(f"missing '{key}'")
        return None
    value = record[key]
    if not isinstance(value, str):
        reasons.append(f"'{key}' must be a string, got {kind(value)}")
        return None
    return value


def image_field(record: dict, folder: Path | None, reasons: list[str]) -> Path | None:
    """The record's 'image' file under `folder` (None when it has none); what is wrong, appended to `reasons`."""
    if "image" not in record:
        return None
    name = record["image"]
    if not isinstance(name, str) or not name:
        reasons.append(f"'image' must be a file name, got {kind(name)}")
        return None
    if folder is None:
        reasons.append(f"image {name!r} needs --image-folder")
        return None
    if Path(name).is_absolute() or ".." in Path(name).parts:  # the app's uploads are the folder:
        # a record must not have it read (and say whether it exists) any file of the server
        reasons.append(f"'image' must name a file under the image folder (no absolute path, no '..'), got {name!r}")
        return None
    path = folder / name
    if not path.is_file():
        reasons.append(f"{MISSING_PICTURE} {not_a_file(path)}")
    elif (problem := image_file_problem(path)) is not None:
        reasons.append(f"image {problem}")
    return path


def read_conversation(record: dict, reasons: list[str], layout: ChatLayout = CONVERSATIONS
                      ) -> tuple[str | None, list[tuple[str, str]]]:
    """A conversation record's system prompt (its "system" string, or a first turn from "system") and (asking,
    answering) pairs; what is wrong, appended to `reasons`."""
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        reasons.append(f"'system' must be a string, got {kind(system)}")
    turns, first = record[layout.key], 0
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and turns[0].get(layout.role) == "system":
        if system is not None:
            reasons.append(f"two system prompts: 'system' and {layout.key}[0]")
        system, first = turns[0].get(layout.text), 1
        if not isinstance(system, str):
            reasons.append(f"{layout.key}[0]: '{layout.text}' must be a string, got {kind(system)}")
    return system, _conversation(turns, reasons, first, layout)


def _conversation(turns: Any, reasons: list[str], first: int, layout: ChatLayout) -> list[tuple[str, str]]:
    """(asking, answering) pairs of alternating turns from `turns[first]` on that start with a question and end
    with an answer; `<image>` removed."""
    key, roles = layout.key, (layout.asking, layout.answering)
    if not isinstance(turns, list) or len(turns) <= first:
        got = kind(turns) if not isinstance(turns, list) else "an empty list" if not turns else "a system turn alone"
        reasons.append(f"'{key}' must be a non-empty list of turns, got {got}")
        return []
    values = []
    for index, turn in enumerate(turns[first:], start=first):
        where = f"{key}[{index}]"
        if not isinstance(turn, dict):
            reasons.append(f"{where}: expected an object with '{layout.role}' and '{layout.text}', got {kind(turn)}")
            continue
        role, value = turn.get(layout.role), turn.get(layout.text)
        expected = roles[(index - first) % 2]
        if role not in roles:
            reasons.append(f"{where}: '{layout.role}' must be '{roles[0]}' or '{roles[1]}', got {role!r}")
        elif role != expected:
            article = "an" if expected.startswith("a") else "a"  # an 'assistant' turn; a 'user' one
            reasons.append(f"{where}: expected {article} {expected!r} turn (turns alternate, {roles[0]} first), "
                           f"got {role!r}")
        if not isinstance(value, str):
            reasons.append(f"{where}: '{layout.text}' must be a string, got {kind(value)}")
            continue
        value = value.replace(IMAGE_MARKER, "").strip() if expected == layout.asking else value
        if expected == layout.asking and not value:
            reasons.append(f"{where}: empty {layout.asking} turn")
        values.append(value)
    if (len(turns) - first) % 2 and isinstance(turns[-1], dict) and turns[-1].get(layout.role) == roles[0]:
        article = "an" if roles[1][0] in "aeiou" else "a"
        reasons.append(f"'{key}' ends with a '{roles[0]}' turn that has no answer: it must end with {article} "
                       f"'{roles[1]}' turn")  # (a last answering turn out of place is named above, as out of turn)
    return list(zip(values[::2], values[1::2]))


def kind(value: Any) -> str:
    """What a JSON value is, in words, for messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
