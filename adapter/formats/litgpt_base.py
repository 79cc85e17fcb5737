"""litgpt's own base checkpoints: a folder with `lit_model.pth` and `model_config.yaml`, as `litgpt download`
leaves them (beside the tokenizer files), so that its adapters can be served on the base they were trained on.

litgpt names the weights `transformer.wte`, `transformer.h.N.{norm_1, attn.qkv, attn.proj, norm_2, mlp.fc_1,
mlp.fc_2, mlp.proj}`, `transformer.ln_f`, `lm_head`, and fuses q|k|v into one weight (all queries, keys, values
from 0.5.5 on, `attn.qkv`; interleaved per query group before, `attn.attn`: adapter.formats.litgpt.split_qkv);
its q/k rows are HF's rotate-half order, turned to Meta's here. Only LLaMA-shaped configs are read (RMSNorm,
LLaMAMLP, no biases, sequential residuals, full rotary); others are refused naming the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..config import ModelArgs, RopeScaling, explicit_head_size
from ..memory import release_file_pages
from ..tokenizer import find_tokenizer
from .common import named_tensors, torch_load
from .hf import hf_to_meta_rows
from .litgpt import CONFIG_FILE, sibling_config, split_qkv
from .window import sliding_window, windowed_args

WEIGHTS_FILE = "lit_model.pth"
_LAYER_KEY = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_TOP = {"transformer.wte.weight": "tok_embeddings.weight", "transformer.ln_f.weight": "norm.weight",
        "lm_head.weight": "output.weight"}
_PARTS = {"norm_1.weight": "attention_norm.weight", "attn.proj.weight": "attention.wo.weight",
          "norm_2.weight": "ffn_norm.weight", "mlp.fc_1.weight": "feed_forward.w1.weight",
          "mlp.fc_2.weight": "feed_forward.w3.weight", "mlp.proj.weight": "feed_forward.w2.weight"}
_QKV = {"attn.qkv.weight": False, "attn.attn.weight": True}  # the fused weight's name -> interleaved (<= 0.5.4)
# what a LLaMA's litgpt config says; any other value is a model this project does not implement
_LLAMA = {"norm_class_name": "RMSNorm", "mlp_class_name": "LLaMAMLP", "parallel_residual": False, "bias": False,
          "attn_bias": False, "lm_head_bias": False, "shared_attention_norm": False, "rotary_percentage": 1.0,
          "norm_qk": False, "post_attention_norm": False, "post_mlp_norm": False, "scale_embeddings": False,
          "n_expert": 0, "rope_interleave": False, "attention_scores_scalar": None,
          "attention_logit_softcapping": None, "final_logit_softcapping": None, "latent_attention": None}


def is_litgpt_folder(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()


class LitGPTCheckpoint:
    """Lazy access to a litgpt base's tensors under Meta's names and in Meta's layout."""

    format = "litgpt"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.source = str(folder)
        self.weights_path = folder / WEIGHTS_FILE
        self.config_path = folder / CONFIG_FILE
        self.config = config = sibling_config(self.weights_path)
        self._params = _params(config, self.config_path)
        self.family = "Mistral" if str(config.get("name", "")).lower().startswith(("mistral", "mixtral")) else "LLaMA"
        self.window = sliding_window(config.get("sliding_window_size"), self.config_path)
        self.tokenizer_path = find_tokenizer(folder)
        state = torch_load(self.weights_path)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        self.state = state = named_tensors(state, self.weights_path)
        fused = {name for key in state if (m := _LAYER_KEY.match(key)) and (name := m.group(2)) in _QKV}
        if len(fused) != 1:
            raise ValueError(f"{self.weights_path}: expected the fused q|k|v weights under one name "
                             f"({' or '.join(_QKV)}), found {sorted(fused) or 'none'}")
        self.qkv_name = fused.pop()
        self._names = self._map_names()

    def _map_names(self) -> dict[str, str]:
        """Meta name -> litgpt name (the fused q|k|v's for wq, wk and wv)."""
        names = {}
        for key in self.state:
            if key in _TOP:
                names[_TOP[key]] = key
                continue
            match = _LAYER_KEY.match(key)
            layer, part = (match.group(1), match.group(2)) if match else (None, None)
            if part in _PARTS:
                names[f"layers.{layer}.{_PARTS[part]}"] = key
            elif part == self.qkv_name:
                for projection in ("wq", "wk", "wv"):
                    names[f"layers.{layer}.attention.{projection}.weight"] = key
            else:
                raise ValueError(f"{self.weights_path}: unexpected tensor {key} for a litgpt LLaMA")
        return names

    def model_args(self, tokenizer_words: int, max_seq_len: int | None = None) -> ModelArgs:
        params = dict(self._params)
        return windowed_args(ModelArgs, self.config_path, self.window, params.pop("block_size", None), max_seq_len,
                             **params)

    @property
    def tied_output(self) -> bool:
        """litgpt saves a tied head as the embedding tensor itself (Llama 3.2 1B/3B): one storage, loaded once."""
        head, embeddings = self.state.get("lm_head.weight"), self.state.get("transformer.wte.weight")
        return (isinstance(head, torch.Tensor) and isinstance(embeddings, torch.Tensor)
                and head.untyped_storage().data_ptr() == embeddings.untyped_storage().data_ptr()
                and head.shape == embeddings.shape and head.storage_offset() == embeddings.storage_offset())

    def keys(self) -> set[str]:
        return set(self._names)

    def release(self, name: str) -> None:
        """The tensor has been copied: give its file pages back (see adapter.memory)."""
        if name in self._names and not name.endswith(("wq.weight", "wk.weight")):  # the fused one is read thrice
            release_file_pages(self.state[self._names[name]])

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise ValueError(f"{self.weights_path}: missing tensor for {name}")
        value = self.state[self._names[name]]
        projection = name.rsplit(".", 2)[-2]
        if projection not in ("wq", "wk", "wv") or not name.startswith("layers."):
            return value
        p = self._params
        heads, kv_heads = p["n_heads"], p["n_kv_heads"]
        head_dim = p.get("head_size") or p["dim"] // heads
        expected = ((heads + 2 * kv_heads) * head_dim, p["dim"])
        if tuple(value.shape) != expected:
            raise ValueError(f"{self.weights_path}: {self._names[name]} has shape {tuple(value.shape)}, expected "
                             f"{expected} ({heads} query and {kv_heads} key/value heads of {head_dim})")
        q, k, v = split_qkv(value, heads, kv_heads, head_dim, interleaved=_QKV[self.qkv_name])
        return {"wq": lambda: hf_to_meta_rows(q, heads), "wk": lambda: hf_to_meta_rows(k, kv_heads),
                "wv": lambda: v.clone()}[projection]()  # not a view holding the whole fused q|k|v tensor


def _params(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """ModelArgs fields from litgpt's config, refusing what a LLaMA does not have."""
    for name, llama in _LLAMA.items():
        value = config.get(name, llama)
        if value != llama and not (name == "n_expert" and value is None):
            raise ValueError(f"{path}: {name}={value!r} is not supported (a LLaMA has {llama!r})")
    indices = config.get("sliding_window_indices")
    if indices is not None and not isinstance(indices, list):
        raise ValueError(f"{path}: sliding_window_indices must be a list (1 or 0 per layer), got {indices!r}")
    if config.get("sliding_window_size") is not None and indices is not None and set(indices) != {1}:
        raise ValueError(f"{path}: sliding_window_indices={indices} is not supported (the window on some layers "
                         "only; a LLaMA-shaped model here has it on every layer or none)")
    missing = [name for name in ("n_embd", "n_layer", "n_head", "intermediate_size") if config.get(name) is None]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}")
    dim, heads = config["n_embd"], config["n_head"]
    vocab = config.get("padded_vocab_size") or config.get("vocab_size")
    params: dict[str, Any] = {
        "dim": dim, "n_layers": config["n_layer"], "n_heads": heads,
        "n_kv_heads": config.get("n_query_groups") or heads, "vocab_size": vocab,
        "ffn_dim": config["intermediate_size"], "norm_eps": config.get("norm_eps", 1e-5),
        "rope_theta": _number(config, "rope_base", 10000, path), "block_size": config.get("block_size"),
        **explicit_head_size(config.get("head_size"), dim, heads)}
    params["rope_scaling"] = _rope_scaling(config, path)
    return params


def _number(config: dict[str, Any], name: str, default: float, path: Path) -> float:
    """A number field of litgpt's config (`default` where it is absent), refused naming the file where it is not."""
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{path}: {name} must be a number, got {value!r}")
    return float(value)


def _rope_scaling(config: dict[str, Any], path: Path) -> RopeScaling | None:
    """litgpt's `rope_adjustments` (Llama 3.1+'s frequency scaling) or `rope_condense_ratio` (positions divided:
    linear scaling)."""
    adjustments, ratio = config.get("rope_adjustments"), _number(config, "rope_condense_ratio", 1, path)
    if adjustments and ratio != 1:
        raise ValueError(f"{path}: rope_adjustments and rope_condense_ratio={ratio} together are not supported")
    if ratio != 1:
        try:
            return RopeScaling("linear", ratio)
        except ValueError as error:
            raise ValueError(f"{path}: rope_condense_ratio: {error}") from None
    if not adjustments:
        return None
    if not isinstance(adjustments, dict) or "low_freq_factor" not in adjustments:
        raise ValueError(f"{path}: rope_adjustments {adjustments!r} is not supported (only Llama 3's: factor, "
                         "low_freq_factor, high_freq_factor, original_max_seq_len)")
    try:
        return RopeScaling("llama3", float(adjustments["factor"]), low_freq_factor=adjustments["low_freq_factor"],
                           high_freq_factor=adjustments["high_freq_factor"],
                           original_max_len=adjustments["original_max_seq_len"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: rope_adjustments: {error}") from None
