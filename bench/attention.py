"""Attention precision in adapter training on CPU: the tiny model's text-adapter step under bf16 autocast with
attention in bf16 (the plain path) and in float32 (`Transformer.fp32_attention`, what adapter.finetune sets on
CPU), in the same process, runs alternating, on the same batches.

The shape is the tiny recipe's text stage (assets/tiny/base, a v1 adapter of 20 prompt tokens on all 4 layers,
32 Alpaca-template questions per step, about 100 tokens each), since that is what adapter.finetune trains here.

    python -m bench.attention [--threads 2] [--steps 10] [--repeats 3] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from adapter.app_config import TINY_FOLDER
from adapter.config import AdapterArgs
from adapter.finetune.batching import Batch, collate
from adapter.finetune.encode import encode_example
from adapter.finetune.records import read_records
from adapter.finetune.step import autocast, micro_batch_loss
from adapter.loading import load
from adapter.tiny.questions import text_questions
from adapter.tiny.recipe import FULL
from adapter.tiny.records import write_text_records
from bench.args import positive_int, run_main
from bench.decode import machine
from bench.report import command_line, publish, spread, stat, table

HEADING = "Attention precision in adapter training"
MODES = {"bf16 (plain path)": False, "fp32 (fp32_attention, adapter.finetune on CPU)": True}


def tiny_batches(model, steps: int) -> list[Batch]:
    """`steps` batches of the text stage's size, from train-split questions (fixed seed), turned into examples
    the way that stage does: Alpaca records written by adapter.tiny.records, read by adapter.finetune."""
    size = FULL.text.batch_size
    with tempfile.TemporaryDirectory() as folder:
        path = write_text_records(text_questions(0, "train", steps * size), Path(folder) / "text.jsonl")
        examples = [example for record in read_records(path) for example in record]
    encoded = [encode_example(example, model.tokenizer, FULL.max_seq_len)[0] for example in examples]
    return [collate(encoded[i: i + size]) for i in range(0, len(encoded), size)]


def seconds_per_step(model, batches: Sequence[Batch], fp32_attention: bool, precision: str = "bf16") -> float:
    """Forward and backward of every batch (no optimizer: it is the same on both paths), per batch;
    `precision` is adapter.finetune's --autocast."""
    model.fp32_attention = fp32_attention
    start = time.perf_counter()
    for batch in batches:
        with autocast(torch.device("cpu"), precision):
            loss = micro_batch_loss(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / len(batches)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--steps", type=positive_int, default=10, help="batches per run")
    parser.add_argument("--repeats", type=positive_int, default=3, help="runs per mode, alternating")
    parser.add_argument("--write", help="replace this section of a BENCHMARKS.md")
    options = parser.parse_args(argv)
    if not (TINY_FOLDER / "base").is_dir():
        raise SystemExit(f"bench.attention needs the tiny base in {TINY_FOLDER / 'base'} "
                         "(python -m adapter.tiny build)")
    torch.set_num_threads(options.threads)
    text = FULL.text
    model = load(TINY_FOLDER / "base", adapter=AdapterArgs(prompt_len=text.prompt_len,
                                                            prompt_layers=text.prompt_layers), device="cpu")
    model.train()
    with torch.no_grad():  # open gates, as after some training: the prompt path then carries gradients too
        for layer in model.layers:
            if layer.attention.gate is not None:
                layer.attention.gate.fill_(0.5)
    batches = tiny_batches(model, options.steps)
    times: dict[str, list[float]] = {name: [] for name in MODES}
    for name, flag in MODES.items():  # warm-up
        seconds_per_step(model, batches[:1], flag)
    for _ in range(options.repeats):
        for name, flag in MODES.items():
            times[name].append(seconds_per_step(model, batches, flag))
    tokens = sum(int(b.tokens.numel()) for b in batches) / len(batches)
    plain = stat(times[next(iter(MODES))])
    rows = []
    for name in MODES:
        figure = stat([t * 1000 for t in times[name]])
        rows.append([name, spread(figure), f"{plain[0] / stat(times[name])[0]:.2f}"])
    lines = [f"## {HEADING} (CPU, bf16 autocast): the tiny text adapter's step", "",
             (f"Machine: {machine()}. Command: `{command_line('bench.attention', argv)}`. Forward and backward of "
             f"{options.steps} batches of {text.batch_size} tiny-world questions ({tokens:.0f} padded tokens "
             f"each) through assets/tiny/base with a v1 adapter of {text.prompt_len} tokens on "
             f"{text.prompt_layers} layers, gates at 0.5; median of {options.repeats} runs per mode (min / max), "
             "modes alternating in one process."), "",
             *table(["attention", "ms per step", "speed-up over bf16"], rows)]
    publish("\n".join(lines) + "\n", HEADING, options.write)


if __name__ == "__main__":
    sys.exit(run_main(main))
