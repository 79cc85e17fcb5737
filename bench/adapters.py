"""Several adapters on one base (CPU): what serving N adapters costs, each loaded with its own copy of the base
(N calls of `adapter.load`) against all on one shared base (`adapter.load`, then `adapter.load_sharing`), as
`python app.py --adapter A B ...` does. Per row: resident memory above the process before loading and the time
to load, each from a fresh process. The adapters are v2 (biases, tuned norms, prompts), randomized; each one
served on the shared base is first checked to give exactly the logits it gives loaded alone.

    python -m bench.adapters [--threads 2] [--repeats 3] [--counts 1,2,4] [--precisions fp32,nf4] [--smoke]
                             [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from adapter import load, load_sharing, save_adapter
from adapter.config import AdapterArgs, ModelArgs
from bench.args import positive_ints, run_main
from bench.decode import machine
from bench.load import write_checkpoint
from bench.peers import PRECISIONS, chosen_precisions, fresh_process_flags, quiet
from bench.report import command_line, publish, ratio, spread, stat, table, versions
from bench.rss import current_mb
from bench.shapes import describe, shapes

HEADING = "Several adapters on one base (CPU)"
WAYS = ("separate", "shared")


def adapter_shape(smoke: bool) -> AdapterArgs:
    """The benchmark's v1 adapter with the v2 parts BIAS-7B has: biases and tuned norms."""
    return dataclasses.replace(shapes(smoke)[1], bias=True, norm=True)


def write_adapters(folder: Path, args: ModelArgs, adapter: AdapterArgs, count: int) -> list[Path]:
    """`count` different random adapters for the base in `folder/meta`."""
    model = load(folder / "meta", adapter=adapter, device="cpu", max_seq_len=args.max_seq_len)
    paths = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for _, param in model.trainable_parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        paths.append(save_adapter(model, folder / f"adapter{index}").parent)
    return paths


def load_all(folder: Path, precision: str, paths: Sequence[Path], way: str, args: ModelArgs) -> list:
    """The models serving `paths`: each on its own base (separate) or all on the first one's (shared)."""
    dtype, quantize = PRECISIONS[precision]
    first = load(folder / "meta", adapter=paths[0], quantize=quantize, dtype=dtype, device="cpu",
                 max_seq_len=args.max_seq_len)
    if way == "shared":
        return [first] + [load_sharing(first, path) for path in paths[1:]]
    return [first] + [load(folder / "meta", adapter=path, quantize=quantize, dtype=dtype, device="cpu",
                           max_seq_len=args.max_seq_len) for path in paths[1:]]


def worker(folder: str, precision: str, count: int, way: str, smoke: bool) -> dict:
    """In this (fresh) process: load `count` adapters one way; memory above the process before, seconds."""
    quiet()
    args = shapes(smoke)[0]
    paths = sorted(Path(folder).glob("adapter*"))[:count]
    gc.collect()
    before = current_mb()
    start = time.perf_counter()
    models = load_all(Path(folder), precision, paths, way, args)
    seconds = time.perf_counter() - start
    gc.collect()
    return {"mb": current_mb() - before, "s": seconds, "models": len(models)}


def run_worker(folder: str, precision: str, count: int, way: str, *, threads: int, smoke: bool) -> dict:
    command = [sys.executable, "-m", "bench.adapters", "--worker", way, "--folder", folder, "--precisions",
               precision, "--counts", str(count), "--threads", str(threads)] + (["--smoke"] if smoke else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{way} {precision} worker with {count} adapters failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check(folder: Path, precision: str, paths: Sequence[Path], args: ModelArgs) -> float:
    """The largest logit difference between each adapter on the shared base and the same adapter alone (0.0:
    the same floats); raises if an adapter computes something else."""
    tokens = torch.randint(0, args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    shared = load_all(folder, precision, paths, "shared", args)
    separate = load_all(folder, precision, paths, "separate", args)
    worst = 0.0
    with torch.no_grad():
        for one, alone in zip(shared, separate):
            for model in (one, alone):  # bitsandbytes repacks 4-bit weights on a first call (AVX512-BF16 CPUs)
                model(tokens)
            worst = max(worst, (one(tokens) - alone(tokens)).abs().max().item())
    if worst != 0.0:
        raise RuntimeError(f"{precision}: an adapter on the shared base differs from itself alone by {worst}")
    return worst


def render(rows: list[tuple[str, ...]], checked: list[str], heading: str, command: str, repeats: int,
           adapter_mb: float) -> str:
    lines = [f"## {heading}", "", f"`{command}`", "", f"Machine: {machine()}; {versions()}.", "",
             f"Median (min / max) of {repeats} fresh process(es) per figure: resident memory above the process before "
             f"loading, and seconds to load. One adapter's learned tensors: {adapter_mb:.2f} MB in float32. Checked "
             f"first: every adapter on the shared base gives exactly the logits it gives alone "
             f"({', '.join(checked)}).", ""]
    lines += table(["precision", "adapters", "separate bases: MB", "one shared base: MB", "separate / shared",
                    "separate: s", "shared: s"], rows)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.adapters", description=__doc__.split("\n\n")[0])
    fresh_process_flags(parser, "fresh processes per figure", WAYS)
    parser.add_argument("--counts", type=positive_ints, default="1,2,4",
                        help="comma-separated numbers of adapters served")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    precisions = chosen_precisions(parser, options)
    counts = options.counts
    if min(counts) < 1:
        parser.error(f"--counts: each must be 1 or more, got {options.counts}")
    if options.worker:
        print(json.dumps(worker(options.folder, precisions[0], counts[0], options.worker, options.smoke)))
        return 0
    quiet()
    args, adapter = shapes(options.smoke)[0], adapter_shape(options.smoke)
    repeats = 1 if options.smoke else options.repeats
    rows, checked = [], []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        write_checkpoint(folder / "meta", args)
        paths = write_adapters(folder, args, adapter, max(counts))
        adapter_mb = sum(t.numel() for t in load(folder / "meta", adapter=paths[0], device="cpu")
                         .adapter_state_dict().values()) * 4 / 2**20
        for precision in precisions:
            check(folder, precision, paths[:2], args)
            checked.append(f"{precision}: 0.0")
            for count in counts:
                runs = {way: [run_worker(name, precision, count, way, threads=options.threads, smoke=options.smoke)
                              for _ in range(repeats)] for way in WAYS}
                memory = {way: stat([r["mb"] for r in runs[way]]) for way in WAYS}
                seconds = {way: stat([r["s"] for r in runs[way]]) for way in WAYS}
                rows.append((precision, str(count), spread(memory["separate"]), spread(memory["shared"]),
                             ratio(memory["separate"], memory["shared"]),
                             spread(seconds["separate"], 2), spread(seconds["shared"], 2)))
    heading = f"{HEADING}: {describe(args, adapter)}, plus biases and tuned norms (v2)" + (
        " (--smoke: tiny shapes, figures mean nothing)" if options.smoke else "")
    publish(render(rows, checked, heading, command_line("bench.adapters", argv), repeats, adapter_mb), HEADING,
            options.write, smoke=options.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
