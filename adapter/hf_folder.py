"""A base written as an HF folder (transformers' layout): its tensors one at a time, in shards, with
config.json, a model card and the tokenizer beside them.

`adapter.quantize_base` writes the frozen linears as bitsandbytes codes, `adapter.merge` with an adapter's
parts merged in; both stream the base tensor by tensor (a memory-mapped checkpoint gives each one's pages back
once written), so a 7B base is written in about the memory of one shard.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from .config import ModelArgs
from .formats.bnb import QuantizedWeight
from .formats.common import refuse_existing, save_tensors, write_text_atomically
from .formats.hf import hf_name, meta_to_hf_rows
from .gguf_tokenizer import write_tokenizer_files
from .loading import DTYPES, base_shapes, check_base_names, check_tensor, open_named_base
from .model import Transformer
from .paths import BASE_NAMES, require_path
from .progress import terminal_progress
from .quantize import FROZEN_LINEARS
from .tokenizer import TOKENIZER_FILES

# what a tokenizer folder may hold besides the tokenizer: its special tokens, chat template, generation stops
TOKENIZER_COMPANIONS = ("tokenizer.model", "tokenizer.json", "tekken.json", "tokenizer_config.json",
                        "special_tokens_map.json", "chat_template.jinja", "generation_config.json")
SHARD_GB = 2.0
CARD = "README.md"
MAX_SHARD_GB = 2**20  # a shard's most GiB (a pebibyte: 1e300 overflowed counting its bytes)


def open_base_to_rewrite(base: str | os.PathLike, out: Path, dtype: str, shard_gb: float, quantized: str):
    """The checkpoint of `base`, to be written anew as the new folder `out`, once the request is checked (a
    ValueError naming the argument at fault, before any weight is read): a known dtype, shards above 0 GiB, `out`
    new, and a base not stored quantized (`quantized` ends that error: what to do instead)."""
    require_path(base, "base", BASE_NAMES)
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype: unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    if isinstance(shard_gb, bool) or not isinstance(shard_gb, int | float) or not 0 < shard_gb <= MAX_SHARD_GB:
        raise ValueError(f"shard_gb: must be a number of GiB above 0 and at most {MAX_SHARD_GB:,}, got {shard_gb!r}")
    refuse_existing(out)
    checkpoint = open_named_base(base)
    if getattr(checkpoint, "quantization", None):
        raise ValueError(f"base: {checkpoint.source} is already stored quantized ({checkpoint.quantization}); "
                         f"{quantized}")
    return checkpoint


def base_tensor_names(checkpoint) -> list[str]:
    """The base's tensors (Meta names) in the order they are written: embeddings, final norm, head, then layer by
    layer."""
    top = ["tok_embeddings.weight", "norm.weight"] + ([] if checkpoint.tied_output else ["output.weight"])
    layers = sorted((n for n in checkpoint.keys() if n.startswith("layers.")), key=lambda n: (int(n.split(".")[1]), n))
    return top + layers


def hf_tensors(name: str, weight: torch.Tensor, args: ModelArgs,
               quantize: Callable[[torch.Tensor], QuantizedWeight] | None = None,
               dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF name -> tensor(s) of one base tensor given in Meta's layout: wq / wk rows moved into HF's order, cast to
    `dtype` when given; with `quantize`, a frozen linear as its codes and statistics (quantized from the tensor as
    stored and in Meta's row order, as adapter.load quantizes, then its rows moved whole)."""
    target = hf_name(name)
    module = name.split(".", 2)[-1].removesuffix(".weight")
    heads = {"attention.wq": args.n_heads, "attention.wk": args.kv_heads}.get(module)
    if quantize is None or module not in FROZEN_LINEARS:
        weight = weight if dtype is None else weight.to(dtype)
        return {target: (weight if heads is None else meta_to_hf_rows(weight, heads)).contiguous()}
    stored = quantize(weight)
    if heads is not None:
        stored = stored.rows(meta_to_hf_rows(torch.arange(weight.shape[0]), heads))
    return stored.state_dict(target)


def write_hf_folder(folder: Path, checkpoint, args: ModelArgs,
                    tensors: Callable[[str, torch.Tensor], dict[str, torch.Tensor]], config: dict,
                    card: Callable[[int], str], shard_bytes: int) -> None:
    """Into the existing (staging) `folder`: `tensors(name, weight)` of each base tensor in shards of at most
    `shard_bytes`, config.json, README.md (`card(bytes of weights)`) and the base's tokenizer files. A base that
    loading would refuse (a tensor missing or extra, a shape that is not `args`') is refused as loading says it."""
    with torch.device("meta"):
        shapes = base_shapes(Transformer(args), checkpoint.tied_output)
    check_base_names(checkpoint, set(shapes))
    shard: dict[str, torch.Tensor] = {}
    written: list[tuple[Path, list[str], int]] = []  # each full shard, saved as soon as it is full
    release = getattr(checkpoint, "release", None)  # memory-mapped checkpoints give read pages back
    for name in terminal_progress(base_tensor_names(checkpoint), "writing the base", "tensor"):
        weight = checkpoint.tensor(name)
        check_tensor(checkpoint, name, weight, shapes[name])
        converted = tensors(name, weight)
        if shard and _bytes(shard) + _bytes(converted) > shard_bytes:
            written.append(_save_part(folder, len(written), shard))
            shard = {}
        shard.update(converted)
        if release is not None:
            release(name)
    written.append(_save_part(folder, len(written), shard))
    _name_shards(folder, written)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / CARD).write_text(card(sum(size for *_, size in written)), encoding="utf-8")
    if checkpoint.format == "gguf":  # the tokenizer is in the file's metadata
        write_tokenizer_files(checkpoint.tokenizer_path, folder)
        return
    tokenizer = checkpoint.tokenizer_path  # under a name the HF reader looks for (Mistral's .v3: .model)
    target = tokenizer.name if tokenizer.name in TOKENIZER_FILES else TOKENIZER_FILES[0]
    shutil.copyfile(tokenizer, folder / target)
    for companion in TOKENIZER_COMPANIONS:
        if (tokenizer.parent / companion).is_file() and not (folder / companion).exists():
            shutil.copyfile(tokenizer.parent / companion, folder / companion)


def hf_config(checkpoint, args: ModelArgs, dtype: str) -> dict:
    """config.json as transformers writes it for a base of this shape (from `checkpoint`: family, tied head,
    sliding window) stored in `dtype` ("float16", ...)."""
    a, mistral = args, checkpoint.family == "Mistral"
    config = {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama", "hidden_act": "silu", "hidden_size": a.dim,
        "intermediate_size": a.ffn_hidden_dim, "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.kv_heads, "head_dim": a.head_dim, "vocab_size": a.vocab_size,
        "rms_norm_eps": a.norm_eps, "max_position_embeddings": a.max_seq_len, "rope_theta": a.rope_theta,
        "rope_scaling": _rope_scaling(a), "tie_word_embeddings": bool(checkpoint.tied_output),
        "attention_bias": False, "mlp_bias": False, "torch_dtype": dtype,
    }
    if mistral:
        config["sliding_window"] = getattr(checkpoint, "window", None)
    return config


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _save_part(folder: Path, number: int, shard: dict[str, torch.Tensor]) -> tuple[Path, list[str], int]:
    """One shard written under a provisional name (the count of shards is known only at the end)."""
    path = folder / f"part-{number:05d}.safetensors"
    save_tensors(shard, path, metadata={"format": "pt"})
    return path, sorted(shard), _bytes(shard)


def _name_shards(folder: Path, parts: list[tuple[Path, list[str], int]]) -> None:
    """HF's names: `model.safetensors` alone, or `model-0000N-of-0000M.safetensors` and their index."""
    if len(parts) == 1:
        parts[0][0].rename(folder / "model.safetensors")
        return
    weight_map = {}
    for number, (path, names, _) in enumerate(parts, 1):
        file_name = f"model-{number:05d}-of-{len(parts):05d}.safetensors"
        path.rename(folder / file_name)
        weight_map.update(dict.fromkeys(names, file_name))
    index = {"metadata": {"total_size": sum(size for *_, size in parts)},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _rope_scaling(args: ModelArgs) -> dict | None:
    scaling = args.rope_scaling
    if scaling is None:
        return None
    if scaling.kind == "linear":
        return {"rope_type": "linear", "factor": scaling.factor}
    return {"rope_type": scaling.kind, "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_len}


def push_folder(folder: Path, repo: str, private: bool, message: str) -> str:
    """A written folder in one commit to `repo` (its card's OWNER/NAME made `repo` first, so that it names where it
    now lives); where that fails, the folder stays, with how to push it later. The commit's URL."""
    from .push import commit_folder

    card = folder / CARD
    named = card.read_text(encoding="utf-8").replace("OWNER/NAME", repo)
    write_text_atomically(card, named)
    try:
        return commit_folder(folder, repo, private, message, what="--push-to-hub")
    except ValueError as error:
        raise ValueError(f"{error}; the folder is kept: push it later with hf upload {repo} {folder} .") from error
