"""How much memory a base takes, known from its shape before anything is loaded: the bytes `adapter.load` will hold
for its weights in each precision, and for its KV cache per token, so that a card can be chosen before a download
(`python -m adapter.inspect BASE` prints them).

The figures are the tensors' own bytes, as bitsandbytes lays them out (nf4: two codes a byte, one uint8 scale
per block of 64 weights, one float32 scale per 256 of those, and each layer's 16- and 256-entry code books;
int8: a byte a weight and one float32 scale per row). Activations, the allocator's slack, CUDA's context and
the adapter's own (float32) tensors come on top.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import ModelArgs

if TYPE_CHECKING:
    from .model import Transformer

NF4_BLOCK = 64  # weights per first-level scale (bitsandbytes' default, the one adapter.quantize uses)
NESTED_BLOCK = 256  # first-level scales per second-level scale (double quantization)
NF4_CODES, NESTED_CODES = 16, 256  # each 4-bit layer's code books, float32
TOWER = "image_encoder."  # the CLIP tower: not the base's


def linear_bytes(out_features: int, in_features: int, mode: str | None, dtype: torch.dtype,
                 double_quant: bool = True) -> int:
    """Bytes of one frozen linear's weight: plain in `dtype`, or quantized ("nf4", "int8") as adapter.quantize does."""
    count = out_features * in_features
    if mode is None:
        return count * dtype.itemsize
    if mode == "int8":
        return count + out_features * 4
    blocks = math.ceil(count / NF4_BLOCK)
    codes = math.ceil(count / 2) + NF4_CODES * 4
    if not double_quant:
        return codes + blocks * 4
    return codes + blocks + math.ceil(blocks / NESTED_BLOCK) * 4 + NESTED_CODES * 4 + 4  # + the nested offset


@dataclass(frozen=True)
class Footprint:
    """One base's memory in one precision: its frozen weights, and its KV cache per token of one batch row."""

    weights: int
    kv_per_token: int
    kv_per_token_int8: int


def footprint(args: ModelArgs, mode: str | None, dtype: torch.dtype, tied_output: bool = False,
              pre_quantized: bool = False, double_quant: bool = True) -> Footprint:
    """The bytes of a base of shape `args` loaded with `quantize=mode` in `dtype` (the compute dtype: embeddings,
    norms and the head stay in it); `tied_output`: the head is the embedding matrix itself; `pre_quantized`: read
    from a pre-quantized HF folder, whose wq/wk keep their block scales in float32 (adapter.formats.bnb), and whose
    other 4-bit linears' are double quantized where `double_quant` (as quantizing while loading always does)."""
    linears = layer_linears(args)
    rows_moved, others = linears[:2], linears[2:]  # wq, wk; the rest
    per_layer = sum(linear_bytes(out, inp, mode, dtype, double_quant=not pre_quantized) for out, inp in rows_moved)
    per_layer += sum(linear_bytes(out, inp, mode, dtype, double_quant=double_quant or not pre_quantized)
                     for out, inp in others) + 2 * args.dim * dtype.itemsize
    embeddings = args.vocab_size * args.dim * dtype.itemsize
    weights = args.n_layers * per_layer + embeddings * (1 if tied_output else 2) + args.dim * dtype.itemsize
    vectors = 2 * args.n_layers * args.kv_heads  # a key and a value per layer and key/value head, per token
    return Footprint(weights, vectors * args.head_dim * dtype.itemsize, vectors * (args.head_dim + dtype.itemsize))


def layer_linears(args: ModelArgs) -> list[tuple[int, int]]:
    """(out, in) features of one layer's frozen linears: wq, wk, wv, wo, w1, w2, w3."""
    head, kv, ffn = args.n_heads * args.head_dim, args.kv_heads * args.head_dim, args.ffn_hidden_dim
    return [(head, args.dim), (kv, args.dim), (kv, args.dim), (args.dim, head), (ffn, args.dim), (args.dim, ffn),
            (ffn, args.dim)]


def describe(args: ModelArgs, tied_output: bool, stored: str | None = None,
             dtype: torch.dtype = torch.bfloat16, double_quant: bool = True) -> str:
    """One line for adapter.inspect: the weights in each precision `load` can give this base (a pre-quantized
    base: its own, `double_quant` or not) in `dtype` (a GPU's), and the KV cache per 1,000 tokens."""
    name = str(dtype).removeprefix("torch.")
    modes = [stored] if stored else [None, "nf4", "int8"]
    weights = {mode: footprint(args, mode, dtype, tied_output, bool(stored), double_quant).weights for mode in modes}
    unit, scale = ("GiB", 2**30) if max(weights.values()) >= 2**30 else ("MiB", 2**20)  # a small base: not 0.00 GiB
    sizes = ", ".join(f"{mode or name} {size / scale:.2f}" for mode, size in weights.items())
    cache = footprint(args, None, dtype, tied_output)
    plain, int8 = (1000 * per_token / 2**20 for per_token in (cache.kv_per_token, cache.kv_per_token_int8))
    digits = 0 if int8 >= 10 else 1  # a small base's cache read 0 MiB
    return (f"  memory in {name}: weights {sizes} {unit}; KV cache {plain:.{digits}f} MiB per 1,000 tokens (int8: "
            f"{int8:.{digits}f})")


def size_text(size: float) -> str:
    """Bytes for people: GiB, or MiB below one (a small base read 0.00 GiB)."""
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def held_bytes(model: Transformer) -> int:
    """The bytes of the frozen base tensors `model` holds now (not its adapter's, not its CLIP tower's):
    bitsandbytes weights with their quantization state, every storage counted once (a tied head, a shared base)."""
    return module_bytes(model, lambda name: not (model.is_adapter_parameter(name) or name.startswith(TOWER)))


def module_bytes(module: nn.Module, keep: Callable[[str], bool] = lambda name: True) -> int:
    """The bytes of `module`'s parameters whose names `keep` takes, as held: bitsandbytes weights with their
    quantization state (int8 scales too, once a layer has run), every storage counted once."""
    tensors: list[torch.Tensor | None] = []
    for prefix, child in module.named_modules():
        named = ((f"{prefix}.{name}".lstrip("."), param) for name, param in child.named_parameters(recurse=False))
        own = [param for name, param in named if keep(name)]
        for param in own:
            tensors += [param.data, getattr(param, "SCB", None)]
            tensors += quant_state_tensors(getattr(param, "quant_state", None))
        if own:
            tensors.append(getattr(getattr(child, "state", None), "SCB", None))  # int8 scales, once a layer has run
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


def tower_bytes(tower: nn.Module, mode: str | None, dtype: torch.dtype) -> int:
    """The bytes an open_clip vision tower of `tower`'s shapes (`visual.tower_shape`: on the meta device) holds in
    `dtype`, its blocks' linears quantized as `quantize.quantize_tower` does (attention as separate q, k, v and out
    linears; their biases, the patch embedding, norms and projection stay in `dtype`)."""
    quantized: set[int] = set()
    total = 0
    for block in tower.transformer.resblocks if mode is not None else ():
        linears = []
        if isinstance(block.attn, nn.MultiheadAttention):
            width = block.attn.embed_dim
            linears += [(width, width)] * 3 + [tuple(block.attn.out_proj.weight.shape)]
            quantized |= {id(block.attn.in_proj_weight), id(block.attn.out_proj.weight)}
        for child in block.mlp.children():
            if type(child) is nn.Linear:
                linears.append(tuple(child.weight.shape))
                quantized.add(id(child.weight))
        total += sum(linear_bytes(out, inp, mode, dtype) for out, inp in linears)
    return total + sum(p.numel() * dtype.itemsize for p in tower.parameters() if id(p) not in quantized)


def kv_bytes_per_token(model: Transformer) -> int:
    """The KV cache `model` allocates per token of context and batch row (its dtype, or int8 with scales)."""
    found = footprint(model.args, None, model.tok_embeddings.weight.dtype)
    return found.kv_per_token_int8 if model.kv_cache == "int8" else found.kv_per_token


def quant_state_tensors(state) -> list[torch.Tensor]:
    """The tensors a bitsandbytes 4-bit QuantState holds (block scales, code book, nested state), if any."""
    if state is None:
        return []
    found = [getattr(state, name, None) for name in ("absmax", "code", "offset")]
    return [t for t in found if torch.is_tensor(t)] + quant_state_tensors(getattr(state, "state2", None))
