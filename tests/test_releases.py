"""`official:NAME` fetches an official release file into the cache, checked against the SHA-256 in its name;
the network is faked here (urlopen serves a fabricated file), nothing is downloaded."""

from __future__ import annotations

import hashlib
import io
import urllib.error

import pytest
import torch

import adapter
from adapter import hub, releases
from adapter.app_config import parse_config
from adapter.convert import convert
from adapter.inspect import describe
from tests.test_official_format import v2_state


class Server:
    """Stands in for urlopen: serves `body` for every URL and counts the requests."""

    def __init__(self, body: bytes | None) -> None:
        self.body, self.urls = body, []

    def __call__(self, url: str, timeout: float):
        self.urls.append(url)
        if self.body is None:
            raise urllib.error.URLError("no network here")
        return io.BytesIO(self.body)


@pytest.fixture
def release(base_folder, tmp_path, monkeypatch):
    """A tiny BIAS-7B-layout file published under the name its SHA-256 gives, and an empty cache."""
    buffer = io.BytesIO()
    torch.save(v2_state(base_folder), buffer)
    body = buffer.getvalue()
    digest = hashlib.sha256(body).hexdigest()
    monkeypatch.setitem(releases.OFFICIAL, "BIAS-7B", f"v.2.0.0/{digest}_BIAS-7B.pth")
    monkeypatch.setenv("ADAPTER_CACHE", str(tmp_path / "cache"))
    return body, digest


def serve(monkeypatch, body: bytes | None) -> Server:
    server = Server(body)
    monkeypatch.setattr(releases.urllib.request, "urlopen", server)
    return server


def test_an_official_release_is_downloaded_once_checked_and_loaded(base_folder, release, tmp_path, monkeypatch):
    body, digest = release
    server = serve(monkeypatch, body)
    model = adapter.load(base_folder, adapter="official:BIAS-7B", device="cpu")
    assert model.adapter_format == "official-v2" and model.adapter_args.bias and model.adapter_args.visual == "v2"
    cached = tmp_path / "cache" / f"{digest}_BIAS-7B.pth"
    assert server.urls == [releases.RELEASES + f"v.2.0.0/{digest}_BIAS-7B.pth"] and cached.read_bytes() == body
    serve(monkeypatch, None)  # offline now: the cached copy is used
    assert hub.resolve("official:BIAS-7B", "adapter") == cached
    assert describe("official:BIAS-7B")[0] == f"{cached}: adapter, official-v2 format"
    native = convert("official:BIAS-7B", tmp_path / "ours", "native", base_folder)
    assert adapter.load(base_folder, adapter=native, device="cpu").adapter_args == model.adapter_args
    cached.write_bytes(body[:100])  # a broken copy is fetched again
    server = serve(monkeypatch, body)
    assert hub.resolve("official:BIAS-7B", "adapter") == cached and len(server.urls) == 1
    assert cached.read_bytes() == body


def test_a_wrong_or_failed_download_keeps_nothing_and_says_why(release, tmp_path, monkeypatch):
    body, digest = release
    serve(monkeypatch, body + b"tampered")
    with pytest.raises(ValueError, match=f"--adapter: .*_BIAS-7B.pth was downloaded, but its SHA-256 is "
                                         f"[0-9a-f]{{64}}, not the {digest} its name gives; nothing was kept"):
        hub.resolve("official:BIAS-7B", "--adapter")
    assert list((tmp_path / "cache").iterdir()) == []
    serve(monkeypatch, None)
    with pytest.raises(ValueError, match=r"adapter: could not download https://github.com/OpenGVLab/LLaMA-Adapter/"
                                         r"releases/download/v.2.0.0/.*_BIAS-7B.pth \(<urlopen error no network here>\)"
                                         r"; download it yourself and pass the file"):
        hub.resolve("official:BIAS-7B", "adapter")
    with pytest.raises(ValueError, match="adapter: official:BIAS-13B is no official release; choose from official:v1, "
                                         "official:BIAS-7B, official:LORA-BIAS-7B, official:CAPTION-7B, "
                                         "official:LORA-BIAS-7B-v21"):
        hub.resolve("official:BIAS-13B", "adapter")


def test_the_v1_release_has_no_checksum_and_is_cached_as_named(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTER_CACHE", str(tmp_path / "cache"))
    server = serve(monkeypatch, b"v1 bytes")
    path = hub.resolve("official:v1", "adapter")
    assert path == tmp_path / "cache" / "llama_adapter_len10_layer30_release.pth" and path.read_bytes() == b"v1 bytes"
    assert server.urls == [releases.RELEASES + "v.1.0.0/llama_adapter_len10_layer30_release.pth"]
    serve(monkeypatch, None)
    assert hub.resolve("official:v1", "adapter") == path


def test_the_app_takes_official_names_without_a_local_file(base_folder):
    config = parse_config(["--base", str(base_folder), "--adapter", "official:BIAS-7B"], {})
    assert config.adapter == ("official:BIAS-7B",)
    assert hub.is_remote("official:v1") and hub.is_remote("hf:a/b") and not hub.is_remote(str(base_folder))
