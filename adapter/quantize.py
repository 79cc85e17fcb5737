"""4/8-bit frozen base: bitsandbytes `Linear4bit` (nf4) and `Linear8bitLt` replace the frozen linears.

Only the seven linears of each layer are quantized. Everything learned (prompts, gates, biases, LoRA,
norm deltas) lives outside them in full precision, and the output head stays in the model dtype.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZE_MODES = ("nf4", "int8")
FROZEN_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                  "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
INT8_OUTLIER_THRESHOLD = 6.0  # LLM.int8(): inputs above it go through a 16-bit path


def check_mode(mode: str | None) -> str | None:
    """None or "none" means no quantization; anything else must be a known mode."""
    if mode in (None, "none"):
        return None
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize: unknown mode {mode!r}; choose from {('none',) + QUANTIZE_MODES}")
    return mode


def _bnb():
    try:
        import bitsandbytes
    except ImportError as error:
        raise ValueError("quantize: needs the bitsandbytes package (pip install bitsandbytes)") from error
    return bitsandbytes


def quantize_linear(weight: torch.Tensor, mode: str, compute_dtype: torch.dtype, device: torch.device | str,
                    double_quant: bool = True) -> nn.Module:
    """A bias-free quantized linear holding `weight` [out, in], on `device` (quantized on the move)."""
    bnb = _bnb()
    out_features, in_features = weight.shape
    weight = weight.detach().to("cpu")  # bitsandbytes quantizes on the move from the host to `device`
    if mode == "nf4":
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=compute_dtype,
                                  quant_type="nf4", compress_statistics=double_quant, device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                         compress_statistics=double_quant, module=layer)
    else:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False,
                                    threshold=INT8_OUTLIER_THRESHOLD, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    return layer.to(device)


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
