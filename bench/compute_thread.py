"""What the device's compute thread buys a server (adapter.device_work): the tiny model's greedy decoding and the
Train tab's training steps asked for from a pool of 4 worker threads, as gradio and uvicorn ask, with the model
loaded on the main thread and its work run on whichever worker asks (how the app ran before) against loaded and
run on the device's compute thread (how it runs now); beside them, everything on the main thread, as a command line
runs. Each case in a fresh process: OpenMP's state is the process's.

    python -m bench.compute_thread [--threads 2] [--repeats 5] [--write BENCHMARKS.md]

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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.args import positive_int, run_main
from bench.decode import machine
from bench.report import command_line, publish, spread, stat, table

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Name three shapes and their colours."
NEW_TOKENS = 64
TRAIN_STEPS = 20
WORKERS = 4
CASES = ("all on the main thread (a command line)", "on the worker that asks (the app before)",
         "on the device's compute thread (the app now)")


def measure(case: int, repeats: int) -> dict[str, list[float]]:
    """One case, in this process: decode tokens/s and seconds of TRAIN_STEPS training steps, per repeat."""
    import adapter
    from adapter.app_config import ServeConfig
    from adapter.app_examples import tiny_training_records
    from adapter.device_work import DeviceWork, start_compute_thread
    from adapter.engine import Engine, Settings
    from adapter.finetune import RunHooks, train
    from adapter.live_training import TrainRequest

    if case == 2:
        start_compute_thread("cpu")
    model = DeviceWork("cpu").run(adapter.load, "tiny", adapter="tiny-text")
    engine = Engine(model, max_new_tokens=NEW_TOKENS)
    greedy = Settings(gate_scale=0.0, temperature=0.0, max_new_tokens=NEW_TOKENS)
    prompt = adapter.alpaca(QUESTION)
    request = TrainRequest(data=str(tiny_training_records(ServeConfig())), prompt_len=20, prompt_layers=4)

    def decode() -> float:
        tokens: list[int] = []
        started = time.perf_counter()
        for _ in engine.complete(prompt, greedy, generated=tokens):  # the frozen base writes on to the limit
            pass
        return len(tokens) / (time.perf_counter() - started)

    def steps() -> float:
        with tempfile.TemporaryDirectory() as folder:
            config = request.config(str(model.base_path), Path(folder, "run"), model.args)
            config = config.__class__(**{**config.to_dict(), "max_steps": TRAIN_STEPS})
            started = time.perf_counter()
            train(config, RunHooks(base=model, step_runner=engine.work.run))
            return time.perf_counter() - started

    if case == 0:
        decode()  # warm-up
        return {"decode": [decode() for _ in range(repeats)], "train": [steps() for _ in range(2)]}
    with ThreadPoolExecutor(WORKERS) as workers:  # each request on a free worker, one at a time, as a server's pool
        list(workers.map(lambda _: decode(), range(WORKERS)))  # warm-up: every worker at once, each once
        return {"decode": [workers.submit(decode).result() for _ in range(repeats)],
                "train": [workers.submit(steps).result() for _ in range(2)]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compute_thread", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--write", help="replace this benchmark's section of this markdown file (e.g. BENCHMARKS.md)")
    parser.add_argument("--case", type=int, choices=range(len(CASES)), help=argparse.SUPPRESS)  # one, here
    options = parser.parse_args(argv)
    from adapter.app_config import tiny_available

    if not tiny_available():
        raise SystemExit("bench.compute_thread: needs the embedded tiny model (python -m adapter.tiny build)")
    if options.case is not None:
        import torch

        torch.set_num_threads(options.threads)
        print(json.dumps(measure(options.case, options.repeats)))
        return 0
    results = []
    for case in range(len(CASES)):
        done = subprocess.run([sys.executable, "-m", "bench.compute_thread", "--case", str(case), "--repeats",
                               str(options.repeats), "--threads", str(options.threads)], cwd=ROOT, env=os.environ,
                              check=True, capture_output=True, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    before, now = (stat(results[i]["decode"])[0] for i in (1, 2))
    rows = [(name, spread(stat(r["decode"]), 0), spread(stat(r["train"]), 2)) for name, r in zip(CASES, results)]
    text = "\n".join([
        "## Compute thread: where a server's model work runs",
        "",
        (f"Machine: {machine()}. Command: `{command_line('bench.compute_thread', argv)}`. The embedded tiny model "
         f"(text adapter) through `Engine.complete`: greedy continuations of {NEW_TOKENS} tokens at gate 0, tokens/s, "
         f"median (min / max) of {options.repeats}; {TRAIN_STEPS} training steps at the Train tab's starting "
         f"settings on the loaded model's base, s, of 2. Requests, one at a time, come from a pool of {WORKERS} "
         "worker threads (each has asked once before) but in the first case. Each case in a fresh process. The "
         f"compute thread's decoding: {now / before:.2f}x the rate of decoding on the worker that asks."),
        "",
        *table(("where the model's work runs", "decode tokens/s", "training steps, s"), rows),
        "",
    ])
    publish(text, "Compute thread:", options.write)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
