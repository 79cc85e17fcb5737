"""llama.cpp's GGUF files: one `.gguf` holding a LLaMA's shape (`llama.*` metadata), its tokenizer
(`tokenizer.ggml.*`, adapter.gguf_tokenizer), its chat template and its weights, most often quantized in ggml's
own block formats (Q4_K, Q6_K, Q8_0...).

Weights are named `token_embd`, `blk.N.attn_q`, ..., `output_norm`, `output` (absent when the head is the
embedding matrix). llama.cpp's converter turned wq/wk back into Meta's interleaved RoPE rows (its "normal" RoPE
is Meta's), so they are read as they are. ggml's block formats are dequantized with the `gguf` package (llama.cpp's
own Python reader) to float32, one tensor at a time; `adapter.load(..., quantize="nf4")` then quantizes them again,
as it would a 16-bit base (rounding twice: a Q4_K file in nf4 is not the Q4_K model's weights exactly). Llama 3.1's
scaled RoPE is stored as per-frequency factors (`rope_freqs.weight`); they are read back into the "llama3" scaling
they were made from. Mixture-of-experts files and other architectures are refused by name.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelArgs, RopeScaling, explicit_head_size, is_positive_whole
from ..memory import release_file_pages
from .common import renamed
from .window import windowed_args

MAGIC = b"GGUF"
ARCHITECTURES = ("llama", "mistral")  # llama.cpp writes Mistral 7B and NeMo as "llama"; some tools as "mistral"
ROPE_FACTORS = "rope_freqs.weight"
_TOP = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
        "output.weight": "output.weight"}
_LAYER_KEY = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_PARTS = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
          "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
          "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
# metadata key (after "<architecture>.") -> ModelArgs field
_REQUIRED = {"embedding_length": "dim", "block_count": "n_layers", "attention.head_count": "n_heads",
             "feed_forward_length": "ffn_dim"}
_OPTIONAL = {"attention.head_count_kv": "n_kv_heads", "attention.layer_norm_rms_epsilon": "norm_eps",
             "rope.freq_base": "rope_theta"}


def is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == MAGIC


class GGUFFile:
    """A GGUF file's metadata and tensors, read with the `gguf` package (memory-mapped: nothing is read before it
    is asked for)."""

    def __init__(self, path: Path) -> None:
        try:
            from gguf import GGUFReader
        except ImportError as error:
            raise ImportError(f"{path}: reading GGUF files needs the gguf package (pip install gguf)") from error
        self.path = path
        try:
            self.reader = GGUFReader(path, "c")  # copy-on-write: tensors are writable views, the file is untouched
        except (ValueError, OSError, IndexError, KeyError) as error:
            raise ValueError(f"{path}: not a readable GGUF file ({error})") from error
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}

    def value(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.value(key)
        if value is None:
            raise ValueError(f"{self.path}: missing metadata {key}")
        return value

    def stored_type(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as float (F32, F16, BF16 as stored; ggml's block formats dequantized to float32)."""
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize

        found = self.tensors[name]
        shape = tuple(int(d) for d in reversed(found.shape.tolist()))
        if found.tensor_type in (Q.F32, Q.F16):
            return torch.from_numpy(found.data).reshape(shape)
        if found.tensor_type == Q.BF16:
            return torch.from_numpy(found.data.view(np.int16)).view(torch.bfloat16).reshape(shape)
        try:
            values = dequantize(found.data, found.tensor_type)
        except NotImplementedError:
            raise ValueError(f"{self.path}: {name} is stored as {found.tensor_type.name}, which the gguf package "
                             "cannot dequantize") from None
        self.release(name)  # a copy now: the blocks' pages are not needed resident
        return torch.from_numpy(values).reshape(shape)

    def release(self, name: str) -> None:
        """Give back the file pages of a tensor that has been copied."""
        release_file_pages(torch.from_numpy(self.tensors[name].data))


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """The GGUF file at `path`, opened once for the checkpoint, its tokenizer and its chat template alike: parsing a
    Llama 3 vocabulary's metadata takes gguf's reader seconds."""
    path = Path(path)
    stat = path.stat()
    return _open_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=2)
def _open_cached(path: str, mtime_ns: int, size: int) -> GGUFFile:
    return GGUFFile(Path(path))


def meta_name(gguf_name: str) -> str | None:
    """Meta's name for a llama.cpp tensor name, or None when it is not part of a LLaMA."""
    return renamed(gguf_name, _TOP, _LAYER_KEY, _PARTS)


class GGUFCheckpoint:
    """Lazy access to a GGUF file's tensors, under Meta's names and in Meta's layout."""

    format = "gguf"
    window = None
    quantization = None  # ggml's blocks are dequantized on reading; any bitsandbytes mode may be asked for

    def __init__(self, path: Path) -> None:
        self.file = open_gguf(path)
        self.source = str(path)
        self.tokenizer_path = path  # the tokenizer is in the metadata (adapter.gguf_tokenizer)
        self.architecture = self.file.require("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"{path}: architecture {self.architecture!r} is not supported (only "
                             f"{', '.join(map(repr, ARCHITECTURES))}: LLaMA-shaped models)")
        experts = self._key("expert_count")
        if experts:
            raise ValueError(f"{path}: {self.architecture}.expert_count is {experts}: mixture-of-experts models "
                             "(Mixtral) are not supported")
        name = f"{self.file.value('general.name', '')} {self.file.value('general.basename', '')}"
        self.family = "Mistral" if "mistral" in name.lower() else "LLaMA"
        self._names = {}
        for gguf_name in self.file.tensors:
            if gguf_name == ROPE_FACTORS:
                continue
            name = meta_name(gguf_name)
            if name is None:
                raise ValueError(f"{path}: unexpected tensor {gguf_name} (not part of a LLaMA model)")
            self._names[name] = gguf_name
        self.tied_output = "output.weight" not in self._names
        if self.tied_output and "tok_embeddings.weight" in self._names:
            self._names["output.weight"] = self._names["tok_embeddings.weight"]

    def _key(self, key: str) -> Any:
        return self.file.value(f"{self.architecture}.{key}")

    @cached_property
    def _params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for key, field in _REQUIRED.items():
            params[field] = self.file.require(f"{self.architecture}.{key}")
        params.update({field: value for key, field in _OPTIONAL.items() if (value := self._key(key)) is not None})
        for field in ("n_heads", "n_kv_heads", "ffn_dim"):
            params[field] = self._one_per_model(field, params.get(field))
        head_dim, rotary = self._key("attention.key_length"), self._key("rope.dimension_count")
        for key, value in (("embedding_length", params["dim"]), ("attention.head_count", params["n_heads"]),
                           ("attention.key_length", head_dim),
                           ("rope.dimension_count", rotary)):  # else read as partial rotary embeddings
            if value is not None and not is_positive_whole(value):
                raise ValueError(f"{self.source}: {self.architecture}.{key} must be a positive integer, got "
                                 f"{value!r}")
        params.update(explicit_head_size(head_dim, params["dim"], params["n_heads"]))
        width = head_dim or params["dim"] // params["n_heads"]
        if rotary is not None and rotary != width:
            raise ValueError(f"{self.source}: {self.architecture}.rope.dimension_count is {rotary} but heads are "
                             f"{width} wide: partial rotary embeddings are not supported")
        scaling = self._rope_scaling(params.get("rope_theta", 10000.0), width)
        if scaling is not None:
            params["rope_scaling"] = scaling
        return params

    def _one_per_model(self, field: str, value: Any) -> Any:
        """Per-layer lists (llama.cpp writes some shapes so) are taken when every layer has the same value."""
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise ValueError(f"{self.source}: {field} differs between layers ({value[:8]}...): not a LLaMA shape")
            return value[0]
        return value

    def _rope_scaling(self, theta: float, head_dim: int) -> RopeScaling | None:
        """The RoPE scaling: linear from the metadata, Llama 3's read back from its per-frequency factors."""
        kind = self._key("rope.scaling.type")
        if kind not in (None, "none", "linear"):
            raise ValueError(f"{self.source}: {self.architecture}.rope.scaling.type {kind!r} is not supported "
                             "(only linear, or Llama 3's as rope_freqs)")
        if kind == "linear":
            return RopeScaling("linear", float(self.file.require(f"{self.architecture}.rope.scaling.factor")))
        if ROPE_FACTORS not in self.file.tensors:
            return None
        factors = self.file.tensor(ROPE_FACTORS).float().flatten()
        if factors.numel() != head_dim // 2:
            raise ValueError(f"{self.source}: {ROPE_FACTORS} has {factors.numel()} factors for heads of {head_dim} "
                             f"(expected {head_dim // 2})")
        if bool((factors == 1).all()):
            return None
        return llama3_scaling(factors, theta, head_dim, self.source)

    def model_args(self, tokenizer_words: int, max_seq_len: int | None = None) -> ModelArgs:
        """From the metadata, the vocabulary from the embedding's rows; `max_seq_len` overrides the context length
        it records."""
        embeddings = self.file.tensors.get(self._names.get("tok_embeddings.weight", ""))
        vocab_size = int(embeddings.shape[-1]) if embeddings is not None else tokenizer_words
        return windowed_args(ModelArgs, self.file.path, None, self._key("context_length"), max_seq_len,
                             **{"vocab_size": vocab_size, **self._params})

    def keys(self) -> set[str]:
        return set(self._names)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise ValueError(f"{self.source}: missing tensor {name}")
        return self.file.tensor(self._names[name])

    def release(self, name: str) -> None:
        self.file.release(self._names[name])

    def stored_types(self) -> Counter:
        """How many tensors each ggml type stores (for `adapter.inspect`)."""
        return Counter(self.file.stored_type(name) for name in self.file.tensors)


def llama3_scaling(factors: torch.Tensor, theta: float, head_dim: int, source: str) -> RopeScaling:
    """The "llama3" RopeScaling whose frequencies are llama.cpp's `rope_freqs` factors (each frequency divided by
    its factor): the largest factor is the scaling factor; the blend's bounds are Llama 3.1's (1, 4, 8192), the only
    ones Meta has released, checked against every factor."""
    from ..model import rope_frequencies

    if not bool(torch.isfinite(factors).all()) or float(factors.min()) <= 0:
        raise ValueError(f"{source}: {ROPE_FACTORS} holds factors that are not positive numbers")
    scaling = RopeScaling("llama3", float(factors.max()))
    plain = rope_frequencies(head_dim, theta, torch.device("cpu"))
    scaled = rope_frequencies(head_dim, theta, torch.device("cpu"), scaling)
    if not torch.allclose(plain / scaled, factors, rtol=1e-4, atol=0):
        worst = int(((plain / scaled) - factors).abs().argmax())
        raise ValueError(f"{source}: {ROPE_FACTORS} are not Llama 3's RoPE scaling (factor {scaling.factor:g}, "
                         f"low 1, high 4, original context 8192): factor {worst} is {float(factors[worst]):g}, "
                         f"that scaling gives {float(plain[worst] / scaled[worst]):g}")
    return scaling
