"""`python -m adapter.inspect` and `python -m adapter.convert` as users run them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import adapter
from adapter.app_config import TINY_FOLDER, tiny_available
from adapter.config import AdapterArgs
from adapter.convert import main as convert_main
from adapter.inspect import describe
from adapter.inspect import main as inspect_main
from tests.test_official_format import v2_state

TOKENS = torch.tensor([[1, 45, 300, 7, 99, 12]])


def logits(model):
    with torch.no_grad():
        return model(TOKENS)


def test_inspect_base_folder(base_folder, capsys):
    assert inspect_main([str(base_folder)]) == 0
    out = capsys.readouterr().out
    assert "base LLaMA, meta format" in out
    assert "dim 64, layers 4, heads 4 of 16 (kv heads 4), ffn 192, vocab 512" in out
    assert "\n  context 2048 tokens\n" in out  # params.json has no length: the default


def test_inspect_official_v2_adapter_reports_layers_parts_and_gates(base_folder, tmp_path, capsys):
    state = v2_state(base_folder, lora_rank=4, new_gate=True)
    path = tmp_path / "LORA-BIAS-7B-v21.pth"
    torch.save(state, path)
    assert inspect_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "adapter, official-v2 format" in out
    assert "fits a base with: dim 64, n_layers 4" in out
    assert "prompts: 3 tokens on layers 1..3; gate activation tanh" in out
    assert "v2 parts: bias, norm, LoRA rank 4, new_gate" in out
    assert "visual prompt v2: reads 24-wide ViT-L-14-quickgelu tokens, images in BGR order, 2 blocks of width 32" \
        in out
    m = state["model"]
    gate = m["llama.layers.2.attention.gate"].tanh() * m["llama.layers.2.attention.new_gate"]
    assert f"layer   2: gate mean {gate.mean():+.4f}  min {gate.min():+.4f}  max {gate.max():+.4f}" in out
    assert "layer   0:" not in out


def test_inspect_reports_bad_paths_in_one_line(tmp_path, capsys):
    assert inspect_main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_convert_official_v2_to_native_keeps_the_logits(base_folder, tmp_path, capsys):
    path = tmp_path / "BIAS-7B.pth"
    torch.save(v2_state(base_folder), path)
    assert convert_main([str(path), str(tmp_path / "native"), "--to", "native", "--base", str(base_folder)]) == 0
    assert "wrote" in capsys.readouterr().out
    converted = adapter.load(base_folder, adapter=tmp_path / "native", device="cpu")
    assert torch.equal(logits(converted), logits(adapter.load(base_folder, adapter=path, device="cpu")))


def test_convert_native_to_official_v1_and_refusals(base_folder, tmp_path, capsys):
    model = adapter.load(base_folder, adapter=AdapterArgs(prompt_len=3, prompt_layers=2), device="cpu")
    with torch.no_grad():
        for _, param in model.trainable_parameters():
            param.normal_()
    adapter.save_adapter(model, tmp_path / "v1")
    target = tmp_path / "llama_adapter_len3_layer2_release.pth"
    assert convert_main([str(tmp_path / "v1"), str(target), "--to", "official-v1", "--base", str(base_folder)]) == 0
    assert torch.equal(logits(adapter.load(base_folder, adapter=target, device="cpu")), logits(model))
    assert sorted(torch.load(target, weights_only=True)) == ["adapter_query.weight"] + [
        f"layers.{i}.attention.gate" for i in range(4)], "a gate for every layer, like the release"
    assert convert_main([str(tmp_path / "v1"), str(tmp_path / "release.pth"), "--to", "official-v1", "--base",
                         str(base_folder)]) == 2
    assert "name it like llama_adapter_len3_layer2.pth" in capsys.readouterr().err
    path = tmp_path / "BIAS-7B.pth"
    torch.save(v2_state(base_folder), path)
    assert convert_main([str(path), str(tmp_path / "no.pth"), "--to", "official-v1", "--base", str(base_folder)]) == 2
    assert "holds only prompts and gates" in capsys.readouterr().err
    assert not (tmp_path / "no.pth").exists()


def test_inspect_names_the_embedded_model_by_its_names():
    from adapter.app_config import tiny_available

    if not tiny_available():
        pytest.skip("assets/tiny not built yet")
    assert describe("tiny")[0].endswith("assets/tiny/base: base LLaMA, meta format")
    assert describe("tiny-image")[0].endswith("assets/tiny/image/adapter.safetensors: adapter, native format")


def test_convert_onto_what_exists_or_a_folder_is_refused_by_name(base_folder, tmp_path, capsys):
    """An existing target was replaced without a word, or got a PEFT adapter beside ours (readers then took
    PEFT's); merge, quantize_base and push --folder refuse an existing output too."""
    model = adapter.load(base_folder, adapter=AdapterArgs(prompt_len=3, prompt_layers=2), device="cpu")
    adapter.save_adapter(model, tmp_path / "v1")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "llama_adapter_len3_layer2.pth").mkdir()
    (tmp_path / "empty").mkdir()
    assert convert_main([str(tmp_path / "v1"), str(tmp_path / "empty"), "--to", "native", "--base",
                         str(base_folder)]) == 0, "an empty folder is written into"
    written = (tmp_path / "empty" / "adapter.safetensors").read_bytes()
    exists = "already exists; name a new file or folder (or remove it)"
    for target, to, message in [(tmp_path / "notes.txt", "native", f"target: {tmp_path / 'notes.txt'} {exists}"),
                                (tmp_path / "empty", "peft", f"target: {tmp_path / 'empty'} {exists}"),
                                (tmp_path / "empty", "native", f"target: {tmp_path / 'empty'} {exists}"),
                                (tmp_path / "llama_adapter_len3_layer2.pth", "official-v1",
                                 f"{tmp_path / 'llama_adapter_len3_layer2.pth'} is a folder; name a file to write")]:
        assert convert_main([str(tmp_path / "v1"), str(target), "--to", to, "--base", str(base_folder)]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    assert (tmp_path / "notes.txt").read_text() == "mine" and not any((tmp_path / "llama_adapter_len3_layer2.pth")
                                                                     .iterdir())
    assert sorted(path.name for path in (tmp_path / "empty").iterdir()) == ["adapter.json", "adapter.safetensors"]
    assert (tmp_path / "empty" / "adapter.safetensors").read_bytes() == written


@pytest.mark.skipif(not tiny_available(), reason="assets/tiny not built yet")
def test_an_image_adapters_clip_config_is_written_beside_it_and_found_wherever_it_is_moved(tmp_path, monkeypatch):
    """tiny-image names its CLIP config relative to itself (../clip/tiny-clip.json); converted or merged into
    another folder, the copy named that file by a path out of the folder (absolute, or relative to where it was
    written), so a folder moved, zipped or published could not find it."""
    from adapter.formats.native import read_adapter
    from adapter.merge import main as merge_main

    shutil.copytree(TINY_FOLDER / "image", tmp_path / "src" / "image")
    shutil.copytree(TINY_FOLDER / "clip", tmp_path / "src" / "clip")
    shipped = (tmp_path / "src" / "clip" / "tiny-clip.json").read_bytes()
    monkeypatch.chdir(tmp_path)
    assert convert_main(["src/image", "out/converted", "--to", "native", "--base", "tiny"]) == 0
    assert merge_main(["tiny", "src/image", "merged"]) == 0  # the prompts stay an adapter beside the base
    for written in (Path("out/converted"), next(Path("merged").rglob("adapter.safetensors")).parent):
        assert json.loads((written / "adapter.json").read_text())["adapter_args"]["clip_model"] == "tiny-clip.json"
        moved = shutil.move(written, tmp_path / "elsewhere")
        assert Path(read_adapter(moved).args.clip_model) == Path(moved) / "tiny-clip.json"
        assert (Path(moved) / "tiny-clip.json").read_bytes() == shipped
        shutil.rmtree(moved)


def test_an_output_that_cannot_be_written_is_one_line(base_folder, tmp_path, capsys, monkeypatch):
    """An OSError from the disk (permission, space) is said as the error it is, not a traceback (tests run as
    root, where permissions do not bite: the write is made to fail)."""
    from adapter.formats import native

    model = adapter.load(base_folder, adapter=AdapterArgs(prompt_len=3, prompt_layers=2), device="cpu")
    adapter.save_adapter(model, tmp_path / "v1")

    def refused(path, write):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(native, "atomic_write", refused)
    target = tmp_path / "out"
    assert convert_main([str(tmp_path / "v1"), str(target), "--to", "native", "--base", str(base_folder)]) == 2
    assert capsys.readouterr().err == f"error: [Errno 13] Permission denied: '{target / 'adapter.safetensors'}'\n"
