"""The tiny model's adapters behind the OpenAI-compatible API, through FastAPI's test client (real HTTP requests,
no port): the fixtures of the chat-completions and the completions tests."""

from __future__ import annotations

import pytest

from adapter.app_config import load_engines, parse_config
from adapter.openai_api import build_api


@pytest.fixture(scope="module")
def engines():
    return load_engines(parse_config([]))


@pytest.fixture(scope="module")
def client(engines):
    from fastapi.testclient import TestClient

    return TestClient(build_api(engines))


@pytest.fixture(scope="module")
def live_url(engines):
    """The API served by uvicorn on a free local port, for what the test client cannot do (a client that goes
    away mid-stream)."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_api(engines), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
