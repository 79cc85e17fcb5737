"""4/8-bit frozen base: bitsandbytes `Linear4bit` (nf4) and `Linear8bitLt` replace the frozen linears.

Only the seven linears of each layer are quantized. Everything learned (prompts, gates, biases, LoRA,
norm deltas) lives outside them in full precision, and the output head stays in the model dtype.

On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weight in place for a faster bf16 kernel at its
first eval-mode forward. That kernel has no backward and does not take every shape, so `quantize_linear`
leaves the shapes it cannot take as they are, and `training_layout` (which `Transformer.train()` calls) turns
the repacking off for training.

A frozen CLIP tower can be quantized too (`quantize_tower`, on request: it changes the image features a little):
its MLPs' linears, and its attention's projections once `SelfAttention` has split them out of
nn.MultiheadAttention, which keeps them as one packed parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .formats.bnb import QuantizedWeight

QUANTIZE_MODES = ("nf4", "int8")
CPU_KERNEL_ROWS = 32  # bitsandbytes' CPU layout packs output rows in blocks of this many
BLOCK_SIZE = 64  # bitsandbytes' default 4-bit block (one scale per this many weights), the one we write
FROZEN_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                  "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
INT8_OUTLIER_THRESHOLD = 6.0  # LLM.int8(): inputs above it go through a 16-bit path


def check_mode(mode: str | None, name: str = "quantize") -> str | None:
    """None or "none" means no quantization; anything else must be a known mode."""
    if mode in (None, "none"):
        return None
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"{name}: unknown mode {mode!r}; choose from {('none',) + QUANTIZE_MODES}")
    return mode


def bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as error:
        raise ValueError("quantize: needs the bitsandbytes package (pip install bitsandbytes)") from error
    return bitsandbytes


def quantize_linear(weight: torch.Tensor, mode: str, compute_dtype: torch.dtype, device: torch.device | str,
                    double_quant: bool = True, bias: torch.Tensor | None = None) -> nn.Module:
    """A quantized linear holding `weight` [out, in] (and `bias`, kept in the compute dtype), on `device`
    (quantized on the move)."""
    bnb = bitsandbytes()
    out_features, in_features = weight.shape
    weight = weight.detach().to("cpu")  # bitsandbytes quantizes on the move from the host to `device`
    if mode == "nf4":
        layer = _four_bit_layer(out_features, in_features, bias is not None, compute_dtype, "nf4", double_quant,
                                BLOCK_SIZE)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                         compress_statistics=double_quant, module=layer)
    else:
        layer = _int8_layer(out_features, in_features, bias is not None)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to("cpu", compute_dtype), requires_grad=False)
    return layer.to(device)


def stored_linear(stored: QuantizedWeight, compute_dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """A linear holding a weight that a file stored quantized (adapter.formats.bnb), on `device`, as it was."""
    bnb = bitsandbytes()
    out_features, in_features = stored.shape
    if stored.mode == "int8":
        layer = _int8_layer(out_features, in_features, False)
        layer.weight = bnb.nn.Int8Params(stored.data, requires_grad=False, has_fp16_weights=False, CB=stored.data,
                                         SCB=stored.row_scales)
    else:
        state = stored.quant_state
        layer = _four_bit_layer(out_features, in_features, False, compute_dtype, state.quant_type, state.nested,
                                state.blocksize)
        layer.weight = bnb.nn.Params4bit(stored.data, requires_grad=False, quant_state=state,
                                         blocksize=state.blocksize, compress_statistics=state.nested,
                                         quant_type=state.quant_type, quant_storage=stored.data.dtype, module=layer,
                                         bnb_quantized=True)
        layer.quant_state = state
    return layer.to(device)


def _four_bit_layer(out_features: int, in_features: int, bias: bool, compute_dtype: torch.dtype, quant_type: str,
                    double_quant: bool, blocksize: int) -> nn.Module:
    layer = bitsandbytes().nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                                         quant_type=quant_type, compress_statistics=double_quant, device="meta")
    if out_features % CPU_KERNEL_ROWS or in_features % blocksize:
        layer.support_avx512bf16_for_cpu = False  # its repacking would fail on this shape (e.g. a tiny tower)
    return layer


def _int8_layer(out_features: int, in_features: int, bias: bool) -> nn.Module:
    return bitsandbytes().nn.Linear8bitLt(in_features, out_features, bias=bias, has_fp16_weights=False,
                                          threshold=INT8_OUTLIER_THRESHOLD, device="meta")


def training_layout(model: nn.Module) -> None:
    """Keep every 4-bit layer of `model` in the layout that bitsandbytes can backpropagate through.

    On CPUs with AVX512-BF16 a Linear4bit's first eval-mode forward repacks its weight for a bf16 kernel that has
    no backward: afterwards every gradient that should pass through the layer is silently lost (the prompts
    below the top adapter layer would learn nothing, e.g. after adapter.finetune's first validation). This turns
    the repacking off for good and undoes it where it happened, with bitsandbytes' own inverse (which has
    rounded the block scales through bf16 once).
    """
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)


def pack_for_inference(model: nn.Module) -> None:
    """Have bitsandbytes repack now each 4-bit layer that it repacks at its first eval-mode forward on a CPU with
    AVX512-BF16: that first forward computes otherwise than every later one (logits off by 2e-3 on a random
    base), so the first request after loading, or after a run trained on the served base, answered otherwise than
    the same request asked again (`Transformer` calls this before its first inference after loading or
    training). The layer is fed zeros in its compute dtype, the one bitsandbytes then keeps."""
    with torch.inference_mode():
        for module in model.modules():
            if getattr(module, "support_avx512bf16_for_cpu", False) and not module.training \
                    and module.weight.device.type == "cpu" \
                    and not getattr(module.weight.quant_state, "packing_format_for_cpu", False):
                module(torch.zeros(1, module.in_features, dtype=module.compute_dtype, device="cpu"))


def serving_state(model: nn.Module) -> Callable[[], None]:
    """What training changes in a model that keeps serving while an adapter trains on its base (adapter.finetune's
    RunHooks): every module's train/eval mode and, through `training_layout`, 4-bit layers' AVX512-BF16 repacking.
    Returns the function that puts them back once the run ends; each such layer is repacked before the next
    inference (`pack_for_inference`), to the very bytes it held before (the repacking's bf16 scales survive the round
    trip)."""
    modes = [(module, module.training) for module in model.modules()]
    repacking = [(module, module.support_avx512bf16_for_cpu) for module, _ in modes
                 if hasattr(module, "support_avx512bf16_for_cpu")]

    def restore() -> None:
        for module, training in modes:
            module.training = training
        for module, allowed in repacking:
            module.support_avx512bf16_for_cpu = allowed

    return restore


def quantize_block(block: nn.Module, mode: str, compute_dtype: torch.dtype, device: torch.device | str,
                   double_quant: bool = True) -> None:
    """Replace the frozen linears of one transformer block in place."""
    for path in FROZEN_LINEARS:
        parent_name, name = path.split(".")
        parent = getattr(block, parent_name)
        linear = getattr(parent, name)
        if isinstance(linear, nn.Linear):
            setattr(parent, name, quantize_linear(linear.weight, mode, compute_dtype, device, double_quant))


def quantize_model(model: nn.Module, mode: str | None, compute_dtype: torch.dtype | None = None,
                   double_quant: bool = True) -> nn.Module:
    """Quantize every layer of an already built model (in place); returns it for chaining."""
    mode = check_mode(mode)
    if mode is None:
        return model
    device = model.tok_embeddings.weight.device
    compute_dtype = compute_dtype or model.tok_embeddings.weight.dtype
    for block in model.layers:
        quantize_block(block, mode, compute_dtype, device, double_quant)
    model.quantization = mode
    return model


class SelfAttention(nn.Module):
    """nn.MultiheadAttention's self-attention as open_clip's blocks call it (`attn(x, x, x, need_weights=False,
    attn_mask=...)`), with the four projections as separate modules (made by `linear(weight, bias)`), so that
    they can be bitsandbytes layers."""

    def __init__(self, attention: nn.MultiheadAttention,
                 linear: Callable[[torch.Tensor, torch.Tensor | None], nn.Module]) -> None:
        super().__init__()
        if not attention._qkv_same_embed_dim or attention.bias_k is not None or attention.add_zero_attn:
            raise ValueError("clip_quantize: the tower's attention has separate key/value sizes or extra key/value "
                             "biases; only plain self-attention can be quantized")
        dim, weight, bias = attention.embed_dim, attention.in_proj_weight, attention.in_proj_bias
        parts = [(weight[i * dim:(i + 1) * dim], None if bias is None else bias[i * dim:(i + 1) * dim])
                 for i in range(3)]
        self.q, self.k, self.v = (linear(w, b) for w, b in parts)
        self.out = linear(attention.out_proj.weight, attention.out_proj.bias)
        self.heads, self.batch_first = attention.num_heads, attention.batch_first

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, dim = query.shape

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, self.heads, dim // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(query)), split(self.k(key)), split(self.v(value)),
                                             attn_mask=attn_mask)
        out = self.out(out.transpose(1, 2).reshape(batch, length, dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


def quantize_tower(tower: nn.Module, mode: str, compute_dtype: torch.dtype) -> nn.Module:
    """Quantize the linears of an open_clip vision tower's blocks in place (attention through `SelfAttention`);
    returns it. The patch embedding, norms and final projection stay as they are."""
    mode = check_mode(mode, "clip_quantize")
    if mode is None:
        return tower
    device = tower.conv1.weight.device

    def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        return quantize_linear(weight, mode, compute_dtype, device, bias=bias)

    for block in tower.transformer.resblocks:
        if isinstance(block.attn, nn.MultiheadAttention):
            block.attn = SelfAttention(block.attn, linear)
        for name, child in list(block.mlp.named_children()):
            if type(child) is nn.Linear:
                setattr(block.mlp, name, linear(child.weight, child.bias))
    return tower
