"""docs/gating.md says each output in it "was printed by the command above it": the quick ones are run here (its
Python snippet, and every `adapter.generate` or `adapter.inspect` command followed by its output), so that a
change to the model, the sampler or the printing cannot leave the walk-through showing what no longer happens.
The long ones (evaluations over hundreds of questions, training) are measured by their own tests and benchmarks."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

import adapter
from adapter.app_config import tiny_available

from .openai_helpers import client, engines  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
GATING = ROOT / "docs" / "gating.md"
RUN = {"adapter.generate", "adapter.inspect"}  # the commands quick enough to run here

pytestmark = pytest.mark.skipif(not tiny_available(), reason="assets/tiny not built yet")


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def shown_runs(text: str) -> list[tuple[list[str], str]]:
    """(argv, output) of each one-command bash block of RUN's followed by an output block."""
    found = []
    fenced = blocks(text)
    for (language, body), (next_language, output) in zip(fenced, fenced[1:]):
        command = body.replace("\\\n", " ").strip()
        if language == "bash" and next_language == "" and "\n" not in command and command.startswith("python -m "):
            argv = shlex.split(command, comments=True)[2:]
            if argv[0] in RUN:
                found.append((argv, output))
    return found


def matches(output: str, shown: str) -> bool:
    """Whether `output` reads as `shown`, in which "..." stands for whatever the doc cut (in a line, or lines)."""
    pattern = "\n".join(".*" if line == "..." else ".*".join(map(re.escape, line.split("...")))
                        for line in shown.rstrip("\n").split("\n"))
    return re.fullmatch(pattern, output.rstrip("\n"), flags=re.DOTALL) is not None


RUNS = shown_runs(GATING.read_text(encoding="utf-8"))


def test_the_walk_through_shows_commands_with_their_outputs():
    assert [argv[0] for argv, _ in RUNS] == ["adapter.generate"] * 2 + ["adapter.inspect", "adapter.generate"]


@pytest.mark.parametrize("argv, shown", RUNS, ids=[f"{argv[0]}-{index}" for index, (argv, _) in enumerate(RUNS)])
def test_each_command_prints_what_the_walk_through_shows(argv, shown):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert importlib.import_module(argv[0]).main(argv[1:]) == 0
    assert matches(printed.getvalue(), shown), f"printed:\n{printed.getvalue()}\nthe doc shows:\n{shown}"


def test_a_fresh_adapter_is_the_base_as_the_snippet_prints():
    snippet = next(body for language, body in blocks(GATING.read_text(encoding="utf-8")) if language == "python")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, str(GATING), "exec"), {})
    assert printed.getvalue() == "True\n"


def test_the_api_scores_the_colours_as_the_walk_through_tabulates(client):  # noqa: F811
    """Section 8's table: the last token's log-probability of the question followed by " red" or " blue", echoed and
    scored by /v1/completions at each gate scale, as its snippet asks."""
    text = GATING.read_text(encoding="utf-8")
    table = re.search(r'^\| gate scale \| " red" \| " blue" \|\n\|[-|]+\|\n((?:\|.*\|\n)+)', text, re.MULTILINE)
    shown = [[float(cell) for cell in row.strip("|").split("|")] for row in table.group(1).splitlines()]
    question = "There is a large red star on the left. What colour is the star?"
    scored = []
    for gate in (0, 1, 2):
        row = [float(gate)]
        for colour in (" red", " blue"):
            reply = client.post("/v1/completions", json={
                "model": "tiny-text", "prompt": adapter.alpaca(question) + colour, "echo": True, "max_tokens": 0,
                "logprobs": 0, "gate_scale": gate}).json()
            row.append(round(reply["choices"][0]["logprobs"]["token_logprobs"][-1], 2))
        scored.append(row)
    assert scored == shown


def test_the_cuts_match_what_they_stand_for():
    assert matches("a\nb\nc\nd\n", "a\n...\nd")
    assert matches("There is a star. There is a circle.", "There is a star. ...")
    assert not matches("a\nb\nc\n", "a\n...\nd")
    assert not matches("red\n", "blue")
