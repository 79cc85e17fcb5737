"""Running the app for tests: the random demo model (`adapter.random_demo` on the `base_folder` base: a
randomized v2 adapter with a visual prompt and a tiny random CLIP) served in this process on a free port,
shut down afterwards."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import gradio as gr
import pytest
import torch

from adapter.engine import Engine, Engines
from adapter.random_demo import DemoFiles, write_random_demo

QUESTION = "Name a shape."
GREEDY = {"temperature": 0.0, "top_p": 0.75, "max_new_tokens": 24, "seed": 0}
MAX_NEW_TOKENS = 1024  # the test server's limit: long enough that a stopped answer is visibly cut short


def controls(gate: float = 1.0, delta: float = 1.0, **overrides) -> list:
    """The shared slider values, in the order every endpoint takes them after its own inputs."""
    values = {**GREEDY, **overrides}
    return [gate, delta, values["temperature"], values["top_p"], values["max_new_tokens"], values["seed"]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Decoding a 64-dim model is fastest on one thread, and leaves the other core to the server and clients."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Served:
    url: str
    engines: Engines  # the app's own, to watch what the server does
    demo: gr.Blocks

    @property
    def engine(self) -> Engine:
        """The first adapter's, which answers requests that name none."""
        return self.engines.default


@contextmanager
def running_app(flags: list[str]) -> Iterator[Served]:
    """`python app.py FLAGS` in this process (prevent_thread_lock) on a free port; closed afterwards."""
    import app

    with one_torch_thread():
        demo, engines = app.serve([*flags, "--port", str(free_port()), "--device", "cpu", "--concurrency", "2",
                                  "--max-new-tokens", str(MAX_NEW_TOKENS)], environ={}, block=False)
        try:
            yield Served(demo.local_url, engines, demo)
        finally:
            demo.close()


@pytest.fixture(scope="module")
def demo_files(base_folder, tmp_path_factory) -> DemoFiles:
    """Random demo files (base, image adapter, CLIP) for the app, one set per test module."""
    return write_random_demo(tmp_path_factory.mktemp("demo"), base=base_folder)


@pytest.fixture(scope="module")
def served(demo_files) -> Iterator[Served]:
    """The app serving the demo files on a free port, for one test module."""
    with running_app(demo_files.flags()) as app:
        yield app
