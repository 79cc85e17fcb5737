"""Deploying the app to a Hugging Face Space (adapter.space) against the fake hub of test_push: the flags become the
Space's variables (checked as the app checks them, paths of this machine refused), the tracked files without
tests and benchmarks are uploaded, and that tree, run as a Space runs it, serves the app as the flags say."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from adapter.inspect import describe
from adapter.space import ROOT, deploy, main, space_files, space_variables
from tests.app_helpers import free_port
from tests.test_push import FakeHub


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    fake.install(monkeypatch)
    return fake


def test_the_apps_flags_become_the_spaces_variables_and_what_it_cannot_follow_is_named(tmp_path):
    assert space_variables([]) == {}, "the defaults: the embedded tiny model, nothing to set"
    assert space_variables(["--base", "hf:owner/llama-7b", "--quantize", "nf4", "--adapter", "hf:me/a",
                            "official:BIAS-7B", "--clip", "openai", "--clip-model", "ViT-L-14-quickgelu",
                            "--private-adapters", "--max-new-tokens", "128", "--device", "cuda"]) == {
        "ADAPTER_BASE": "hf:owner/llama-7b", "ADAPTER_ADAPTER": "hf:me/a,official:BIAS-7B", "ADAPTER_CLIP": "openai",
        "ADAPTER_CLIP_MODEL": "ViT-L-14-quickgelu", "ADAPTER_QUANTIZE": "nf4", "ADAPTER_DEVICE": "cuda",
        "ADAPTER_MAX_NEW_TOKENS": "128", "ADAPTER_PRIVATE_ADAPTERS": "1"}  # cuda: the Space's GPU, not this machine's
    (tmp_path / "adapter").mkdir()
    cases = [
        (["--base", str(tmp_path)], rf"^--base: {tmp_path} is a path on this machine, which a Space cannot read; "
                                    r"name what it fetches: hf:owner/name \(python -m adapter\.push puts an adapter "
                                    r"there\), official:NAME or the embedded model's name$"),
        (["--adapter", "hf:me/a", "runs/alpaca/adapter"], r"^--adapter: runs/alpaca/adapter is a path on this machine"),
        (["--adapter", "tiny-image", "--clip", "weights/visual.pt"], r"^--clip: weights/visual\.pt is a path on this "
                                                                    r"machine.*official:NAME, an open_clip tag or"),
        (["--port", "8000"], r"^--port: a Space serves on its own address and port, publicly$"),
        (["--share"], r"^--share: a Space serves on its own address and port, publicly$"),
        (["--quantize", "nf5"], r"^--quantize: unknown mode 'nf5'"),  # the app's own checks
        (["--private-adapters", "--no-train-tab", "--no-upload"], r"^--private-adapters: nothing to keep private"),
        (["--openai-api", "--api-key", "k" * 20], r"^--api-key: a Space's variables are public; set ADAPTER_API_KEY "
                                                   r"as a secret of the Space instead"),
        (["--auth", "me:a-long-password"], r"^--auth: a Space's variables are public; set ADAPTER_AUTH as a secret"),
    ]
    for flags, message in cases:
        with pytest.raises(ValueError, match=message):
            space_variables(flags)


def test_a_deploy_sets_exactly_the_flags_variables_and_uploads_the_tracked_files_without_tests(hub):
    hub.variables["me/demo"] = {"ADAPTER_QUANTIZE": "int8", "ADAPTER_BASE": "hf:old/base", "THEIRS": "kept"}
    url = deploy("me/demo", ["--base", "hf:owner/llama-7b", "--quantize", "nf4"], private=True, hardware="t4-small",
                 with_token=True)
    assert url == "https://huggingface.co/spaces/me/demo"
    calls = [call for call in hub.calls if call[0] != "upload_folder"]  # the base is not fetched: no safetensors
    assert calls == [
        ("create_repo", "me/demo", {"repo_type": "space", "space_sdk": "gradio", "private": True, "exist_ok": True}),
        ("add_space_variable", "me/demo", "ADAPTER_BASE", "hf:owner/llama-7b"),
        ("add_space_variable", "me/demo", "ADAPTER_QUANTIZE", "nf4"),
        ("add_space_secret", "me/demo", "HF_TOKEN", "hf_fake"),
        ("request_space_hardware", "me/demo", "t4-small")]
    assert hub.variables["me/demo"] == {"ADAPTER_QUANTIZE": "nf4", "ADAPTER_BASE": "hf:owner/llama-7b",
                                        "THEIRS": "kept"}
    assert hub.calls[-1][0] == "upload_folder" and hub.calls[-1][4] == "space", "the files come last"
    deploy("me/demo", ["--private-adapters"])  # a deploy with other flags: the earlier ones' variables go
    assert hub.variables["me/demo"] == {"THEIRS": "kept", "ADAPTER_PRIVATE_ADAPTERS": "1"}
    assert ("delete_space_variable", "me/demo", "ADAPTER_BASE") in hub.calls

    uploaded = {str(p.relative_to(hub.folder("me/demo"))) for p in hub.folder("me/demo").rglob("*") if p.is_file()}
    assert uploaded == set(space_files())
    assert {"app.py", "README.md", "requirements.txt", "adapter/space.py", "assets/tiny/base/params.json"} <= uploaded
    assert not any(name.startswith(("tests/", "bench/", ".ci/")) for name in uploaded)

    hub.calls.clear()
    with pytest.raises(ValueError, match=r"^--hardware: 'h100' is not a Space hardware; choose from cpu-basic, "):
        deploy("me/demo", [], hardware="h100")
    with pytest.raises(ValueError, match=r"^space: 'demo' is not a hub repository id like owner/name$"):
        deploy("demo")
    hub.token = None
    with pytest.raises(ValueError, match=r"^space: no Hugging Face token to write to me/demo with"):
        deploy("me/demo")
    assert hub.calls == [], "refused before anything reached the hub"


def test_the_deployed_tree_serves_the_app_as_its_variables_say(hub, tmp_path, capsys):
    assert main(["me/served", "--no-train-tab", "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "hardware cpu-basic (2 vCPU, 16 GB of memory): holds it", "checked on a new Space's hardware"
    assert out[2:] == ["deployed https://huggingface.co/spaces/me/served"]
    folder, port = hub.folder("me/served"), free_port()
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("ADAPTER_", "PYTHON"))}
    environ |= hub.variables["me/served"] | {"GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1",
                                             "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, "app.py"], cwd=folder, env=environ, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)  # as a Space runs it: from its own files alone
    try:
        info = None
        for _ in range(240):
            try:
                info = httpx.get(f"http://127.0.0.1:{port}/gradio_api/info", timeout=5)
                break
            except httpx.TransportError:
                assert server.poll() is None, server.stdout.read().decode()[-3000:]
                time.sleep(0.5)
        assert info is not None and info.status_code == 200
        endpoints = info.json()["named_endpoints"]
        assert "/chat" in endpoints and "/push_adapter" in endpoints
        assert "/train" not in endpoints, "ADAPTER_NO_TRAIN_TAB=1 followed"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_only_tracked_files_are_sent_and_a_dry_run_names_the_untracked_left_behind(tmp_path):
    """Files git did not track but would (a .env with a token, a run's adapter, training data, a merged base:
    what the README's own commands write into the checkout) went to the Space, public by default."""
    import subprocess

    from adapter.space import _files_lines, untracked_files

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    for name in ("app.py", ".env", "runs/lora/adapter.safetensors", "build/x", "tests/test_x.py", ".gitignore"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("build/\n" if name == ".gitignore" else "x")
    subprocess.run(["git", "add", "app.py", ".gitignore", "tests/test_x.py"], cwd=tmp_path, check=True)
    assert space_files(tmp_path) == [".gitignore", "app.py"]
    assert untracked_files(tmp_path) == [".env", "runs/lora/adapter.safetensors"]
    assert _files_lines(tmp_path) == ["2 files, 0.0 MiB",
                                      "not sent (git does not track them): .env, runs/lora/adapter.safetensors"]


def test_an_installed_package_is_told_to_deploy_from_a_clone(tmp_path, monkeypatch):
    """`pip install .` carries the library without app.py or git: the Space's files come from a clone."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # tmp_path's parents hold no repository
    with pytest.raises(ValueError) as refused:
        space_files(tmp_path)
    assert str(refused.value).startswith(f"space: {tmp_path} is not a git checkout (git ls-files: ")
    assert str(refused.value).endswith("a Space gets the tracked files of a clone of this project (an installed "
                                       "package has no app.py): run this command from one")


def test_the_dry_run_lists_what_a_space_would_get(capsys):
    assert main(["me/demo", "--dry-run", "--adapter", "tiny-text", "--private-adapters"]) == 0
    out = capsys.readouterr().out.splitlines()
    files = space_files()
    size = sum((ROOT / name).stat().st_size for name in files) / 2**20
    assert out[:3] == ["ADAPTER_ADAPTER=tiny-text", "ADAPTER_PRIVATE_ADAPTERS=1", f"{len(files)} files, {size:.1f} MiB"]
    assert out[4:-3] == describe("tiny")[1:] and out[3] == "tiny: base LLaMA, meta format", \
        "then the base the Space serves, as inspect describes it: its memory per precision"
    assert out[-3] == "hardware cpu-basic (2 vCPU, 16 GB of memory): holds it", "then how a new Space's hardware does"
    assert out[-1] == "(a new Space's cpu-basic; a deploy checks an existing Space's own hardware)"
    assert main(["me/demo", "--dry-run", "--port", "1"]) == 2
    assert capsys.readouterr().err == "error: --port: a Space serves on its own address and port, publicly\n"
