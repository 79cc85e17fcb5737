"""PEFT `adaption_prompt` adapters (LLaMA-Adapter v1 as huggingface/peft implements it), read and written.

A PEFT folder holds `adapter_config.json` and `adapter_model.safetensors` (or `.bin`), with one prompt
`[1, adapter_len, dim]` and one raw (identity) gate `[1]` per adapted layer, the top `adapter_layers` layers:

    base_model.model.model.layers.N.self_attn.adaption_prompt
    base_model.model.model.layers.N.self_attn.adaption_gate

PEFT adds `gate * softmax(q pk) pv` through o_proj to the attention output, which is our v1 math with a raw
gate shared by all heads of a layer. The peft library itself is not needed to read or write these files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import AdapterArgs
from .common import LoadedAdapter, atomic_write, named_tensors, torch_load, write_text_atomically
from .meta import read_json

if TYPE_CHECKING:
    from ..model import Transformer

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_TYPE = "ADAPTION_PROMPT"
LORA_TYPE = "LORA"
TARGET_MODULES = "self_attn"
KEY_PREFIX = "base_model.model.model.layers"
# older PEFT versions saved the keys without the `base_model.model.` wrapper prefix
_KEY = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.self_attn\.(adaption_prompt|adaption_gate)")


def peft_folder(path: Path) -> Path:
    """The folder itself, or the folder of a PEFT weights file that was given directly."""
    return path.parent if path.name in (SAFETENSORS_NAME, BIN_NAME) else path


def is_peft(path: Path) -> bool:
    """Any folder with `adapter_config.json`, so that a PEFT type we cannot read gets PEFT's own error."""
    return (peft_folder(path) / CONFIG_NAME).is_file()


def read_peft(path: Path) -> LoadedAdapter:
    """A PEFT adaption-prompt folder, as raw-gate v1 tensors under the model's names (a LoRA one: peft_lora)."""
    folder = peft_folder(path)
    if read_json(folder / CONFIG_NAME).get("peft_type") == LORA_TYPE:
        from .peft_lora import read_lora

        return read_lora(folder)
    adapter_len, adapter_layers = _read_config(folder / CONFIG_NAME)
    weights = weights_path(folder)
    prompts, gates = _split_keys(weights, read_weights(weights))
    layers = sorted(prompts)
    _check_layers(weights, layers, adapter_layers)
    dim = _check_prompts(weights, prompts, adapter_len)
    tensors = {"adapter_query.weight": torch.cat([prompts[n][0] for n in layers])}
    for n in layers:
        tensors[f"layers.{n}.attention.gate"] = gates[n].reshape(1, 1, 1, 1)  # one value; apply_to expands it
    args = AdapterArgs(prompt_len=adapter_len, prompt_layers=adapter_layers, gate_activation="raw")
    return LoadedAdapter(path=weights, format="peft", args=args, tensors=tensors,
                         base_shape={"dim": dim, "n_layers": layers[-1] + 1})


def _read_config(path: Path) -> tuple[int, int]:
    config = read_json(path)
    peft_type = config.get("peft_type")
    if peft_type != PEFT_TYPE:
        raise ValueError(f"{path}: peft_type {peft_type!r} is not supported; only {PEFT_TYPE} (LLaMA-Adapter) "
                         f"and {LORA_TYPE} PEFT adapters can be loaded")
    if config.get("target_modules") != TARGET_MODULES:
        raise ValueError(f"{path}: target_modules {config.get('target_modules')!r} is not supported; "
                         f"expected {TARGET_MODULES!r} (LLaMA attention)")
    values = []
    for name in ("adapter_len", "adapter_layers"):
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{path}: {name} must be a positive integer, got {value!r}")
        values.append(value)
    return values[0], values[1]


def weights_path(folder: Path) -> Path:
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"adapter: {folder / SAFETENSORS_NAME} does not exist (nor {BIN_NAME}) beside "
                            f"{CONFIG_NAME}")


def read_weights(path: Path) -> dict:
    if path.name == BIN_NAME:
        state = torch_load(path)
    else:
        try:
            state = load_file(path)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
    return named_tensors(state, path, floating=True)


def _split_keys(path: Path, state: dict) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """{layer: prompt} and {layer: gate}, each layer with both."""
    found: dict[str, dict[int, torch.Tensor]] = {"adaption_prompt": {}, "adaption_gate": {}}
    for key, value in state.items():
        match = _KEY.fullmatch(key) if isinstance(key, str) else None
        if match is None or not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: unexpected entry {key!r}; expected {KEY_PREFIX}.N.self_attn.adaption_prompt "
                             "/ adaption_gate tensors")
        if not value.is_floating_point():
            raise ValueError(f"{path}: {key} has dtype {value.dtype}, expected a floating point tensor")
        found[match[2]][int(match[1])] = value
    prompts, gates = found["adaption_prompt"], found["adaption_gate"]
    for have, name, other in ((prompts, "adaption_prompt", gates), (gates, "adaption_gate", prompts)):
        lacking = sorted(set(other) - set(have))
        if lacking:
            raise ValueError(f"{path}: missing {KEY_PREFIX}.{lacking[0]}.self_attn.{name}")
    if not prompts:
        raise ValueError(f"{path}: no adaption_prompt tensors")
    for n, gate in gates.items():
        if gate.numel() != 1:
            raise ValueError(f"{path}: {KEY_PREFIX}.{n}.self_attn.adaption_gate has shape {tuple(gate.shape)}, "
                             "expected (1,)")
    return prompts, gates


def _check_layers(path: Path, layers: list[int], adapter_layers: int) -> None:
    """PEFT adapts the top `adapter_layers` layers: the indices must be that many, contiguous."""
    if len(layers) != adapter_layers:
        raise ValueError(f"{path}: prompts for {len(layers)} layers {layers}, but {CONFIG_NAME} has "
                         f"adapter_layers={adapter_layers}")
    if layers != list(range(layers[-1] - adapter_layers + 1, layers[-1] + 1)):
        raise ValueError(f"{path}: prompts for layers {layers} are not {adapter_layers} contiguous top layers "
                         f"(adapter_layers={adapter_layers})")


def _check_prompts(path: Path, prompts: dict[int, torch.Tensor], adapter_len: int) -> int:
    """All prompts [1, adapter_len, dim] with one dim, which is returned."""
    dim = None
    for n in sorted(prompts):
        shape = tuple(prompts[n].shape)
        key = f"{KEY_PREFIX}.{n}.self_attn.adaption_prompt"
        if len(shape) != 3 or shape[0] != 1:
            raise ValueError(f"{path}: {key} has shape {shape}, expected (1, adapter_len, dim)")
        if shape[1] != adapter_len:
            raise ValueError(f"{path}: {key} has {shape[1]} prompt tokens but {CONFIG_NAME} has "
                             f"adapter_len={adapter_len}")
        if dim is not None and shape[2] != dim:
            raise ValueError(f"{path}: {key} has dim {shape[2]}, the other prompts {dim}")
        dim = shape[2]
    return dim


def write_peft(model: "Transformer", folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Export a raw-gate v1 adapter as a PEFT adaption_prompt folder (for transformers + peft users); a LoRA-only
    one as a PEFT LoRA folder (adapter.formats.peft_lora).

    Weights first, config last, each atomically, so the folder only looks like PEFT once it is complete;
    nothing is written when the adapter is not representable.
    """
    a = model.adapter_args
    if not a.has_prompts and a.lora_rank > 0:  # a LoRA-only adapter is a PEFT LoRA
        from .peft_lora import write_peft_lora

        return write_peft_lora(model, folder, base_model_name_or_path)
    folder = Path(folder)
    _check_representable(model)
    n_layers = model.args.n_layers
    prompts = model.adapter_query.weight.detach().float().cpu().view(a.prompt_layers, a.prompt_len, model.args.dim)
    tensors = {}
    for i, n in enumerate(range(model.first_prompt_layer, n_layers)):
        gate = model.layers[n].attention.gate.detach().float().cpu()
        tensors[f"{KEY_PREFIX}.{n}.self_attn.adaption_prompt"] = prompts[i].unsqueeze(0).clone()
        tensors[f"{KEY_PREFIX}.{n}.self_attn.adaption_gate"] = gate.flatten()[:1].clone()
    config = {"adapter_layers": a.prompt_layers, "adapter_len": a.prompt_len, "auto_mapping": None,
              "base_model_name_or_path": base_model_name_or_path, "inference_mode": True, "peft_type": PEFT_TYPE,
              "revision": None, "target_modules": TARGET_MODULES, "task_type": "CAUSAL_LM"}
    atomic_write(folder / SAFETENSORS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_text_atomically(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return folder


def _check_representable(model: "Transformer") -> None:
    """PEFT has prompts and one raw gate per layer, nothing else: what else an adapter has is named."""
    if (reason := _unrepresentable(model)) is not None:
        raise ValueError(f"PEFT's adaption_prompt format cannot hold this adapter: {reason}; our own format "
                         "(native) holds every adapter")


def _unrepresentable(model: "Transformer") -> str | None:
    a = model.adapter_args
    if not a.has_prompts:
        return "it has no adaption prompts (prompt_layers=0)"
    if a.gate_activation != "raw":
        return f"its gate_activation is {a.gate_activation}; PEFT uses raw gates"
    if model.args.head_size is not None:
        return (f"the base's heads are {model.args.head_size} wide, not dim / n_heads; PEFT's adaption_prompt "
                "reshapes the prompt's keys into dim / n_heads wide heads and fails on it")
    if extra := a.beyond_v1:
        return f"PEFT adaption_prompt (v1 only) has no place for {', '.join(extra)}"
    for n in range(model.first_prompt_layer, model.args.n_layers):
        gate = model.layers[n].attention.gate.detach().flatten()
        if not torch.all(gate == gate[0]):
            return f"layer {n} has a different gate value per head; PEFT has one gate per layer shared by all heads"
    return None
