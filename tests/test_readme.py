"""The README documents every command line's every flag: each module that builds an argparse parser is found by
reading the sources (a new command line is covered without being listed here), its parser captured as its main
would parse, and each long option looked for in README.md as a whole word."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


class Captured(Exception):
    """Raised instead of parsing: the parser a main built."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def command_modules() -> list[str]:
    """Every module of the project's packages that builds a parser of its own (app.py's flags are
    adapter.app_config's)."""
    files = sorted(p for folder in ("adapter", "bench", "docs") for p in (ROOT / folder).rglob("*.py"))
    return [".".join(path.relative_to(ROOT).with_suffix("").parts) for path in files
            if "argparse.ArgumentParser(" in path.read_text()]


def parser_of(module_name: str, monkeypatch) -> argparse.ArgumentParser:
    def capture(self, args=None, namespace=None):
        raise Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)  # parse_args calls it too
    module = importlib.import_module(module_name)
    if hasattr(module, "build_parser"):  # the app's flags (environment variables as defaults) and the trainer's
        try:
            return module.build_parser({}) if module_name.endswith("app_config") else module.build_parser()
        except TypeError:
            pass
    with pytest.raises(Captured) as caught:
        module.main([]) if module.main.__code__.co_argcount else module.main()
    return caught.value.parser


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    """Its long options and its subcommands' (python -m adapter.tiny build --fp32 ...), those it hides from --help
    aside."""
    found = set()
    for action in parser._actions:
        if action.help != argparse.SUPPRESS:  # suppressed: a benchmark's flags for the worker processes it starts
            found |= {option for option in action.option_strings if option.startswith("--") and option != "--help"}
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= long_options(sub)
    return found


def test_commands_are_found():
    modules = command_modules()
    for expected in ("adapter.generate", "adapter.push", "adapter.finetune.cli", "adapter.app_config",
                     "adapter.tiny.cli", "bench.gpu"):
        assert expected in modules


@pytest.mark.parametrize("module_name", command_modules())
def test_every_flag_of_every_command_line_is_in_the_readme(module_name, monkeypatch):
    options = long_options(parser_of(module_name, monkeypatch))
    missing = sorted(option for option in options if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", README))
    assert not missing, f"{module_name}: flags the README does not mention: {missing}"
