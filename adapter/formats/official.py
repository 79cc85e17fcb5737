"""The official LLaMA-Adapter releases (OpenGVLab/LLaMA-Adapter).

v1 (`llama_adapter_len10_layer30_release.pth`): a flat dict with `adapter_query.weight` [layers*len, dim]
and `layers.N.attention.gate` for every layer N (shape [1, heads, 1, 1]; older files [1]). The release is
run with the raw gate (the training code used tanh; the inference code multiplies by the gate itself).

v2 (`<sha256>_BIAS-7B.pth`, `LORA-BIAS-7B`, `CAPTION-7B`, `LORA-BIAS-7B-v21`): `{'model': ..., 'config':
{'w_bias', 'w_lora', 'lora_rank'}}` with `llama.`-prefixed language keys (gates, wq/wo/w1/w2/w3 biases,
tuned norms, `lora_w*_l1/_l2`, `new_gate`) for all 32 layers, `adapter_query.weight` [310, 4096] for the
top 31 layers, and the visual prompt's keys (`clip_proj`, `visual_query`, `visual_blocks.N`, `visual_proj`).
Gates go through tanh; images are expected in BGR order, as the official demo read them with OpenCV.
Only the prompt layers' gates are used by the official model; the others are dropped.

v2 dialog (`llama_adapter_v2_chat65b`, LLaMA-65B "bias, scale, norm" tuning on ShareGPT): `{'model': ...}`
without prompts: `layers.N.attention.w{q,k,v,o}_{bias,scale}`, `layers.N.feed_forward.w{1,2,3}_{bias,scale}`
and the tuned norms. Its linears compute `W(x * scale) + bias` (the scale reads the input: [in_features]).
It is asked in the official demo's conversation (adapter.prompts' "v2-dialog").
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import BIAS_TARGETS, LORA_TARGETS, AdapterArgs
from .common import LoadedAdapter, atomic_write, named_tensors, torch_load

if TYPE_CHECKING:
    from ..model import Transformer

DEFAULT_PROMPT_LEN = 10  # the official query_len; the v1 file name says it too ("len10")
OFFICIAL_VISUAL_HEADS = 16
OFFICIAL_CLIP_MODEL = "ViT-L-14-quickgelu"  # OpenAI's ViT-L/14, as the official code loads it
VISUAL_PREFIXES = ("clip_proj", "clip_proj_norm", "visual_query", "visual_blocks", "visual_proj", "visual_proj_norm")
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_DIALOG_KEY = re.compile(r"^layers\.(\d+)\.(attention|feed_forward)\.(w\w)_(bias|scale)$")
_NORM_KEY = re.compile(r"^(layers\.\d+\.(attention_norm|ffn_norm)\.weight|norm\.weight)$")
_LINEAR_PARENT = {name: ("attention" if name.startswith("w") and name[1] in "qkvo" else "feed_forward")
                  for name in LORA_TARGETS}


def is_official(path: Path, state: object) -> bool:
    """A torch file holding the v1 flat dict, the v2 {'model', 'config'} wrapper, or the v2 dialog's."""
    if not isinstance(state, dict):
        return False
    inner = state.get("model", state)
    return isinstance(inner, dict) and ("adapter_query.weight" in inner or _is_dialog(inner))


def _is_dialog(model: dict) -> bool:
    return any(isinstance(key, str) and _DIALOG_KEY.match(key) for key in model)


def read_official(path: Path, state: dict | None = None) -> LoadedAdapter:
    state = torch_load(path) if state is None else state
    if not is_official(path, state):
        raise ValueError(f"{path}: not an official LLaMA-Adapter file (no adapter_query.weight)")
    if "model" in state:
        model, config = named_tensors(state["model"], path, floating=True), state.get("config") or {}
        if not isinstance(config, dict):
            raise ValueError(f"{path}: config: expected a dict of settings, got {type(config).__name__}")
        return _read_v2(path, model, config) if "adapter_query.weight" in model else _read_dialog(path, model)
    return _read_v1(path, named_tensors(state, path, floating=True))


def _layers_of(keys, source: Path) -> dict[int, dict[str, str]]:
    """{layer: {rest of key: full key}} for `layers.N.rest` keys."""
    layers: dict[int, dict[str, str]] = {}
    for key in keys:
        match = _LAYER_KEY.match(key)
        if match:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = key
    if not layers:
        raise ValueError(f"{source}: no layers.N.attention.gate keys")
    return layers


def _prompt_shape(path: Path, query: torch.Tensor, prompt_len: int, n_layers: int) -> tuple[int, int]:
    if prompt_len < 1:
        raise ValueError(f"{path}: its name says a prompt length of {prompt_len} (len{prompt_len}); an adapter has "
                         "at least one prompt token")
    if query.dim() != 2:
        raise ValueError(f"{path}: adapter_query.weight has shape {tuple(query.shape)}, expected [layers*len, dim]")
    if query.shape[0] == 0:
        raise ValueError(f"{path}: adapter_query.weight has no rows: an adapter has at least one prompt")
    if query.shape[0] % prompt_len:
        raise ValueError(f"{path}: adapter_query.weight has {query.shape[0]} rows, not a multiple of the prompt "
                         f"length {prompt_len}")
    prompt_layers = query.shape[0] // prompt_len
    if prompt_layers > n_layers:
        raise ValueError(f"{path}: {prompt_layers} prompt layers but gates for only {n_layers} layers")
    return prompt_len, prompt_layers


def _gates(path: Path, layers: dict[int, dict[str, str]], state: dict, first: int, n_layers: int,
           prefix: str = "") -> dict[str, torch.Tensor]:
    """The gates of the prompt layers, kept in the file's shape ([1] is expanded on loading)."""
    out = {}
    for layer in range(first, n_layers):
        key = layers.get(layer, {}).get("attention.gate")
        if key is None:
            raise ValueError(f"{path}: missing {prefix}layers.{layer}.attention.gate")
        gate = state[prefix + key] if prefix + key in state else state[key]
        out[f"layers.{layer}.attention.gate"] = gate.float().reshape(1, -1, 1, 1)
    return out


def named_prompt_len(path: Path) -> int:
    """The prompt length a v1 release file's name gives (`..._len10_...`; the official 10 where it gives none):
    the format stores it nowhere else."""
    match = re.search(r"len(\d+)", path.name)
    return int(match.group(1)) if match else DEFAULT_PROMPT_LEN


def _read_v1(path: Path, state: dict) -> LoadedAdapter:
    unknown = sorted(k for k in state if k != "adapter_query.weight" and not
                     (_LAYER_KEY.match(k) and k.endswith(".attention.gate")))
    if unknown:
        raise ValueError(f"{path}: unexpected key(s) for an official v1 adapter: {unknown[:5]}")
    layers = _layers_of(state, path)
    n_layers = max(layers) + 1
    query = state["adapter_query.weight"]
    prompt_len, prompt_layers = _prompt_shape(path, query, named_prompt_len(path), n_layers)
    tensors = {"adapter_query.weight": query.float()}
    tensors.update(_gates(path, layers, state, n_layers - prompt_layers, n_layers))
    args = AdapterArgs(prompt_len=prompt_len, prompt_layers=prompt_layers, gate_activation="raw")
    return LoadedAdapter(path=path, format="official-v1", args=args, tensors=tensors,
                         base_shape={"dim": query.shape[1], "n_layers": n_layers})


def _read_v2(path: Path, model: dict, config: dict) -> LoadedAdapter:
    visual = {k: v for k, v in model.items() if k.split(".", 1)[0] in VISUAL_PREFIXES}
    language = {k[len("llama."):]: v for k, v in model.items() if k.startswith("llama.")}
    unknown = sorted(set(model) - set(visual) - {"llama." + k for k in language} - {"adapter_query.weight"})
    if unknown:
        raise ValueError(f"{path}: unexpected key(s) for an official v2 adapter: {unknown[:5]}")
    layers = _layers_of(language, path)
    n_layers = max(layers) + 1
    query = model["adapter_query.weight"]
    prompt_len = (_matrix(path, "visual_query.weight", visual["visual_query.weight"]).shape[0]
                  if "visual_query.weight" in visual else DEFAULT_PROMPT_LEN)
    prompt_len, prompt_layers = _prompt_shape(path, query, prompt_len, n_layers)
    first = n_layers - prompt_layers
    tensors = {"adapter_query.weight": query.float()}
    tensors.update(_gates(path, layers, language, first, n_layers))
    norm_weights = {}
    lora_ranks = set()
    has_bias = has_new_gate = False
    for layer, rests in sorted(layers.items()):
        for rest, key in rests.items():
            value = language[key]
            name = f"layers.{layer}.{rest}"
            if rest == "attention.gate":
                continue
            if rest in ("attention_norm.weight", "ffn_norm.weight"):
                norm_weights[name] = value
            elif rest == "attention.new_gate":
                has_new_gate = True
                if value.numel() != 1:
                    raise ValueError(f"{path}: llama.{name} has shape {tuple(value.shape)}; a new gate is one value")
                if layer >= first:
                    tensors[name] = value.float().reshape(1, 1, 1, 1)
            elif ((bias := re.fullmatch(r"(attention|feed_forward)\.(w\w)\.bias", rest))
                  and bias.group(2) in BIAS_TARGETS):
                has_bias = True
                tensors[f"layers.{layer}.{bias.group(1)}.{bias.group(2)}_delta.bias"] = value.float()
            elif lora := re.fullmatch(r"(attention|feed_forward)\.lora_(w\w)_l([12])\.weight", rest):
                target, part = lora.group(2), "lora_down" if lora.group(3) == "1" else "lora_up"
                if target not in LORA_TARGETS or _LINEAR_PARENT[target] != lora.group(1):
                    raise ValueError(f"{path}: unexpected key llama.{name}")
                if part == "lora_down":
                    lora_ranks.add(_matrix(path, f"llama.{name}", value).shape[0])
                tensors[f"layers.{layer}.{lora.group(1)}.{target}_delta.{part}.weight"] = value.float()
            else:
                raise ValueError(f"{path}: unexpected key llama.{name}")
    if "norm.weight" in language:
        norm_weights["norm.weight"] = language["norm.weight"]
    _check_norms(path, norm_weights, n_layers, "llama.")
    if len(lora_ranks) > 1:
        raise ValueError(f"{path}: LoRA ranks differ between layers: {sorted(lora_ranks)}")
    lora_rank = lora_ranks.pop() if lora_ranks else 0
    if lora_rank and config.get("lora_rank") not in (None, lora_rank):
        raise ValueError(f"{path}: config lora_rank={config['lora_rank']} but the LoRA tensors have rank {lora_rank}")
    tensors.update({f"visual_prompt.{k}": v.float() for k, v in visual.items()})
    args = AdapterArgs(prompt_len=prompt_len, prompt_layers=prompt_layers, gate_activation="tanh", bias=has_bias,
                       norm=bool(norm_weights), lora_rank=lora_rank, new_gate=has_new_gate,
                       **_visual_args(path, visual))
    return LoadedAdapter(path=path, format="official-v2", args=args, tensors=tensors, norm_weights=norm_weights,
                         base_shape={"dim": query.shape[1], "n_layers": n_layers})


def _read_dialog(path: Path, model: dict) -> LoadedAdapter:
    """The v2 dialog model's biases, input scales and tuned norms (no prompts, so no gates: the delta scale is
    its slider)."""
    tensors, norm_weights = {}, {}
    found: dict[str, set[str]] = {"bias": set(), "scale": set()}
    layers = set()
    for key, value in model.items():
        if part := _DIALOG_KEY.match(key):
            layer, parent, linear, kind = part.groups()
            if linear not in LORA_TARGETS or _LINEAR_PARENT[linear] != parent:
                raise ValueError(f"{path}: unexpected key {key} for an official v2 dialog adapter")
            tensors[f"layers.{layer}.{parent}.{linear}_delta.{kind}"] = value.float()
            found[kind].add(linear)
            layers.add(int(layer))
        elif _NORM_KEY.match(key):
            norm_weights[key] = value
        else:
            raise ValueError(f"{path}: unexpected key {key} for an official v2 dialog adapter")
    if found["scale"] and found["scale"] != set(LORA_TARGETS):
        raise ValueError(f"{path}: input scales on {sorted(found['scale'])} only; the model scales all of "
                         f"{', '.join(LORA_TARGETS)}")
    _check_norms(path, norm_weights, max(layers) + 1, "")
    scale = model.get("layers.0.attention.wq_scale")
    args = AdapterArgs(prompt_len=0, prompt_layers=0, bias=bool(found["bias"]),
                       bias_targets=tuple(t for t in LORA_TARGETS if t in found["bias"]) or BIAS_TARGETS,
                       scale=bool(found["scale"]), norm=bool(norm_weights))
    shape = {"n_layers": max(layers) + 1}
    if scale is not None:
        shape["dim"] = scale.shape[0]
    return LoadedAdapter(path=path, format="official-v2-dialog", args=args, tensors=tensors,
                         norm_weights=norm_weights, base_shape=shape, prompt_format="v2-dialog")


def _check_norms(path: Path, norm_weights: dict[str, torch.Tensor], n_layers: int, prefix: str) -> None:
    """That tuned norms, where the file has any, are there for every layer and the final norm (named as the file
    names them, under `prefix`); a missing one was named by the model's parameter (norm.delta)."""
    if not norm_weights:
        return
    wanted = [f"layers.{layer}.{norm}.weight" for layer in range(n_layers) for norm in ("attention_norm", "ffn_norm")]
    missing = [name for name in [*wanted, "norm.weight"] if name not in norm_weights]
    if missing:
        raise ValueError(f"{path}: tuned norms, but not {prefix}{missing[0]}" +
                         (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def _matrix(path: Path, key: str, value: torch.Tensor) -> torch.Tensor:
    """`value` where it is a matrix, as the shapes read from it need (the model's shapes are compared later)."""
    if value.dim() != 2:
        raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, expected a matrix")
    return value


def _visual_args(path: Path, visual: dict[str, torch.Tensor]) -> dict:
    """The visual prompt's shape from its tensors (heads are not stored: the official 16 are assumed).

    Official v2 models were trained on OpenCV-read (BGR) images and read ViT-L/14 (OpenAI) tokens."""
    if not visual:
        return {}
    proj = visual.get("clip_proj.weight")
    if proj is None or proj.dim() != 2:
        raise ValueError(f"{path}: visual keys present but clip_proj.weight is missing or not a matrix")
    blocks = {int(k.split(".")[1]) for k in visual if k.startswith("visual_blocks.")}
    width = proj.shape[0]
    fc1 = visual.get("visual_blocks.0.mlp.fc1.weight")
    ratio = _matrix(path, "visual_blocks.0.mlp.fc1.weight", fc1).shape[0] / width if fc1 is not None else 4.0
    return {"visual": "v2", "clip_dim": proj.shape[1], "visual_dim": width, "visual_depth": max(blocks, default=0) + 1,
            "visual_heads": OFFICIAL_VISUAL_HEADS, "visual_mlp_ratio": ratio, "channel_order": "bgr",
            "clip_model": OFFICIAL_CLIP_MODEL}


def write_official_v1(model: "Transformer", path: str | Path) -> Path:
    """Export a v1 adapter as the official release file (raw gates: tanh gates are written as tanh(gate)).

    Only prompts and gates exist in that format, so v2 parts and new_gate cannot be exported. Like the
    release, it holds a gate for every layer (zero where there is no prompt). The prompt length is not
    stored in the file: readers take it from the name (`..._len3_...`) or assume the official 10.
    """
    path = Path(path)
    a = model.adapter_args
    reasons = a.beyond_v1
    if not a.has_prompts:
        reasons.append("no adaption prompts")
    if reasons:
        raise ValueError(f"{path}: the official v1 format holds only prompts and gates; this adapter has "
                         f"{', '.join(reasons)}")
    if (named := named_prompt_len(path)) != a.prompt_len:  # read back by that name, it would be another adapter
        raise ValueError(f"{path}: the prompt length is only known from the file name in this format, and this name "
                         f"reads as {named}, the adapter's is {a.prompt_len}; name it like "
                         f"llama_adapter_len{a.prompt_len}_layer{a.prompt_layers}.pth")
    state = {"adapter_query.weight": model.adapter_query.weight.detach().float().cpu().clone()}
    for layer, block in enumerate(model.layers):
        gate = torch.zeros(1, model.args.n_heads, 1, 1)
        if block.attention.gate is not None:
            gate = block.attention.effective_gate().detach().float().cpu().clone()
        state[f"layers.{layer}.attention.gate"] = gate
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path
