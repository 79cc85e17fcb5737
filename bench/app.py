"""App benchmark, as users see it: `python app.py` start-up time until it answers HTTP, time to first streamed
token and tokens/s through gradio_client, p50/p95 latency with 8 clients at once (every answer checked
complete: equal to the same request made alone), and what a gate sweep of 8 scales (one batch) costs against
one answer. CPU, the app's default --concurrency (1: one answer at a time), and the 8 clients again with
--concurrency 8, where the chats that wait for the device are decoded together (adapter.chat_batcher).

    python -m bench.app [--clients 8] [--max-new-tokens 64] [--write BENCHMARKS.md]

Serves the embedded tiny model when it is built (assets/tiny/), else the random demo model
(`adapter.random_demo`); the table heading says which.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from adapter.app_config import TINY_FOLDER, tiny_available
from adapter.tokenizer import Tokenizer, open_tokenizer
from bench.args import positive_int, run_main
from bench.decode import machine
from bench.report import publish

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Name three shapes and their colours."


def model_flags(folder: Path) -> tuple[list[str], Path, str]:
    """Flags for the app, its tokenizer (to count tokens) and how the model is named in the heading."""
    if tiny_available():
        return ["--base", "tiny"], next(TINY_FOLDER.rglob("tokenizer.model")), "embedded tiny model"
    from adapter.random_demo import write_random_demo

    files = write_random_demo(folder)
    return (files.flags(), files.base / "tokenizer.model",
            "random demo model: dim 64, 4 layers, v2 adapter with visual prompt; the tiny model is not built yet")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(flags: list[str], port: int, timeout: float = 300.0) -> tuple[subprocess.Popen, float]:
    """Start `python app.py` and wait until its page answers; seconds from spawn to ready. Its stderr goes to a
    file, not a pipe: a pipe nobody reads fills with warnings (bitsandbytes' int8 layers warn at every matmul on a
    CPU) and then blocks the app."""
    start = time.perf_counter()
    log = tempfile.TemporaryFile(encoding="utf-8", mode="w+")
    process = subprocess.Popen([sys.executable, "app.py", *flags, "--port", str(port), "--device", "cpu"],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True)
    while time.perf_counter() - start < timeout:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"app.py exited with {process.returncode}: {log.read().strip()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=1):
                return process, time.perf_counter() - start
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"app.py was not ready after {timeout:.0f} s")


def chat_arguments(max_new_tokens: int) -> list:
    """message, history, gate, delta, temperature, top_p, max new tokens, seed: greedy, so answers repeat; at
    gate 0, where the frozen base writes on to the token limit (the tiny adapter answers in a word or two)."""
    return [QUESTION, [], 0.0, 0.0, 0.0, 0.75, max_new_tokens, 0]


def answer_of(history: list) -> str:
    from adapter.app_handlers import to_pairs

    return to_pairs(history)[-1][1]


def stream_once(url: str, max_new_tokens: int, tokenizer: Tokenizer) -> tuple[float, float, str]:
    """(time to first streamed token in ms, tokens/s from the request to the answer's end, the answer) for one
    client. Not tokens/s after the first: gradio_client can hand over a fast answer's updates in one burst, which
    makes that interval about zero."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    start = time.perf_counter()
    job = client.submit(*chat_arguments(max_new_tokens), api_name="/chat")
    first = None
    for history in job:  # the first update shows the question; the next ones carry the answer
        if first is None and answer_of(history):
            first = time.perf_counter()
    end = time.perf_counter()
    answer = answer_of(job.result())
    if first is None:  # (a TypeError, and the benchmark ended without a result)
        raise SystemExit(f"bench.app: the app answered nothing to {QUESTION!r}; no first token to time")
    tokens = len(tokenizer.encode(answer, bos=False))
    return (first - start) * 1000, tokens / (end - start), answer


def concurrent(url: str, clients: int, max_new_tokens: int) -> tuple[list[float], list[str]]:
    """Latency (s) and answer of each of `clients` clients asking at the same moment."""
    from gradio_client import Client

    latencies, answers = [0.0] * clients, [""] * clients
    barrier = threading.Barrier(clients)

    def user(index: int) -> None:
        client = Client(url, verbose=False)
        barrier.wait()
        start = time.perf_counter()
        answers[index] = answer_of(client.predict(*chat_arguments(max_new_tokens), api_name="/chat"))
        latencies[index] = time.perf_counter() - start

    threads = [threading.Thread(target=user, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, answers


def sweep_against_one_answer(url: str, max_new_tokens: int, repeats: int) -> tuple[float, float, int]:
    """Median seconds of a whole gate sweep (the app's default scales, one batch) and of one whole answer at
    gate 0 (the frozen base writes on), taken in turn; and the sweep's row count."""
    from gradio_client import Client

    from adapter.engine import gate_scales
    from app import SWEEP

    client = Client(url, verbose=False)
    controls = chat_arguments(max_new_tokens)[2:]
    sweeps, singles = [], []
    for _ in range(repeats + 1):  # the first round warms the batch-of-8 path up
        start = time.perf_counter()
        client.predict(QUESTION, SWEEP, *controls, api_name="/sweep")
        sweeps.append(time.perf_counter() - start)
        start = time.perf_counter()
        client.predict(*chat_arguments(max_new_tokens), api_name="/chat")
        singles.append(time.perf_counter() - start)
    return statistics.median(sweeps[1:]), statistics.median(singles[1:]), len(gate_scales(SWEEP))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=positive_int, default=8)
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--repeats", type=positive_int, default=5, help="single-client streaming runs")
    parser.add_argument("--write", help="replace the app section of this markdown file (e.g. BENCHMARKS.md)")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        flags, tokenizer_path, model_name = model_flags(Path(folder))
        tokenizer = open_tokenizer(tokenizer_path)
        port = free_port()
        process, ready_s = start_app(flags, port)
        try:
            url = f"http://127.0.0.1:{port}/"
            stream_once(url, options.max_new_tokens, tokenizer)  # warm-up
            runs = [stream_once(url, options.max_new_tokens, tokenizer) for _ in range(options.repeats)]
            latencies, answers = concurrent(url, options.clients, options.max_new_tokens)
            sweep_s, single_s, rows = sweep_against_one_answer(url, options.max_new_tokens, options.repeats)
        finally:
            process.terminate()
            process.wait(timeout=30)
        process, _ = start_app([*flags, "--concurrency", str(options.clients)], port)
        try:
            concurrent(url, options.clients, options.max_new_tokens)  # warm-up: the first batch of this size
            together, together_answers = concurrent(url, options.clients, options.max_new_tokens)
        finally:
            process.terminate()
            process.wait(timeout=30)
    alone = runs[0][2]
    complete = sum(answer == alone for answer in answers)
    complete_together = sum(answer == alone for answer in together_answers)
    if min(complete, complete_together) != options.clients:
        raise RuntimeError(f"only {complete} (one at a time) and {complete_together} (decoded together) of "
                           f"{options.clients} concurrent answers equal the answer given alone")
    first_ms = statistics.median(r[0] for r in runs)
    rate = statistics.median(r[1] for r in runs)
    command = "python -m bench.app " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        f"## App (CPU, gradio_client): {model_name}",
        "",
        (f"Machine: {machine()}. Command: `{command.strip()}`. Default `python app.py` settings (--concurrency 1, "
         f"torch's default threads); greedy chat answers at gate 0 (the frozen base: it writes on) of "
         f"{options.max_new_tokens} new tokens at most "
         f"({len(tokenizer.encode(alone, bos=False))} here). Streaming and sweep figures: median of {options.repeats} "
         "runs."),
        "",
        "| measure | value |",
        "|---|---|",
        f"| `python app.py` start-up until the page answers, s | {ready_s:.1f} |",
        f"| time to first streamed token, one client, ms | {first_ms:.0f} |",
        f"| tokens/s of a whole answer (from the request to its end), one client | {rate:.0f} |",
        f"| {options.clients} clients at once: p50 latency, s | {percentile(latencies, 0.5):.2f} |",
        f"| {options.clients} clients at once: p95 latency, s | {percentile(latencies, 0.95):.2f} |",
        (f"| {options.clients} clients at once: answers complete (equal to the answer alone) | "
         f"{complete} / {options.clients} |"),
        (f"| {options.clients} clients at once, `--concurrency {options.clients}` (their chats decoded together): "
         f"p50 / p95 latency, s | {percentile(together, 0.5):.2f} / {percentile(together, 0.95):.2f} "
         f"({percentile(latencies, 0.5) / percentile(together, 0.5):.1f}x faster at p50) |"),
        (f"| {options.clients} clients at once, `--concurrency {options.clients}`: answers complete | "
         f"{complete_together} / {options.clients} |"),
        (f"| gate sweep of {rows} scales (one batch of {rows} rows, until its longest answer), s; one answer at gate 0 "
         f"alone, s | {sweep_s:.2f}; {single_s:.2f} ({sweep_s / single_s:.1f}x for {rows}x the answers) |"),
        "",
    ])
    publish(text, "App (CPU", options.write)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
