"""`adapter.footprint`: the memory a base will take, from its shape alone, equals the bytes of the tensors
`adapter.load` then holds, in every precision, and the KV cache's."""

from __future__ import annotations

import pytest
import torch

import adapter
from adapter.config import ModelArgs
from adapter.footprint import footprint, held_bytes
from adapter.quantize_base import quantize_base
from adapter.random_model import write_random_base

# grouped-query attention, a vocabulary not a multiple of 64, weights in whole 64-blocks and in a partial one
SHAPES = [ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=500, multiple_of=64, max_seq_len=64),
          ModelArgs(dim=96, n_layers=1, n_heads=3, vocab_size=300, multiple_of=32, max_seq_len=64)]


def storages(tensors) -> int:
    """The bytes of the distinct storages under `tensors`."""
    seen = {}
    for tensor in tensors:
        if tensor is not None:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@pytest.fixture(scope="module", params=range(len(SHAPES)))
def base(request, tmp_path_factory):
    args = SHAPES[request.param]
    return write_random_base(tmp_path_factory.mktemp("footprint"), args, seed=1, tokenizer="sentencepiece"), args


@pytest.mark.parametrize("mode", [None, "nf4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_weights_take_what_the_shape_says(base, mode, dtype):
    folder, args = base
    model = adapter.load(folder, quantize=mode, dtype=dtype, device="cpu")
    assert held_bytes(model) == footprint(args, mode, dtype).weights


@pytest.mark.parametrize("mode, double_quant", [("nf4", True), ("nf4", False), ("int8", True)])
def test_a_pre_quantized_base_takes_what_the_shape_says(base, mode, double_quant, tmp_path):
    """Its block scales quantized or not, as its config says (a folder without double quantization was counted
    with it: 240 MiB too little for a 7B)."""
    from adapter.formats import open_base
    from adapter.inspect import describe

    folder, args = base
    if args.dim % 64:
        pytest.skip("a pre-quantized folder's wq/wk rows move whole only in whole 64-blocks")
    stored = quantize_base(folder, tmp_path / "q", mode, double_quant=double_quant, device="cpu")
    model = adapter.load(stored, dtype=torch.bfloat16, device="cpu")
    found = open_base(stored)
    assert held_bytes(model) == footprint(args, mode, torch.bfloat16, found.tied_output, pre_quantized=True,
                                          double_quant=found.double_quant).weights
    if mode == "nf4":
        assert found.double_quant is double_quant
        assert held_bytes(model) != footprint(args, mode, torch.bfloat16, pre_quantized=True,
                                              double_quant=not double_quant).weights
        weights = f"{held_bytes(model) / 2**20:.2f} MiB"
        assert f"  memory in bfloat16: weights nf4 {weights};" in "\n".join(describe(stored))


@pytest.mark.parametrize("kind", ["auto", "int8"])
def test_the_kv_cache_takes_what_the_shape_says_per_token(base, kind):
    folder, args = base
    model = adapter.load(folder, dtype=torch.bfloat16, device="cpu")
    cache = model.new_cache(3, 40, kv_cache=kind)
    per_token = footprint(args, None, torch.bfloat16)
    expected = per_token.kv_per_token_int8 if kind == "int8" else per_token.kv_per_token
    assert storages(t for layers in cache.tensor_lists() for t in layers) == 3 * 40 * expected


def test_inspect_prints_the_memory_of_each_precision(base):
    from adapter.inspect import describe_base

    folder, args = base
    line = [line for line in describe_base(folder) if line.startswith("  memory in bfloat16: ")]
    nf4 = footprint(args, "nf4", torch.bfloat16).weights / 2**20  # in MiB: a small base's GiB read 0.00
    assert len(line) == 1 and f"nf4 {nf4:.2f}" in line[0] and "int8 " in line[0] and "per 1,000 tokens" in line[0]
    assert " MiB; KV cache" in line[0] and nf4 > 0.1
    kv = footprint(args, None, torch.bfloat16).kv_per_token * 1000 / 2**20
    assert f"KV cache {kv:.1f} MiB per 1,000 tokens" in line[0] and kv < 10, "a small base's cache: not 0 MiB"


def test_the_held_bytes_leave_out_the_adapter_and_count_int8_scales_after_a_forward_pass(base):
    folder, args = base
    model = adapter.load(folder, adapter.AdapterArgs(prompt_len=4, prompt_layers=1, bias=True), quantize="int8",
                         device="cpu")
    before = held_bytes(model)
    assert before == footprint(args, "int8", torch.float32).weights
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # bitsandbytes moves each layer's row scales into its state
    assert held_bytes(model) == before


@pytest.mark.parametrize("mode", [None, "nf4", "int8"])
def test_a_clip_towers_memory_from_its_model_name_is_what_the_loaded_tower_holds(mode):
    from adapter.footprint import module_bytes, tower_bytes
    from adapter.tiny.assets import ASSETS, CLIP_CONFIG
    from adapter.visual import tower_shape

    model = adapter.load("tiny", adapter="tiny-image", clip_quantize=mode, device="cpu")
    shape = tower_shape(str(ASSETS / CLIP_CONFIG))
    assert shape.conv1.weight.device.type == "meta", "shapes alone, no weights"
    assert module_bytes(model.image_encoder) == tower_bytes(shape, mode, torch.float32)
    if mode is None:  # OpenAI's ViT-L/14 vision tower: 303,966,208 parameters
        assert tower_bytes(tower_shape("ViT-L-14-quickgelu"), None, torch.bfloat16) == 303_966_208 * 2
