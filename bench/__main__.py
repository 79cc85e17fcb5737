"""`python -m bench`: every benchmark on this machine, one fresh process after another, each rewriting its own
section of BENCHMARKS.md, under a first section that names the machine, the command and what ran.

    python -m bench [--write BENCHMARKS.md] [--threads 2] [--repeats N] [--only NAME,...] [--with-load] [--smoke]

bench.load (writes a 13.5 GB checkpoint once, then 2+ minutes and 6 GB of memory) runs only with --with-load;
the GPU benchmark runs when this machine has a GPU (elsewhere: bench/gpu.sh on a GPU machine). --smoke runs the
benchmarks that have tiny shapes (decode_peers, memory, adapters, scaling, train, sessions, answers, space_fit,
tied, v2_parts, logprobs, gpu) once each: it checks the harness, and its figures mean nothing, so give it a --write file of
its own.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adapter.benchmarks_file import replace_section
from bench.args import positive_int, run_main
from bench.decode import machine
from bench.report import command_line, refuse_smoke_write, versions

HEADING = "This run"


@dataclass(frozen=True)
class Benchmark:
    name: str
    threads: bool  # takes --threads
    repeats: bool  # takes --repeats
    smoke: bool  # has --smoke


BENCHMARKS = (Benchmark("decode", True, True, False), Benchmark("decode_peers", True, True, True),
              Benchmark("memory", True, True, True), Benchmark("adapters", True, True, True),
              Benchmark("scaling", True, True, True),
              Benchmark("visual", True, True, False), Benchmark("train", True, True, True),
              Benchmark("attention", True, True, False), Benchmark("autocast", True, True, False),
              Benchmark("app", False, True, False), Benchmark("train_tab", False, True, False),
              Benchmark("sessions", False, False, True),
              Benchmark("compute_thread", True, True, False),
              Benchmark("answers", True, True, True), Benchmark("space_fit", False, False, True),
              Benchmark("tied", True, False, True), Benchmark("v2_parts", True, True, True),
              Benchmark("logprobs", True, True, True),
              Benchmark("load", False, False, False),
              Benchmark("gpu", False, True, True))


def chosen(options: argparse.Namespace) -> tuple[list[Benchmark], list[str]]:
    """The benchmarks this run runs, and a note for each one it leaves out."""
    names = [name.strip() for name in options.only.split(",") if name.strip()] if options.only is not None \
        else [b.name for b in BENCHMARKS]
    unknown = sorted(set(names) - {b.name for b in BENCHMARKS})
    if unknown or not names:  # (an empty --only ran the whole suite)
        raise SystemExit(f"--only: unknown benchmark(s) {unknown}; choose from {[b.name for b in BENCHMARKS]}")
    run, left = [], []
    for b in BENCHMARKS:
        if b.name not in names:
            continue
        if options.smoke and not b.smoke:
            left.append(f"{b.name} (no --smoke mode)")
        elif b.name == "load" and not options.with_load:
            left.append("load (needs --with-load: a 13.5 GB checkpoint, minutes; its section, if any, is from an "
                        "earlier `python -m bench.load`)")
        elif b.name == "gpu" and not options.smoke and not torch.cuda.is_available():
            left.append("gpu (no GPU here: bash bench/gpu.sh on a GPU machine)")
        else:
            run.append(b)
    return run, left


def arguments(b: Benchmark, options: argparse.Namespace) -> list[str]:
    out = ["--threads", str(options.threads)] if b.threads else []
    out += ["--repeats", str(options.repeats)] if b.repeats and options.repeats else []
    out += ["--smoke"] if options.smoke else []
    return out + (["--write", options.write] if options.write else [])


def summary(command: str, ran: list[str], failed: list[str], left: list[str], threads: int) -> str:
    cores = f"{platform.machine()}, {os.cpu_count()} logical CPUs"
    lines = [f"## {HEADING}: `{command}`", "",
             (f"Machine: {machine()} ({cores}); {versions()}; Python {platform.python_version()}. Each benchmark "
              f"ran in its own process with {threads} threads, one after another; its section names its command. "
              "A section rewritten since by its own command (`python -m bench.NAME --write`) is newer than this "
              "run, and names the machine it ran on."), "",
             f"- ran: {', '.join(ran) or 'nothing'}"]
    lines += [f"- failed: {', '.join(failed)} (their sections were not rewritten)"] if failed else []
    lines += [f"- not run: {note}" for note in left]
    return "\n".join(lines + [""])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", help="the markdown file every section goes to (e.g. BENCHMARKS.md)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, help="runs per figure (default: each benchmark's own)")
    parser.add_argument("--only", help="comma-separated: " + ", ".join(b.name for b in BENCHMARKS))
    parser.add_argument("--with-load", action="store_true", help="also bench.load (13.5 GB written once, minutes)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, once each: checks the harness")
    options = parser.parse_args(argv)
    if options.smoke:
        refuse_smoke_write(options.write)  # now, not after every benchmark ran
    torch.set_num_threads(options.threads)  # so that the machine line says what the benchmarks use
    run, left = chosen(options)
    ran, failed = [], []
    for b in run:
        print(f"== bench.{b.name}", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, "-m", f"bench.{b.name}", *arguments(b, options)], check=False)
        (ran if done.returncode == 0 else failed).append(b.name)
    text = summary(command_line("bench", argv), ran, failed, left, options.threads)
    print(text)
    if options.write:
        replace_section(options.write, HEADING, text, first=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
