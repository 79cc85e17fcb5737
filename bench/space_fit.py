"""How close `adapter.space`'s fit check (adapter.space_fit) comes to what `python app.py` holds on a CPU: a random
base of a given shape served as a Space would serve it, its peak resident memory while it loads and while it
answers a conversation that fills 2,048 tokens of context, against the sum the check counts for CPU hardware (weights,
KV cache, reading the prompt, the sessions kept, the 1 GiB for the app itself). The check must not count less than the
app takes. The app keeps 16 sessions (`--max-sessions`) here, the check counting as many: the one session this asks
from holds what `python -m bench.sessions` measures per session, not a thousand's.

    python -m bench.space_fit [--dim 4096 --layers 8] [--modes none,nf4,int8] [--write BENCHMARKS.md] [--smoke]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from adapter.config import ModelArgs
from adapter.loading import open_base_shape
from adapter.quantize import check_mode
from adapter.space_fit import BY_NAME, GIB, Served
from adapter.tokenizer import open_tokenizer
from bench.app import free_port, start_app
from bench.args import positive_int, run_main
from bench.decode import machine
from bench.load import write_checkpoint
from bench.report import command_line, publish, table
from bench.rss import status_gib

CONTEXT = 2048
NEW_TOKENS = 32
SESSIONS = 16  # the app's --max-sessions here (its least), and the check's
MESSAGE_CHARS = 3900  # the app takes messages of up to 4,000 characters: a long prompt comes as earlier turns
HEADING = "Space fit check against the app's memory"


def long_prompt(tokenizer, tokens: int) -> str:
    """Words that the base's tokenizer makes into about `tokens` tokens."""
    words, text = [], ""
    while len(tokenizer.encode(text, bos=True)) < tokens:
        words += [f"the {len(words)} red circles and blue stars"] * 16
        text = " ".join(words)
    while len(tokenizer.encode(text, bos=True)) > tokens:
        text = text[: int(len(text) * 0.98)]
    return text


def measure(folder: Path, mode: str) -> tuple[float, float, float, float, int]:
    """(peak GiB while loading, resident GiB once loaded, peak GiB while answering, the check's sum in GiB, prompt
    tokens) of the app
    serving `folder` in `mode` on the CPU."""
    from gradio_client import Client

    flags = ["--base", str(folder), "--quantize", mode, "--no-train-tab", "--no-upload", "--no-push",
             "--max-new-tokens", str(NEW_TOKENS), "--max-sessions", str(SESSIONS)]
    checkpoint = open_base_shape(folder)
    variables = {"ADAPTER_BASE": str(folder), "ADAPTER_QUANTIZE": mode, "ADAPTER_MAX_SESSIONS": str(SESSIONS)}
    need = Served.read(variables, checkpoint).need(
        BY_NAME["cpu-upgrade"], on_gpu=False)
    tokenizer = open_tokenizer(checkpoint.tokenizer_path)
    prompt = long_prompt(tokenizer, CONTEXT - NEW_TOKENS - 64)  # room for the prompt format's own tokens
    port = free_port()
    process, _ = start_app(flags, port, timeout=900)
    try:
        loading, idle = status_gib(process.pid, "VmHWM"), status_gib(process.pid, "VmRSS")
        Path(f"/proc/{process.pid}/clear_refs").write_text("5", encoding="utf-8")  # the peak from here on: the answer's
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        *earlier, question = [prompt[start:start + MESSAGE_CHARS] for start in range(0, len(prompt), MESSAGE_CHARS)]
        if len(earlier) % 2:  # the turns end with an answer
            earlier.append("yes")
        history = [{"role": "user" if i % 2 == 0 else "assistant", "content": [{"type": "text", "text": text}]}
                   for i, text in enumerate(earlier)]
        client.predict(question, history, 1.0, 1.0, 0.0, 0.75, NEW_TOKENS, 0, api_name="/chat")
        time.sleep(0.5)
        answering = status_gib(process.pid, "VmHWM")
    finally:
        process.terminate()
        process.wait(timeout=60)
    return loading, idle, answering, need.total / GIB, len(tokenizer.encode(prompt, bos=True))


def quantize_modes(text: str) -> list[str]:
    """`none,nf4,int8` as a list, each one the app's --quantize takes (argparse's one-line error otherwise)."""
    modes = [mode.strip() for mode in text.split(",")]
    for mode in modes:
        try:
            check_mode(mode)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return modes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.space_fit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=positive_int, default=4096)
    parser.add_argument("--layers", type=positive_int, default=8)
    parser.add_argument("--modes", default="none,nf4,int8", type=quantize_modes,
                        help="the app's --quantize values to measure")
    parser.add_argument("--write", help="replace this benchmark's section of this markdown file (e.g. BENCHMARKS.md)")
    parser.add_argument("--smoke", action="store_true", help="a dim-256, one-layer base in none and nf4 (the tests)")
    options = parser.parse_args(argv)
    if options.smoke:
        options.dim, options.layers, options.modes = 256, 1, ["none", "nf4"]
    args = ModelArgs(dim=options.dim, n_layers=options.layers, n_heads=options.dim // 128, vocab_size=512,
                     multiple_of=256, max_seq_len=CONTEXT)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        write_checkpoint(Path(folder), args)
        for mode in options.modes:
            loading, idle, answering, counted, prompt = measure(Path(folder), mode)
            rows.append([mode, *(f"{gib:.2f}" for gib in (loading, idle, answering, counted)),
                         f"{counted / max(loading, answering):.2f}"])
    text = "\n".join([
        f"## {HEADING} (CPU)",
        "",
        (f"Machine: {machine()}. Command: `{command_line('bench.space_fit', argv)}`. A random base of dim "
         f"{options.dim}, {options.layers} layers, vocabulary 512 (its random tokenizer's; Meta layout, fp16 on "
         "disk, float32 as the app holds it on a CPU), served by `python app.py --quantize MODE` (no adapter); one "
         f"greedy answer of {NEW_TOKENS} tokens (`--max-sessions {SESSIONS}`, the check counting as many) after a "
         f"conversation of about {prompt:,} tokens (earlier turns and a "
         "question; with the prompt format's, about 2,048 of context). Peak resident memory of the app's process "
         "(VmHWM) while it starts and loads, then, reset, while it answers; against the sum `adapter.space`'s fit "
         "check counts on CPU hardware. The check must count at least the larger peak (ratio >= 1)."),
        "",
        *table(("--quantize", "peak while loading, GiB", "resident once loaded, GiB", "peak while answering, GiB",
                "fit check's sum, GiB", "sum / larger peak"), rows),
        "",
    ])
    publish(text, HEADING, options.write, smoke=options.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
