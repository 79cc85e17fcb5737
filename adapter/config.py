"""Shapes of the frozen LLaMA and of the adapter that is trained on top of it.

Both are plain dataclasses that validate themselves, so that a bad value is reported with the name of the
argument at fault before any tensor is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

GATE_ACTIVATIONS = ("tanh", "raw")
VISUAL_KINDS = ("none", "v1", "v2", "grid")
VISUAL_PROMPT_KINDS = VISUAL_KINDS[1:]  # the kinds that add a visual prompt
CHANNEL_ORDERS = ("rgb", "bgr")
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
BIAS_TARGETS = ("wq", "wo", "w1", "w2", "w3")
SCALE_PLACES = ("input", "output")
# how a layer's prompt becomes keys and values: through the frozen wk/wv (the official formula), through wk/wv
# with their v2 deltas (litgpt's fused qkv linear, up to 0.5.4), or as litgpt 0.5.5+ reads them from that linear
PROMPT_PROJECTIONS = ("frozen", "tuned", "litgpt-qkv")
ROPE_SCALINGS = ("linear", "llama3")
# positions a model is built for: its rotary table is made for all of them (1M: 512 MiB at head dim 128), so a
# config's 2**40 allocated terabytes; a longer one is used by passing a shorter max_seq_len
MAX_CONTEXT = 2**20
MAX_LAYERS = 1024  # Llama 3.1 405B has 126; a model is built layer by layer, so a config's 10**12 would hang
LLAMA32_SMALL_SHAPES = ((2048, 16), (3072, 28))  # (dim, n_layers) of Llama 3.2 1B and 3B
META_DEFAULT_NORM_EPS = 1e-5  # ModelArgs.norm_eps in Meta's llama code, for a params.json without one


def is_whole(value: object) -> bool:
    """An int and not a bool (True is 1 to Python: a config's `true` made a Linear of width True)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_positive_whole(value: object) -> bool:
    return is_whole(value) and value > 0


def _require(condition: bool, argument: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{argument}: {message}")


@dataclass(frozen=True)
class RopeScaling:
    """Stretched rotary frequencies for contexts longer than the model was first trained on.

    "linear" divides every frequency by `factor` (position interpolation, e.g. LongLoRA's LLaMA 2);
    "llama3" (Llama 3.1/3.2/3.3) divides only the low frequencies, whose wavelength is longer than
    `original_max_len / low_freq_factor`, keeps the high ones (shorter than `original_max_len /
    high_freq_factor`) and blends in between. Named as in HF's `rope_scaling`.
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def __post_init__(self) -> None:
        _require(self.kind in ROPE_SCALINGS, "rope_scaling",
                 f"type {self.kind!r} is not supported (choose from {ROPE_SCALINGS})")
        _require(isinstance(self.factor, (int, float)) and self.factor >= 1, "rope_scaling",
                 f"factor must be a number >= 1, got {self.factor!r}")
        if self.kind == "llama3":
            _require(0 < self.low_freq_factor < self.high_freq_factor, "rope_scaling",
                     f"needs 0 < low_freq_factor < high_freq_factor, got {self.low_freq_factor} and "
                     f"{self.high_freq_factor}")
            _require(is_positive_whole(self.original_max_len), "rope_scaling",
                     f"original_max_len must be a positive integer, got {self.original_max_len!r}")

    @classmethod
    def from_hf(cls, values: dict[str, Any]) -> "RopeScaling":
        """From HF's `rope_scaling` / `rope_parameters` object, or from our own `to_dict`."""
        kind = values.get("rope_type", values.get("type", values.get("kind")))
        _require(kind in ROPE_SCALINGS, "rope_scaling",
                 f"type {kind!r} is not supported (choose from {ROPE_SCALINGS} or plain RoPE)")
        options = {"factor": values.get("factor")}
        if kind == "llama3":
            for ours, theirs in (("low_freq_factor", "low_freq_factor"), ("high_freq_factor", "high_freq_factor"),
                                 ("original_max_len", "original_max_position_embeddings")):
                found = values.get(theirs, values.get(ours))
                if found is not None:
                    options[ours] = found
        return cls(kind, **options)


def explicit_head_size(head_dim: object, dim: object, n_heads: object) -> dict[str, object]:
    """{"head_size": head_dim} when a checkpoint's head width is not dim / n_heads (Mistral NeMo's), else {}: an
    unneeded field would make the same shape compare unequal."""
    numbers = all(is_whole(number) for number in (head_dim, dim, n_heads))  # (a dict multiplied: TypeError)
    if head_dim is None or (numbers and n_heads * head_dim == dim):
        return {}
    return {"head_size": head_dim}


@dataclass(frozen=True)
class ModelArgs:
    """The LLaMA 1/2/3 shape, named as in Meta's `params.json`."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    head_size: int | None = None  # a head's width when not dim / n_heads (Mistral NeMo: 128, at dim 5120 and 32 heads)
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    ffn_dim: int | None = None  # explicit SwiGLU width (HF's intermediate_size); None = Meta's rule
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    sliding_window: int | None = None  # each token attends to the last this many positions (Mistral 7B v0.1)

    def __post_init__(self) -> None:
        _require(self.sliding_window is None or (is_whole(self.sliding_window) and self.sliding_window >= 2),
                 "sliding_window",
                 f"must be an integer >= 2 or None, got {self.sliding_window!r}")
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            _require(is_positive_whole(value), name, f"must be a positive integer, got {value!r}")
        _require(self.n_layers <= MAX_LAYERS, "n_layers",
                 f"{self.n_layers:,} layers is more than the {MAX_LAYERS:,} a model is built with here")
        _require(self.max_seq_len <= MAX_CONTEXT, "max_seq_len",
                 f"{self.max_seq_len:,} positions is more than the {MAX_CONTEXT:,} a model is built for here; load "
                 "it with a shorter max_seq_len (adapter.load's; finetune's and evaluate's --max-seq-len)")
        _require(self.ffn_dim_multiplier is None or (isinstance(self.ffn_dim_multiplier, (int, float))
                                                     and not isinstance(self.ffn_dim_multiplier, bool)
                                                     and 0 < self.ffn_dim_multiplier < math.inf),
                 "ffn_dim_multiplier", f"must be a positive number or None, got {self.ffn_dim_multiplier!r}")
        _require(self.head_size is None or is_positive_whole(self.head_size), "head_size",
                 f"must be a positive integer, got {self.head_size!r}")
        _require(self.head_size is not None or self.dim % self.n_heads == 0, "dim",
                 f"{self.dim} is not divisible by n_heads={self.n_heads}")
        _require(self.head_dim % 2 == 0, "dim" if self.head_size is None else "head_size",
                 f"head dim {self.head_dim} must be even for rotary embeddings")
        _require(self.ffn_dim is None or is_positive_whole(self.ffn_dim), "ffn_dim",
                 f"must be a positive integer, got {self.ffn_dim!r}")
        kv = self.kv_heads
        _require(is_positive_whole(kv), "n_kv_heads", f"must be a positive integer, got {kv!r}")
        _require(self.n_heads % kv == 0, "n_kv_heads", f"n_heads={self.n_heads} is not a multiple of {kv}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf, name,
                     f"must be a positive number, got {value!r}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_hf(self.rope_scaling))
        _require(self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling), "rope_scaling",
                 f"expected a RopeScaling or its dict, got {self.rope_scaling!r}")

    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: `ffn_dim` when given, else as Meta computes it (2/3 of 4*dim, multiplier, rounded up)."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_params(cls, params: dict[str, Any], **overrides: Any) -> "ModelArgs":
        """Build from a Meta `params.json` dict; unknown keys are ignored, `vocab_size: -1` needs an override.
        Mistral's params.json (its own releases) names the SwiGLU width `hidden_dim` and writes `head_dim`, kept
        as `head_size` where it is not dim / n_heads (Mistral NeMo).

        Llama 3.1+'s `use_scaled_rope: true` is the "llama3" scaling with Meta's constants and the factor
        `rope_scaling_factor`. Meta's params.json files do not say it: their reference code takes 8, right for
        3.1 and 3.3, while Llama 3.2 1B and 3B were trained with 32 (their HF configs; meta-llama/llama-models
        issue 241), so those two shapes get 32. A params.json without `norm_eps` gets Meta's reference code's
        default, 1e-5 (every release writes it; LLaMA 1's 1e-6 is this class's default for shapes built in code)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {"norm_eps": META_DEFAULT_NORM_EPS, **{k: v for k, v in params.items() if k in known}}
        if params.get("hidden_dim") is not None and "ffn_dim" not in values:  # Mistral's name for the SwiGLU width
            values["ffn_dim"] = params["hidden_dim"]
        values.update(explicit_head_size(params.get("head_dim"), params.get("dim"), params.get("n_heads")))
        if params.get("use_scaled_rope") and values.get("rope_scaling") is None:
            llama32_small = (params.get("dim"), params.get("n_layers")) in LLAMA32_SMALL_SHAPES
            factor = params.get("rope_scaling_factor") or (32.0 if llama32_small else 8.0)
            values["rope_scaling"] = RopeScaling("llama3", factor)
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def grid_side(prompt_len: int) -> int:
    """The side g of a "grid" visual prompt's g x g regions: prompt_len = 1 + g * g (0 if it is no such number)."""
    side = math.isqrt(max(prompt_len - 1, 0))
    return side if side > 0 and side * side == prompt_len - 1 else 0


@dataclass(frozen=True)
class AdapterArgs:
    """What is learned on top of the frozen model.

    v1: `prompt_len` prompt tokens for each of the top `prompt_layers` layers and a zero-init gate per head.
    v2 adds zero-init biases (`bias`, on the `bias_targets` linears), ones-init scales of the linears' inputs
    (`scale`, on all seven: the V2 paper's bias tuning `W(s * x) + b`, as the official V2 dialog model has it),
    tunable norms (`norm`), optional LoRA (`lora_rank` > 0) and the ones-init `new_gate` that the official
    LORA-BIAS checkpoints carry. litgpt's adapter v2 scales the outputs instead (`scale_at="output"`:
    `s * (Wx + b)`), tunes the vocabulary head's bias and scale too (`head_delta`) and feeds the prompt through
    the tuned q|k|v linear (`prompt_projection`, one of PROMPT_PROJECTIONS).

    `visual` adds a visual prompt read from CLIP features and added to every layer's adaption prompt:
    "v2" (official multimodal: projected CLIP tokens, `prompt_len` visual queries, `visual_depth`
    transformer blocks), "v1" (the paper's ScienceQA variant: the CLIP global feature, projected), or "grid"
    (the global feature and the patches pooled to a grid of regions, one per prompt token: adapter.visual).
    `clip_model` names the open_clip tower it reads; `channel_order` "bgr" reproduces the official v2
    models, which were trained on images read by OpenCV.
    """

    prompt_len: int = 10
    prompt_layers: int = 30
    gate_activation: str = "tanh"
    bias: bool = False
    bias_targets: tuple[str, ...] = field(default=BIAS_TARGETS)
    scale: bool = False
    scale_at: str = "input"
    head_delta: bool = False
    prompt_projection: str = "frozen"
    norm: bool = False
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = field(default=LORA_TARGETS)
    new_gate: bool = False
    visual: str = "none"
    clip_model: str = "ViT-L-14-quickgelu"
    clip_dim: int = 768
    visual_dim: int = 768
    visual_depth: int = 8
    visual_heads: int = 16
    visual_mlp_ratio: float = 4.0
    channel_order: str = "rgb"

    def __post_init__(self) -> None:  # the settings may come from a file's metadata: their types are checked too
        for name in ("prompt_len", "prompt_layers", "lora_rank"):
            value = getattr(self, name)
            _require(is_whole(value) and value >= 0, name, f"must be a non-negative integer, got {value!r}")
        for name in ("bias", "scale", "head_delta", "norm", "new_gate"):
            value = getattr(self, name)
            _require(isinstance(value, bool), name, f"must be true or false, got {value!r}")
        _require(isinstance(self.clip_model, str) and self.clip_model != "", "clip_model",
                 f"must be an open_clip model name or config path, got {self.clip_model!r}")
        _require((self.prompt_len == 0) == (self.prompt_layers == 0), "prompt_layers",
                 f"prompt_len={self.prompt_len} and prompt_layers={self.prompt_layers} must both be 0 or both > 0")
        _require(self.gate_activation in GATE_ACTIVATIONS, "gate_activation",
                 f"must be one of {GATE_ACTIVATIONS}, got {self.gate_activation!r}")
        for name in ("lora_targets", "bias_targets"):
            given = getattr(self, name)
            _require(isinstance(given, list | tuple), name, f"must be a list of linears ({', '.join(LORA_TARGETS)}), "
                     f"got {given!r}")  # a string or a dict were read letter by letter, key by key
            object.__setattr__(self, name, tuple(given))
            unknown = sorted(set(getattr(self, name)) - set(LORA_TARGETS))
            _require(not unknown, name, f"unknown linear(s) {unknown}; choose from {LORA_TARGETS}")
        _require(self.scale_at in SCALE_PLACES, "scale_at", f"must be one of {SCALE_PLACES}, got {self.scale_at!r}")
        _require(not self.head_delta or self.bias or self.scale, "head_delta",
                 "needs a bias or a scale to give the head (bias=True or scale=True)")
        _require(self.prompt_projection in PROMPT_PROJECTIONS, "prompt_projection",
                 f"must be one of {PROMPT_PROJECTIONS}, got {self.prompt_projection!r}")
        _require(not self.new_gate or self.prompt_layers > 0, "new_gate", "needs adaption prompts (prompt_layers > 0)")
        _require(self.visual in VISUAL_KINDS, "visual", f"must be one of {VISUAL_KINDS}, got {self.visual!r}")
        _require(self.visual == "none" or self.prompt_layers > 0, "visual", "needs adaption prompts to add to")
        _require(self.visual != "grid" or grid_side(self.prompt_len) > 0, "prompt_len",
                 f"a grid visual prompt needs 1 + a square number of prompt tokens (e.g. 5, 10, 17), "
                 f"got {self.prompt_len}")
        _require(self.channel_order in CHANNEL_ORDERS, "channel_order",
                 f"must be one of {CHANNEL_ORDERS}, got {self.channel_order!r}")
        for name in ("clip_dim", "visual_dim", "visual_depth", "visual_heads"):
            value = getattr(self, name)
            _require(is_positive_whole(value), name, f"must be a positive integer, got {value!r}")
        _require(self.visual_dim % self.visual_heads == 0, "visual_heads",
                 f"visual_dim={self.visual_dim} is not divisible by {self.visual_heads}")
        ratio = self.visual_mlp_ratio
        _require(isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0, "visual_mlp_ratio",
                 f"must be a positive number, got {ratio!r}")

    @property
    def has_prompts(self) -> bool:
        return self.prompt_layers > 0

    @property
    def v2_parts(self) -> list[str]:
        """The v2 parts this adapter has, named for people: bias, scale, norm, LoRA rank N, new_gate, head
        bias/scale."""
        scale = "scale" if self.scale_at == "input" else "output scale"
        return [name for name, on in (("bias", self.bias), (scale, self.scale), ("norm", self.norm),
                                      (f"LoRA rank {self.lora_rank}", self.lora_rank > 0),
                                      ("new_gate", self.new_gate), ("head bias/scale", self.head_delta)) if on]

    @property
    def beyond_v1(self) -> list[str]:
        """What the official v1 formula (and PEFT's) cannot compute: the v2 parts, and litgpt 0.5.5+'s reading of
        the prompt's keys and values."""
        projection = ["litgpt 0.5.5+ prompt keys/values"] if self.prompt_projection == "litgpt-qkv" else []
        return self.v2_parts + projection

    @property
    def has_deltas(self) -> bool:
        """Whether it changes the frozen layers themselves (biases, scales, norms, LoRA), which the delta scale
        scales and the gate scale leaves on."""
        return self.bias or self.scale or self.norm or self.lora_rank > 0

    @property
    def learns_nothing(self) -> bool:
        """No prompts and no deltas: the frozen base itself (nothing to download, push or train further)."""
        return not (self.has_prompts or self.has_deltas)

    def check_fits(self, model: ModelArgs) -> None:
        """The adapter must fit the model it is attached to."""
        _require(self.prompt_layers <= model.n_layers, "prompt_layers",
                 f"{self.prompt_layers} is more than the model's n_layers={model.n_layers}")
        # (a LoRA's rank past its linears' sides adds nothing; --lora-rank 100000 made 1.5 billion parameters)
        _require(self.lora_rank <= model.dim, "lora_rank",
                 f"{self.lora_rank} is more than the model's dim={model.dim} (a rank past it adds nothing)")

    def first_prompt_layer(self, n_layers: int) -> int:
        """Official indexing: prompt i goes to layer `n_layers - prompt_layers + i`."""
        return n_layers - self.prompt_layers

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["lora_targets"] = list(self.lora_targets)
        values["bias_targets"] = list(self.bias_targets)
        return values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AdapterArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        _require(not unknown, "adapter config", f"unknown field(s) {unknown}")
        return cls(**values)
