"""Which thread loads the model, and how fast the threads that answer then run torch (adapter.main_thread): the
tiny model's greedy decoding and a few training steps of its text adapter's recipe on a worker thread (as a server
answers, and as the app's Train tab trains), after loading the model on the main thread (how the app and the API
server loaded it before) or on a helper thread (`off_the_main_thread`, how they load it now), beside everything on
the main thread and the `OMP_NUM_THREADS=1` advice. Each case runs in a fresh process: OpenMP's state is the
process's.

    python -m bench.threads [--threads 2] [--repeats 5] [--write BENCHMARKS.md]

Needs the embedded tiny model (assets/tiny/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.decode import machine
from bench.report import command_line, publish, spread, stat

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Name three shapes and their colours."
NEW_TOKENS = 64
TRAIN_STEPS = 20
CASES = {  # name: (where the model is loaded, where it works, extra environment)
    "everything on the main thread": ("main", "main", {}),
    "loaded on the main thread": ("main", "worker", {}),
    "loaded off the main thread": ("helper", "worker", {}),
    "OMP_NUM_THREADS=1, loaded on the main thread": ("main", "worker", {"OMP_NUM_THREADS": "1"}),
}


def on(where: str, work: Callable[[], object]) -> object:
    """`work()` on the main thread, or on a thread of its own."""
    if where == "main":
        return work()
    from adapter.main_thread import off_the_main_thread

    return off_the_main_thread(work)


def measure(load_on: str, work_on: str, repeats: int, threads: int) -> dict[str, list[float]]:
    """One case, in this process: decode tokens/s and seconds of TRAIN_STEPS training steps, per repeat."""
    import torch

    import adapter
    from adapter.app_config import ServeConfig
    from adapter.finetune import RunHooks, train
    from adapter.live_training import TrainRequest
    from app import tiny_training_records

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads)
    model = on(load_on, lambda: adapter.load("tiny", adapter="tiny-text"))
    prompt = adapter.alpaca(QUESTION)
    request = TrainRequest(data=str(tiny_training_records(ServeConfig())), prompt_len=20, prompt_layers=4)

    def decode() -> float:
        model.generate(prompt, temperature=0.0, max_new_tokens=NEW_TOKENS, gate_scale=0.0)  # warm-up
        started = time.perf_counter()
        model.generate(prompt, temperature=0.0, max_new_tokens=NEW_TOKENS, gate_scale=0.0)
        return NEW_TOKENS / (time.perf_counter() - started)

    def steps() -> float:
        with tempfile.TemporaryDirectory() as folder:
            config = request.config(str(model.base_path), Path(folder, "run"), model.args.max_seq_len)
            started = time.perf_counter()
            train(config.__class__(**{**config.to_dict(), "max_steps": TRAIN_STEPS}), RunHooks(base=model))
            return time.perf_counter() - started

    return {"decode": [on(work_on, decode) for _ in range(repeats)],
            "train": [on(work_on, steps) for _ in range(max(2, repeats // 2))]}


def run_case(name: str, repeats: int, threads: int) -> dict[str, list[float]]:
    load_on, work_on, environment = CASES[name]
    done = subprocess.run([sys.executable, "-m", "bench.threads", "--case", name, "--repeats", str(repeats),
                           "--threads", str(threads)], cwd=ROOT, env={**os.environ, **environment}, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.threads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", help="replace the threads section of this markdown file (e.g. BENCHMARKS.md)")
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)  # one case, in this process
    options = parser.parse_args(argv)
    from adapter.app_config import tiny_available

    if not tiny_available():
        raise SystemExit("bench.threads: needs the embedded tiny model (python -m adapter.tiny build)")
    if options.case:
        print(json.dumps(measure(*CASES[options.case][:2], options.repeats, options.threads)))
        return 0
    results = {name: run_case(name, options.repeats, options.threads) for name in CASES}
    base = stat(results["everything on the main thread"]["decode"])[0]
    rows = [f"| {name} | {CASES[name][1]} thread | {spread(stat(r['decode']), 0)} ({stat(r['decode'])[0] / base:.2f}x) "
            f"| {spread(stat(r['train']), 2)} |" for name, r in results.items()]
    text = "\n".join([
        "## Threads: where the model is loaded, and how fast the other threads then run torch",
        "",
        (f"Machine: {machine()}. Command: `{command_line('bench.threads', argv)}`. The embedded tiny model (text "
         f"adapter): greedy decoding of {NEW_TOKENS} tokens at gate 0, tokens/s, median (min / max) of "
         f"{options.repeats}; {TRAIN_STEPS} training steps of the Train tab's starting settings on the loaded model's "
         f"base, s, of {max(2, options.repeats // 2)}. Each case in a fresh process; a worker thread is a new thread, "
         "as a server's or the Train tab's. `python app.py` and `python -m adapter.openai_api` load off the main "
         "thread (adapter.main_thread)."),
        "",
        "| case | works on | decode tokens/s (/ all on the main thread) | training steps, s |",
        "|---|---|---|---|",
        *rows,
        "",
    ])
    publish(text, "Threads:", options.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
