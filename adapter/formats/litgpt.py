"""litgpt (and lit-llama) adapter checkpoints, `lit_model.pth.adapter`.

Keys `transformer.h.N.attn.adapter_wte.weight` [len, dim] and `transformer.h.N.attn.gating_factor`
[1, heads, 1, 1] for every layer N from `adapter_start_layer` to the last, possibly wrapped in
{"model": ...}. litgpt multiplies the prompt attention by the raw gating factor and feeds the prompt
through its fused qkv projection without RoPE, which is our formula with a raw gate.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import AdapterArgs
from .common import LoadedAdapter

_KEY = re.compile(r"^transformer\.h\.(\d+)\.attn\.(adapter_wte\.weight|gating_factor)$")


def _inner(state: object) -> dict | None:
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    return state if isinstance(state, dict) else None


def is_litgpt(state: object) -> bool:
    inner = _inner(state)
    return bool(inner) and any(_KEY.match(k) for k in inner)


def read_litgpt(path: Path, state: object) -> LoadedAdapter:
    inner = _inner(state) or {}
    prompts: dict[int, torch.Tensor] = {}
    gates: dict[int, torch.Tensor] = {}
    for key, value in inner.items():
        match = _KEY.match(key)
        if not match:
            raise ValueError(f"{path}: unexpected key {key} for a litgpt adapter")
        layer = int(match.group(1))
        (prompts if match.group(2).startswith("adapter_wte") else gates)[layer] = value
    layers = sorted(prompts)
    if sorted(gates) != layers:
        raise ValueError(f"{path}: layers with prompts {layers} and with gating factors {sorted(gates)} differ")
    first, last = layers[0], layers[-1]
    if layers != list(range(first, last + 1)):
        raise ValueError(f"{path}: adapter layers {layers} are not contiguous")
    shapes = {tuple(prompts[n].shape) for n in layers}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"{path}: adapter_wte shapes differ or are not [len, dim]: {sorted(shapes)}")
    prompt_len, dim = next(iter(shapes))
    tensors = {"adapter_query.weight": torch.cat([prompts[n].float() for n in layers])}
    tensors.update({f"layers.{n}.attention.gate": gates[n].float().reshape(1, -1, 1, 1) for n in layers})
    args = AdapterArgs(prompt_len=prompt_len, prompt_layers=len(layers), gate_activation="raw")
    return LoadedAdapter(path=path, format="litgpt", args=args, tensors=tensors,
                         base_shape={"dim": dim, "n_layers": last + 1})
