"""Served adapters downloaded from the running app (`adapter.adapter_download`): each format read back gives the
served adapter's logits; what a format cannot hold, the bare base and an unknown format are refused by name."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import adapter
from adapter import adapter_download
from adapter.adapter_download import AdapterDownloads
from adapter.config import AdapterArgs
from tests.conftest import V1, randomize_adapter

TOKENS = torch.tensor([[1, 5, 9, 22, 40, 7, 3]])
LORA = AdapterArgs(prompt_len=0, prompt_layers=0, lora_rank=2)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


@pytest.fixture
def served(base_folder):
    return adapter.load(base_folder, device="cpu")


def serving(served, args: AdapterArgs):
    return randomize_adapter(adapter.load_sharing(served, args), seed=3)


@pytest.mark.parametrize("args, to, read_as", [(V1, "native", "native"), (V1, "official-v1", "official-v1"),
                                               (LORA, "peft", "peft-lora")])
def test_a_downloaded_adapter_reads_back_with_the_served_logits(tmp_path, base_folder, served, args, to, read_as):
    model = serving(served, args)
    path = AdapterDownloads(tmp_path / "downloads").write(model, "trained-1", to)
    if path.suffix == ".zip":
        assert path.name == "trained-1.zip"
        zipfile.ZipFile(path).extractall(tmp_path / "unzipped")
        path = tmp_path / "unzipped" / "trained-1"  # the one folder in the zip
    else:
        assert path.name == f"llama_adapter_len{args.prompt_len}_layer{args.prompt_layers}_trained-1.pth"
    again = adapter.load(base_folder, adapter=path, device="cpu")
    assert again.adapter_format == read_as
    torch.testing.assert_close(logits(again), logits(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, stem", [("hf:owner/my-adapter", "my-adapter"), ("assets/tiny/text", "text"),
                                       ("/elsewhere/runs/a/best", "best"), ("..", "adapter")])
def test_an_adapter_served_by_a_path_or_hub_name_downloads_into_the_downloads_folder(tmp_path, served, name, stem):
    """(the name was a path prefix: a hub name failed, an absolute path rewrote the served adapter in place)"""
    path = AdapterDownloads(tmp_path / "downloads").write(serving(served, V1), name, "native")
    assert path.name == f"{stem}.zip" and path.parent.parent == tmp_path / "downloads"
    assert zipfile.ZipFile(path).namelist() == [f"{stem}/adapter.json", f"{stem}/adapter.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloads"], "nothing written elsewhere"


def test_what_a_format_cannot_hold_the_bare_base_and_unknown_formats_are_refused(tmp_path, served):
    downloads = AdapterDownloads(tmp_path / "downloads")
    with pytest.raises(ValueError, match=r"^PEFT's adaption_prompt format cannot hold this adapter: its "
                                         r"gate_activation is tanh; PEFT uses raw gates; our own format \(native\) "
                                         r"holds every adapter$"):
        downloads.write(serving(served, V1), "tiny-text", "peft")
    with pytest.raises(ValueError, match="^adapter: base is the frozen base without an adapter; there is nothing"):
        downloads.write(served, "base", "native")
    with pytest.raises(ValueError, match="^to: unknown target format 'gguf'"):
        downloads.write(serving(served, V1), "tiny-text", "gguf")
    assert not any((tmp_path / "downloads").iterdir()), "nothing left behind"


def test_the_last_downloads_stay_and_older_ones_go(tmp_path, served, monkeypatch):
    monkeypatch.setattr(adapter_download, "MAX_KEPT", 2)
    downloads, model = AdapterDownloads(tmp_path / "downloads"), serving(served, V1)
    paths = [downloads.write(model, "trained-1", "native") for _ in range(3)]
    assert [p.exists() for p in paths] == [False, True, True]
    assert len(list((tmp_path / "downloads").iterdir())) == 2


def test_the_app_warns_where_a_downloaded_format_loses_how_the_adapter_is_asked(tmp_path, served):
    import warnings

    from adapter.app_handlers import Handlers
    from adapter.engine import Engine, Engines

    model = serving(served, V1)
    model.prompt_format = "llama2"  # trained with --prompt-format llama2
    handlers = Handlers(Engines({"trained-1": Engine(model)}))
    handlers.downloads = AdapterDownloads(tmp_path / "downloads")
    for to, warned in (("official-v1", True), ("native", False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            path = Path(handlers.download_adapter(None, to, "trained-1"))
        note = (f"note: the {to} format does not record the prompt format; ask this adapter in llama2 "
                "(e.g. generate --template llama2)")
        assert (note in [str(w.message) for w in caught]) == warned, to
        assert adapter.load(served.base_path, adapter=path if to != "native" else _unzipped(path, tmp_path),
                            device="cpu").prompt_format == ("alpaca" if warned else "llama2")


def _unzipped(path, tmp_path):
    zipfile.ZipFile(path).extractall(tmp_path / "unzipped")
    return tmp_path / "unzipped" / path.stem


def test_saved_conversations_are_kept_as_downloads_are_the_last_few(tmp_path, monkeypatch):
    """(each Save left a folder in the temporary folder for good: a long-running server's grew with every click)"""
    from adapter import app_handlers
    from adapter.app_handlers import Handlers
    from adapter.kept_folders import KeptFolders

    monkeypatch.setattr(app_handlers, "SAVED_CONVERSATIONS", KeptFolders(tmp_path / "saved", 2))
    history = [{"role": "user", "content": "Which shape is red?"}, {"role": "assistant", "content": "The star."}]
    saved = [Path(Handlers.save_conversation(None, history)) for _ in range(2)]
    zipped = Path(Handlers.save_image_conversation(Image.new("RGB", (4, 4)), "What is it?", "a star", []))
    assert [p.exists() for p in (*saved, zipped)] == [False, True, True]
    assert sorted(p.parent for p in (saved[1], zipped)) == sorted((tmp_path / "saved").iterdir())



def test_what_the_app_kept_on_disk_goes_when_its_process_ends(tmp_path):
    """(a stopped server left every kept download, saved conversation, upload and trained adapter behind)"""
    import subprocess
    import sys

    script = ("import sys\nfrom pathlib import Path\nfrom adapter.kept_folders import KeptFolders\n"
              "kept = KeptFolders(Path(sys.argv[1]), 3)\n(kept.new('download-') / 'a.zip').write_text('x')\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "downloads")], check=True,
                   cwd=Path(__file__).parents[1])
    assert (tmp_path / "downloads").is_dir() and not any((tmp_path / "downloads").iterdir())


def test_added_adapters_folders_go_when_the_process_ends(tmp_path, monkeypatch):
    from adapter import kept_folders
    from adapter.added_adapters import AddedAdapters

    at_exit = []
    monkeypatch.setattr(kept_folders.atexit, "register", at_exit.append)
    added = AddedAdapters(engines=None, make_engine=None, prefix="uploaded", limit=4)
    folder = tmp_path / "uploaded-1"
    folder.mkdir()
    added._added.append(("uploaded-1", folder, None))  # as `add` records what it serves
    [remove] = at_exit
    remove()
    assert not folder.exists()
