"""Peak memory of generation at 512 and 2048 tokens of context, ours beside transformers + peft, fp32 and nf4.

Every figure comes from a fresh process that loads one side, resets its peak resident memory (bench.rss) and
greedy-decodes 64 tokens after a prompt of (context - 64) tokens: the peak while generating, and how much of it
is above the loaded model (KV cache, activations, logits); ours also with its KV cache in int8. The pair is
checked to compute the same thing first (bench.compare), as for the timed benchmarks.

    python -m bench.memory [--threads 2] [--repeats 3] [--contexts 512,2048] [--precisions fp32,nf4] [--smoke]
                           [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence

import torch

from bench.args import positive_ints, run_main
from bench.compare import Check, Ours, Peer, check_lines, checked_pair, greedy, prompt
from bench.decode import machine
from bench.peers import Weights, chosen_precisions, fresh_process_flags, load_ours, load_peer, quiet, write_weights
from bench.report import command_line, publish, ratio, spread, stat, table, versions
from bench.rss import current_mb, peak_mb, reset_peak
from bench.shapes import describe, shapes, with_layers

HEADING = "Memory of generation (CPU)"
NEW_TOKENS = 64
PAIR = ("ours", "peer")
SIDES = ("ours", "ours-int8-kv", "peer")  # ours-int8-kv: ours with its KV cache in int8 (adapter.kv_cache)


def worker(folder: str, side: str, precision: str, context: int, new_tokens: int, layers: int | None,
           timed: int, smoke: bool) -> dict:
    """In this (fresh) process: load one side, then one generation measured for memory, then `timed` more
    for tokens/s. `layers` overrides the adapter's prompt layers."""
    quiet()
    args, adapter = shapes(smoke)
    if layers is not None:
        adapter = with_layers(adapter, layers)
    weights = Weights.at(folder, args)
    if side == "peer":
        model = Peer(load_peer(weights, precision, adapter).eval())
    else:
        model = Ours(load_ours(weights, precision, adapter).eval())
        model.model.kv_cache = "int8" if side == "ours-int8-kv" else "auto"
    tokens = prompt(1, context - new_tokens, args.vocab_size)
    gc.collect()
    reset = reset_peak()
    loaded = current_mb()
    greedy(model, tokens, new_tokens)
    peak = peak_mb()
    rates = [greedy(model, tokens, new_tokens).tokens_per_s for _ in range(timed)]
    return {"loaded_mb": loaded, "peak_mb": peak, "own_mb": peak - loaded if reset else None,
            "tokens_per_s": rates}


def run_worker(folder: str, side: str, precision: str, context: int, *, threads: int, smoke: bool,
               new_tokens: int = NEW_TOKENS, layers: int | None = None, timed: int = 0) -> dict:
    """`worker` in a fresh process; its result."""
    command = [sys.executable, "-m", "bench.memory", "--worker", side, "--folder", folder, "--precisions", precision,
               "--contexts", str(context), "--new-tokens", str(new_tokens), "--timed", str(timed),
               "--threads", str(threads)]
    command += (["--layers", str(layers)] if layers is not None else []) + (["--smoke"] if smoke else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{side} {precision} worker at context {context} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def render(checks: list[Check], rows: list[tuple[str, ...]], heading: str, command: str, repeats: int) -> str:
    return "\n".join([
        f"## {heading}",
        "",
        (f"Machine: {machine()}; {versions()}. Command: `{command}`. Each figure: a fresh process loads one side, "
         f"then greedy-decodes {NEW_TOKENS} tokens after a prompt of (context - {NEW_TOKENS}) tokens: the peak "
         "resident memory while generating (VmHWM, reset after loading) and how much of it is above the loaded "
         "model (KV cache, activations, logits; absent where the kernel cannot reset the peak, which then includes "
         f"loading). Median of {repeats} processes per side, min / max in brackets. Peer: transformers + peft "
         "`adaption_prompt` with its DynamicCache, on the same weights; ours preallocates its KV cache for the "
         "whole context, in the model's dtype or (`kv_cache=\"int8\"`) in int8 with one scale per vector."),
        "",
        *check_lines(checks),
        "",
        *table(("precision", "context", "measure", "ours", "ours, int8 KV cache", "transformers + peft",
                "ours / peer"), rows),
        "",
    ])


def rows_for(precision: str, context: int, runs: dict[str, list[dict]]) -> list[tuple[str, ...]]:
    rows = []
    for key, name in (("peak_mb", "peak resident memory while generating, MB"),
                      ("own_mb", "of which above the loaded model, MB"), ("loaded_mb", "resident after loading, MB")):
        if runs["ours"][0][key] is None:
            continue
        a, small, b = (stat([r[key] for r in runs[side]]) for side in SIDES)
        rows.append((precision, str(context), name, spread(a, 0), spread(small, 0), spread(b, 0), ratio(a, b)))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    fresh_process_flags(parser, "fresh processes per side and figure", SIDES)
    parser.add_argument("--contexts", type=positive_ints, default="512,2048",
                        help="comma-separated total tokens (prompt + new)")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--timed", type=int, default=0, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    contexts = options.contexts
    precisions = chosen_precisions(parser, options)
    if options.worker:
        print(json.dumps(worker(options.folder, options.worker, precisions[0], contexts[0], options.new_tokens,
                                options.layers, options.timed, options.smoke)))
        return 0
    quiet()
    args, adapter = shapes(options.smoke)
    too_long = [c for c in contexts if not NEW_TOKENS < c <= args.max_seq_len]
    if too_long:
        parser.error(f"--contexts: {too_long} must be above {NEW_TOKENS} and at most {args.max_seq_len}")
    repeats = 1 if options.smoke else options.repeats
    checks, rows = [], []
    with tempfile.TemporaryDirectory() as folder:
        weights = write_weights(folder, args)
        for precision in precisions:
            checks.append(checked_pair(weights, precision, adapter)[2])
            gc.collect()
            for context in contexts:
                runs: dict[str, list[dict]] = {side: [] for side in SIDES}
                for _ in range(repeats):
                    for side in SIDES:
                        runs[side].append(run_worker(folder, side, precision, context, threads=options.threads,
                                                     smoke=options.smoke))
                rows += rows_for(precision, context, runs)
    heading = f"{HEADING}: {describe(args, adapter)}" + (" (--smoke: tiny shapes, figures mean nothing)"
                                                         if options.smoke else "")
    text = render(checks, rows, heading, command_line("bench.memory", argv), repeats)
    publish(text, HEADING, options.write, smoke=options.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
