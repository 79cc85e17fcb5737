"""GPTQ, AWQ and compressed-tensors bases: read back to the weights their quantizers' kernels compute with. GPTQ and
AWQ are checked against files GPTQModel packed and the logits of the weights its own kernels dequantize from them
(tests/fixtures/make_packed.py wrote both), compressed-tensors against transformers' own loading of folders packed
by compressed-tensors' own code."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapter
from adapter.formats import open_base
from adapter.formats.hf import hf_name, meta_to_hf_rows
from adapter.formats.packed import AWQ_ORDER, PackedScheme
from adapter.inspect import describe
from adapter.quantize_base import quantize_base
from adapter.random_model import train_tokenizer
from tests.fixtures.make_packed import LINEARS, TOKENS, random_llama

FIXTURES = Path(__file__).parent / "fixtures" / "packed"
GPTQ_AWQ = ("gptq-4bit-act-order", "gptq-8bit-v2", "awq-4bit-gemm")


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("packed") / "tokenizer.model"
    train_tokenizer(path, vocab_size=512, seed=3)
    return path


def fixture_copy(name: str, tokenizer_model: Path, folder: Path) -> Path:
    shutil.copytree(FIXTURES / name, folder)
    shutil.copy(tokenizer_model, folder / "tokenizer.model")
    return folder


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    return (ours - theirs).abs().max().item() <= 1e-5 * max(1.0, theirs.abs().max().item())


@pytest.mark.parametrize("name", GPTQ_AWQ)
def test_gptq_and_awq_bases_give_the_logits_of_the_quantizers_weights(name, tokenizer_model, tmp_path):
    folder = fixture_copy(name, tokenizer_model, tmp_path / name)
    expected = load_file(folder / "expected.safetensors")
    assert torch.equal(expected["tokens"], TOKENS)
    model = adapter.load(folder, device="cpu")
    assert close(logits(model), expected["logits"])
    assert model.base_format == "hf" and model.quantization is None


def test_an_adapter_trains_on_a_gptq_base_quantized_again_in_nf4(tokenizer_model, tmp_path):
    """The hub's GPTQ model as the frozen base of fine-tuning: read back, put in nf4, the adapter learns and loads."""
    from adapter.finetune import train
    from tests.finetune_helpers import alpaca_records, tiny_config, write_jsonl

    folder = fixture_copy("gptq-4bit-act-order", tokenizer_model, tmp_path / "gptq")
    data = write_jsonl(tmp_path / "data.jsonl", alpaca_records(16))
    result = train(tiny_config(folder, data, tmp_path / "run", quantize="nf4", prompt_layers=2))
    assert result.train_losses[-1] < result.train_losses[0] - 0.05, result.train_losses
    trained = adapter.load(folder, adapter=result.adapter, device="cpu", quantize="nf4")
    assert float(trained.effective_gates().abs().min()) > 1e-3


def test_an_old_autogptq_folder_reads_its_quantize_config_and_named_file(tokenizer_model, tmp_path):
    """Before transformers read GPTQ, AutoGPTQ kept its settings in quantize_config.json and named the weights file
    there (`model_file_base_name`); such folders load as the same model."""
    folder = fixture_copy("gptq-4bit-act-order", tokenizer_model, tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    settings = config.pop("quantization_config")
    settings.pop("quant_method")
    (folder / "config.json").write_text(json.dumps(config))
    settings["model_file_base_name"] = "gptq_model-4bit-32g"
    (folder / "quantize_config.json").write_text(json.dumps(settings))
    (folder / "model.safetensors").rename(folder / "gptq_model-4bit-32g.safetensors")
    assert close(logits(adapter.load(folder, device="cpu")), load_file(folder / "expected.safetensors")["logits"])
    assert "stored packed: gptq 4-bit, group 32" in "\n".join(describe(folder))


def test_a_packed_base_quantizes_again_as_its_weights_do(tokenizer_model, tmp_path):
    """--quantize nf4 quantizes the read-back weights (rounding twice: near the GPTQ model, not equal to it) as
    they would be once loaded; quantize_base writes that once, which loads alike."""
    folder = fixture_copy("gptq-4bit-act-order", tokenizer_model, tmp_path / "gptq")
    in_nf4 = adapter.load(folder, device="cpu", quantize="nf4")
    assert in_nf4.quantization == "nf4"
    dense = tmp_path / "dense"  # the read-back weights as a plain float16 folder
    dense.mkdir()
    checkpoint = open_base(folder)
    save_file({hf_name(name): _hf_rows(name, checkpoint.tensor(name)) for name in checkpoint.keys()},
              dense / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (dense / "config.json").write_text(json.dumps(config))
    shutil.copy(tokenizer_model, dense / "tokenizer.model")
    assert torch.equal(logits(in_nf4), logits(adapter.load(dense, device="cpu", quantize="nf4")))
    quantize_base(folder, tmp_path / "nf4", "nf4", dtype="float32")
    assert torch.equal(logits(adapter.load(tmp_path / "nf4", device="cpu")), logits(in_nf4))


def _hf_rows(name: str, weight: torch.Tensor) -> torch.Tensor:
    heads = {"attention.wq.weight": 4, "attention.wk.weight": 2}.get(name.split(".", 2)[-1])
    return (weight if heads is None else meta_to_hf_rows(weight, heads)).contiguous()


def test_a_linears_parts_may_lie_in_two_shards(tokenizer_model, tmp_path):
    folder = fixture_copy("awq-4bit-gemm", tokenizer_model, tmp_path / "awq")
    expected = logits(adapter.load(folder, device="cpu"))
    stored = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    first = {name for name in stored if name.endswith("qweight")}  # the codes in one file, zeros and scales in another
    weight_map = {}
    for file_name, names in (("model-00001-of-00002.safetensors", first),
                             ("model-00002-of-00002.safetensors", set(stored) - first)):
        save_file({name: stored[name] for name in names}, folder / file_name)
        weight_map.update(dict.fromkeys(names, file_name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(logits(adapter.load(folder, device="cpu")), expected)


def test_the_benchmarks_gptq_writer_packs_what_the_reader_reads():
    from bench.gptq_file import GROUP_SIZE, pack_gptq

    weight = torch.randn(64, 2 * GROUP_SIZE, generator=torch.Generator().manual_seed(0))
    parts = pack_gptq(weight)
    read = PackedScheme("gptq", 4, GROUP_SIZE, zeros_minus_one=True).dequantize("x", parts).float()
    step = parts["scales"].float().T.repeat_interleave(GROUP_SIZE, 1)
    assert ((read - weight).abs() <= step / 2 + 1e-3).all() and (read - weight).abs().max() > 0


def test_gptq_v1_zeros_come_back_across_a_borrow():
    """v1 files store each zero minus one by subtracting 0x11111111 from whole words (AutoGPTQ's pack, GPTQModel's
    v2 -> v1 conversion), so a zero of 0 borrows from the next code; adding the words back undoes it exactly."""
    zeros = [0, 8, 15, 1, 0, 0, 7, 3]  # out = 8 columns, one group
    word = sum(zero << 4 * k for k, zero in enumerate(zeros))
    stored = (word - 0x11111111) & 0xFFFFFFFF
    parts = {"qweight": torch.full((1, 8), 0x55555555, dtype=torch.int32),  # every code 5, in = 8
             "qzeros": torch.tensor([[stored - 2 ** 32 if stored >= 2 ** 31 else stored]], dtype=torch.int32),
             "scales": torch.full((1, 8), 0.5, dtype=torch.float16)}
    weight = PackedScheme("gptq", 4, -1, zeros_minus_one=True).dequantize("x", parts)
    assert weight.dtype == torch.float16 and weight.shape == (8, 8)
    assert torch.equal(weight.float(), 0.5 * (5 - torch.tensor(zeros, dtype=torch.float32)).unsqueeze(1).expand(8, 8))


def test_awq_codes_are_interleaved_in_each_word():
    """AutoAWQ packs a word's eight codes in the column order 0, 2, 4, 6, 1, 3, 5, 7."""
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    word = sum(position << 4 * position for position in range(8))  # the code at position j is j
    parts = {"qweight": torch.tensor([[word]], dtype=torch.int32), "qzeros": torch.zeros(1, 1, dtype=torch.int32),
             "scales": torch.ones(1, 8, dtype=torch.float16)}
    column = PackedScheme("awq", 4, 1).dequantize("x", parts)[:, 0]
    assert column.tolist() == [float(AWQ_ORDER.index(k)) for k in range(8)]


# compressed-tensors, written with its own quantize and pack functions: (format, bits, strategy, symmetric); FP8
# ("float-quantized") as llm-compressor's FP8 schemes write it, activations quantized too (not applied here)
COMPRESSED = [("pack-quantized", 4, "group", False), ("pack-quantized", 4, "channel", True),
              ("pack-quantized", 3, "group", True), ("int-quantized", 8, "channel", True),
              ("float-quantized", 8, "channel", True), ("float-quantized", 8, "tensor", True),
              ("float-quantized", 8, "block", True)]
FP8_MAX = 448.0  # float8_e4m3fn's largest value
DYNAMIC_FP8 = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}


def write_compressed(folder: Path, form: str, bits: int, strategy: str, symmetric: bool, seed: int = 4) -> Path:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize

    fp8 = form == "float-quantized"
    settings = {"num_bits": bits, "type": "float" if fp8 else "int", "symmetric": symmetric, "strategy": strategy}
    settings.update(group_size=32) if strategy == "group" else None
    settings.update(block_structure=[32, 64]) if strategy == "block" else None
    args = QuantizationArgs(**settings)
    model = random_llama(seed)
    tensors = {key: value for key, value in model.state_dict().items()
               if not any(f".{linear}." in key for linear in LINEARS)}
    low_code, high_code = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    for index, layer in enumerate(model.model.layers):
        for linear in LINEARS:
            weight = layer.get_submodule(linear).weight.data
            prefix = f"model.layers.{index}.{linear}."
            if fp8:
                tensors.update({prefix + key: value for key, value in _fp8(weight, strategy, quantize, args).items()})
                continue
            grouped = weight.float().reshape(weight.shape[0], -1, 32 if strategy == "group" else weight.shape[1])
            low, high = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
            if symmetric:
                scale = torch.maximum(-low, high) / high_code
                zero = torch.zeros_like(scale, dtype=torch.int8)
            else:
                scale = (high - low) / (2 ** bits - 1)
                zero = (low_code - torch.round(low / scale)).clamp(low_code, high_code).to(torch.int8)
            scale = scale.clamp(min=1e-5).half()
            codes = quantize(x=weight, scale=scale, zero_point=zero, args=args, dtype=torch.int8)
            tensors[prefix + "weight_scale"] = scale
            if form == "pack-quantized":
                tensors[prefix + "weight_packed"] = pack_to_int32(codes, bits)
                tensors[prefix + "weight_shape"] = torch.tensor(weight.shape)
                if not symmetric:
                    tensors[prefix + "weight_zero_point"] = pack_to_int32(zero, bits, packed_dim=0)
            else:
                tensors[prefix + "weight"] = codes
    folder.mkdir(parents=True)
    save_file({key: value.contiguous() for key, value in tensors.items()}, folder / "model.safetensors")
    config = model.config.to_dict()
    config.pop("dtype", None)
    config.update(torch_dtype="float16", quantization_config={
        "quant_method": "compressed-tensors", "format": form, "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": settings,
                                      "input_activations": DYNAMIC_FP8 if fp8 else None, "output_activations": None}}})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _fp8(weight: torch.Tensor, strategy: str, quantize, args) -> dict[str, torch.Tensor]:
    """FP8 codes and scales (each scale the range of its channel, block or tensor over FP8's largest value)."""
    w = weight.float()
    if strategy == "tensor":
        scale = (w.abs().amax() / FP8_MAX).reshape(1)
    elif strategy == "channel":
        scale = w.abs().amax(1, keepdim=True) / FP8_MAX
    else:
        blocks = w.reshape(w.shape[0] // 32, 32, w.shape[1] // 64, 64)
        scale = blocks.abs().amax((1, 3)) / FP8_MAX
    scale = scale.clamp(min=1e-8).to(torch.bfloat16)
    codes = quantize(x=weight.to(torch.bfloat16), scale=scale, zero_point=None, args=args, dtype=torch.float8_e4m3fn)
    return {"weight": codes, "weight_scale": scale}


def transformers_logits(folder: Path) -> torch.Tensor:
    import transformers

    logging.getLogger("transformers").setLevel(logging.ERROR)
    with warnings.catch_warnings():  # that the folder's own quantization_config is kept, but for `dequantize`
        warnings.simplefilter("ignore", UserWarning)
        peer = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    with torch.no_grad():
        return peer(TOKENS).logits


@pytest.mark.parametrize("form, bits, strategy, symmetric", COMPRESSED,
                         ids=lambda value: str(value) if not isinstance(value, bool) else ("sym" if value else "asym"))
def test_compressed_tensors_bases_give_transformers_logits(form, bits, strategy, symmetric, tokenizer_model, tmp_path):
    folder = write_compressed(tmp_path / "ct", form, bits, strategy, symmetric)
    theirs = transformers_logits(folder)
    shutil.copy(tokenizer_model, folder / "tokenizer.model")
    assert close(logits(adapter.load(folder, device="cpu")), theirs)
    if form == "float-quantized":  # what is not applied is said
        grouping = {"channel": "per channel", "tensor": "per tensor", "block": "blocks of 32x64"}[strategy]
        assert f"  stored packed: compressed-tensors fp8, {grouping}; its activation quantization not applied " \
               "(dequantized while loading; --quantize nf4 or int8 quantizes again)" in describe(folder)


def test_act_order_groups_of_compressed_tensors_pick_each_inputs_scale():
    """`weight_g_idx` (older llm-compressor files with actorder "group") names each input's group, as GPTQ's."""
    codes = torch.tensor([[1, -2, 3, -4]], dtype=torch.int8)
    scales = torch.tensor([[0.5, 2.0]], dtype=torch.float16)
    g_idx = torch.tensor([1, 0, 0, 1], dtype=torch.int32)
    weight = PackedScheme("compressed-tensors", 8, 2).dequantize(
        "x", {"weight": codes, "weight_scale": scales, "weight_g_idx": g_idx})
    assert weight.tolist() == [[2.0, -1.0, 1.5, -8.0]]


def test_inspect_and_the_model_tab_name_the_packing(tokenizer_model, tmp_path):
    from adapter.engine import Engine

    folder = fixture_copy("awq-4bit-gemm", tokenizer_model, tmp_path / "awq")
    assert "  stored packed: awq 4-bit, group 32 (dequantized while loading; --quantize nf4 or int8 quantizes " \
           "again)" in describe(folder)
    assert Engine(adapter.load(folder, device="cpu")).model_info()["base_packing"] == "awq 4-bit, group 32"


def _rewrite(folder: Path, settings: dict | None = None, tensors=None) -> Path:
    if settings is not None:
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = {**config["quantization_config"], **settings}
        (folder / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        stored = load_file(folder / "model.safetensors")
        save_file(tensors(stored), folder / "model.safetensors")
    return folder


PREFIX = "model.layers.0.self_attn.q_proj."
BAD = {
    "gptq 3-bit": ("gptq-8bit-v2", {"bits": 3}, None, "quantization_config.bits 3 is not supported for gptq"),
    "awq gemv": ("awq-4bit-gemm", {"version": "GEMV"}, None, "quantization_config.version 'gemv' is not supported"),
    "marlin": ("gptq-8bit-v2", {"checkpoint_format": "marlin"}, None,
               "quantization_config.checkpoint_format 'marlin' is not supported"),
    "dynamic": ("gptq-8bit-v2", {"dynamic": {"+:.*down.*": {"bits": 8}}}, None,
                "quantization_config.dynamic '+:.*down.*' quantizes some modules otherwise"),
    "kv cache": ("gptq-8bit-v2", {"quant_method": "compressed-tensors", "format": "float-quantized",
                                  "kv_cache_scheme": {"num_bits": 8, "type": "float"}, "config_groups": {}}, None,
                 "quantization_config.kv_cache_scheme: a quantized KV cache's scales are not read"),
    "packed fp8": ("gptq-8bit-v2", {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "g": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}}, None,
                   "config_groups.g.weights: float weights of 8 bits in 'pack-quantized' are not supported"),
    "nvfp4": ("gptq-8bit-v2", {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"}, None,
              "quantization_config.format 'nvfp4-pack-quantized' is not supported"),
    "missing part": ("gptq-4bit-act-order", None, lambda t: {k: v for k, v in t.items() if k != PREFIX + "qzeros"},
                     "model.layers.0.self_attn.q_proj: missing qzeros of a gptq linear"),
    "int64 words": ("awq-4bit-gemm", None, lambda t: {**t, PREFIX + "qweight": t[PREFIX + "qweight"].long()},
                    "model.layers.0.self_attn.q_proj: qweight is torch.int64, not the int32 words of a awq linear"),
    "odd scales": ("awq-4bit-gemm", None, lambda t: {**t, PREFIX + "scales": t[PREFIX + "scales"][:, :64].contiguous()},
                   "model.layers.0.self_attn.q_proj: awq 4-bit, group 32 parts do not fit together"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_packed_folders_are_refused_naming_the_field(case, tokenizer_model, tmp_path):
    name, settings, tensors, message = BAD[case]
    folder = _rewrite(fixture_copy(name, tokenizer_model, tmp_path / "bad"), settings, tensors)
    with pytest.raises(ValueError) as error:
        adapter.load(folder, device="cpu")
    assert message in str(error.value)
    assert str(folder) in str(error.value)
