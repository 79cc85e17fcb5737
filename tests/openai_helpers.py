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
