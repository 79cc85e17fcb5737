"""Hugging Face LLaMA folders: `config.json`, `tokenizer.model` and the weights as `model.safetensors`,
`pytorch_model.bin`, or shards of either listed in `model.safetensors.index.json` / `pytorch_model.bin.index.json`.

Mistral folders (`model_type: mistral`) are read too: their layers are LLaMA's (grouped-query attention, the same
tensor names), and PEFT's `adaption_prompt` adapts both; its `sliding_window` is kept (adapter.formats.window).

The checkpoint is handed to the loader under Meta's names and layout, so the model and every adapter
stay in Meta layout. HF stores wq/wk with the rows of each head permuted for its rotate-half RoPE;
`hf_to_meta_rows` undoes that as each tensor is read. Anything else touching those rows must be permuted
the same way when it crosses between the layouts: v2 `wq` biases and the LoRA up-projections of `wq`/`wk`
(both have the head rows as their first dimension, which is what the two permutation functions act on).

Safetensors files are opened per tensor and .bin files with weights-only, mmap'ed `torch.load`, so
nothing is read before it is asked for and no pickled code ever runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelArgs, RopeScaling, explicit_head_size
from ..paths import not_a_file
from ..tokenizer import find_tokenizer
from .bnb import QuantizedWeight, split_stats, stored_double_quant, stored_quantization
from .common import named_tensors, renamed, torch_load
from .meta import read_json
from .packed import PACKED_METHODS, packed_scheme
from .window import sliding_window, windowed_args

_TOP_LEVEL = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "output.weight"}
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(\w+\.\w+|\w+)\.weight")
_LAYER_PARTS = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
IGNORED_SUFFIX = "rotary_emb.inv_freq"  # a buffer older transformers saved; recomputed from rope_theta

# config.json field -> ModelArgs field
_REQUIRED = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
             "intermediate_size": "ffn_dim"}
_OPTIONAL = {"num_key_value_heads": "n_kv_heads", "vocab_size": "vocab_size", "rms_norm_eps": "norm_eps",
             "max_position_embeddings": "max_seq_len"}
# settings the model does not implement: field -> the only value accepted
_FIXED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
MODEL_TYPES = ("llama", "mistral")
GPTQ_SETTINGS = "quantize_config.json"  # AutoGPTQ's, beside a config.json without quantization_config
_LAYOUTS = (("model.safetensors", "model.safetensors.index.json"),
            ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _head_dim(w: torch.Tensor, n_heads: int) -> int:
    rows = w.shape[0] if w.dim() else 0
    if rows == 0 or rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of an even size")
    return rows // n_heads


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved RoPE pairs (0,1),(2,3).. -> HF's halves (0,D/2),(1,D/2+1).., per head, on dim 0."""
    head_dim = _head_dim(w, n_heads)
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `meta_to_hf_rows`: HF's rotate-half row order back to Meta's interleaved pairs."""
    head_dim = _head_dim(w, n_heads)
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def meta_name(hf_name: str) -> str | None:
    """Meta's name for an HF LLaMA tensor name, or None when it is not part of a LLaMA."""
    return renamed(hf_name, _TOP_LEVEL, _LAYER_KEY, _LAYER_PARTS)


def hf_name(name: str) -> str:
    """HF's name for one of a LLaMA's tensors named as Meta names them (the inverse of `meta_name`)."""
    top = {meta: hf for hf, meta in _TOP_LEVEL.items()}
    if name in top:
        return top[name]
    _, layer, rest = name.split(".", 2)
    part = {meta: hf for hf, meta in _LAYER_PARTS.items()}[rest.removesuffix(".weight")]
    return f"model.layers.{layer}.{part}.weight"


class SafetensorsFile:
    """One safetensors file: its header is checked now, each tensor read when asked for."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._open() as handle:
            self.names = set(handle.keys())

    def _open(self):
        try:
            return safe_open(self.path, framework="pt")
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{self.path}: not a readable safetensors file ({error})") from error

    def get(self, name: str) -> torch.Tensor:
        with self._open() as handle:
            return handle.get_tensor(name)


class _TorchFile:
    """One pytorch_model*.bin file, loaded weights-only and mmap'ed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state = state = named_tensors(torch_load(path), path)
        self.names = set(state)

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]


class ListedFile:
    """A weights file of which only the tensor names were read (a hub repository's safetensors headers): enough for
    a base's shape and settings; asking it for a tensor is an error."""

    def __init__(self, path: Path, names: set[str]) -> None:
        self.path, self.names = path, set(names)

    def get(self, name: str) -> torch.Tensor:
        raise ValueError(f"{self.path}: only its tensors' names were read; its weights are not fetched")


_WeightFile = SafetensorsFile | _TorchFile | ListedFile


def _open_file(path: Path) -> _WeightFile:
    return SafetensorsFile(path) if path.suffix == ".safetensors" else _TorchFile(path)


def _open_shards(index: Path) -> list[_WeightFile]:
    """The files a `*.index.json` names, each checked to hold the tensors the index says it holds."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: expected a weight_map of tensor name -> file name")
    files = {}
    for file_name in sorted(set(weight_map.values())):
        if Path(file_name).name != file_name:
            raise ValueError(f"{index}: {file_name!r} is not a file name in this folder")
        path = index.parent / file_name
        if not path.is_file():
            raise FileNotFoundError(f"{index.name} names the weight shard {not_a_file(path)}")
        files[file_name] = _open_file(path)
    for name, file_name in weight_map.items():
        if name not in files[file_name].names:
            raise ValueError(f"{files[file_name].path}: missing tensor {name} (listed in {index.name})")
    return list(files.values())


def _open_weights(folder: Path, base_name: str | None = None) -> list[_WeightFile]:
    """HF's order: a single file before an index, safetensors before .bin; then, for an old AutoGPTQ folder, the
    file its quantize_config.json names (`model_file_base_name`, e.g. gptq_model-4bit-128g.safetensors)."""
    for single, index in _LAYOUTS:
        if (folder / single).is_file():
            return [_open_file(folder / single)]
        if (folder / index).is_file():
            return _open_shards(folder / index)
    named = folder / f"{base_name}.safetensors" if base_name else None
    if named is not None and named.is_file():
        return [_open_file(named)]
    names = ", ".join(name for layout in _LAYOUTS for name in layout)
    raise FileNotFoundError(f"base: {folder} has config.json but no weights ({names})")


def _rope(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """`rope_theta` and `rope_scaling` from config.json: at the top level (transformers 4) or inside
    `rope_parameters` (5); "linear" and "llama3" scaling are read, other kinds refused by name."""
    found: dict[str, Any] = {"rope_theta": config.get("rope_theta")}
    for field in ("rope_scaling", "rope_parameters"):
        value = config.get(field)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ValueError(f"{path}: {field} must be an object, got {value!r}")
        if found["rope_theta"] is None:
            found["rope_theta"] = value.get("rope_theta")
        if value.get("rope_type", value.get("type")) not in (None, "default"):
            try:
                found["rope_scaling"] = RopeScaling.from_hf(value)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from error
    if found["rope_theta"] is None:
        found["rope_theta"] = 10000.0
    return found


def _quantization_settings(config: dict[str, Any], folder: Path, config_path: Path) -> tuple[Any, Path]:
    """config.json's `quantization_config`, or an old AutoGPTQ folder's `quantize_config.json` (GPTQ's settings
    before transformers read GPTQ), with the file they came from."""
    if "quantization_config" in config or not (folder / GPTQ_SETTINGS).is_file():
        return config.get("quantization_config"), config_path
    settings = read_json(folder / GPTQ_SETTINGS)
    if not isinstance(settings, dict):
        raise ValueError(f"{folder / GPTQ_SETTINGS}: expected an object of GPTQ settings")
    return {"quant_method": "gptq", **settings}, folder / GPTQ_SETTINGS


def _params(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """ModelArgs fields from config.json, refusing the LLaMA variants the model does not implement."""
    if config.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"{path}: model_type {config.get('model_type')!r} is not supported "
                         f"(only {', '.join(map(repr, MODEL_TYPES))})")
    missing = [name for name in _REQUIRED if config.get(name) is None]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}")
    for name, only in _FIXED.items():
        if config.get(name, only) != only:
            raise ValueError(f"{path}: {name}={config[name]!r} is not supported (only {only!r})")
    params = {ours: config[theirs] for theirs, ours in {**_REQUIRED, **_OPTIONAL}.items()
              if config.get(theirs) is not None}
    params.update(explicit_head_size(config.get("head_dim"), params["dim"], params["n_heads"]))
    params.update(_rope(config, path))
    return params


class HFCheckpoint:
    """Lazy access to an HF LLaMA folder's tensors, under Meta's names and in Meta's layout."""

    format = "hf"

    def __init__(self, folder: Path, listed: dict[str, set[str]] | None = None) -> None:
        """`listed`: the tensor names of each weights file (by file name), for a folder without its weights."""
        self.folder, self.without_weights = folder, bool(listed)
        self.source = str(folder)
        self.tokenizer_path = find_tokenizer(folder)
        self.config_path = folder / "config.json"
        config = read_json(self.config_path)
        self._params = _params(config, self.config_path)
        settings, settings_path = _quantization_settings(config, folder, self.config_path)
        self.packing = packed_scheme(settings, settings_path) if isinstance(settings, dict) and \
            settings.get("quant_method") in PACKED_METHODS else None  # GPTQ, AWQ, ...: read back to weights
        # a bitsandbytes folder's mode: its linears stay as stored
        self.quantization = None if self.packing else stored_quantization(config, self.config_path)
        self.double_quant = stored_double_quant(config)  # (of a 4-bit one)
        self.family = "Mistral" if config["model_type"] == "mistral" else "LLaMA"
        self.window = sliding_window(config.get("sliding_window") if self.family == "Mistral" else None,
                                     self.config_path)
        n_heads = self._params["n_heads"]
        self._rope_heads = {"attention.wq.weight": n_heads,
                            "attention.wk.weight": self._params.get("n_kv_heads") or n_heads}
        files = [ListedFile(folder / name, names) for name, names in sorted(listed.items())] if listed else \
            _open_weights(folder, (settings or {}).get("model_file_base_name") if self.packing else None)
        tied = config.get("tie_word_embeddings")
        if tied not in (None, True, False):  # "false" read as true: a stored lm_head ignored
            raise ValueError(f"{self.config_path}: tie_word_embeddings must be true or false, got {tied!r}")
        self._where = self._map_names(files, tied)
        self._stats = self._map_stats(files)
        embeddings = self._where.get("tok_embeddings.weight")
        self.tied_output = embeddings is not None and self._where.get("output.weight") == embeddings

    def _split(self, names: set[str]) -> tuple[set[str], dict[str, dict[str, str]]]:
        """The plain tensor names, and the parts of each stored-quantized weight by that weight's name."""
        return self.packing.split(names) if self.packing else split_stats(names)

    def _map_names(self, files: list[_WeightFile], tied: bool | None) -> dict[str, tuple[_WeightFile, str]]:
        """Meta name -> (file, HF name); a tied lm_head (or an absent one, the config silent) reads the
        embeddings. A packed linear's weight is named as if it were stored (its parts may be in several shards)."""
        where: dict[str, tuple[_WeightFile, str]] = {}
        for file in files:
            plain, owned = self._split(file.names)
            packed = set(owned) if self.packing else set()
            for hf_name in sorted(plain | packed):
                if hf_name.endswith(IGNORED_SUFFIX) or (tied and hf_name == "lm_head.weight"):
                    continue
                name = meta_name(hf_name)
                if name is None:
                    raise ValueError(f"{file.path}: unexpected tensor {hf_name} (not part of a LLaMA model)")
                if name in where and hf_name in packed and where[name][1] == hf_name:
                    continue
                if name in where:
                    raise ValueError(f"{file.path}: tensor {hf_name} is also in {where[name][0].path}")
                where[name] = (file, hf_name)
        if "output.weight" not in where and "tok_embeddings.weight" in where:
            if tied is False:  # the embeddings would answer as the head, silently other logits
                raise ValueError(f"{self.source}: missing tensor lm_head.weight ({self.config_path.name} says "
                                 "tie_word_embeddings: false)")
            where["output.weight"] = where["tok_embeddings.weight"]
        return where

    def _map_stats(self, files: list[_WeightFile]) -> dict[str, dict[str, tuple[_WeightFile, str]]]:
        """Meta name -> the bitsandbytes statistics, or the packed parts, of that weight: {key: (file, HF name)} (in
        any shard)."""
        stats: dict[str, dict[str, tuple[_WeightFile, str]]] = {}
        for file in files:
            for hf_weight, keys in sorted(self._split(file.names)[1].items()):
                name = meta_name(hf_weight)
                if name is None or name not in self._where or self._where[name][1] != hf_weight:
                    first = next(iter(keys.values()))
                    raise ValueError(f"{file.path}: quantization statistics {first} belong to no weight of the model")
                if self.quantization is None and self.packing is None:
                    first = next(iter(keys.values()))
                    raise ValueError(f"{file.path}: holds bitsandbytes statistics ({first}) but "
                                     f"{self.config_path} has no quantization_config")
                if not name.startswith("layers.") and not self.packing:
                    raise ValueError(f"{file.path}: {hf_weight} is stored quantized; only the linears of the layers "
                                     "can be (transformers leaves lm_head out unless told otherwise)")
                stats.setdefault(name, {}).update({key: (file, hf_name) for key, hf_name in keys.items()})
        return stats

    def model_args(self, tokenizer_words: int, max_seq_len: int | None = None) -> ModelArgs:
        """From config.json; `max_seq_len` overrides max_position_embeddings."""
        return windowed_args(ModelArgs, self.config_path, self.window, self._params.get("max_seq_len"), max_seq_len,
                             **{"vocab_size": tokenizer_words, **self._params})

    def keys(self) -> set[str]:
        return set(self._where)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ValueError(f"{self.source}: missing tensor {name}")
        file, hf_name = self._where[name]
        if name in self._stats and self.packing:
            parts = {key: where.get(part_name) for key, (where, part_name) in self._stats[name].items()}
            weight = self.packing.dequantize(f"{file.path}: {hf_name.removesuffix('.weight')}", parts)
            return self._meta_rows(name, file, hf_name, weight, hf_to_meta_rows)
        if name in self._stats:
            raise ValueError(f"{self.source}: {hf_name} is stored quantized ({self.quantization}); "
                             "it is read as a quantized linear (quantized_weight)")
        return self._meta_rows(name, file, hf_name, file.get(hf_name), hf_to_meta_rows)

    def quantized_weight(self, name: str) -> QuantizedWeight | None:
        """The weight `name` as bitsandbytes stored it (rows in Meta's order), or None when it is a plain tensor
        (a packed linear's weight is read back by `tensor`)."""
        if name not in self._stats or self.packing:
            return None
        file, hf_name = self._where[name]
        stats = {key: where.get(stat_name) for key, (where, stat_name) in self._stats[name].items()}
        stored = QuantizedWeight.read(f"{file.path}: {hf_name}", file.get(hf_name), stats)
        return self._meta_rows(name, file, hf_name, stored, lambda w, heads: w.rows(hf_to_meta_rows(
            torch.arange(w.shape[0]), heads)))

    def _meta_rows(self, name: str, file: _WeightFile, hf_name: str, value, reorder):
        """`value` with wq/wk rows turned from HF's rotate-half order into Meta's (`reorder(value, heads)`)."""
        heads = self._rope_heads.get(name.split(".", 2)[-1]) if name.startswith("layers.") else None
        if heads is None:
            return value
        try:
            return reorder(value, heads)
        except ValueError as error:
            raise ValueError(f"{file.path}: {hf_name}: {error}") from error
