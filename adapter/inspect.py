"""`python -m adapter.inspect PATH`: what a base folder or an adapter file/folder is, without loading weights.

For a base: its family (LLaMA or Mistral), format, shape, RoPE, context length, parameter count, tokenizer and the
prompt format it is asked in without an adapter (its chat template's, when it ships one in a format
adapter.prompts writes).

For an adapter: its format, the base shape it fits, which layers get prompts, prompt length, gate
activation, v2 parts, parameter count, the prompt format it is asked in and per-layer gate statistics (after
the activation).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .arg_types import refused, unicode_output
from .footprint import describe as memory_line
from .formats import open_base, read_adapter
from .formats.common import LoadedAdapter
from .formats.gguf import is_gguf_file
from .hub import resolve
from .loading import hub_base_without_weights
from .model import Transformer
from .paths import missing
from .prompts import base_prompt_format, chat_template_source
from .tiny.assets import resolve as resolve_tiny
from .tokenizer import open_tokenizer


def describe_base(path: Path | str, checkpoint=None) -> list[str]:
    """`checkpoint`: the base already opened (one on the hub, without its weights); else `path` is opened."""
    checkpoint = checkpoint or open_base(path)
    tokenizer = open_tokenizer(checkpoint.tokenizer_path)
    args = checkpoint.model_args(tokenizer.n_words)
    stored = getattr(checkpoint, "quantization", None)  # a pre-quantized base's mode
    with torch.device("meta"):
        params = Transformer(args).count_parameters()
    if checkpoint.tied_output:  # the head is the embedding matrix itself, counted once (Llama 3.2 1B: 1.24B)
        params -= args.vocab_size * args.dim
    scaling = args.rope_scaling
    rope = f"rope theta {args.rope_theta:g}"
    if scaling is not None:
        rope += f", {scaling.kind} scaling x{scaling.factor:g}"
    return [
        f"{path}: base {checkpoint.family}, {checkpoint.format} format",
        f"  dim {args.dim}, layers {args.n_layers}, heads {args.n_heads} of {args.head_dim} "
        f"(kv heads {args.kv_heads}), ffn {args.ffn_hidden_dim}, vocab {args.vocab_size}, {rope}",
        f"  context {args.max_seq_len} tokens"
        + (f"; attention over a sliding window of {checkpoint.window}" if checkpoint.window else ""),
        f"  parameters {params:,}; tokenizer {tokenizer.path.name} ({tokenizer.kind}, {tokenizer.n_words} pieces, "
        f"stops at ids {sorted(tokenizer.stop_ids)})",
        f"  prompt format without an adapter: {_bare_format(checkpoint.tokenizer_path, tokenizer)}",
    ] + ([f"  stored quantized: {stored} (bitsandbytes), loaded as stored"] if stored else []) + _unfetched(
        checkpoint) + _packing(
        checkpoint) + _ggml_types(checkpoint) + [
        memory_line(args, checkpoint.tied_output, stored, double_quant=getattr(checkpoint, "double_quant", True))]


def _unfetched(checkpoint) -> list[str]:
    """A base on the hub read without its weights says so."""
    if not getattr(checkpoint, "without_weights", False):
        return []
    return ["  read without its weights (its config, tokenizer and the safetensors headers' tensor names)"]


def _packing(checkpoint) -> list[str]:
    """A GPTQ / AWQ / compressed-tensors base's packing."""
    packing = getattr(checkpoint, "packing", None)
    if packing is None:
        return []
    return [f"  stored packed: {packing.label} (dequantized while loading; --quantize nf4 or int8 quantizes again)"]


def _ggml_types(checkpoint) -> list[str]:
    """A GGUF base's tensor types, most used first."""
    if not hasattr(checkpoint, "stored_types"):
        return []
    counts = sorted(checkpoint.stored_types().items(), key=lambda item: (-item[1], item[0]))
    return [f"  stored as ggml {', '.join(f'{name} x{count}' for name, count in counts)} (dequantized while loading)"]


def _bare_format(tokenizer_path: Path, tokenizer) -> str:
    chat = base_prompt_format(chat_template_source(tokenizer_path), tokenizer)
    return "alpaca (no chat template in a format its tokenizer writes)" if chat is None else \
        f"{chat} (its chat template's)"


def gate_rows(found: LoadedAdapter) -> list[str]:
    """One line per prompt layer: the effective gate (act(gate) * new_gate) over its heads."""
    rows = []
    for name in sorted((k for k in found.tensors if k.endswith(".attention.gate")), key=lambda k: int(k.split(".")[1])):
        gate = found.tensors[name].float()
        gate = gate.tanh() if found.args.gate_activation == "tanh" else gate
        new_gate = found.tensors.get(name.replace(".gate", ".new_gate"))
        if new_gate is not None:
            gate = gate * new_gate.float()
        layer = name.split(".")[1]
        rows.append(f"  layer {layer:>3}: gate mean {gate.mean():+.4f}  min {gate.min():+.4f}  max {gate.max():+.4f}"
                    f"  |mean| {gate.abs().mean():.4f}")
    return rows


PROJECTIONS = {"tuned": "through wk/wv with their v2 deltas (litgpt up to 0.5.4)",
               "litgpt-qkv": "litgpt 0.5.5+'s, read from its fused q|k|v output as if interleaved per query group"}


def describe_adapter(path: Path) -> list[str]:
    found = read_adapter(path)
    a = found.args
    n_layers = found.base_shape.get("n_layers")
    layers = (f"layers {n_layers - a.prompt_layers}..{n_layers - 1}" if n_layers
              else f"the top {a.prompt_layers} layers")
    parts = a.v2_parts
    count = sum(t.numel() for t in found.tensors.values()) + sum(t.numel() for t in found.norm_weights.values())
    shared_gates = sum(1 for name, t in found.tensors.items() if name.endswith(".attention.gate") and t.numel() == 1)
    heads = found.base_shape.get("n_heads")
    counted = f"parameters {count:,}"
    if shared_gates and heads:  # a gate a layer is served as one a head
        counted = f"parameters {count + shared_gates * (heads - 1):,}"
    elif shared_gates:
        counted += f" as stored ({shared_gates} gates of one value a layer, which become one a head when served)"
    fits = ", ".join(f"{k} {v}" for k, v in found.base_shape.items()) or "any"
    lines = [
        f"{found.path}: adapter, {found.format} format",
        f"  fits a base with: {fits}",
        f"  prompts: {a.prompt_len} tokens on {layers}; gate activation {a.gate_activation}" if a.has_prompts
        else "  prompts: none (no gates: the delta scale is its only slider)",
        f"  v2 parts: {', '.join(parts) if parts else 'none (v1)'}",
        *([f"  prompt keys/values: {PROJECTIONS[a.prompt_projection]}"] if a.prompt_projection != "frozen" else []),
        f"  {counted}",
        f"  prompt format {found.prompt_format}"
        + ("" if found.format == "native" else f" (assumed: the {found.format} format does not record one)"),
    ]
    if a.visual != "none":
        lines.append(f"  visual prompt {a.visual}: reads {a.clip_dim}-wide {a.clip_model} tokens, images in "
                     f"{a.channel_order.upper()} order" + (f", {a.visual_depth} blocks of width {a.visual_dim}"
                                                           if a.visual == "v2" else ""))
    return lines + gate_rows(found)


def describe(path: str | Path) -> list[str]:
    base, adapter, _, _ = resolve_tiny(path, path, None, None)  # the embedded model's names: its files
    light = hub_base_without_weights(path, "path")  # an HF base on the hub: its shape without its weights
    if light is not None:
        return describe_base(str(path), light)
    path = resolve(base if base != path else adapter, "path")  # hf:owner/name and official:NAME are fetched first
    if not path.exists():
        raise FileNotFoundError(missing(path))
    if is_gguf_file(path) or path.is_dir() and any((path / name).exists()
                                                   for name in ("params.json", "config.json", "lit_model.pth")):
        return describe_base(path)
    return describe_adapter(path)


def main(argv: Sequence[str] | None = None) -> int:
    unicode_output()
    parser = argparse.ArgumentParser(prog="python -m adapter.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a base folder or .gguf file, or an adapter file/folder in any supported format; "
                                     "the embedded model by its names (tiny, tiny-text, tiny-image); hf:owner/name "
                                     "and official:NAME are fetched")
    options = parser.parse_args(argv)
    try:
        print("\n".join(describe(options.path)))
    except (ValueError, OSError) as error:
        return refused(error, parser)
    return 0


if __name__ == "__main__":
    sys.exit(main())
