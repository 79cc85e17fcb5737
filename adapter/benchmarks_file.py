"""BENCHMARKS.md is made of `## ` sections, one per benchmark (or `python -m adapter.tiny eval`); each rewrites
only its own. Here in the library, not in bench/, because an installed package's tiny eval writes one too."""

from __future__ import annotations

import os
from pathlib import Path

from .formats.common import write_text_atomically

HEADER = ("# Benchmarks\n\nEvery figure below was written by the command shown with it; none is edited by hand. "
          "Tests never time anything.\n\n")


def replace_section(path: str | os.PathLike, heading: str, text: str, first: bool = False) -> None:
    """Replace the section whose `## ` heading starts with `heading` (or add it: at the end, or with `first`
    before all others), atomically."""
    path = Path(path)
    current = path.read_text(encoding="utf-8") if path.exists() else HEADER
    head, *sections = current.split("\n## ")
    sections = ["## " + s.rstrip("\n") + "\n" for s in sections]
    new = text.rstrip("\n") + "\n"
    replaced = False
    for index, section in enumerate(sections):
        if section[3:].startswith(heading):
            sections[index], replaced = new, True
    if not replaced:
        sections.insert(0 if first else len(sections), new)
    content = head.rstrip("\n") + "\n\n" + "\n".join(sections)
    write_text_atomically(path, content)
