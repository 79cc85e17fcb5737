"""Server memory against the number of sessions it has seen: gradio copies every component's settings into each
session (a page, or an API client) and keeps them until `--max-sessions` newer ones push them out. `python app.py`
with the embedded tiny model (else the random demo model) is asked one question of the Model tab per new session
(`/model_info`, through one gradio_client whose session is renewed before each request: the server sees a new
visitor each time), and its resident memory read every `--every` sessions, once with gradio's own capacity (10,000)
and once with the app's default (`--max-sessions 1000`).

    python -m bench.sessions [--sessions 2500] [--every 500] [--write BENCHMARKS.md] [--smoke]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from adapter.app_config import MAX_SESSIONS
from bench.app import free_port, model_flags, start_app
from bench.args import positive_int, run_main
from bench.decode import machine
from bench.report import command_line, publish, table
from bench.rss import status_gib

GRADIO_CAPACITY = 10_000  # gradio's own state_session_capacity


def resident_mib(pid: int) -> float:
    return status_gib(pid, "VmRSS") * 1024


def memory_by_sessions(flags: list[str], capacity: int, sessions: int, every: int) -> list[float]:
    """The server's resident memory (MiB) after a warm-up session, then after each `every` new sessions."""
    from gradio_client import Client

    port = free_port()
    process, _ = start_app([*flags, "--max-sessions", str(capacity)], port)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        client.predict(api_name="/model_info")  # warm-up: the first answer builds what every later one reuses
        read = [resident_mib(process.pid)]
        for count in range(1, sessions + 1):
            client.session_hash = uuid.uuid4().hex
            client.predict(api_name="/model_info")
            if count % every == 0:
                read.append(resident_mib(process.pid))
        return read
    finally:
        process.terminate()
        process.wait(timeout=30)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sessions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=positive_int, default=2500)
    parser.add_argument("--every", type=positive_int, default=500, help="read the memory after this many sessions")
    parser.add_argument("--write", help="replace the sessions section of this markdown file (e.g. BENCHMARKS.md)")
    parser.add_argument("--smoke", action="store_true", help="4 sessions, read every 2 (the tests)")
    options = parser.parse_args(argv)
    if options.smoke:
        options.sessions, options.every = 4, 2
    with tempfile.TemporaryDirectory() as folder:
        flags, _, model_name = model_flags(Path(folder))
        capped = memory_by_sessions(flags, MAX_SESSIONS, options.sessions, options.every)
        uncapped = memory_by_sessions(flags, GRADIO_CAPACITY, options.sessions, options.every)
    counts = [0, *range(options.every, options.sessions + 1, options.every)]
    rows = [(f"{count:,}", f"{mine - capped[0]:.0f}", f"{theirs - uncapped[0]:.0f}")
            for count, mine, theirs in zip(counts, capped, uncapped)]
    per_session = (uncapped[-1] - uncapped[0]) / counts[-1]
    text = "\n".join([
        f"## Sessions (CPU, gradio_client): server memory, {model_name}",
        "",
        (f"Machine: {machine()}. Command: `{command_line('bench.sessions', argv)}`. `python app.py` asked one "
         f"`/model_info` question per new session; its resident memory (VmRSS) over what it held after the first "
         f"answer. With gradio's own capacity each session costs {per_session:.2f} MiB more, kept for good until "
         f"{GRADIO_CAPACITY:,} sessions (about {per_session * GRADIO_CAPACITY / 1024:.1f} GiB then); the app's "
         f"`--max-sessions {MAX_SESSIONS}` forgets the least recently active beyond that."),
        "",
        *table(("sessions seen", f"MiB more, --max-sessions {MAX_SESSIONS} (the app's default)",
                f"MiB more, {GRADIO_CAPACITY:,} (gradio's default)"), rows),
        "",
    ])
    publish(text, "Sessions (CPU", options.write, smoke=options.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
