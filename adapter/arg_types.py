"""What the command lines share about their arguments: types (a bad number is argparse's one-line error naming the
flag, before any work starts, not a traceback from deep inside a run, nor a 0 read as "not given"), the one
line a refused input gets, naming the flag the user typed, and output streams that can write any answer."""

from __future__ import annotations

import argparse
import codecs
import math
import sys


def positive_int(text: str) -> int:
    """A whole number of at least 1 (threads, rounds, steps, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_number(text: str) -> float:
    """A finite number above 0 (a learning rate, ...)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def refusal(error: BaseException, parser: argparse.ArgumentParser) -> str:
    """A refused input's line, `error: ...`. The library names what it refuses by its parameter ("clip: /x does not
    exist", "gate_scale: must be in [0, 2]"); where that parameter is one of the command's flags, the line names
    the flag that was typed ("--clip: ...", "--gate-scale: ..."); a positional argument keeps its name."""
    name, said, rest = str(error).partition(": ")
    flag = "--" + name.replace("_", "-")
    if said and any(flag in action.option_strings for action in parser._actions):
        return f"error: {flag}: {rest}"
    return f"error: {error}"


def refused(error: BaseException, parser: argparse.ArgumentParser) -> int:
    """Print `refusal` on stderr and give the exit code of a refused input, 2 (argparse's for a bad flag)."""
    print(refusal(error, parser), file=sys.stderr)
    return 2


def unicode_output() -> None:
    """Let stdout and stderr write any text a model answers or a user names. Python writes a redirected stream in
    the locale's code page (cp1252 on most Windows machines, before Python 3.15), where an answer's emoji, CJK or
    U+FFFD stopped a command half-way with "'charmap' codec can't encode character". A file or pipe is written in
    UTF-8 instead, as Python's UTF-8 mode writes it (and as our JSONL files are); a terminal keeps its encoding,
    a character it cannot show replaced by '?'. Commands call it first."""
    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None)
        if not hasattr(stream, "reconfigure") or codecs.lookup(encoding or "ascii").name == "utf-8":
            continue
        stream.flush()
        if stream.isatty():
            stream.reconfigure(errors="replace")
        else:
            stream.reconfigure(encoding="utf-8")
