"""`adapter.load`: a frozen (optionally quantized) LLaMA base plus an adapter, ready to generate.

The model is first built on the `meta` device (no memory), then the base is filled in one block at a
time, each block quantized as it arrives, so that peak host memory stays near one block plus the
(quantized) model rather than the whole model in 16/32-bit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import hub
from .config import AdapterArgs, ModelArgs
from .formats import open_base, read_adapter
from .formats.common import LoadedAdapter
from .formats.hf import HFCheckpoint, is_hf_folder
from .kv_cache import check_kv_cache
from .layout import column_major_copy, prefers_column_major
from .memory import trim_heap
from .model import Transformer
from .paths import BASE_NAMES
from .progress import terminal_progress
from .prompts import base_prompt_format, chat_template_source
from .quantize import FROZEN_LINEARS, check_mode, quantize_linear, quantize_tower, stored_linear
from .tiny.assets import resolve as resolve_tiny
from .tokenizer import open_tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


ACCELERATORS = {"mps": "Apple MPS", "xpu": "Intel XPU"}  # besides CUDA: what torch runs the model on


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: {device!r} is not a device name (e.g. cpu, cuda, cuda:1)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device} asked for, but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device: {device} asked for, but there are {torch.cuda.device_count()} CUDA device(s)")
    if device.type in ACCELERATORS and not _available(device.type):
        raise ValueError(f"device: {device} asked for, but no {ACCELERATORS[device.type]} device is available")
    if device.type not in ("cpu", "cuda", *ACCELERATORS):
        raise ValueError(f"device: {device.type} cannot hold a model here; use cpu, cuda, "
                         f"{' or '.join(ACCELERATORS)}")
    return device


def _available(kind: str) -> bool:
    backend = getattr(torch.backends, kind, None) if kind == "mps" else getattr(torch, kind, None)
    return backend is not None and bool(backend.is_available())


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Default: bfloat16 (or float16 where bf16 is unsupported) on GPU, float32 on CPU."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype: {dtype} is not a floating point type")
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:  # (a list: "unhashable type")
        raise ValueError(f"dtype: unknown dtype {dtype!r}; choose from {sorted(set(DTYPES))}")
    return DTYPES[dtype]


def open_named_base(base: str | os.PathLike):
    """The checkpoint a base argument names: a path, `hf:owner/name` (fetched), or the embedded `tiny` (what every
    command line's --base takes)."""
    return open_base(hub.resolve(resolve_tiny(base, None, None, None)[0], "base"))


def hub_base_without_weights(value: str | os.PathLike, what: str = "base") -> HFCheckpoint | None:
    """An HF base on the hub (`hf:owner/name`) read without its weights (its config, tokenizer and safetensors
    headers: megabytes, not gigabytes; asking it for a tensor is an error); None for anything else."""
    light = hub.resolve_without_weights(value, what)
    return HFCheckpoint(*light) if light is not None and is_hf_folder(light[0]) else None


def open_base_shape(base: str | os.PathLike):
    """`open_named_base` for a base's shape, settings and tensor names alone (what inspect and convert need): a hub
    repository of an HF base is read without its weights (`hub_base_without_weights`); anything else as
    `open_named_base`."""
    return hub_base_without_weights(resolve_tiny(base, None, None, None)[0]) or open_named_base(base)


def load(
    base: str | os.PathLike,
    adapter: str | os.PathLike | AdapterArgs | LoadedAdapter | None = None,
    quantize: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    max_seq_len: int | None = None,
    clip: str | os.PathLike | None = None,
    clip_model: str | os.PathLike | None = None,
    kv_cache: str = "auto",
    clip_quantize: str | None = None,
) -> Transformer:
    """Load a base LLaMA folder and, optionally, an adapter; returns the model in eval mode.

    `adapter` is a file/folder to load (or one already read, a `LoadedAdapter`), or an `AdapterArgs` for a
    fresh (zero-init) adapter to train.
    Either path may be `hf:owner/name` to fetch it from the Hugging Face hub (needs network).
    `clip` gives an adapter with a visual prompt its CLIP tower: a local weights file, or an open_clip
    pretrained tag such as "openai" (downloads); `clip_model` overrides the open_clip model the adapter
    names (an open_clip name or a model-config .json). The shipped tiny model has short names: base "tiny",
    adapters "tiny-text" (the default with base "tiny") and "tiny-image", clip "tiny" (see adapter.tiny.assets).
    `kv_cache="int8"` makes generation store keys/values in int8 (half the cache's memory; adapter.kv_cache).
    `clip_quantize` ("nf4", "int8") puts the CLIP tower's linears through bitsandbytes too (adapter.quantize).
    """
    clip_model = _checked_names(adapter, clip, clip_model, base=base)
    base, adapter, clip, clip_model = resolve_tiny(base, adapter, clip, clip_model)
    mode = check_mode(quantize)
    check_kv_cache(kv_cache)
    clip_mode = _clip_mode(clip, clip_quantize)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    checkpoint = open_named_base(base)
    tokenizer = open_tokenizer(checkpoint.tokenizer_path)
    args = checkpoint.model_args(tokenizer.n_words, max_seq_len)
    if tokenizer.n_words > args.vocab_size:
        raise ValueError(f"base: tokenizer has {tokenizer.n_words} pieces but the model's vocab_size is "
                         f"{args.vocab_size}")
    adapter_args, found = _read_adapter(adapter, args, clip)
    with torch.device("meta"):
        model = Transformer(args, adapter_args)
    fill_base(model, checkpoint, dtype=dtype, device=device, quantize=mode)
    model.base_format = checkpoint.format
    packing = getattr(checkpoint, "packing", None)
    model.base_packing = None if packing is None else packing.label
    model.base_family = checkpoint.family
    model.base_path = str(base)
    model.tokenizer = tokenizer
    model.base_prompt_format = base_prompt_format(chat_template_source(checkpoint.tokenizer_path), tokenizer)
    model.kv_cache = kv_cache
    return _fit_adapter(model, adapter, found, clip, clip_model, clip_mode, device)


def load_many(base: str | os.PathLike, adapters: Sequence[str | os.PathLike | None], *,
              clip: str | os.PathLike | None = None, clip_model: str | None = None,
              clip_quantize: str | None = None, **options: Any) -> list[Transformer]:
    """The base loaded once and each of `adapters` on it (`load_sharing`), in order: what serving several
    adapters needs. `clip` goes to every adapter with a visual prompt (the embedded "tiny-image" brings its own
    tower unless `clip` names another); those asking for the same tower share one. `options` are `load`'s
    (quantize, device, dtype, max_seq_len, kv_cache)."""
    if isinstance(adapters, str | os.PathLike):  # read letter by letter: "adapter: t does not exist"
        raise ValueError(f"adapters: expected a list of adapters, got one: {str(adapters)!r}; give [{str(adapters)!r}]")
    if not adapters:
        raise ValueError("adapters: give at least one (None: the bare base)")
    models: list[Transformer] = []
    towers: dict = {}
    for wanted in adapters:
        resolved, adapter, own_clip, own_clip_model = resolve_tiny(base, wanted, clip, clip_model)
        model = load_sharing(models[0], adapter) if models else load(resolved, adapter=adapter, **options)
        if own_clip is not None and model.visual_prompt is not None:
            attach_clip(model, own_clip, own_clip_model, clip_quantize, towers)
        models.append(model)
    if clip is not None and not towers:
        names = ", ".join(str(m.adapter_path) for m in models)
        raise ValueError(f"clip: none of the adapters ({names}) has a visual prompt to feed")
    if check_mode(clip_quantize, "clip_quantize") is not None and not towers:
        raise ValueError("clip_quantize: none of the adapters has a CLIP tower to quantize")
    return models


def load_sharing(
    model: Transformer,
    adapter: str | os.PathLike | AdapterArgs | None,
    clip: str | os.PathLike | None = None,
    clip_model: str | os.PathLike | None = None,
    clip_quantize: str | None = None,
) -> Transformer:
    """Another adapter on `model`'s frozen base, which is shared, not copied: serving a second adapter costs
    its own tensors (and CLIP tower), not a second base. `adapter`, `clip`, `clip_model` and `clip_quantize`
    are as in `load`; device, dtype, quantization and KV cache follow `model`.
    """
    clip_model = _checked_names(adapter, clip, clip_model)
    _, adapter, clip, clip_model = resolve_tiny(None, adapter, clip, clip_model)
    clip_mode = _clip_mode(clip, clip_quantize)
    adapter_args, found = _read_adapter(adapter, model.args, clip)
    with torch.device("meta"):
        sharing = Transformer(model.args, adapter_args)
    _share_base(sharing, model)
    for setting in SHARED_SETTINGS:
        setattr(sharing, setting, getattr(model, setting))
    return _fit_adapter(sharing, adapter, found, clip, clip_model, clip_mode, model.tok_embeddings.weight.device)


def _checked_names(adapter: object, clip: object, clip_model: object, **base: object) -> str | None:
    """ValueError naming an argument of `load` (`load_sharing`) of the wrong kind, rather than pathlib's TypeError
    ("expected str, bytes or os.PathLike object, not int") or an AttributeError from deep inside; `clip_model` as
    a string (a Path to its .json too)."""
    paths = (str, os.PathLike)
    kinds = {"base": (paths, BASE_NAMES),
             "adapter": ((*paths, AdapterArgs, LoadedAdapter, type(None)),
                         "a path, a name (tiny-text, hf:owner/name, official:NAME), AdapterArgs or a LoadedAdapter"),
             "clip": ((*paths, type(None)), "a path or an open_clip pretrained tag"),
             "clip_model": ((*paths, type(None)), "an open_clip model name or a model-config .json path")}
    for name, value in {**base, "adapter": adapter, "clip": clip, "clip_model": clip_model}.items():
        allowed, wanted = kinds[name]
        if not isinstance(value, allowed):
            raise ValueError(f"{name}: expected {wanted}, got {value!r:.80}")
    return None if clip_model is None else os.fspath(clip_model)


# what a model sharing another's base takes over from it besides the tensors
SHARED_SETTINGS = ("tokenizer", "base_format", "base_packing", "base_family", "base_path", "base_prompt_format",
                   "quantization", "kv_cache", "prefill_chunk", "cuda_graphs", "fused_inference", "fp32_attention")


def _clip_mode(clip: object, clip_quantize: str | None) -> str | None:
    mode = check_mode(clip_quantize, "clip_quantize")
    if mode is not None and clip is None:
        raise ValueError("clip_quantize: there is no CLIP tower to quantize (give clip=)")
    return mode


def _read_adapter(adapter: object, args: ModelArgs, clip: object) -> tuple[AdapterArgs, Any]:
    """(AdapterArgs, the adapter file read or None) for `adapter` on a base of shape `args`, checked to fit."""
    found = None
    if isinstance(adapter, AdapterArgs):
        adapter_args = adapter
        adapter_args.check_fits(args)
    elif adapter is not None:
        found = adapter if isinstance(adapter, LoadedAdapter) else read_adapter(hub.resolve(adapter, "adapter"))
        found.check_base(args)
        adapter_args = found.args
    else:
        adapter_args = AdapterArgs(prompt_len=0, prompt_layers=0)
    if clip is not None and adapter_args.visual == "none":
        raise ValueError("clip: this adapter has no visual prompt, so it cannot use an image encoder")
    return adapter_args, found


def _fit_adapter(model: Transformer, adapter: object, found, clip, clip_model: str | None, clip_mode: str | None,
                 device: torch.device) -> Transformer:
    """Give a model whose base is in place its adapter tensors (read, or fresh) and CLIP tower; freeze the base."""
    if found:
        found.check_declared(model)  # while the adapter's tensors are still shapes alone
    model.reset_adapter(device)
    # a bare base is asked as its chat template asks; an adapter in the format it records (alpaca unless it says)
    model.prompt_format = (model.base_prompt_format or "alpaca") if adapter is None else "alpaca"
    if found:
        found.apply_to(model)
        model.adapter_format = found.format
        model.adapter_path = str(found.path if isinstance(adapter, LoadedAdapter) else adapter)
    if clip is not None:
        attach_clip(model, clip, clip_model, clip_mode)
    model.freeze_base()
    return model.eval()


def attach_clip(model: Transformer, clip: str | os.PathLike, clip_model: str | None = None,
                clip_quantize: str | None = None, towers: dict | None = None) -> None:
    """Give `model`'s visual prompt its frozen CLIP tower (`clip`, `clip_model`, `clip_quantize` as in `load`).

    `towers` keeps the towers loaded so far by (weights, model, quantization), so that several image adapters
    served on one base share one tower instead of loading it again."""
    from .visual import attach_image_encoder, load_image_encoder

    mode = check_mode(clip_quantize, "clip_quantize")
    key = (str(clip), clip_model or model.adapter_args.clip_model, mode)
    encoder = None if towers is None else towers.get(key)
    if encoder is not None:
        attach_image_encoder(model, encoder, inference=True)
        return
    attach_image_encoder(model, load_image_encoder(clip, key[1]), inference=True)
    if mode is not None:
        quantize_tower(model.image_encoder.tower, mode, model.tok_embeddings.weight.dtype)
    if towers is not None:
        towers[key] = model.image_encoder


def _share_base(model: Transformer, source: Transformer) -> None:
    """Point every frozen tensor of `model` (built on the meta device with `source`'s args) at `source`'s: whole
    modules where neither holds anything learned (so quantized or re-laid-out linears come as they are), single
    parameters where one does (a norm one adapter tunes and the other not)."""
    for name in [n for n, _ in model.named_parameters() if not model.is_adapter_parameter(n)]:
        path, _, leaf = name.rpartition(".")
        mine, theirs = model.get_submodule(path), source.get_submodule(path)
        if mine is theirs:
            continue  # already shared with an earlier parameter of the same module
        if _holds_nothing_learned(model, path, mine) and _holds_nothing_learned(source, path, theirs):
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, theirs)
        else:
            setattr(mine, leaf, source.get_parameter(name))


def _holds_nothing_learned(model: Transformer, path: str, module: nn.Module) -> bool:
    return not any(model.is_adapter_parameter(f"{path}.{leaf}") for leaf, _ in module.named_parameters(recurse=False))


def _base_names(module: nn.Module, prefix: str, model: Transformer) -> list[str]:
    return [prefix + n for n, _ in module.named_parameters() if not model.is_adapter_parameter(prefix + n)]


def fill_base(model: Transformer, checkpoint, *, dtype: torch.dtype, device: torch.device,
              quantize: str | None) -> None:
    """Replace the meta base tensors with the checkpoint's, one block (and one matrix) at a time.

    Each frozen linear is quantized straight from the file's tensor, and the file pages of every tensor
    are given back as soon as it has been copied, so that little more than the finished model is resident.
    """
    release = getattr(checkpoint, "release", None)  # memory-mapped checkpoints give copied pages back
    stored_mode = _stored_mode(checkpoint, quantize)
    stored = getattr(checkpoint, "quantized_weight", lambda name: None)
    # a pre-quantized base's plain linears were left so on purpose (e.g. skip modules): they stay plain
    quantized_weights = tuple(f"{linear}.weight" for linear in FROZEN_LINEARS) if quantize and not stored_mode else ()
    tied = checkpoint.tied_output  # the head is the embedding matrix (Llama 3.2 1B/3B)
    parts: list[tuple[str, nn.Module]] = [("tok_embeddings.", model.tok_embeddings), ("norm.", model.norm)]
    parts += [] if tied else [("output.", model.output)]
    parts += [(f"layers.{i}.", block) for i, block in enumerate(model.layers)]
    check_base_names(checkpoint, set(base_shapes(model, tied)))
    shown = f"loading the base ({stored_mode or quantize or str(dtype).replace('torch.', '')})"
    for prefix, module in terminal_progress(parts, shown, "block"):
        state = {}
        for name in _base_names(module, prefix, model):
            want = tuple(model.get_parameter(name).shape)
            local = name[len(prefix):]
            quantized = stored(name)
            if quantized is not None:
                check_shape(checkpoint, name, quantized.shape, want)
                parent, _, linear = local[: -len(".weight")].rpartition(".")
                setattr(module.get_submodule(parent), linear, stored_linear(quantized, dtype, device))
                continue
            source = checkpoint.tensor(name)
            check_tensor(checkpoint, name, source, want)
            if name.endswith(quantized_weights):
                # quantized from the file's own dtype on the host (bitsandbytes quantizes on the move)
                parent, _, linear = local[: -len(".weight")].rpartition(".")
                setattr(module.get_submodule(parent), linear, quantize_linear(source, quantize, dtype, device))
                copied = True
            elif local.endswith("weight") and prefers_column_major(
                    model.output if tied and name == "tok_embeddings.weight" else owner(module, local), device, dtype):
                state[local] = column_major_copy(source, device, dtype)  # the CPU GEMV reads it faster so
                copied = True
            else:
                state[local] = source.to(device=device, dtype=dtype)
                copied = not _shares_memory(source, state[local])
            if release is not None and copied:
                release(name)
            del source
        module.load_state_dict(state, strict=False, assign=True)
        del state
        trim_heap()
    if tied:  # one tensor for both: a copy would add half again to Llama 3.2 1B's nf4 tensors (bench.tied)
        model.output.weight = model.tok_embeddings.weight
    model.quantization = stored_mode or quantize


def _stored_mode(checkpoint, quantize: str | None) -> str | None:
    """The mode a pre-quantized base was stored in (None for a plain one); asking for another is refused, since it
    would quantize already quantized weights again."""
    stored_mode = getattr(checkpoint, "quantization", None)
    if stored_mode and quantize not in (None, stored_mode):
        raise ValueError(f"quantize: {checkpoint.source} is stored quantized in {stored_mode} (bitsandbytes); load "
                         f"it as it is (quantize none or {stored_mode}), not in {quantize}")
    return stored_mode


def base_shapes(model: Transformer, tied: bool) -> dict[str, tuple[int, ...]]:
    """The base tensors `model`'s LLaMA holds (Meta names, its adapter's left out) and their shapes; no head where
    it is `tied` to the embeddings."""
    return {name: tuple(parameter.shape) for name, parameter in model.named_parameters()
            if not model.is_adapter_parameter(name) and not (tied and name == "output.weight")}


def check_base_names(checkpoint, expected: set[str]) -> None:
    """A ValueError naming the first tensor of `expected` that `checkpoint` lacks, or those it holds besides (a
    tied head's copy allowed)."""
    available = set(checkpoint.keys())
    missing = sorted(expected - available)
    if missing:
        raise ValueError(f"{checkpoint.source}: missing tensor {missing[0]}")
    unexpected = sorted(available - expected - ({"output.weight"} if checkpoint.tied_output else set()))
    if unexpected:
        raise ValueError(f"{checkpoint.source}: unexpected tensor(s) {unexpected[:5]}")


def check_tensor(checkpoint, name: str, tensor: torch.Tensor, want: tuple[int, ...]) -> None:
    """A ValueError naming a stored base tensor that is not a floating-point one of shape `want`."""
    check_shape(checkpoint, name, tensor.shape, want)
    if not tensor.is_floating_point():
        raise ValueError(f"{checkpoint.source}: {name} holds {str(tensor.dtype).removeprefix('torch.')} values, "
                         "not floating-point weights")


def check_shape(checkpoint, name: str, shape: Sequence[int], want: tuple[int, ...]) -> None:
    if tuple(shape) != want:
        raise ValueError(f"{checkpoint.source}: {name} has shape {tuple(shape)}, expected {want}")


def owner(module: nn.Module, name: str) -> nn.Module:
    """The submodule that holds parameter `name` (relative to `module`)."""
    return module.get_submodule(name.rpartition(".")[0])


def _shares_memory(source: torch.Tensor, copy: torch.Tensor) -> bool:
    """Whether `copy` still reads the checkpoint's memory (`.to` made no copy)."""
    return copy.device == source.device and copy.data_ptr() == source.data_ptr()
