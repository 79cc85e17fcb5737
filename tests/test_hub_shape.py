"""A base on the hub read without its weights (adapter.hub.resolve_without_weights): `inspect hf:owner/name` and
`convert`/`push` with `--base hf:owner/name` fetch its config, tokenizer and the safetensors headers' tensor names,
not gigabytes of weights, and say what the base with its weights says; an adapter whose tuned norms need the base's
(the official v2 files) still gets them. The hub is faked by local folders; nothing reaches the network."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

import adapter
from adapter.convert import convert
from adapter.formats import read_adapter
from adapter.inspect import describe
from adapter.loading import open_base_shape
from tests.conftest import V1, randomize_adapter


class HubOfFolders:
    """huggingface_hub's snapshot_download (filtered by allow and ignore patterns, as it filters them) and
    get_safetensors_metadata over local folders named by repository id; `fetched` lists every file copied."""

    def __init__(self, repos: dict[str, Path], cache: Path) -> None:
        self.repos, self.cache, self.fetched = repos, cache, []

    def install(self, monkeypatch) -> None:
        import huggingface_hub

        hub = self
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")

        def snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, **options):
            source, target = hub.repos[repo_id], hub.cache / repo_id
            for file in sorted(p for p in source.rglob("*") if p.is_file()):
                name = str(file.relative_to(source))
                if allow_patterns and not any(fnmatch.fnmatch(name, p) for p in allow_patterns) or \
                        any(fnmatch.fnmatch(name, p) for p in ignore_patterns or []):
                    continue
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, target / name)
                hub.fetched.append(name)
            return str(target)

        class HfApi:
            def get_safetensors_metadata(self, repo_id, **options):
                source = hub.repos[repo_id]
                index = source / "model.safetensors.index.json"
                if (source / "model.safetensors").is_file():
                    files = ["model.safetensors"]
                elif index.is_file():
                    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                else:
                    raise huggingface_hub.errors.NotASafetensorsRepoError(f"{repo_id} has no safetensors weights")
                headers = {}
                for name in files:
                    with safe_open(source / name, "pt") as handle:
                        headers[name] = SimpleNamespace(tensors=dict.fromkeys(handle.keys()))
                return SimpleNamespace(files_metadata=headers)

        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        monkeypatch.setattr(huggingface_hub, "HfApi", HfApi)


@pytest.fixture(scope="module")
def hf_base(base_folder, tmp_path_factory) -> Path:
    """The random base in HF's layout (transformers wrote it), with its tokenizer."""
    from bench.peers import hf_llama

    folder = tmp_path_factory.mktemp("hf") / "llama"
    hf_llama(adapter.load(base_folder, device="cpu")).save_pretrained(folder)
    shutil.copy(base_folder / "tokenizer.model", folder / "tokenizer.model")
    return folder


@pytest.fixture
def hub(hf_base, tmp_path, monkeypatch) -> HubOfFolders:
    fake = HubOfFolders({"owner/llama": hf_base}, tmp_path / "cache")
    fake.install(monkeypatch)
    return fake


def test_inspect_describes_a_hub_base_as_the_whole_folder_without_fetching_its_weights(hf_base, hub):
    remote, local = describe("hf:owner/llama"), describe(str(hf_base))
    assert remote[0] == local[0].replace(str(hf_base), "hf:owner/llama")
    assert [line for line in remote[1:] if "without its weights" not in line] == local[1:], \
        "shape, tokenizer, prompt format, memory per precision: all as with the weights"
    assert "  read without its weights (its config, tokenizer and the safetensors headers' tensor names)" in remote
    assert sorted(hub.fetched) == ["config.json", "generation_config.json", "tokenizer.model"]
    with pytest.raises(ValueError, match=r"model\.safetensors: only its tensors' names were read; its weights are "
                                         r"not fetched$"):
        open_base_shape("hf:owner/llama").tensor("layers.0.attention.wq.weight")


def test_convert_and_push_take_the_shape_of_a_hub_base_and_fetch_weights_only_for_tuned_norms(base_folder, hf_base,
                                                                                            hub, tmp_path):
    from tests.test_official_format import v2_state

    ours = randomize_adapter(adapter.load(base_folder, adapter=V1, device="cpu"))
    adapter.save_adapter(ours, tmp_path / "ours")
    convert(tmp_path / "ours", tmp_path / "remote", "native", "hf:owner/llama")
    assert not any(name.endswith(".safetensors") for name in hub.fetched), "the shape alone: no weights"
    convert(tmp_path / "ours", tmp_path / "local", "native", hf_base)
    remote, local = read_adapter(tmp_path / "remote"), read_adapter(tmp_path / "local")
    assert remote.tensors.keys() == local.tensors.keys()
    assert all(torch.equal(remote.tensors[name], local.tensors[name]) for name in local.tensors)

    official = tmp_path / "llama_adapter_v2.pth"  # tuned norms: stored whole, turned into deltas on the base's
    torch.save(v2_state(base_folder), official)
    convert(official, tmp_path / "v2-remote", "native", "hf:owner/llama")
    assert "model.safetensors" in hub.fetched, "the base's norms need its weights"
    convert(official, tmp_path / "v2-local", "native", hf_base)
    remote, local = read_adapter(tmp_path / "v2-remote"), read_adapter(tmp_path / "v2-local")
    assert any(name.endswith("norm.delta") for name in local.tensors)
    assert all(torch.equal(remote.tensors[name], local.tensors[name]) for name in local.tensors)


def test_a_hub_repository_without_safetensors_weights_is_fetched_whole(hf_base, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    bin_folder = tmp_path / "bin"  # the same base as pytorch_model.bin, as older repositories hold it
    shutil.copytree(hf_base, bin_folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(hf_base / "model.safetensors"), bin_folder / "pytorch_model.bin")
    hub = HubOfFolders({"owner/bin": bin_folder}, tmp_path / "cache")
    hub.install(monkeypatch)
    assert describe("hf:owner/bin")[1:] == describe(str(bin_folder))[1:]
    assert "pytorch_model.bin" in hub.fetched


def test_an_adapter_in_a_folder_of_a_hub_repository_is_fetched_alone(base_folder, tmp_path, monkeypatch):
    """`hf:owner/name/FOLDER` (PEFT's `subfolder`): that folder's files only, loaded as a local folder is."""
    from adapter.formats.native import save_adapter
    from adapter.hub import _check_size, resolve

    repo = tmp_path / "repo"
    for name, seed in (("first", 1), ("second", 2)):
        save_adapter(randomize_adapter(adapter.load(base_folder, adapter=V1, device="cpu"), seed=seed), repo / name)
    (repo / "README.md").write_text("two adapters")
    hub = HubOfFolders({"owner/adapters": repo}, tmp_path / "cache")
    hub.install(monkeypatch)
    loaded = adapter.load(base_folder, adapter="hf:owner/adapters/second", device="cpu")
    assert sorted(hub.fetched) == ["second/adapter.json", "second/adapter.safetensors"]
    local = adapter.load(base_folder, adapter=repo / "second", device="cpu")
    assert all(torch.equal(loaded.adapter_state_dict()[k], v) for k, v in local.adapter_state_dict().items())
    with pytest.raises(ValueError, match=r"adapter: hf:owner/adapters has no folder 'third'"):
        resolve("hf:owner/adapters/third", "adapter")

    files = [SimpleNamespace(rfilename=name, size=size) for name, size in
             (("first/adapter.safetensors", 900), ("second/adapter.safetensors", 100), ("README.md", 10))]
    api = SimpleNamespace(HfApi=lambda: SimpleNamespace(model_info=lambda repo, **_: SimpleNamespace(siblings=files)))
    _check_size(api, "owner/adapters", {}, "second", 100, "adapter")  # that folder alone counts
    with pytest.raises(ValueError, match=r"hf:owner/adapters holds 1,010 bytes, more than the 100 fetched here"):
        _check_size(api, "owner/adapters", {}, "", 100, "adapter")
