"""The one line a command prints for a refused input names the flag the user typed, not the library's parameter."""

from __future__ import annotations

import argparse

from adapter.arg_types import refusal


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--clip")
    parser.add_argument("--clip-quantize")
    return parser


def test_a_parameter_that_is_a_flag_is_named_as_the_flag():
    assert refusal(FileNotFoundError("clip: /nowhere does not exist"), parser()) == \
        "error: --clip: /nowhere does not exist"
    assert refusal(ValueError("clip_quantize: 'nf3' is not one of nf4, int8"), parser()) == \
        "error: --clip-quantize: 'nf3' is not one of nf4, int8"


def test_a_positional_argument_or_an_unknown_name_keeps_the_line_as_it_is():
    assert refusal(ValueError("out: /x already exists; name a new folder"), parser()) == \
        "error: out: /x already exists; name a new folder"
    assert refusal(ValueError("device: cuda:3 asked for, but no CUDA device is available"), parser()) == \
        "error: device: cuda:3 asked for, but no CUDA device is available"
    assert refusal(OSError("disk full"), parser()) == "error: disk full"
    assert refusal(ValueError("clip"), parser()) == "error: clip", "a bare word is no parameter's name"
