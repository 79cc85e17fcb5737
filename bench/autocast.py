"""bf16 autocast against float32 on this CPU, per training step of the tiny recipe's stages: whether the
recipe's bf16 (fast where the CPU has AMX or AVX512-BF16) pays here, and what `build --fp32` saves.

Each stage at the recipe's own shape (adapter/tiny/recipe.py FULL): the base's pretraining step (16 windows of
256 tokens), the CLIP's contrastive step (128 scenes), the text adapter's step (32 questions, forward and
backward as adapter.finetune runs it on a CPU: attention in float32). Base and CLIP steps are timed as the
difference between a run of 1 + N steps and a run of 1 (so model set-up and the first step do not count).

    python -m bench.autocast [--threads 2] [--steps 2] [--repeats 3] [--stages base,clip,text] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence

import torch

from adapter.app_config import TINY_FOLDER
from adapter.config import AdapterArgs, ModelArgs
from adapter.loading import load
from adapter.tiny.clip import train_clip
from adapter.tiny.corpus import corpus
from adapter.tiny.pretrain import pack, pretrain
from adapter.tiny.recipe import FULL
from adapter.tokenizer import Tokenizer, open_tokenizer
from bench.args import positive_int, run_main
from bench.attention import seconds_per_step, tiny_batches
from bench.decode import machine
from bench.report import command_line, publish, spread, stat, table

HEADING = "Training precision on this CPU"
STAGES = ("base", "clip", "text")
PRECISIONS = ("bf16", "fp32")


def step_difference(run: Callable[[int], None], steps: int) -> float:
    """Seconds per step: a run of 1 + `steps` steps less a run of 1."""
    start = time.perf_counter()
    run(1)
    one = time.perf_counter() - start
    start = time.perf_counter()
    run(1 + steps)
    return (time.perf_counter() - start - one) / steps


def stage_timers(tokenizer: Tokenizer, steps: int) -> dict[str, Callable[[bool], float]]:
    """Per stage: bf16 on/off -> seconds per step."""
    windows = pack(corpus(FULL.seed, 2000), tokenizer, FULL.max_seq_len)
    args = ModelArgs(dim=FULL.dim, n_layers=FULL.n_layers, n_heads=FULL.n_heads, vocab_size=tokenizer.n_words,
                     multiple_of=64, max_seq_len=FULL.max_seq_len)

    def base(bf16: bool) -> float:
        settings = dataclasses.replace(FULL.pretrain, copy_steps=0, warmup=1, bf16=bf16)
        return step_difference(lambda n: pretrain(args, windows, dataclasses.replace(settings, steps=n), FULL.seed,
                                                  lambda _: None), steps)

    def clip(bf16: bool) -> float:
        settings = dataclasses.replace(FULL.clip, warmup=1, bf16=bf16)
        return step_difference(lambda n: train_clip(dataclasses.replace(settings, steps=n), tokenizer, FULL.seed,
                                                     lambda _: None), steps)

    text_model = load(TINY_FOLDER / "base", adapter=AdapterArgs(prompt_len=FULL.text.prompt_len,
                                                                 prompt_layers=FULL.text.prompt_layers), device="cpu")
    text_model.train()
    batches = tiny_batches(text_model, steps)

    def text(bf16: bool) -> float:
        seconds_per_step(text_model, batches[:1], True, "bf16" if bf16 else "off")  # warm-up
        return seconds_per_step(text_model, batches, True, "bf16" if bf16 else "off")

    return {"base": base, "clip": clip, "text": text}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.autocast", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--steps", type=positive_int, default=2, help="timed steps per run")
    parser.add_argument("--repeats", type=positive_int, default=3, help="runs per stage and precision, alternating")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--write", help="replace this section of a BENCHMARKS.md")
    options = parser.parse_args(argv)
    stages = options.stages.split(",")
    if not set(stages) <= set(STAGES):
        raise SystemExit(f"--stages: unknown stage(s) {sorted(set(stages) - set(STAGES))}; choose from {STAGES}")
    if not (TINY_FOLDER / "base").is_dir():
        raise SystemExit(f"bench.autocast needs the tiny base in {TINY_FOLDER / 'base'} (python -m adapter.tiny build)")
    torch.set_num_threads(options.threads)
    timers = stage_timers(open_tokenizer(TINY_FOLDER / "base" / "tokenizer.model"), options.steps)
    rows = []
    for stage in stages:
        times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        for _ in range(options.repeats):
            for precision in PRECISIONS:
                times[precision].append(timers[stage](precision == "bf16"))
        bf16, fp32 = stat(times["bf16"]), stat(times["fp32"])
        rows.append([stage, spread(bf16, 2), spread(fp32, 2), f"{bf16[0] / fp32[0]:.2f}"])
    lines = [f"## {HEADING}: bf16 autocast against float32, per step of the tiny recipe's stages", "",
             (f"Machine: {machine()}. Command: `{command_line('bench.autocast', argv)}`. The recipe's shapes: base "
              f"{FULL.pretrain.batch_size} windows of {FULL.max_seq_len} tokens, CLIP {FULL.clip.batch_size} scenes, "
              f"text adapter {FULL.text.batch_size} questions (attention in float32, as adapter.finetune on a CPU); "
              f"{options.steps} timed steps per run, median of {options.repeats} runs (min / max), precisions "
              "alternating. Above 1 in the last column, bf16 is slower here: `python -m adapter.tiny build --fp32`."),
             "", *table(["stage", "bf16 autocast, s per step", "float32, s per step", "bf16 / float32"], rows)]
    publish("\n".join(lines) + "\n", HEADING, options.write)


if __name__ == "__main__":
    sys.exit(run_main(main))
