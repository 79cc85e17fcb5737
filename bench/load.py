"""Load benchmark: time and peak resident memory to load a LLaMA-7B-shaped Meta checkpoint (random fp16
weights, 13.5 GB, written once by this benchmark) into nf4 on the CPU, quantizing while loading, against loading
the pre-quantized folder `adapter.quantize_base` writes from it (once, beside it; timed too), and with `--gguf`
against a llama.cpp GGUF file of the same weights in Q8_0 (dequantized, then quantized while loading), and with
`--gptq` against a GPTQ 4-bit folder of them (bench.gptq_file; read back to weights, then quantized while loading).

    python -m bench.load [--folder /tmp/llama-7b-random] [--quantize nf4] [--gguf] [--gptq] [--write BENCHMARKS.md]

Each load runs in a fresh process, so its peak RSS (VmHWM; unlike ru_maxrss, not inherited from this process,
which grew while writing the checkpoint) is its own; both print their last logits for one
prompt, compared here (the same codes and scales: equal).
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
from adapter.quantize_base import quantize_base
from bench.args import run_main
from bench.gptq_file import write_gptq
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
    (folder / "params.json").write_text(json.dumps(params), encoding="utf-8")
    train_tokenizer(folder / "tokenizer.model")  # a small one: the benchmark only needs the weights


_CHILD = """
import json, sys, time, torch
import adapter
from bench.rss import peak_mb
start = time.perf_counter()
model = adapter.load(sys.argv[1], quantize=sys.argv[2], device="cpu")  # "none": a pre-quantized folder as it is
seconds = time.perf_counter() - start
peak = peak_mb() / 1024
tokens = torch.tensor([model.tokenizer.encode("The red circle")])
with torch.no_grad():
    logits = model(tokens)[0, -1]
after = peak_mb() / 1024
print(json.dumps({"seconds": seconds, "peak_rss_gb": peak, "peak_after_forward_gb": after,
                  "logits": logits.float().tolist()}))
"""


def write_q8_0(folder: Path, target: Path) -> None:
    """The checkpoint as llama.cpp's converter writes it with `--outtype q8_0` (norms in F32)."""
    from adapter.formats import open_base
    from bench.gguf_file import Q, sentencepiece_vocab, write_gguf

    started = time.perf_counter()
    checkpoint = open_base(folder)
    tensors = {name: checkpoint.tensor(name) for name in sorted(checkpoint.keys())}
    staging = target.with_suffix(".tmp")
    write_gguf(staging, LLAMA_7B, tensors, lambda writer: sentencepiece_vocab(writer, folder / "tokenizer.model"),
               qtype=lambda name: Q.Q8_0)
    staging.rename(target)
    print(f"wrote {target} in {time.perf_counter() - started:.0f} s", file=sys.stderr)


def measure_load(folder: Path, quantize: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), quantize], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"loading {folder} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir()) / 1e9


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default="/tmp/llama-7b-random")
    parser.add_argument("--quantize", default="nf4", choices=("nf4", "int8", "none"),
                        help="none: only the fp16 checkpoint, loaded as it is")
    parser.add_argument("--gguf", action="store_true",
                        help="also load a GGUF file of the same weights in Q8_0 (written once, beside the checkpoint)")
    parser.add_argument("--gptq", action="store_true",
                        help="also load a GPTQ 4-bit folder of the same weights (written once, beside the checkpoint)")
    parser.add_argument("--write", help="replace the load section of this markdown file (e.g. BENCHMARKS.md)")
    options = parser.parse_args(argv)
    folder = Path(options.folder)
    if not (folder / "consolidated.00.pth").exists():
        started = time.perf_counter()
        write_checkpoint(folder)
        print(f"wrote the random 7B checkpoint in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    size = (folder / "consolidated.00.pth").stat().st_size / 1e9
    stored = folder.with_name(f"{folder.name}-{options.quantize}")
    written = None
    if options.quantize != "none" and not stored.exists():
        started = time.perf_counter()
        quantize_base(folder, stored, options.quantize, dtype="float16", device="cpu")
        written = time.perf_counter() - started
    rows = [("quantized while loading the fp16 checkpoint", measure_load(folder, options.quantize))]
    if options.quantize != "none":
        rows.append((f"the pre-quantized folder ({_gb(stored):.1f} GB)", measure_load(stored, "none")))
    gguf_file = folder.with_name(f"{folder.name}-q8_0.gguf")
    if options.gguf and options.quantize != "none":
        if not gguf_file.exists():
            write_q8_0(folder, gguf_file)
        rows.append((f"a GGUF file of the same weights in Q8_0 ({gguf_file.stat().st_size / 1e9:.1f} GB)",
                     measure_load(gguf_file, options.quantize)))
    gptq_folder = folder.with_name(f"{folder.name}-gptq")
    if options.gptq and options.quantize != "none":
        if not gptq_folder.exists():
            started = time.perf_counter()
            write_gptq(folder, gptq_folder)
            print(f"wrote {gptq_folder} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        rows.append((f"a GPTQ folder of the same weights, 4-bit, groups of 128 ({_gb(gptq_folder):.1f} GB)",
                     measure_load(gptq_folder, options.quantize)))
    command = "python -m bench.load " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"## Load (CPU): LLaMA-7B-shaped Meta checkpoint, {size:.1f} GB fp16, into {options.quantize}",
        "",
        f"Command: `{command.strip()}`. One fresh process per load; peak RSS is its VmHWM. Target: under 6 GB. "
        f"The pre-quantized folder is `python -m adapter.quantize_base {folder} {stored} --mode {options.quantize} "
        "--dtype float16 --device cpu`" + (f", written in {written:.0f} s by this run" if written else "") + ".",
        "",
        "| loaded from | load time, s | peak resident memory while loading, GB | after one forward pass, GB |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} | {r['peak_after_forward_gb']:.2f} |"
              for name, r in rows]
    if len(rows) >= 2:
        first, second = (torch.tensor(r["logits"]) for _, r in rows[:2])
        lines += ["", f"Largest difference between the first two loads' last logits: "
                      f"{(first - second).abs().max():.2g} (logits up to {first.abs().max():.2g})."]
    notes = {"a GGUF": "The GGUF file's: {0:.2g} from the first (its weights were rounded to Q8_0 before nf4, so some "
                       "nf4 codes differ, and 32 random layers amplify that; the reading itself is checked against "
                       "transformers' GGUF loader in tests/test_gguf.py). The file is written by `bench.gguf_file` in "
                       "llama.cpp's layout, beside the checkpoint.",
             "a GPTQ": "The GPTQ folder's: {0:.2g} from the first (rounded to 4 bits, then again to nf4; the reading "
                       "is checked against GPTQModel's own dequantizing in tests/test_packed.py). The folder is "
                       "written by `bench.gptq_file` (AutoGPTQ's layout, round-to-nearest codes), beside the "
                       "checkpoint."}
    for name, result in rows[2:]:
        difference = (first - torch.tensor(result["logits"])).abs().max()
        lines += [note.format(difference) for start, note in notes.items() if name.startswith(start)]
    text = "\n".join(lines + [""])
    publish(text, "Load (CPU)", options.write)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
