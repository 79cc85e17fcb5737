"""Writes a base as a GPTQ folder (AutoGPTQ's layout, checkpoint format v1), for `bench.load --gptq`: each frozen
linear rounded to nearest in 4-bit asymmetric groups of 128 inputs (what GPTQ starts from before its error
updates, which only choose other codes) and packed as adapter.formats.packed reads it; the rest in float16.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapter.formats import open_base
from adapter.formats.hf import hf_name, meta_to_hf_rows
from adapter.hf_folder import hf_config
from adapter.tokenizer import open_tokenizer

BITS, GROUP_SIZE = 4, 128
_PER_WORD = 32 // BITS
_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
            "feed_forward.w3")


def _int32(words: torch.Tensor) -> torch.Tensor:
    """32-bit patterns held in int64 as the int32 values of the same bits."""
    return ((words + 2 ** 31) % 2 ** 32 - 2 ** 31).to(torch.int32)


def _words(codes: torch.Tensor) -> torch.Tensor:
    """int64 words of 4-bit codes along dim 0, the first in the low bits (codes [n * 8, cols], 0..15)."""
    grouped = codes.to(torch.int64).reshape(-1, _PER_WORD, codes.shape[1])
    return (grouped << torch.arange(0, 32, BITS, dtype=torch.int64).view(1, -1, 1)).sum(1)


def pack_gptq(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """qweight, qzeros (v1: each zero minus one, on whole words), scales and g_idx of `weight` [out, in]."""
    out_features, in_features = weight.shape
    grouped = weight.float().reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    low, high = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
    scales = ((high - low) / (2 ** BITS - 1)).clamp(min=1e-8).half()
    zeros = torch.round(-low / scales.float()).clamp(0, 2 ** BITS - 1)
    codes = torch.round(grouped / scales.float().unsqueeze(-1) + zeros.unsqueeze(-1)).clamp(0, 2 ** BITS - 1)
    qzeros = _words(zeros).T - sum(1 << shift for shift in range(0, 32, BITS))  # along the outputs, v1
    return {"qweight": _int32(_words(codes.reshape(out_features, in_features).T)),
            "qzeros": _int32(qzeros).contiguous(),
            "scales": scales.T.contiguous(),
            "g_idx": (torch.arange(in_features) // GROUP_SIZE).to(torch.int32)}


def write_gptq(source: Path, target: Path) -> None:
    """`source` (any base folder) as a GPTQ folder at `target` (a new folder, written beside it and renamed)."""
    checkpoint = open_base(source)
    args = checkpoint.model_args(open_tokenizer(checkpoint.tokenizer_path).n_words)
    heads = {"attention.wq": args.n_heads, "attention.wk": args.kv_heads}
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    weight_map = {}
    layers = sorted({int(name.split(".")[1]) for name in checkpoint.keys() if name.startswith("layers.")})
    groups = [[n for n in checkpoint.keys() if not n.startswith("layers.")]] + [
        [n for n in checkpoint.keys() if n.startswith(f"layers.{layer}.")] for layer in layers]
    for number, names in enumerate(groups):
        shard, file_name = {}, f"model-{number + 1:05d}-of-{len(groups):05d}.safetensors"
        for name in sorted(names):
            module = name.split(".", 2)[-1].removesuffix(".weight")
            weight = checkpoint.tensor(name)
            if module not in _LINEARS:
                shard[hf_name(name)] = weight.half().contiguous()
                continue
            if module in heads:
                weight = meta_to_hf_rows(weight, heads[module])
            prefix = hf_name(name).removesuffix(".weight")
            shard.update({f"{prefix}.{part}": value for part, value in pack_gptq(weight).items()})
        save_file(shard, staging / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    index = json.dumps({"weight_map": weight_map}, indent=1)
    (staging / "model.safetensors.index.json").write_text(index, encoding="utf-8")
    config = {**hf_config(checkpoint, args, "float16"), "quantization_config": {
        "quant_method": "gptq", "bits": BITS, "group_size": GROUP_SIZE, "desc_act": False, "sym": False}}
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(checkpoint.tokenizer_path, staging / checkpoint.tokenizer_path.name)
    staging.rename(target)
