"""Decode beside transformers + peft: greedy tokens/s at batch 1 and 8 and time to first token for 64- and
512-token prompts, at fp32, bf16, nf4 and int8, as ours / peer ratios, beside the one-GEMV-per-weight floor.

Both sides hold the same weights (bench.peers) and are checked to compute the same thing before anything is
timed (bench.compare): a precision whose pair disagrees stops the run with the difference it saw. Where
`Transformer.step` has its `compile` option, the fp32 decode rates are timed through it too (checked first),
beside the floor of the kernel its one-row steps use (adapter.model.frozen_linear).

    python -m bench.decode_peers [--threads 2] [--repeats 5] [--precisions fp32,bf16,nf4,int8] [--no-compile]
                                 [--smoke] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import sys
import tempfile
from collections.abc import Callable, Sequence

import torch

from adapter.config import AdapterArgs
from adapter.model import Transformer
from bench.args import positive_int, run_main
from bench.compare import (
    CHECK_PROMPT,
    Check,
    Ours,
    Peer,
    PeerMismatch,
    check_lines,
    check_same,
    checked_pair,
    greedy,
    prompt,
)
from bench.decode import floor_tokens_per_s, machine, measure_side_by_side, reduction_floor_tokens_per_s
from bench.peers import PRECISIONS, Weights, quiet, write_weights
from bench.report import command_line, error_line, publish, ratio, spread, table, versions
from bench.shapes import describe, shapes

HEADING = "Decode vs transformers + peft (CPU)"
BLAS_FLOOR = "floor: one GEMV per weight matrix through the BLAS, tokens/s"
REDUCTION_FLOOR = "floor: one GEMV per weight matrix as the compiled step computes it (a fused reduction), tokens/s"
Side = Ours | Peer
# the decode path's torch.compile option, where this version of adapter has it
COMPILE = "compile" in inspect.signature(Transformer.step).parameters


def measures(vocab: int, new_tokens: int) -> list[tuple[str, Callable[[Side], float]]]:
    """What is timed on each side: (row name, one run giving the figure)."""
    def rate(batch: int) -> Callable[[Side], float]:
        return lambda side: greedy(side, prompt(batch, 16, vocab), new_tokens + 1).tokens_per_s

    def first_ms(length: int) -> Callable[[Side], float]:
        return lambda side: 1000 * greedy(side, prompt(1, length, vocab, seed=1), 1).first_token_s

    return [("greedy decode, batch 1, tokens/s", rate(1)), ("greedy decode, batch 8, tokens/s", rate(8)),
            ("time to first token, 64-token prompt, ms", first_ms(64)),
            ("time to first token, 512-token prompt, ms", first_ms(512))]


def run_precision(weights: Weights, precision: str, adapter: AdapterArgs, repeats: int, new_tokens: int,
                  compiled: bool) -> tuple[list[Check], list[tuple[str, ...]]]:
    """The equality check, then every measure on both sides (with the floor, for the plain fp32 weights); with
    `compiled`, the decode rates again through `Transformer.step(compile=True)`, checked first as well."""
    ours, peer, check = checked_pair(weights, precision, adapter)
    # the BLAS floor reads float32 nn.Linear weights; bf16 and bitsandbytes layers differ
    floor = (BLAS_FLOOR, lambda: floor_tokens_per_s(ours.model)) if precision == "fp32" else None
    checks = [check]
    rows = side_by_side_rows(ours, peer, precision, weights.args.vocab_size, repeats, new_tokens, floor)
    if compiled:
        more_checks, more_rows = compiled_rows(Ours(ours.model, compile=True), peer, precision,
                                               weights.args.vocab_size, repeats, new_tokens)
        checks, rows = checks + more_checks, rows + more_rows
    return checks, rows


def side_by_side_rows(ours: Side, peer: Side, precision: str, vocab: int, repeats: int, new_tokens: int,
                      floor: tuple[str, Callable[[], float]] | None = None, suffix: str = "",
                      rates_only: bool = False) -> list[tuple[str, ...]]:
    """Each measure on both sides in turn; with `floor` (its row name, one run of it), the floor joins the
    batch-1 rounds, and each side's batch-1 rate is given as a share of it."""
    rows = []
    for name, run in measures(vocab, new_tokens):
        if rates_only and "tokens/s" not in name:
            continue
        with_floor = floor is not None and name.endswith("batch 1, tokens/s")
        runs = [lambda run=run: run(ours), lambda run=run: run(peer)] + ([floor[1]] if with_floor else [])
        a, b, *floors = measure_side_by_side(runs, repeats)
        if with_floor:
            rows.append((precision, floor[0], spread(floors[0]), "", ""))
        rows.append((precision, f"{name}{suffix}", spread(a), spread(b), ratio(a, b)))
        if with_floor:
            rows.append((precision, f"decode, batch 1 / the floor above{suffix}", f"{a[0] / floors[0][0]:.0%}",
                         f"{b[0] / floors[0][0]:.0%}", ""))
    return rows


def compiled_rows(ours: Ours, peer: Peer, precision: str, vocab: int, repeats: int,
                  new_tokens: int) -> tuple[list[Check], list[tuple[str, ...]]]:
    """Decode rates through torch.compile (the first, compiling run is the warm-up), the batch-1 rounds with the
    floor of the kernel its one-row steps use; a compiler that fails is reported in the table rather than
    stopping the run, a compiled path that differs from the peer stops it."""
    label = f"{precision}, compiled"
    floor = (REDUCTION_FLOOR, lambda: reduction_floor_tokens_per_s(ours.model))
    try:
        check = check_same(ours, peer, precision, prompt(1, CHECK_PROMPT, vocab, seed=7))
        rows = side_by_side_rows(ours, peer, precision, vocab, repeats, new_tokens, floor,
                                 suffix=", through `step(compile=True)`", rates_only=True)
    except PeerMismatch as error:
        raise PeerMismatch(f"{label}: {error}") from error
    except RuntimeError as error:  # torch.compile's failures (no C++ compiler, an unsupported op, ...) are these
        reason = f"not available: {error_line(error, 200)}"
        return [], [(precision, "greedy decode through `step(compile=True)`", reason, "", "")]
    return [dataclasses.replace(check, precision=label)], rows


def render(checks: list[Check], rows: list[tuple[str, ...]], heading: str, command: str, repeats: int) -> str:
    return "\n".join([
        f"## {heading}",
        "",
        (f"Machine: {machine()}; {versions()}. Command: `{command}`. Median of {repeats} runs after a warm-up, "
         "min / max in brackets; the two sides run in turn, one run each per round, so that both see the "
         "machine's drift alike. Ours: `Transformer.step` with its static KV cache; peer: transformers "
         "LlamaForCausalLM + peft `adaption_prompt` with its own cache, the same prompts and gates; both greedy "
         "in one loop (bench.compare), batch-1 and batch-8 rates over the steps after the first token. The same "
         "weights: fp32/bf16 by dtype, nf4/int8 through `adapter.load(quantize=)` and transformers' "
         "`BitsAndBytesConfig` (bitsandbytes on the CPU). Rows \"through `step(compile=True)`\": our one-token "
         "steps through torch.compile (its compiling first run is the warm-up), in turn with the peer again."),
        "",
        *check_lines(checks),
        "",
        *table(("precision", "measure", "ours", "transformers + peft", "ours / peer"), rows),
        "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated, from "
                        + ", ".join(PRECISIONS))
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time fp32 decoding through Transformer.step(compile=True) (default: on)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one run: checks the harness, not speed")
    parser.add_argument("--write", help="replace this section of the markdown file (e.g. BENCHMARKS.md)")
    options = parser.parse_args(argv)
    precisions = options.precisions.split(",")
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        parser.error(f"--precisions: unknown {unknown}; choose from {list(PRECISIONS)}")
    quiet()
    torch.set_num_threads(options.threads)
    args, adapter = shapes(options.smoke)
    repeats, new_tokens = (1, 4) if options.smoke else (options.repeats, 64)
    checks, rows = [], []
    with tempfile.TemporaryDirectory() as folder:
        weights = write_weights(folder, args)
        for precision in precisions:
            more_checks, more = run_precision(weights, precision, adapter, repeats, new_tokens,
                                              options.compile and COMPILE and precision == "fp32")
            checks += more_checks
            rows += more
            gc.collect()  # the previous pair's memory back before the next pair loads
    heading = f"{HEADING}: {describe(args, adapter)}" + (" (--smoke: tiny shapes, figures mean nothing)"
                                                         if options.smoke else "")
    publish(render(checks, rows, heading, command_line("bench.decode_peers", argv), repeats), HEADING, options.write,
            smoke=options.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
