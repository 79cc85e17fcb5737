"""The sampling flags the commands that answer share (adapter.generate, adapter.terminal_chat), read one way: their
names are those of `adapter.generate`'s keyword arguments and of `adapter.engine.Settings`' fields."""

from __future__ import annotations

import argparse
from typing import Any

SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=0.1, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.75)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--min-p", type=float, default=0.0,
                        help="sample among the tokens at least this times as likely as the likeliest (0 to 1, 0 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    parser.add_argument("--presence-penalty", type=float, default=0.0,
                        help="OpenAI's: less this for a token the answer already holds (-2 to 2, 0 = off)")
    parser.add_argument("--frequency-penalty", type=float, default=0.0,
                        help="OpenAI's: less this times the times the answer holds a token (-2 to 2, 0 = off)")


def sampling_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed sampling flags, by their keyword names."""
    return {name: getattr(args, name) for name in SAMPLING_FLAGS}
