"""Load benchmark: time and peak resident memory to load a LLaMA-7B-shaped Meta checkpoint (random fp16
weights, 13.5 GB, written once by this benchmark) into nf4 on the CPU.

    python -m bench.load [--folder /tmp/llama-7b-random] [--quantize nf4] [--write BENCHMARKS.md]

Each load runs in a fresh process, so its peak RSS (ru_maxrss) is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from adapter.config import ModelArgs
from bench.report import publish

LLAMA_7B = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-6)


def write_checkpoint(folder: Path, args: ModelArgs = LLAMA_7B) -> None:
    """Random fp16 weights in Meta's layout; one storage per tensor, like Meta's files."""
    from adapter.model import Transformer
    from adapter.random_model import train_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    noise = torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)).to(torch.float16) * 0.02
    state = {}
    for index, (name, shape) in enumerate(shapes.items()):
        count = shape.numel()
        flat = torch.empty(count, dtype=torch.float16)
        for start in range(0, count, noise.numel()):
            piece = flat[start:start + noise.numel()]
            piece.copy_(noise.roll(index * 7919 + start)[: piece.numel()])
        state[name] = flat.view(shape) if not name.endswith("norm.weight") else torch.ones(shape, dtype=torch.float16)
    torch.save(state, folder / "consolidated.00.pth")
    del state
    params = {"dim": args.dim, "multiple_of": args.multiple_of, "n_heads": args.n_heads, "n_layers": args.n_layers,
              "norm_eps": args.norm_eps, "vocab_size": args.vocab_size}
    (folder / "params.json").write_text(json.dumps(params))
    train_tokenizer(folder / "tokenizer.model")  # a small one: the benchmark only needs the weights


_CHILD = """
import json, resource, sys, time, torch
import adapter
start = time.perf_counter()
model = adapter.load(sys.argv[1], quantize=sys.argv[2], device="cpu")
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
tokens = torch.tensor([model.tokenizer.encode("The red circle")])
with torch.no_grad():
    model(tokens)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"seconds": seconds, "peak_rss_gb": peak, "peak_after_forward_gb": after}))
"""


def measure_load(folder: Path, quantize: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), quantize], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default="/tmp/llama-7b-random")
    parser.add_argument("--quantize", default="nf4", choices=("nf4", "int8", "none"))
    parser.add_argument("--write", help="replace the load section of this markdown file (e.g. BENCHMARKS.md)")
    options = parser.parse_args(argv)
    folder = Path(options.folder)
    if not (folder / "consolidated.00.pth").exists():
        started = time.perf_counter()
        write_checkpoint(folder)
        print(f"wrote the random 7B checkpoint in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    size = (folder / "consolidated.00.pth").stat().st_size / 1e9
    result = measure_load(folder, options.quantize)
    command = "python -m bench.load " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        f"## Load (CPU): LLaMA-7B-shaped Meta checkpoint, {size:.1f} GB fp16, into {options.quantize}",
        "",
        f"Command: `{command.strip()}`. One fresh process; peak RSS is its ru_maxrss. Target: under 6 GB.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| load time, s | {result['seconds']:.1f} |",
        f"| peak resident memory while loading, GB | {result['peak_rss_gb']:.2f} |",
        f"| peak resident memory after one forward pass, GB | {result['peak_after_forward_gb']:.2f} |",
        "",
    ])
    publish(text, "Load (CPU)", options.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
