"""PEFT LoRA adapters (`peft_type: LORA`), the most common adapter on the hub, read as this project's LoRA deltas, so
that the delta-scale slider blends a LoRA in and out as the gate slider does adaption prompts (0: the base, 1: the
trained LoRA, above 1 exaggerated).

A PEFT folder holds `adapter_config.json` and `adapter_model.safetensors` (or `.bin`) with, per adapted linear,
`base_model.model.model.layers.N.{self_attn,mlp}.X.lora_A.weight` [r, in] and `lora_B.weight` [out, r]; PEFT adds
`scaling * B A x` to the frozen output, `scaling = lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`), both
per module where `rank_pattern` / `alpha_pattern` say so. Here A is the `lora_down`, `scaling * B` the `lora_up` of
the linear's delta (adapter.model.LinearDelta computes `d * up(down(x))`). Where the ranks differ they are padded
with zeros to the largest; linears and layers the LoRA leaves out (`target_modules`, `layers_to_transform`) get
zero deltas; q_proj/k_proj's B rows are turned from HF's rotate-half order into Meta's for the base's head counts,
once the base is known (`LoadedAdapter.fit`). DoRA, LoRA on the embeddings or the head, `modules_to_save` and
trained biases are refused by name. A LoRA-only adapter of ours is written back so (`write_peft_lora`,
`python -m adapter.convert --to peft`). The peft library itself is not needed.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from ..config import LORA_TARGETS, AdapterArgs
from .common import LoadedAdapter, atomic_write, write_text_atomically
from .hf import hf_to_meta_rows, meta_to_hf_rows
from .meta import read_json
from .peft import CONFIG_NAME, LORA_TYPE, SAFETENSORS_NAME, read_weights, weights_path

if TYPE_CHECKING:
    from ..model import Transformer

# HF module -> (our parent module, our linear)
MODULES = {"self_attn.q_proj": ("attention", "wq"), "self_attn.k_proj": ("attention", "wk"),
           "self_attn.v_proj": ("attention", "wv"), "self_attn.o_proj": ("attention", "wo"),
           "mlp.gate_proj": ("feed_forward", "w1"), "mlp.up_proj": ("feed_forward", "w3"),
           "mlp.down_proj": ("feed_forward", "w2")}
READS_HIDDEN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
MAX_PATTERN, MAX_REPEATS = 200, 2  # a module pattern read from a file: what matches a module name at once
_KEY = re.compile(r"(?:base_model\.model\.)?(model\.layers\.(\d+)\.(self_attn\.\w+|mlp\.\w+))\.lora_([AB])\.weight")
# settings of LoRA variants that compute something else, and the only value read
_PLAIN = {"use_dora": False, "bias": "none", "modules_to_save": None, "layer_replication": None}


def read_lora(folder: Path) -> LoadedAdapter:
    """A PEFT LoRA folder as LoRA deltas under the model's names (rows of wq/wk turned when fitted to a base)."""
    config_path = folder / CONFIG_NAME
    config = read_json(config_path)
    _check_config(config, config_path)
    weights = weights_path(folder)
    pairs = _pairs(weights, read_weights(weights))
    rank = max(a.shape[0] for a, _ in pairs.values())
    tensors: dict[str, torch.Tensor] = {}
    for (module_name, layer, module), (down, up) in sorted(pairs.items()):
        parent, linear = MODULES[module]
        r = down.shape[0]
        declared = _pattern_value(config, "rank_pattern", module_name, config["r"])
        if r != declared:  # PEFT builds each LoRA at the config's rank, then refuses tensors of another
            raise ValueError(f"{weights}: {module_name}: LoRA of rank {r}, but {config_path.name} gives it rank "
                             f"{declared} (r or rank_pattern)")
        alpha = _pattern_value(config, "alpha_pattern", module_name, config["lora_alpha"])
        scaling = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        prefix = f"layers.{layer}.{parent}.{linear}_delta"
        tensors[f"{prefix}.lora_down.weight"] = torch.cat([down.float(), torch.zeros(rank - r, down.shape[1])])
        tensors[f"{prefix}.lora_up.weight"] = torch.cat([up.float() * scaling, torch.zeros(up.shape[0], rank - r)],
                                                        dim=1)
    targets = tuple(t for t in LORA_TARGETS if any(MODULES[m][1] == t for _, _, m in pairs))
    dims = {a.shape[1] for (_, _, module), (a, _) in pairs.items() if module in READS_HIDDEN}
    args = AdapterArgs(prompt_len=0, prompt_layers=0, lora_rank=rank, lora_targets=targets)
    return LoadedAdapter(path=weights, format="peft-lora", args=args, tensors=tensors,
                         base_shape={"dim": dims.pop()} if len(dims) == 1 else {}, fit=_fit)


def _check_config(config: dict[str, Any], path: Path) -> None:
    for name, plain in _PLAIN.items():
        value = config.get(name, plain)
        if value not in (plain, [], {}) and not (name == "bias" and value is None):
            raise ValueError(f"{path}: {name}={value!r} is not supported (only {plain!r}: plain LoRA on the "
                             "attention and MLP linears)")
    for name in ("lora_alpha", "r"):
        value = config.get(name)
        if not _positive(value):
            raise ValueError(f"{path}: {name} must be a positive number, got {value!r}")
    if not isinstance(config.get("use_rslora", False), bool):  # "no" would read as true
        raise ValueError(f"{path}: use_rslora must be true or false, got {config['use_rslora']!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(name) or {}, dict):
            raise ValueError(f"{path}: {name} must be an object of module pattern -> value, got {config[name]!r}")
        for key, value in (config.get(name) or {}).items():
            if not _positive(value):
                raise ValueError(f"{path}: {name}[{key!r}] must be a positive number, got {value!r}")
            try:
                re.compile(key)
            except re.error as error:
                raise ValueError(f"{path}: {name}: {key!r} is not a module pattern ({error})") from None
            if not _tame(key):  # an upload's regex must not hang the server
                raise ValueError(f"{path}: {name}: {key!r:.80} is not read: a pattern of at most {MAX_PATTERN} "
                                 f"characters with at most {MAX_REPEATS} repeats (*, +, ?, {{}}) and none of a group, "
                                 "e.g. 'q_proj' or 'layers\\.0\\..*'")


def _tame(pattern: str) -> bool:
    """Whether a module pattern matches without runaway backtracking: "(a|aa)*!" or ".*" eight times over a
    module's name take hours (Python's regexes backtrack), a repeat or two a moment."""
    bare = re.sub(r"\\.", "", pattern)  # escaped characters repeat nothing
    return (len(pattern) <= MAX_PATTERN and sum(bare.count(mark) for mark in "*+?{") <= MAX_REPEATS
            and re.search(r"\)[*+?{]", bare) is None)


def _pairs(path: Path, state: dict) -> dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor]]:
    """{(module name, layer, HF module): (A, B)}, each A [r, in] with its B [out, r]."""
    found: dict[tuple[str, int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _KEY.fullmatch(key) if isinstance(key, str) else None
        if match is None or match[3] not in MODULES or not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: unexpected entry {key!r}; only LoRA on the attention and MLP linears "
                             f"({', '.join(m.split('.')[1] for m in MODULES)}) is read")
        if not value.is_floating_point() or value.dim() != 2:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)} {value.dtype}, expected a 2-D float "
                             "tensor")
        parts = found.setdefault((match[1], int(match[2]), match[3]), {})
        if match[4] in parts:
            raise ValueError(f"{path}: {match[1]}.lora_{match[4]}.weight is stored twice (with and without the "
                             "base_model.model. prefix)")
        parts[match[4]] = value
    if not found:
        raise ValueError(f"{path}: no lora_A / lora_B tensors")
    pairs = {}
    for (module_name, layer, module), parts in found.items():
        if set(parts) != {"A", "B"}:
            lacking = ({"A", "B"} - set(parts)).pop()
            raise ValueError(f"{path}: {module_name}.lora_{lacking}.weight is missing")
        a, b = parts["A"], parts["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] == 0:
            raise ValueError(f"{path}: {module_name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not "
                             "matrices of rank 1 or more")
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"{path}: {module_name}: lora_B {tuple(b.shape)} does not follow lora_A "
                             f"{tuple(a.shape)} (their rank differs)")
        pairs[(module_name, layer, module)] = (a, b)
    return pairs


def _positive(value: Any) -> bool:
    """A finite number above 0 (NaN and infinity made every logit NaN)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < math.inf


def _pattern_value(config: dict[str, Any], patterns: str, module_name: str, default: float) -> float:
    """A module's value in `rank_pattern` / `alpha_pattern` as PEFT reads it (the first key that is a whole dotted
    suffix of the module's name, as a regex), else `default` (r, lora_alpha): PEFT's scaling is lora_alpha / r,
    or / sqrt(r) with rsLoRA."""
    for key, value in (config.get(patterns) or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _fit(tensors: dict[str, torch.Tensor], model: "Transformer") -> dict[str, torch.Tensor]:
    """The deltas for this base: wq/wk's up-projection rows in Meta's order, zeros for every layer and linear the
    LoRA left out."""
    heads = {"attention.wq": model.args.n_heads, "attention.wk": model.args.kv_heads}
    fitted = {}
    for name, value in tensors.items():
        layer, module = name.split(".")[1], name.split(".", 2)[2].split("_delta")[0]
        if int(layer) >= model.args.n_layers:
            raise ValueError(f"LoRA for layer {layer}, but the base has {model.args.n_layers} layers")
        if name.endswith("lora_up.weight") and module in heads:
            expected = model.get_parameter(name).shape[0]
            if value.shape[0] != expected:
                raise ValueError(f"{name} has {value.shape[0]} rows, the base's {module} {expected}")
            value = hf_to_meta_rows(value, heads[module])
        fitted[name] = value
    for name, parameter in model.named_parameters():
        if model.is_adapter_parameter(name) and name not in fitted:
            fitted[name] = torch.zeros(parameter.shape)
    return fitted


def write_peft_lora(model: "Transformer", folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Export a LoRA-only adapter (no prompts, biases, scales or norms) as a PEFT LoRA folder, for transformers +
    peft users: A and B as they are (wq/wk's B rows in HF's order), `lora_alpha = r` so that PEFT's scaling is 1.
    Weights first, config last, each atomically; nothing is written when the adapter is not plain LoRA."""
    a = model.adapter_args
    other = [part for part in a.beyond_v1 if not part.startswith("LoRA")] + (["prompts"] if a.has_prompts else [])
    if a.lora_rank == 0 or other:
        raise ValueError(f"write_peft_lora: PEFT LoRA holds LoRA alone; this adapter has "
                         f"{', '.join(other) if other else 'no LoRA'}")
    heads = {"wq": model.args.n_heads, "wk": model.args.kv_heads}
    adapted = {hf: place for hf, place in MODULES.items() if place[1] in a.lora_targets}
    tensors = {}
    for n, layer in enumerate(model.layers):
        for hf, (parent, linear) in adapted.items():
            delta = layer.get_submodule(f"{parent}.{linear}_delta")
            up = delta.lora_up.weight.detach().float().cpu()
            key = f"base_model.model.model.layers.{n}.{hf}"
            tensors[f"{key}.lora_A.weight"] = delta.lora_down.weight.detach().float().cpu().contiguous()
            up = meta_to_hf_rows(up, heads[linear]) if linear in heads else up
            tensors[f"{key}.lora_B.weight"] = up.contiguous()
    config = {"peft_type": LORA_TYPE, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              "r": a.lora_rank, "lora_alpha": a.lora_rank, "lora_dropout": 0.0, "bias": "none",
              "target_modules": [hf.split(".")[1] for hf in adapted], "fan_in_fan_out": False, "use_rslora": False,
              "use_dora": False, "modules_to_save": None, "inference_mode": True}
    folder = Path(folder)
    atomic_write(folder / SAFETENSORS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_text_atomically(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return folder
