"""Log-probabilities while decoding: what keeping each decoded token's log-probability and its likeliest
alternatives costs a greedy decode (`adapter.generate`'s `logprobs`: what a streamed answer sends, and what a whole
answer returns), beside the same decode without them and beside scoring the answer afterwards with one forward over
prompt and answer per row (`adapter.next_token.answer_logprobs`: how a whole answer was scored before).

    python -m bench.logprobs [--threads 2] [--repeats 5] [--smoke] [--write BENCHMARKS.md]

Shape: bench.decode's (LLaMA dim 512, 8 layers, 8 heads, vocab 32000, fp32, a v1 adapter on all 8 layers), each
row a 64-token prompt of its own and 64 new tokens, greedy, through `adapter.generate.decode_tokens` at batch 1
and 8; 5 alternatives per token (20, the API's most, in a row of its own). The sides run in turn in each round
(bench.decode.measure_side_by_side); median, min / max in brackets.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from adapter.config import AdapterArgs, ModelArgs
from adapter.generate import GenerationRequest, decode_tokens
from adapter.next_token import answer_logprobs
from adapter.random_model import train_tokenizer
from adapter.sampling import SamplingParams
from adapter.tokenizer import open_tokenizer
from bench.args import positive_int, run_main
from bench.decode import SHAPE, build_model, machine, measure_side_by_side
from bench.report import command_line, publish, table

HEADING = "Log-probabilities while decoding (CPU, fp32)"
SMOKE_SHAPE = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=512, max_seq_len=256)
SMOKE_ADAPTER = AdapterArgs(prompt_len=4, prompt_layers=2)


def timed_answers(model, prompts: list[list[int]], new_tokens: int, top: int | None, afterwards: bool) -> float:
    """Seconds to answer `prompts` greedily as one batch, keeping each token's log-probability with its `top`
    likeliest (None: not kept), or (`afterwards`) scoring each answer afterwards with a forward of its own."""
    request = GenerationRequest(max_new_tokens=new_tokens, sampling=SamplingParams(temperature=0.0),
                                logprobs=None if afterwards else top)
    scored = [None] * len(prompts) if request.logprobs is not None else None
    answers: list[list[int]] = [[] for _ in prompts]
    start = time.perf_counter()
    for step in decode_tokens(model, prompts, request, scored=scored):
        for answer, token in zip(answers, step):
            answer.append(token)
    if afterwards:
        for prompt, answer in zip(prompts, answers):
            answer_logprobs(model, prompt, answer, 1.0, top_k=top)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.logprobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--write", help="replace this benchmark's section of this markdown file (e.g. BENCHMARKS.md)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one run (the tests)")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    shape, adapter, prompt_len, new_tokens = (SMOKE_SHAPE, SMOKE_ADAPTER, 8, 4) if options.smoke else \
        (SHAPE, None, 64, 64)
    model = build_model(shape, adapter) if options.smoke else build_model()
    with tempfile.TemporaryDirectory() as folder:
        model.tokenizer = open_tokenizer(train_tokenizer(Path(folder) / "tokenizer.model"))
    repeats = 1 if options.smoke else options.repeats
    rows = []
    for batch in (1, 8):
        generator = torch.Generator().manual_seed(batch)
        prompts = torch.randint(3, shape.vocab_size, (batch, prompt_len), generator=generator).tolist()
        sides = {"decode, no log-probabilities": (None, False),
                 "decode keeping each token's log-probability and 5 likeliest": (5, False),
                 "decode keeping each token's log-probability and 20 likeliest": (20, False),
                 "decode, then one forward over prompt and answer per row, 5 likeliest (before)": (5, True)}
        measured = measure_side_by_side(
            [lambda top=top, after=after: timed_answers(model, prompts, new_tokens, top, after)
             for top, after in sides.values()], repeats)
        plain = measured[0][0]
        for label, (median, low, high) in zip(sides, measured):
            rows.append((str(batch), label, f"{median * 1000:.0f} ({low * 1000:.0f} / {high * 1000:.0f})",
                         f"{median / plain:.2f}"))
    name = f"{HEADING}: LLaMA dim {shape.dim}, {shape.n_layers} layers, vocab {shape.vocab_size}"
    text = "\n".join([
        f"## {name}",
        "",
        (f"Machine: {machine()}. Command: `{command_line('bench.logprobs', argv)}`. "
         f"Each row of the batch a {prompt_len}-token prompt of its own and {new_tokens} new tokens, greedy, "
         f"through `decode_tokens`; median of {repeats} runs after a warm-up, min / max in brackets, the sides in "
         "turn in each round."),
        "",
        *table(("batch", "answered", "ms", "/ no log-probabilities"), rows),
        "",
    ])
    publish(text, HEADING, options.write, smoke=options.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
