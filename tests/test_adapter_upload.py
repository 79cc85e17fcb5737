"""Adapters uploaded to the running app (`adapter.adapter_upload`): read from a file or a zip of a folder in any
format, served on the served base as `uploaded-N` with the logits of the same adapter loaded directly, an image
adapter on the served tower; a zip that reaches outside its folder, a file that is no adapter, an adapter of
another base: refused by name, nothing served and nothing kept."""

from __future__ import annotations

import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import adapter
from adapter import adapter_upload
from adapter.adapter_upload import AdapterUploads, unpack
from adapter.config import AdapterArgs, ModelArgs
from adapter.engine import Engine, Engines
from adapter.formats.peft import write_peft
from adapter.random_model import write_random_base
from tests.conftest import V1, V2, randomize_adapter
from tests.test_official_format import write_v1
from tests.test_peft_format import raw_adapter
from tests.test_visual import CLIP_CONFIG, clip_files  # noqa: F401  (fixture)

TOKENS = torch.tensor([[1, 5, 9, 22, 40, 7, 3]])


@pytest.fixture
def served(base_folder):
    return adapter.load(base_folder, device="cpu")


def uploads(engines: Engines, tmp_path: Path) -> AdapterUploads:
    return AdapterUploads(engines, lambda model: Engine(model, engines.default.lock), tmp_path / "uploads")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def zipped(folder: Path, path: Path, top: str | None = None) -> Path:
    """`folder`'s files in a zip, under a folder `top` or at its root."""
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(folder.iterdir()):
            archive.write(file, f"{top}/{file.name}" if top else file.name)
    return path


def finder_zipped(folder: Path, path: Path) -> Path:
    """`folder` zipped as macOS's Finder does: its files beside __MACOSX/ resource forks and a .DS_Store."""
    zipped(folder, path, top=folder.name)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(f"{folder.name}/.DS_Store", b"\0\0\0\1Bud1")
        for file in sorted(folder.iterdir()):
            archive.writestr(f"__MACOSX/{folder.name}/._{file.name}", b"\0\5\x16\7")
    return path


def trained(base_folder: Path, args: AdapterArgs, out: Path, seed: int = 1) -> Path:
    """A randomized adapter of shape `args` saved in our format (a folder: adapter.json, adapter.safetensors)."""
    model = randomize_adapter(adapter.load(base_folder, adapter=args, device="cpu"), seed=seed)
    return adapter.save_adapter(model, out).parent


def test_every_format_uploaded_is_served_with_the_logits_of_the_adapter_loaded_directly(tmp_path, base_folder,
                                                                                        served):
    engines = Engines({"base": Engine(served)})
    service = uploads(engines, tmp_path)
    ours = trained(base_folder, V2, tmp_path / "ours")
    peft = write_peft(raw_adapter(base_folder), tmp_path / "peft")
    official = tmp_path / "llama_adapter_len3_layer2_release.pth"
    write_v1(official)
    cases = [  # what is uploaded, what it is read as directly
        (zipped(ours, tmp_path / "trained-1.zip", top="trained-1"), ours),  # the Train tab's zip
        (ours / "adapter.safetensors", ours),
        (zipped(peft, tmp_path / "peft.zip"), peft),  # a PEFT folder's files at the zip's root
        (official, official),  # a torch .pth (itself a zip), read as it is
        (finder_zipped(ours, tmp_path / "finder.zip"), ours),  # as macOS's Finder zips a folder
    ]
    formats = []
    for number, (upload, direct) in enumerate(cases, start=1):
        name = service.serve(str(upload))
        assert name == f"uploaded-{number}"
        model = engines.get(name).model
        formats.append(model.adapter_format)
        assert model.tok_embeddings is served.tok_embeddings, "on the served base, not a copy"
        expected = adapter.load(base_folder, adapter=direct, device="cpu")
        assert model.adapter_args == expected.adapter_args and model.adapter_format == expected.adapter_format
        torch.testing.assert_close(logits(model), logits(expected), rtol=1e-5, atol=1e-5)
    assert formats == ["native", "native", "peft", "official-v1", "native"]


def test_the_oldest_upload_gives_way_and_its_files_go(tmp_path, base_folder, served, monkeypatch):
    monkeypatch.setattr(adapter_upload, "MAX_UPLOADED", 2)
    engines = Engines({"base": Engine(served)})
    service = uploads(engines, tmp_path)
    ours = trained(base_folder, V1, tmp_path / "ours")
    names = [service.serve(zipped(ours, tmp_path / f"{n}.zip")) for n in range(3)]
    assert names == ["uploaded-1", "uploaded-2", "uploaded-3"]
    assert engines.names == ["base", "uploaded-2", "uploaded-3"]
    assert len(list((tmp_path / "uploads").iterdir())) == 2, "the first upload's files removed"


def test_an_image_adapter_reads_the_served_tower(tmp_path, base_folder, served, clip_files):
    config_json, weights, _ = clip_files
    seeing = AdapterArgs(prompt_len=2, prompt_layers=2, visual="v1", clip_dim=CLIP_CONFIG["embed_dim"],
                         clip_model=str(config_json))
    sees = adapter.load_sharing(served, seeing, clip=weights)
    folder = trained(base_folder, seeing, tmp_path / "image")
    blind = Engines({"base": Engine(served)})
    with pytest.raises(ValueError, match="^adapter: image has a visual prompt, which reads a CLIP tower, and no "
                                         "adapter served here sees"):
        uploads(blind, tmp_path / "blind").serve(folder)
    assert blind.names == ["base"] and not any((tmp_path / "blind" / "uploads").iterdir())
    engines = Engines({"base": Engine(served), "sees": Engine(sees)})
    name = uploads(engines, tmp_path).serve(zipped(folder, tmp_path / "image.zip", top="image"))
    model = engines.get(name).model
    assert engines.get(name).can_see_images and model.image_encoder is sees.image_encoder, "the served tower"
    direct = adapter.load(base_folder, adapter=folder, clip=weights, device="cpu")
    from adapter.visual import encode_images
    from tests.test_visual import RED

    with torch.no_grad():
        got = model(TOKENS, visual_prompt=encode_images(model, [RED]))
        want = direct(TOKENS, visual_prompt=encode_images(direct, [RED]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_uploads_are_refused_by_name_and_nothing_is_kept(tmp_path, base_folder, served):
    engines = Engines({"base": Engine(served)})
    service = uploads(engines, tmp_path)
    ours = trained(base_folder, V1, tmp_path / "ours")
    outside = tmp_path / "outside.zip"
    with zipfile.ZipFile(outside, "w") as archive:
        archive.write(ours / "adapter.safetensors", "../adapter.safetensors")
    notes = tmp_path / "notes.zip"
    with zipfile.ZipFile(notes, "w") as archive:
        archive.writestr("a/notes.txt", "no adapter here")
        archive.writestr("b/notes.txt", "nor here")
    readme = tmp_path / "readme.zip"
    with zipfile.ZipFile(readme, "w") as archive:
        archive.writestr("readme.txt", "an adapter, I promise")
    (tmp_path / "broken.zip").write_bytes(b"PK not really")
    corrupt = tmp_path / "corrupt.zip"
    with zipfile.ZipFile(corrupt, "w") as archive:  # stored as it is, then a byte of it changed: a bad CRC
        archive.writestr("adapter.safetensors", b"A" * 64)
    corrupt.write_bytes(corrupt.read_bytes().replace(b"A" * 64, b"A" * 63 + b"B"))
    clash = tmp_path / "clash.zip"
    with zipfile.ZipFile(clash, "w") as archive:  # a file, then a folder of the same name: no such files here
        archive.writestr("a", "file")
        archive.writestr("a/b", "under it")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    other = write_random_base(tmp_path / "other", ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=512,
                                                            multiple_of=32, max_seq_len=64), seed=0)
    elsewhere = trained(other, AdapterArgs(prompt_len=2, prompt_layers=2), tmp_path / "elsewhere")
    cases = [
        (outside, r"^adapter: outside\.zip: '\.\./adapter\.safetensors' points outside the zip's folder"),
        (notes, r"^adapter: notes\.zip holds no adapter weights \(notes\.txt, notes\.txt\); zip an adapter's folder "
                r"or its \.safetensors, \.pth, \.pt or \.bin file$"),
        (readme, r"^adapter: readme\.zip holds no adapter weights \(readme\.txt\)"),  # was: not a torch checkpoint
        (tmp_path / "broken.zip", r"^adapter: broken\.zip is not a readable zip"),
        (corrupt, r"^adapter: corrupt\.zip could not be unpacked \(Bad CRC-32"),
        (clash, r"^adapter: clash\.zip could not be unpacked \(Not a directory\)$"),
        (tmp_path / "junk.pth", r"junk\.pth"),
        (elsewhere / "adapter.safetensors", r"layers|dim|shape"),
        (None, r"^adapter: upload an adapter file first"),
    ]
    for upload, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            service.serve(upload)
    assert engines.names == ["base"] and not any((tmp_path / "uploads").iterdir()), "nothing served or kept"
    assert not (tmp_path / "adapter.safetensors").exists(), "nothing written outside"


def test_a_zip_of_too_many_files_is_refused_before_it_is_unpacked(tmp_path, monkeypatch):
    monkeypatch.setattr(adapter_upload, "MAX_MEMBERS", 3)
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as archive:
        for n in range(4):
            archive.writestr(f"f{n}.bin", b"x")
    with pytest.raises(ValueError, match="^adapter: many.zip holds 4 files, more than the 3"):
        unpack(many, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(adapter_upload, "MAX_UNPACKED", 3)
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("weights.bin", b"\0" * 4)
    with pytest.raises(ValueError, match="^adapter: big.zip unpacks to 4 bytes, more than 3"):
        unpack(big, tmp_path / "out")


class FakeHub:
    """huggingface_hub's two calls a named adapter makes: the repository's file sizes, then its snapshot."""

    def __init__(self, folder: Path, sizes: dict[str, int]) -> None:
        self.folder, self.sizes, self.asked = folder, sizes, []

    def install(self, monkeypatch) -> None:
        import huggingface_hub

        hub = self

        class HfApi:
            def model_info(self, repo_id, files_metadata=False, **options):
                hub.asked.append(("model_info", repo_id, files_metadata, options))
                siblings = [SimpleNamespace(rfilename=name, size=size) for name, size in hub.sizes.items()]
                return SimpleNamespace(siblings=siblings)

        def snapshot_download(repo_id, **options):
            hub.asked.append(("snapshot_download", repo_id, options))
            return str(hub.folder)

        monkeypatch.setattr(huggingface_hub, "HfApi", HfApi)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_an_adapter_named_on_the_hub_or_an_official_release_is_fetched_and_served(tmp_path, base_folder, served,
                                                                                   monkeypatch):
    from adapter import releases
    from adapter.hub import SKIPPED

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is faked: nothing may reach the network
    engines = Engines({"base": Engine(served)})
    service = uploads(engines, tmp_path)
    peft = write_peft(raw_adapter(base_folder), tmp_path / "peft")
    hub = FakeHub(peft, {"adapter_config.json": 500, "adapter_model.safetensors": 4000,
                         "original/consolidated.00.pth": 10 << 30})  # skipped, as for bases: not counted
    hub.install(monkeypatch)
    assert service.serve(None, " hf:owner/peft-adapter@v1 ") == "uploaded-1"
    assert hub.asked == [("model_info", "owner/peft-adapter", True, {"revision": "v1"}),
                         ("snapshot_download", "owner/peft-adapter", {"ignore_patterns": SKIPPED, "revision": "v1"})]
    model, direct = engines.get("uploaded-1").model, adapter.load(base_folder, adapter=peft, device="cpu")
    assert model.adapter_format == "peft" and model.tok_embeddings is served.tok_embeddings
    torch.testing.assert_close(logits(model), logits(direct), rtol=1e-5, atol=1e-5)

    official = tmp_path / "llama_adapter_len3_layer2_release.pth"
    write_v1(official)
    fetched = []
    monkeypatch.setattr(releases, "fetch", lambda name, what: fetched.append((name, what)) or official)
    assert service.serve("", "official:v1") == "uploaded-2"
    assert fetched == [("v1", "adapter")] and engines.get("uploaded-2").model.adapter_format == "official-v1"
    torch.testing.assert_close(logits(engines.get("uploaded-2").model),
                               logits(adapter.load(base_folder, adapter=official, device="cpu")), rtol=1e-5, atol=1e-5)


def test_named_adapters_too_large_on_the_server_or_unknown_are_refused_before_anything_is_fetched(
        tmp_path, base_folder, served, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(adapter_upload, "MAX_FETCHED", 1000)
    engines = Engines({"base": Engine(served)})
    service = uploads(engines, tmp_path)
    ours = trained(base_folder, V1, tmp_path / "ours")
    hub = FakeHub(ours, {"model-00001-of-00002.safetensors": 600, "model-00002-of-00002.safetensors": 600,
                         "q8/model.Q8_0.gguf": 5000})
    hub.install(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **options: pytest.fail("fetched a file"))
    cases = [
        ("hf:owner/whole-base", r"^adapter: hf:owner/whole-base holds 6,200 bytes, more than the 1,000 fetched here$"),
        ("hf:owner/whole-base/q8/model.Q8_0.gguf", r"^adapter: hf:owner/whole-base/q8/model\.Q8_0\.gguf holds 5,000 "
                                                   r"bytes, more than the 1,000"),
        (str(ours), r"is not hf:owner/name or official:NAME; files on the server are not read by name"),
        ("official:BIAS-13B", r"^adapter: official:BIAS-13B is no official release; choose from official:v1, "),
        ("hf:not a repo", r"^adapter: 'hf:not a repo' is not a hub repository id"),
        ("hf:owner/x/../../../../srv/runs", r"^adapter: 'hf:owner/x/\.\./\.\./\.\./\.\./srv/runs' names a folder "
                                            r"outside the repository"),  # (it served a folder of the server)
    ]
    for named, message in cases:
        with pytest.raises(ValueError, match=message):
            service.serve(None, named)
    assert [call[0] for call in hub.asked] == ["model_info"] * 2, "no snapshot of the large ones"
    with pytest.raises(ValueError, match=r"^adapter: both a file and 'hf:owner/x' given; serve one at a time"):
        service.serve(ours / "adapter.safetensors", "hf:owner/x")

    def offline(repo_id, **options):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setattr(adapter_upload, "MAX_FETCHED", 1 << 20)
    with pytest.raises(ValueError, match=r"^adapter: could not get owner/small from the Hugging Face hub "
                                         r"\(LocalEntryNotFoundError: offline\); download it yourself and pass "
                                         r"the path \(in the app: upload the file\)$"):
        service.serve(None, "hf:owner/small")
    assert engines.names == ["base"] and not any((tmp_path / "uploads").iterdir()), "nothing served or kept"


def test_an_upload_removed_by_hand_is_served_no_more_and_its_files_go(tmp_path, base_folder, served):
    engines = Engines({"base": Engine(served)})
    service = uploads(engines, tmp_path)
    ours = trained(base_folder, V1, tmp_path / "ours")
    names = [service.serve(zipped(ours, tmp_path / f"{n}.zip")) for n in range(2)]
    folders = sorted((tmp_path / "uploads").iterdir(), key=lambda folder: folder.stat().st_mtime_ns)
    assert service.uploaded.remove("uploaded-1") and engines.names == ["base", "uploaded-2"]
    assert not folders[0].exists() and folders[1].exists()
    assert not service.uploaded.remove("uploaded-1") and not service.uploaded.remove("base")
    assert engines.names == ["base", "uploaded-2"] and names == ["uploaded-1", "uploaded-2"]
    assert service.serve(zipped(ours, tmp_path / "again.zip")) == "uploaded-3", "names are not used twice"


def test_a_private_upload_is_served_to_its_session_alone_each_keeping_its_last_until_it_ends(tmp_path, base_folder,
                                                                                             served, monkeypatch):
    monkeypatch.setattr(adapter_upload, "MAX_UPLOADED", 2)
    monkeypatch.setattr("adapter.added_adapters.PRIVATE_SESSIONS", 2)  # 2 each, 4 in all
    engines = Engines({"base": Engine(served)})
    service = AdapterUploads(engines, lambda model: Engine(model, engines.default.lock), tmp_path / "uploads",
                             private=True)
    ours = trained(base_folder, V1, tmp_path / "ours")
    names = {session: [service.serve(zipped(ours, tmp_path / f"{session}{n}.zip"), owner=session) for n in range(2)]
             for session in ("a", "b")}
    assert names == {"a": ["uploaded-1", "uploaded-2"], "b": ["uploaded-3", "uploaded-4"]}
    assert engines.names == ["base"], "served to everyone: none of them (nor listed by the OpenAI API)"
    assert engines.seen_by("a").names == ["base", "uploaded-1", "uploaded-2"]
    assert engines.seen_by("b").names == ["base", "uploaded-3", "uploaded-4"]
    assert engines.seen_by("c") is engines and engines.seen_by(None) is engines
    torch.testing.assert_close(logits(engines.seen_by("a").get("uploaded-1").model), logits(
        adapter.load(base_folder, adapter=ours, device="cpu")), rtol=1e-5, atol=1e-5)
    for session, name in (("b", "uploaded-1"), (None, "uploaded-3"), ("c", "uploaded-4")):
        with pytest.raises(ValueError, match=f"^adapter: '{name}' is not served here; choose from base"):
            engines.seen_by(session).get(name)
    assert service.serve(zipped(ours, tmp_path / "a2.zip"), owner="a") == "uploaded-5"
    assert engines.seen_by("a").names == ["base", "uploaded-2", "uploaded-5"], "a's oldest gives way to a's newest"
    assert engines.seen_by("b").names == ["base", "uploaded-3", "uploaded-4"], "b's are not a's to push out"
    assert service.serve(zipped(ours, tmp_path / "c0.zip"), owner="c") == "uploaded-6"
    assert engines.seen_by("a").names == ["base", "uploaded-5"], "beyond 4 in all, the oldest of all gives way"
    assert len(list((tmp_path / "uploads").iterdir())) == 4
    assert service.uploaded.forget("b") == ["uploaded-3", "uploaded-4"] and engines.seen_by("b") is engines
    assert sorted(engines.private) == ["uploaded-5", "uploaded-6"], "b's page closed: the others' stay"
    assert len(list((tmp_path / "uploads").iterdir())) == 2, "and b's files go"
    assert service.uploaded.forget("b") == [] and service.uploaded.remove("uploaded-6")
    assert list(engines.private) == ["uploaded-5"]
