"""Pre-quantized bases: HF folders whose linears bitsandbytes stored (as transformers saves them), read as they are,
and written by `adapter.quantize_base`; checked against transformers' own loading of the same folders."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

import adapter
from adapter.config import AdapterArgs, ModelArgs
from adapter.formats.hf import hf_to_meta_rows
from adapter.quantize import quantize_linear
from adapter.quantize_base import main as quantize_base_main
from adapter.quantize_base import quantize_base
from adapter.random_model import write_random_base

# dims in whole 64-wide blocks and 32-row groups, as real LLaMAs (and bitsandbytes' CPU kernel) have them
SHAPE = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=64, max_seq_len=128)
TOKENS = torch.tensor([[1, 5, 9, 30, 7, 100, 200, 311]])
LINEARS = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
           "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
           "feed_forward.w3": "mlp.up_proj"}
# transformers' BitsAndBytesConfig settings for each folder the tests have transformers write
SAVED = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "nf4-single": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
    # as unsloth's "dynamic" 4-bit folders leave some layers' linears in 16 bits
    "nf4-skip-mlp": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                         llm_int8_skip_modules=["lm_head", "model.layers.1.mlp"]),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A random Meta base, the same weights as a plain HF folder, and transformers' quantized saves of it."""
    from bench.peers import hf_llama, quiet

    quiet()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    root = tmp_path_factory.mktemp("prequantized")
    meta = write_random_base(root / "meta", SHAPE, seed=3)
    out = {"meta": meta, "plain": root / "plain"}
    hf_llama(adapter.load(meta, device="cpu")).save_pretrained(out["plain"])
    shutil.copy(meta / "tokenizer.model", out["plain"])
    for name in SAVED:
        out[name] = root / name
        peer_load(out["plain"], name).save_pretrained(out[name])
        shutil.copy(meta / "tokenizer.model", out[name])
    return out


def peer_load(folder: Path, saved: str | None = None):
    """transformers' model from `folder`: quantized on loading as SAVED[saved] says, or as the folder is stored."""
    import transformers

    config = None if saved is None else transformers.BitsAndBytesConfig(
        bnb_4bit_compute_dtype=torch.float32, **SAVED[saved])
    return no_repacking(transformers.LlamaForCausalLM.from_pretrained(folder, quantization_config=config,
                                                                      device_map="cpu"))


def no_repacking(model: torch.nn.Module) -> torch.nn.Module:
    """bitsandbytes' CPU bf16 kernel (on AVX512-BF16 CPUs) rounds the inputs through bf16; the float path lets
    two models with the same weights be compared to float precision."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def dequantized(layer: torch.nn.Module) -> torch.Tensor:
    """The weight a bitsandbytes layer multiplies by."""
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear8bitLt):
        scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB  # moved there when first run
        return layer.weight.data.float() * scales.float()[:, None] / 127
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    return layer.weight.float()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(TOKENS)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


def ours(folder: Path, **options) -> adapter.Transformer:
    return no_repacking(adapter.load(folder, device="cpu", **options))


def meta_rows(name: str, weight: torch.Tensor) -> torch.Tensor:
    heads = {"attention.wq": SHAPE.n_heads, "attention.wk": SHAPE.kv_heads}.get(name)
    return weight if heads is None else hf_to_meta_rows(weight, heads)


@pytest.mark.parametrize("saved, mode", [("nf4", "nf4"), ("nf4-single", "nf4"), ("fp4", "fp4"), ("int8", "int8")])
def test_transformers_bnb_folders_load_with_the_files_own_weights(folders, saved, mode):
    import bitsandbytes as bnb

    model, peer = ours(folders[saved]), peer_load(folders[saved])
    assert model.quantization == mode
    kind = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    for i, block in enumerate(model.layers):
        for name, hf in LINEARS.items():
            layer = block.get_submodule(name)
            assert isinstance(layer, kind), (i, name)
            expected = meta_rows(name, dequantized(peer.model.layers[i].get_submodule(hf)))
            assert torch.equal(dequantized(layer), expected), (i, name)  # exactly the file's codes and scales
    torch.testing.assert_close(logits(model), logits(peer), atol=2e-5, rtol=0)
    if saved == "nf4":  # transformers quantized as adapter.load(quantize="nf4") does (w2: no rows moved)
        quantized_on_load = ours(folders["meta"], quantize="nf4")
        assert torch.equal(dequantized(quantized_on_load.layers[1].feed_forward.w2),
                           dequantized(model.layers[1].feed_forward.w2))


def test_linears_the_quantizer_skipped_stay_plain(folders):
    import bitsandbytes as bnb

    model, peer = ours(folders["nf4-skip-mlp"]), peer_load(folders["nf4-skip-mlp"])
    assert all(isinstance(block.attention.wq, bnb.nn.Linear4bit) for block in model.layers)
    assert isinstance(model.layers[0].feed_forward.w1, bnb.nn.Linear4bit)
    plain = model.layers[1].feed_forward.w1
    assert type(plain) is torch.nn.Linear and plain.weight.dtype == torch.float32
    assert model.quantization == "nf4"
    torch.testing.assert_close(logits(model), logits(peer), atol=2e-5, rtol=0)


def test_an_adapter_trains_on_a_pre_quantized_base(folders):
    model = adapter.load(folders["nf4"], AdapterArgs(prompt_len=4, prompt_layers=2), device="cpu")
    with torch.no_grad():
        for block in model.layers:
            block.attention.gate.fill_(0.5)
    model.train()
    model(TOKENS).logsumexp(-1).mean().backward()
    grad = model.adapter_query.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0  # through the stored wk/wv


def test_asking_for_another_quantization_is_refused(folders):
    with pytest.raises(ValueError, match=r"quantize: .*nf4 is stored quantized in nf4 \(bitsandbytes\); load it as "
                                         r"it is \(quantize none or nf4\), not in int8"):
        adapter.load(folders["nf4"], quantize="int8", device="cpu")
    assert adapter.load(folders["nf4"], quantize="nf4", device="cpu").quantization == "nf4"


def broken_copy(folders: dict[str, Path], saved: str, tmp_path: Path, edit_config=None, edit_tensors=None) -> Path:
    folder = tmp_path / saved
    shutil.copytree(folders[saved], folder)
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(folder / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, folder / "model.safetensors")
    return folder


Q_PROJ = "model.layers.0.self_attn.q_proj"
V_PROJ = "model.layers.0.self_attn.v_proj"  # read as stored (q and k rows are reordered)


def packed_state(**changed):
    """An edit of the v projection's packed 4-bit quantization state (the JSON bitsandbytes stores as uint8)."""
    def edit(tensors: dict) -> None:
        key = f"{V_PROJ}.weight.quant_state.bitsandbytes__nf4"
        state = {**json.loads(bytes(tensors[key].tolist()).decode()), **changed}
        tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return edit


def cut(name: str, keep: int):
    return lambda tensors: tensors.update({name: tensors[name][:keep].clone()})


@pytest.mark.parametrize("saved, case, config_edit, tensors_edit, message", [
    ("nf4", "another method", lambda c: c["quantization_config"].update(quant_method="fp8"), None,
     r"quantization_config.quant_method 'fp8' is not supported \(only 'bitsandbytes'"),
    ("nf4", "no config", lambda c: c.pop("quantization_config"), None,
     r"model.safetensors: holds bitsandbytes statistics \(model.layers.0.mlp.down_proj.weight.absmax\) but "
     r".*config.json has no "
     "quantization_config"),
    ("nf4", "no mode", lambda c: c["quantization_config"].update(load_in_4bit=False, _load_in_4bit=False), None,
     "quantization_config has neither load_in_4bit nor load_in_8bit set"),
    ("nf4", "scales lost", None, lambda t: t.pop(f"{Q_PROJ}.weight.absmax"),
     rf"model.safetensors: {Q_PROJ}.weight: incomplete 4-bit quantization state \(has nested_absmax, "),
    ("nf4", "codes cut", None, lambda t: t.update({f"{Q_PROJ}.weight": t[f"{Q_PROJ}.weight"][:100]}),
     rf"{Q_PROJ}.weight: 100 bytes of 4-bit codes do not hold a 128x128 weight"),
    ("nf4", "block scales short", None, lambda t: t.update({f"{V_PROJ}.weight.absmax": t[f"{V_PROJ}.weight.absmax"]
                                                                                   [:-1]}),
     rf"{V_PROJ}.weight: absmax is uint8 \(127,\); a 64x128 weight in blocks of 64 has \(128,\) uint8 block scales"),
    ("nf4", "second level lost", None, lambda t: t.pop(f"{V_PROJ}.weight.nested_absmax"),
     rf"{V_PROJ}.weight: the quantization state says double quantized \(nested_offset\), but its nested_absmax is "
     "missing"),
    ("nf4", "scales unpacked", None, lambda t: t.update({f"{V_PROJ}.weight.absmax": t[f"{V_PROJ}.weight.absmax"]
                                                                                .float()}),
     rf"{V_PROJ}.weight: absmax is float32 \(128,\); a 64x128 weight in blocks of 64 has \(128,\) uint8 block "
     "scales"),
    # as many as wanted but in a second dimension: bitsandbytes' kernels indexed past the end while answering
    ("nf4", "block scales in rows", None, lambda t: t.update({f"{V_PROJ}.weight.absmax": t[f"{V_PROJ}.weight.absmax"]
                                                                                    .view(1, -1)}),
     rf"{V_PROJ}.weight: absmax is uint8 \(1, 128\); a 64x128 weight in blocks of 64 has \(128,\) uint8 block "
     "scales"),
    ("nf4", "level table in rows", None, lambda t: t.update({f"{V_PROJ}.weight.quant_map": t[f"{V_PROJ}.weight.quant_map"]
                                                                                   .view(1, 16)}),
     rf"{V_PROJ}.weight: quant_map is float32 \(1, 16\); expected \(16,\): 16 floating-point levels"),
    ("nf4", "level table short", None, cut(f"{V_PROJ}.weight.quant_map", 4),
     rf"{V_PROJ}.weight: quant_map is float32 \(4,\); expected \(16,\): 16 floating-point levels"),
    ("nf4", "nested table short", None, cut(f"{V_PROJ}.weight.nested_quant_map", 4),
     rf"{V_PROJ}.weight: nested_quant_map is float32 \(4,\); expected \(256,\): 256 floating-point levels"),
    ("nf4", "block size 0", None, packed_state(blocksize=0),
     rf"{V_PROJ}.weight: blocksize must be a positive whole number, got 0$"),
    ("nf4", "block size text", None, packed_state(blocksize="64"),
     rf"{V_PROJ}.weight: blocksize must be a positive whole number, got '64'$"),
    ("nf4", "orphan", None, lambda t: t.update({"model.layers.0.self_attn.x_proj.weight.absmax": torch.ones(4)}),
     r"quantization statistics model.layers.0.self_attn.x_proj.weight.absmax belong to no weight"),
    ("int8", "quantized head", None, lambda t: t.update({"lm_head.SCB": torch.ones(512)}),
     r"model.safetensors: lm_head.weight is stored quantized; only the linears of the layers can be"),
    ("int8", "tile layout", None, lambda t: t.update({f"{Q_PROJ}.weight_format": torch.tensor(1, dtype=torch.uint8)}),
     rf"{Q_PROJ}.weight: weight_format 1 is a GPU tile layout of old bitsandbytes"),
    ("int8", "layout not one number", None,
     lambda t: t.update({f"{Q_PROJ}.weight_format": torch.zeros(3, dtype=torch.uint8)}),
     rf"{Q_PROJ}.weight: weight_format must be one number \(0: row-major\), got shape \(3,\)"),
    ("int8", "row scales lost", None, lambda t: t.pop(f"{Q_PROJ}.SCB"),
     rf"model.safetensors: {Q_PROJ}.weight: int8 weight without its row scales \(SCB\)$"),
    ("int8", "scales short", None, lambda t: t.update({f"{Q_PROJ}.SCB": t[f"{Q_PROJ}.SCB"][:5]}),
     rf"{Q_PROJ}.weight: expected int8 \[out, in\] codes and \[out\] row scales \(SCB\), got torch.int8 \(128, 128\) "
     r"and \(5,\)"),
])
def test_broken_pre_quantized_folders_get_one_clear_error(folders, tmp_path, saved, case, config_edit, tensors_edit,
                                                           message):
    folder = broken_copy(folders, saved, tmp_path, config_edit, tensors_edit)
    with pytest.raises(ValueError, match=message):
        adapter.load(folder, device="cpu")


@pytest.mark.parametrize("mode, double_quant", [("nf4", True), ("nf4", False), ("int8", True)])
def test_quantize_base_writes_a_folder_transformers_and_we_load_alike(folders, tmp_path, mode, double_quant):
    import bitsandbytes as bnb

    out = quantize_base(folders["meta"], tmp_path / "out", mode, dtype="float32", double_quant=double_quant,
                        device="cpu")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer.model"]
    model, peer = ours(out), peer_load(out)
    assert model.quantization == mode
    torch.testing.assert_close(logits(model), logits(peer), atol=2e-5, rtol=0)
    kind = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    assert isinstance(peer.model.layers[0].self_attn.q_proj, kind)
    source = adapter.load(folders["meta"], device="cpu")
    for i, block in enumerate(model.layers):  # the codes adapter.load(quantize=) would make from the same tensor
        for name in LINEARS:
            weight = source.layers[i].get_submodule(name).weight
            expected = quantize_linear(weight, "nf4" if mode == "nf4" else "int8", torch.float32, "cpu",
                                       double_quant=double_quant)
            assert torch.equal(dequantized(block.get_submodule(name)), dequantized(expected)), (i, name, mode)
    if double_quant:  # as adapter.load(quantize=) quantizes, so the same answers (its CPU kernel too)
        on_load = adapter.load(folders["meta"], device="cpu", quantize=mode)
        again = adapter.load(out, device="cpu")
        assert again.generate("The red circle", temperature=0.0, max_new_tokens=8) == \
            on_load.generate("The red circle", temperature=0.0, max_new_tokens=8) != ""
        assert torch.equal(logits(again), logits(on_load))


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_a_half_precision_base_is_quantized_from_its_own_tensors(tmp_path, mode):
    """--dtype (bfloat16 by default) is the rest's: the linears are quantized from the float16 tensors as stored,
    as --quantize does while loading (casting them to bfloat16 first gave other codes)."""
    base = write_random_base(tmp_path / "fp16", SHAPE, seed=4, dtype=torch.float16)
    out = quantize_base(base, tmp_path / "out", mode, device="cpu")
    written, on_load = adapter.load(out, device="cpu"), adapter.load(base, device="cpu", quantize=mode)
    for block, expected in zip(written.layers, on_load.layers):
        for name in LINEARS:
            assert torch.equal(dequantized(block.get_submodule(name)), dequantized(expected.get_submodule(name)))
    stored = load_file(out / "model.safetensors")
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16  # the rest in --dtype


def test_quantize_base_shards_and_keeps_the_tokenizer_files(folders, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(folders["plain"], source)
    (source / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (source / "chat_template.jinja").write_text("{{ messages }}")
    whole = quantize_base(source, tmp_path / "whole", "nf4", device="cpu")
    sharded = quantize_base(source, tmp_path / "sharded", "nf4", device="cpu", shard_gb=0.0001)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for name in ("tokenizer.model", "tokenizer_config.json", "chat_template.jinja"):
        assert (sharded / name).read_bytes() == (source / name).read_bytes()
    config = json.loads((sharded / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["quantization_config"]["bnb_4bit_use_double_quant"]
    torch.testing.assert_close(logits(ours(sharded)), logits(ours(whole)), atol=0, rtol=0)


def test_quantize_base_refuses_what_it_cannot_write_and_leaves_nothing_half_written(folders, tmp_path, monkeypatch,
                                                                                   capsys):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="out: .*taken already exists; name a new folder"):
        quantize_base(folders["meta"], tmp_path / "taken")
    (tmp_path / "a-file").write_text("")  # (refused once the work was done: "[Errno 17] File exists")
    with pytest.raises(ValueError, match="^out: .*a-file is a file, not a folder to write nf4 into$"):
        quantize_base(folders["meta"], tmp_path / "a-file" / "nf4")
    (tmp_path / "a-file").unlink()
    with pytest.raises(ValueError, match=r"base: .*nf4 is already stored quantized \(nf4\)"):
        quantize_base(folders["nf4"], tmp_path / "twice")
    for size in ("0", "inf", "nan", "1e300"):  # (1e300 overflowed counting its bytes: a traceback)
        assert quantize_base_main([str(folders["meta"]), str(tmp_path / "bad"), "--shard-gb", size]) == 2
        assert (f"error: --shard-gb: must be a number of GiB above 0 and at most 1,048,576, got {float(size)}"
                in capsys.readouterr().err)

    def fail(self, dtype):
        raise RuntimeError("disk full")

    monkeypatch.setattr("adapter.quantize_base._Writer._quantization_config", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        quantize_base(folders["meta"], tmp_path / "half", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_quantize_base_command_line_says_where_it_wrote(folders, tmp_path, capsys):
    out = tmp_path / "cli"
    assert quantize_base_main([str(folders["meta"]), str(out), "--mode", "int8", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out} (int8, ") and f"python app.py --base {out}" in printed
    size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
    assert f"(int8, {size:.1f} MiB of weights)" in printed, "a small base in MiB, not 0.00 GiB"
    assert adapter.load(out, device="cpu").quantization == "int8"


def test_quantize_base_writes_its_card_and_pushes_the_folder_to_the_hub(folders, tmp_path, capsys, monkeypatch):
    from tests.test_push import FakeHub

    hub = FakeHub(tmp_path / "hub")
    hub.install(monkeypatch)
    out = tmp_path / "nf4"
    assert quantize_base_main([str(folders["meta"]), str(out), "--device", "cpu", "--push-to-hub", "me/base",
                               "--hub-private"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.endswith("pushed https://huggingface.co/me/base/commit/0123abc; serve it with "
                                            "python app.py --base hf:me/base\n")
    assert hub.calls[0] == ("create_repo", "me/base", {"private": True, "exist_ok": True})
    pushed = hub.folder("me/base")
    assert sorted(p.name for p in pushed.iterdir()) == sorted(p.name for p in out.iterdir())
    card = (pushed / "README.md").read_text()
    assert "- 4-bit\n" in card and "library_name: transformers" in card and "base_model" not in card
    size = sum(t.numel() * t.element_size() for p in out.glob("*.safetensors")
               for t in safetensors.torch.load_file(p).values()) / 2**20
    assert (f"`{folders['meta'].name}` (LLaMA: dim {SHAPE.dim}, {SHAPE.n_layers} layers, {SHAPE.n_heads} heads, "
            f"vocabulary {SHAPE.vocab_size}), its linears stored nf4 (4-bit) by `python -m adapter.quantize_base` in "
            f"transformers' bitsandbytes layout ({size:.1f} MiB of weights; the rest in bfloat16") in card
    assert "python app.py --base hf:me/base --adapter" in card and 'from_pretrained("me/base")' in card
    torch.testing.assert_close(logits(ours(pushed)), logits(ours(out)), atol=0, rtol=0)  # the folder as written

    hub.calls.clear()
    assert quantize_base_main([str(folders["meta"]), str(tmp_path / "no"), "--push-to-hub", "me"]) == 2
    assert capsys.readouterr().err == "error: --push-to-hub: 'me' is not a hub repository id like owner/name\n"
    hub.token = None
    assert quantize_base_main([str(folders["meta"]), str(tmp_path / "no"), "--push-to-hub", "me/base"]) == 2
    assert "error: --push-to-hub: no Hugging Face token" in capsys.readouterr().err
    assert not (tmp_path / "no").exists() and hub.calls == [], "refused before anything is quantized"
    hub.token, hub.refuse = "hf_fake", ConnectionError("offline")
    assert quantize_base_main([str(folders["meta"]), str(tmp_path / "kept"), "--device", "cpu",
                               "--push-to-hub", "me/base"]) == 2
    assert capsys.readouterr().err.endswith(f"the folder is kept: push it later with hf upload me/base "
                                            f"{tmp_path / 'kept'} .\n")
    assert adapter.load(tmp_path / "kept", device="cpu").quantization == "nf4"


def test_inspect_says_a_base_is_stored_quantized(folders):
    from adapter.inspect import describe_base

    assert "  stored quantized: int8 (bitsandbytes), loaded as stored" in describe_base(folders["int8"])
    assert not any("stored quantized" in line for line in describe_base(folders["plain"]))


def test_a_mistral_base_is_written_with_its_window_and_tokenizer(tmp_path):
    import transformers

    from adapter.random_model import write_random_mistral

    source = write_random_mistral(tmp_path / "mistral", SHAPE, seed=4, window=8)  # (its context, too)
    out = quantize_base(source, tmp_path / "out", "nf4", dtype="float32", device="cpu")
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["sliding_window"]) == ("mistral", 8)
    assert (out / "tokenizer.model").read_bytes() == (source / "tokenizer.model.v3").read_bytes()
    model, on_load = ours(out), ours(source, quantize="nf4")
    assert (model.base_family, model.args.sliding_window) == ("Mistral", 8)
    assert model.tokenizer.encode("[INST] hi [/INST]") == on_load.tokenizer.encode("[INST] hi [/INST]")
    torch.testing.assert_close(logits(model), logits(on_load), atol=0, rtol=0)
    peer = no_repacking(transformers.MistralForCausalLM.from_pretrained(out, device_map="cpu"))
    torch.testing.assert_close(logits(model), logits(peer), atol=2e-5, rtol=0)
