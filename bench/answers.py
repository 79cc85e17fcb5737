"""Answering a file of questions (`generate --prompts-file`): questions per second at each batch size, on the
embedded tiny model's held-out text questions at gate scales 0 and 1 (a row per scale), greedy. The answers of
every batch size are checked equal to those of batch size 1 before anything is timed.

    python -m bench.answers [--threads 2] [--repeats 3] [--questions 64] [--batch-sizes 1,4,16] [--smoke]
                            [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

import adapter
from adapter.answer_file import Question, answer_questions
from adapter.tiny.evaluate import held_out
from adapter.tiny.questions import TEXT_CATEGORIES
from bench.args import positive_int, positive_ints, run_main
from bench.decode import machine, measure
from bench.report import command_line, publish

HEADING = "Answering a file of questions"
SCALES = [0.0, 1.0]
NEW_TOKENS = 32


def questions(count: int) -> list[Question]:
    """`count` held-out questions of the tiny model, as `--prompts-file` reads them."""
    found = held_out("text", 0, -(-count // len(TEXT_CATEGORIES)))[:count]
    return [Question(f"question {i}", {"instruction": q.instruction}, q.instruction) for i, q in enumerate(found)]


def answers(model, asked: list[Question], batch_size: int) -> list[list[str]]:
    """What `generate --prompts-file --gate-sweep 0,1 --temperature 0` answers, `batch_size` questions at a time."""
    return answer_questions(model, asked, gate_scales=SCALES, batch_size=batch_size, temperature=0.0,
                            max_new_tokens=NEW_TOKENS)


def questions_per_s(model, asked: list[Question], batch_size: int) -> float:
    start = time.perf_counter()
    answers(model, asked, batch_size)
    return len(asked) / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.answers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--questions", type=positive_int, default=64)
    parser.add_argument("--batch-sizes", type=positive_ints, default="1,4,16")
    parser.add_argument("--smoke", action="store_true", help="8 questions, batch sizes 1 and 4, once")
    parser.add_argument("--write", help="replace this benchmark's section of this markdown file")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    count, sizes = options.questions, options.batch_sizes
    repeats = options.repeats
    if options.smoke:
        count, sizes, repeats = 8, [1, 4], 1
    model = adapter.load("tiny", adapter="tiny-text", device="cpu")
    asked = questions(count)
    alone = answers(model, asked, 1)
    for size in sizes[1:]:
        if answers(model, asked, size) != alone:
            raise SystemExit(f"batch size {size}: the answers differ from batch size 1's; nothing timed")
    rates = [measure(lambda size=size: questions_per_s(model, asked, size), repeats) for size in sizes]
    first = rates[0][0]
    lines = [
        f"## {HEADING} (CPU, the tiny model): `generate --prompts-file` batch sizes",
        "",
        f"Machine: {machine()}. Command: `{command_line('bench.answers', argv)}`. {count} held-out text questions "
        f"of the embedded tiny model, each at gate scales 0 and 1 (a batch row per question and scale), greedy, up to "
        f"{NEW_TOKENS} new tokens; every batch size's answers were checked equal to batch size 1's before timing. "
        f"Median of {repeats} run(s), min / max beside it.",
        "",
        "| batch size (questions) | rows per batch | questions/s | min / max | / batch size 1 |",
        "|---|---|---|---|---|",
        *(f"| {size} | {size * len(SCALES)} | {median:.2f} | {low:.2f} / {high:.2f} | {median / first:.2f} |"
          for size, (median, low, high) in zip(sizes, rates)),
        "",
    ]
    publish("\n".join(lines), HEADING, options.write, smoke=options.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
