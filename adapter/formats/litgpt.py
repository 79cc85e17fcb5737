"""litgpt adapter checkpoints: `lit_model.pth.adapter` (adapter) and `lit_model.pth.adapter_v2` (adapter v2).

Adapter: `transformer.h.N.attn.adapter_wte.weight` [len, dim] and `transformer.h.N.attn.gating_factor` (one raw
gate per head) for every layer N from `adapter_start_layer` to the last, possibly wrapped in {"model": ...}.
Adapter v2 adds, on every layer, an `adapter_bias` and a ones-init `adapter_scale` of the outputs
(`s * (Wx + b)`) of the fused q|k|v linear (`attn.qkv`; `attn.attn` up to litgpt 0.5.4), `attn.proj` (wo) and
`mlp.fc_1` / `mlp.fc_2` / `mlp.proj` (w1, w3, w2), and of the head (`lm_head`), and tunes the norms (`norm_1`,
`norm_2`, `transformer.ln_f`: whole weights).

litgpt feeds the prompt through the fused q|k|v linear (v2: with its bias and scale), without RoPE. Up to 0.5.4
that linear's rows were interleaved per query group ([its queries, key, value] per group) and the prompt's keys
and values are the formula's ("tuned"); from 0.5.5 on the rows are all queries, all keys, all values, and the
prompt is still read as if interleaved ("litgpt-qkv", `Attention._litgpt_prompt_kv`). A v2 file says which by its
qkv key. A v1 file does not: the `model_config.yaml` litgpt writes beside it has `norm_qk` from 0.5.5 on; with no
such file the current layout is assumed.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import LORA_TARGETS, AdapterArgs
from .common import LoadedAdapter, named_tensors
from .hf import hf_to_meta_rows

_LAYER_KEY = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_PROMPT, _GATE = "attn.adapter_wte.weight", "attn.gating_factor"
_QKV_LINEARS = ("attn.qkv", "attn.attn")  # the fused q|k|v linear's name from litgpt 0.5.5 on, and up to 0.5.4
_LINEARS = {"attn.proj": "attention.wo", "mlp.fc_1": "feed_forward.w1", "mlp.fc_2": "feed_forward.w3",
            "mlp.proj": "feed_forward.w2"}
_NORMS = {"norm_1.weight": "attention_norm.weight", "norm_2.weight": "ffn_norm.weight"}
_PARTS = ("adapter_bias", "adapter_scale")
FILE_NAMES = ("lit_model.pth.adapter_v2", "lit_model.pth.adapter")  # what litgpt's finetune commands save
CONFIG_FILE = "model_config.yaml"  # litgpt's model config, written beside every checkpoint it saves


def _inner(state: object) -> dict | None:
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    return state if isinstance(state, dict) else None


def is_litgpt(state: object) -> bool:
    inner = _inner(state)
    return bool(inner) and any(isinstance(k, str) and (m := _LAYER_KEY.match(k)) and m.group(2) == _PROMPT
                               for k in inner)


def read_litgpt(path: Path, state: object) -> LoadedAdapter:
    inner = named_tensors(_inner(state) or {}, path, floating=True)
    layers: dict[int, dict[str, torch.Tensor]] = {}
    top: dict[str, torch.Tensor] = {}
    for key, value in inner.items():
        match = _LAYER_KEY.match(key)
        if match:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = value
        elif key in ("transformer.ln_f.weight", "lm_head.adapter_bias", "lm_head.adapter_scale"):
            top[key] = value
        else:
            raise ValueError(f"{path}: unexpected key {key} for a litgpt adapter")
    prompts, gates = _prompts_and_gates(path, layers)
    first, last = min(prompts), max(prompts)
    prompt_len, dim = prompts[first].shape
    n_layers = max(max(layers), last) + 1
    tensors = {"adapter_query.weight": torch.cat([prompts[n].float() for n in range(first, last + 1)])}
    tensors.update({f"layers.{n}.attention.gate": gates[n].float().reshape(1, -1, 1, 1) for n in gates})
    shape = {"dim": dim, "n_layers": n_layers}
    n_heads = gates[first].numel()
    if n_heads > 1:
        shape["n_heads"] = n_heads
    config = sibling_config(path)
    v2 = _read_v2(path, layers, top, n_layers, n_heads, config.get("head_size") or dim // max(n_heads, 1))
    if v2 is None:
        # a v1 file does not say which litgpt wrote it; its model_config.yaml does (norm_qk: new in 0.5.5)
        projection = "litgpt-qkv" if not config or "norm_qk" in config else "frozen"  # no deltas: "tuned" = "frozen"
        args = AdapterArgs(prompt_len=prompt_len, prompt_layers=last - first + 1, gate_activation="raw",
                           prompt_projection=projection)
        return LoadedAdapter(path=path, format="litgpt", args=args, tensors=tensors, base_shape=shape)
    deltas, norms, kv_heads, projection = v2
    tensors.update(deltas)
    shape["kv_heads"] = kv_heads
    args = AdapterArgs(prompt_len=prompt_len, prompt_layers=last - first + 1, gate_activation="raw", bias=True,
                       bias_targets=LORA_TARGETS, scale=True, scale_at="output",
                       head_delta="output_delta.bias" in deltas, norm=bool(norms), prompt_projection=projection)
    return LoadedAdapter(path=path, format="litgpt-v2", args=args, tensors=tensors, base_shape=shape,
                         norm_weights=norms)


def _prompts_and_gates(path: Path, layers: dict[int, dict[str, torch.Tensor]]
                       ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    prompts = {n: parts[_PROMPT] for n, parts in layers.items() if _PROMPT in parts}
    gates = {n: parts[_GATE] for n, parts in layers.items() if _GATE in parts}
    if sorted(gates) != sorted(prompts):
        raise ValueError(f"{path}: layers with prompts {sorted(prompts)} and with gating factors {sorted(gates)} "
                         "differ")
    numbers = sorted(prompts)
    if numbers != list(range(numbers[0], numbers[-1] + 1)):
        raise ValueError(f"{path}: adapter layers {numbers} are not contiguous")
    shapes = {tuple(p.shape) for p in prompts.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"{path}: adapter_wte shapes differ or are not [len, dim]: {sorted(shapes)}")
    if len({g.numel() for g in gates.values()}) != 1:
        raise ValueError(f"{path}: gating factors of different sizes: {sorted({g.numel() for g in gates.values()})}")
    return prompts, gates


def _read_v2(path: Path, layers: dict[int, dict[str, torch.Tensor]], top: dict[str, torch.Tensor], n_layers: int,
             n_heads: int, head_dim: int) -> tuple[dict, dict, int, str] | None:
    """The v2 parts under the model's names ([bias and scale tensors], [tuned norm weights], the kv heads the qkv
    vectors imply, the prompt projection), or None for a v1 file."""
    qkv_names = {name.rsplit(".", 1)[0] for parts in layers.values() for name in parts
                 if name.rsplit(".", 1)[0] in _QKV_LINEARS}
    if not qkv_names and not top and not any(set(parts) - {_PROMPT, _GATE} for parts in layers.values()):
        return None
    if len(qkv_names) != 1:
        raise ValueError(f"{path}: a litgpt adapter v2 needs the fused q|k|v linear's adapter_bias and "
                         f"adapter_scale under one name (attn.qkv or attn.attn), found {sorted(qkv_names) or 'none'}")
    qkv = qkv_names.pop()
    if n_heads < 2:
        raise ValueError(f"{path}: the gating factors have one value, so the heads of the q|k|v vectors are unknown")
    deltas: dict[str, torch.Tensor] = {}
    norms: dict[str, torch.Tensor] = {}
    kv_heads = None
    for n in range(n_layers):
        parts = {name: value for name, value in layers.get(n, {}).items() if name not in (_PROMPT, _GATE)}
        for part in _PARTS:
            vector = _take(path, parts, n, f"{qkv}.{part}").float()
            heads = _kv_heads(path, vector, n, f"{qkv}.{part}", n_heads, head_dim)
            if kv_heads not in (None, heads):
                raise ValueError(f"{path}: layer {n}'s {qkv}.{part} implies {heads} key/value heads, other layers "
                                 f"{kv_heads}")
            kv_heads = heads
            q, k, v = split_qkv(vector, n_heads, kv_heads, head_dim, interleaved=qkv == "attn.attn")
            leaf = part.removeprefix("adapter_")
            deltas[f"layers.{n}.attention.wq_delta.{leaf}"] = hf_to_meta_rows(q, n_heads)
            deltas[f"layers.{n}.attention.wk_delta.{leaf}"] = hf_to_meta_rows(k, kv_heads)
            deltas[f"layers.{n}.attention.wv_delta.{leaf}"] = v
            for linear, ours in _LINEARS.items():
                deltas[f"layers.{n}.{ours}_delta.{leaf}"] = _take(path, parts, n, f"{linear}.{part}").float()
        for norm, ours in _NORMS.items():
            if norm in parts:
                norms[f"layers.{n}.{ours}"] = parts.pop(norm)
        if parts:
            raise ValueError(f"{path}: unexpected key transformer.h.{n}.{sorted(parts)[0]} for a litgpt adapter v2")
    if "transformer.ln_f.weight" in top:
        norms["norm.weight"] = top["transformer.ln_f.weight"]
    if norms and len(norms) != 2 * n_layers + 1:
        raise ValueError(f"{path}: tuned norms for only some layers ({len(norms)} of norm_1, norm_2 on {n_layers} "
                         "layers and ln_f)")
    head = [top.get(f"lm_head.{part}") for part in _PARTS]
    if any(t is not None for t in head):
        if any(t is None for t in head):
            raise ValueError(f"{path}: lm_head has only one of adapter_bias and adapter_scale")
        deltas["output_delta.bias"], deltas["output_delta.scale"] = (t.float() for t in head)
    return deltas, norms, kv_heads, "litgpt-qkv" if qkv == "attn.qkv" else "tuned"


def _take(path: Path, parts: dict[str, torch.Tensor], layer: int, name: str) -> torch.Tensor:
    if name not in parts:
        raise ValueError(f"{path}: transformer.h.{layer}.{name} is missing (a litgpt adapter v2 has it on every "
                         "layer)")
    return parts.pop(name)


def _kv_heads(path: Path, vector: torch.Tensor, layer: int, name: str, n_heads: int, head_dim: int) -> int:
    """The key/value heads of a q|k|v vector of (heads + 2 kv_heads) * head_dim values."""
    rows, extra = divmod(vector.numel(), head_dim)
    kv_heads, odd = divmod(rows - n_heads, 2)
    if vector.dim() != 1 or extra or odd or kv_heads < 1 or n_heads % kv_heads:
        raise ValueError(f"{path}: transformer.h.{layer}.{name} has shape {tuple(vector.shape)}, which is no q|k|v "
                         f"vector of {n_heads} heads of {head_dim} (and 1 to {n_heads} key/value heads)")
    return kv_heads


def split_qkv(fused: torch.Tensor, n_heads: int, kv_heads: int, head_dim: int, interleaved: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q, k and v rows of a fused q|k|v weight or vector (rows first, HF's order within q/k heads): all
    queries, keys, values (0.5.5+), or per query group its queries, key and value (up to 0.5.4)."""
    if not interleaved:
        return fused.split((n_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim))
    per_group, rest = n_heads // kv_heads, fused.shape[1:]
    groups = fused.reshape(kv_heads, per_group + 2, head_dim, *rest)
    return (groups[:, :per_group].reshape(n_heads * head_dim, *rest), groups[:, per_group].reshape(-1, *rest),
            groups[:, per_group + 1].reshape(-1, *rest))


def sibling_config(path: Path) -> dict:
    """The model_config.yaml litgpt writes beside its checkpoints ({} when there is none)."""
    import yaml

    config = path.parent / CONFIG_FILE
    if not config.is_file():
        return {}
    try:
        values = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{config}: cannot read YAML ({error})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{config}: expected a mapping of litgpt config fields")
    return values
