"""The LLaMA we own, with zero-init gated adaption prompts (LLaMA-Adapter v1) and the v2 deltas.

Parameter names follow Meta's checkpoints (`tok_embeddings`, `layers.N.attention.wq`, ..., `output`) and
the official adapter files (`adapter_query.weight`, `layers.N.attention.gate`), so that loading needs as
little renaming as possible. Everything learned is zero-initialised or scaled by a zero-init gate, so a
fresh adapter computes exactly the frozen base model.

In a layer with a prompt P (`prompt_len` x dim):
    out = sdpa(q, k, v, causal) + s_g * act(gate)_h * new_gate * sdpa(q, wk(P), wv(P))
where wk(P), wv(P) use the frozen projections without RoPE, with their own softmax (litgpt's adapters feed P
through the tuned projections, and from litgpt 0.5.5 read other rows: `AdapterArgs.prompt_projection`). `s_g`
(gate scale) and `s_d` (delta scale, for the v2 bias/LoRA/scale/norm deltas) are tensors, scalar or one value
per batch row.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import AdapterArgs, ModelArgs, RopeScaling
from .fused import StackedWeight
from .head_loss import head_cross_entropy, head_scores, logit_scores
from .kv_cache import KVCache, check_kv_cache
from .layout import row_major
from .static_decode import StaticDecoder
from .step_context import StepContext

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

NO_ADAPTER = AdapterArgs(prompt_len=0, prompt_layers=0)
ScaleLike = float | Sequence[float] | torch.Tensor


class RMSNorm(nn.Module):
    """RMSNorm with a frozen weight and, for v2, a trainable zero-init `delta` added to it."""

    def __init__(self, dim: int, eps: float, tunable: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.delta = nn.Parameter(torch.zeros(dim)) if tunable else None

    def forward(self, x: torch.Tensor, delta_scale: torch.Tensor | None = None, fused: bool = False) -> torch.Tensor:
        if fused:  # torch's one-call RMSNorm: on the CPU the same operations (so the same floats), in C++
            normed = F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        else:
            normed = x.float()
            normed = (normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        weight = self.weight
        if self.delta is not None:
            scale = 1.0 if delta_scale is None else delta_scale
            weight = weight + scale * self.delta
        return normed * weight.to(x.dtype)


class LinearDelta(nn.Module):
    """The v2 change to one frozen linear: a zero-init bias, LoRA with a zero-init up-projection, and/or a
    ones-init scale, of its input (`W(s * x) + b`, the V2 paper's bias tuning) or of its output (`s * (Wx + b)`,
    litgpt's adapter v2).

    Kept outside the frozen (possibly quantized) linear so that it stays in full precision and can be
    scaled by the delta scale d: the layer computes `W((1 + d(s - 1)) * x) + d(b + LoRA(x))`, or
    `(1 + d(s - 1)) * (Wx + d(b + LoRA(x)))` with an output scale: the frozen linear at d = 0 and the trained
    one at d = 1.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, lora_rank: int, scale: bool = False,
                 scale_at: str = "input") -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.scale = nn.Parameter(torch.ones(in_features if scale_at == "input" else out_features)) if scale else None
        self.scale_at = scale_at
        self.lora_down = self.lora_up = None
        if lora_rank > 0:
            self.lora_down = nn.Linear(in_features, lora_rank, bias=False)
            self.lora_up = nn.Linear(lora_rank, out_features, bias=False)
            nn.init.zeros_(self.lora_up.weight)

    def scaled_input(self, x: torch.Tensor, delta_scale: torch.Tensor) -> torch.Tensor:
        """What the frozen linear reads: `x`, or with an input scale `(1 + d(s - 1)) * x`."""
        if self.scale is None or self.scale_at != "input":
            return x
        return x * (1 + delta_scale * (self.scale - 1)).to(x.dtype)

    def scaled_output(self, y: torch.Tensor, delta_scale: torch.Tensor) -> torch.Tensor:
        """What the layer gives: `y`, or with an output scale `(1 + d(s - 1)) * y`."""
        if self.scale is None or self.scale_at != "output":
            return y
        return y * (1 + delta_scale * (self.scale - 1)).to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The added output, bias and LoRA (None without either)."""
        delta = None
        if self.lora_down is not None:
            down = self.lora_down.weight.to(x.dtype)
            delta = F.linear(F.linear(x, down), self.lora_up.weight.to(x.dtype))
        if self.bias is not None:
            bias = self.bias.to(x.dtype)
            delta = bias if delta is None else delta + bias
        return delta


def _make_delta(adapter: AdapterArgs, name: str, in_features: int, out_features: int) -> LinearDelta | None:
    """The delta of linear `name` (one of the seven, or "output": the head, when `head_delta`), None without
    one."""
    if name == "output":
        bias, rank, scale = adapter.head_delta and adapter.bias, 0, adapter.head_delta and adapter.scale
    else:
        bias, scale = adapter.bias and name in adapter.bias_targets, adapter.scale
        rank = adapter.lora_rank if name in adapter.lora_targets else 0
    if not bias and rank == 0 and not scale:
        return None
    return LinearDelta(in_features, out_features, bias, rank, scale, adapter.scale_at)


# Compiled decode steps of at most this many rows compute their frozen matrix-vector products as reductions
REDUCTION_ROWS = 2


def frozen_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`; under torch.compile, for a few rows through a row-major plain linear on the CPU, as a
    multiply-and-sum that inductor fuses into one vectorised pass over the weight.

    A decode step's speed is how fast it streams the weights. On the CPU, torch's matrix-vector product (MKL)
    read them at about half the rate a plain sum does; the fused reduction reads them at about the sum's rate,
    1.5-1.8x faster per step at batch 1 and 2 (`python -m bench.decode`). With more rows, or column-major
    weights (whose reduction runs across the rows, slower), the BLAS is faster and is kept.
    """
    if torch.compiler.is_compiling() and _reads_as_reduction(layer, x):
        return reduction_matvec(x, layer.weight)
    return layer(x)


def reduction_matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` as a broadcast multiply and a sum over the inputs (one fused pass when compiled)."""
    return (x.unsqueeze(-2) * weight.to(x.dtype)).sum(-1)


def _reads_as_reduction(layer: nn.Module, x: torch.Tensor) -> bool:
    if type(layer) is not nn.Linear or layer.bias is not None:
        return False
    w = layer.weight
    return w.device.type == "cpu" and w.is_contiguous() and x.numel() <= REDUCTION_ROWS * x.shape[-1]


def _linear(layer: nn.Module, delta: LinearDelta | None, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if delta is None:
        return frozen_linear(layer, x)
    out = frozen_linear(layer, delta.scaled_input(x, scale))
    added = delta(x)
    return delta.scaled_output(out if added is None else out + scale * added, scale)


def _stacked_linear(weight: torch.Tensor, parts: Sequence[tuple[nn.Module, LinearDelta | None]], x: torch.Tensor,
                    scale: torch.Tensor) -> torch.Tensor:
    """`_linear` of each (layer, delta) part side by side, with one matmul for the stacked frozen weights.

    Inference only: each delta is added in place to its own columns, the same sum `_linear` computes.
    """
    out = F.linear(x, weight)
    start = 0
    for layer, delta in parts:
        end = start + layer.out_features
        added = None if delta is None else delta(x)
        if added is not None:
            out[..., start:end].add_(scale * added)
        start = end
    return out


def rope_frequencies(head_dim: int, theta: float, device: torch.device,
                     scaling: RopeScaling | None = None) -> torch.Tensor:
    """The head_dim // 2 rotary frequencies theta^(-2j/head_dim), stretched as `scaling` says."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is None:
        return freqs
    if scaling.kind == "linear":
        return freqs / scaling.factor
    wavelength = 2 * math.pi / freqs
    longest_kept = scaling.original_max_len / scaling.high_freq_factor  # shorter wavelengths stay as they are
    shortest_divided = scaling.original_max_len / scaling.low_freq_factor  # longer ones are divided by factor
    blend = (scaling.original_max_len / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - blend) * freqs / scaling.factor + blend * freqs
    return torch.where(wavelength < longest_kept, freqs,
                       torch.where(wavelength > shortest_divided, freqs / scaling.factor, blended))


def rope_table(head_dim: int, max_len: int, theta: float, device: torch.device,
               scaling: RopeScaling | None = None) -> torch.Tensor:
    """Meta's rotary embedding as one complex64 table [max_len, head_dim // 2]: e^(i * position * freq_j)."""
    freqs = rope_frequencies(head_dim, theta, device, scaling)
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (Meta layout) of `x` [B, T, H, D] by `rope` [T|B,T, D/2] from `rope_table`.

    Each pair (e, o) is the complex number e + io times the table's entry: one complex multiply forward
    and one backward, 3-4x faster on the CPU than real arithmetic with a pair swap (bench: training step).
    Under torch.compile the same products are written in real numbers, which inductor fuses into one
    kernel (it has no complex kernels of its own).
    """
    if torch.compiler.is_compiling():
        cos, sin = rope.real.unsqueeze(-2), rope.imag.unsqueeze(-2)
        even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2).type_as(x)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rope.unsqueeze(-2)).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, adapter: AdapterArgs, layer_id: int, has_prompt: bool) -> None:
        super().__init__()
        self.layer_id = layer_id
        # which adapter layer this is (0 = the lowest with a prompt): where it reads a per-layer gate scale
        self.prompt_index = layer_id - adapter.first_prompt_layer(args.n_layers) if has_prompt else None
        self.n_heads = args.n_heads
        self.kv_heads = args.kv_heads
        self.head_dim = args.head_dim
        self.gate_activation = adapter.gate_activation
        self.prompt_projection = adapter.prompt_projection
        q_dim, kv_dim = args.n_heads * args.head_dim, args.kv_heads * args.head_dim
        self.wq = nn.Linear(args.dim, q_dim, bias=False)
        self.wk = nn.Linear(args.dim, kv_dim, bias=False)
        self.wv = nn.Linear(args.dim, kv_dim, bias=False)
        self.wo = nn.Linear(q_dim, args.dim, bias=False)
        self.wq_delta = _make_delta(adapter, "wq", args.dim, q_dim)
        self.wk_delta = _make_delta(adapter, "wk", args.dim, kv_dim)
        self.wv_delta = _make_delta(adapter, "wv", args.dim, kv_dim)
        self.wo_delta = _make_delta(adapter, "wo", q_dim, args.dim)
        self.gate = nn.Parameter(torch.zeros(1, args.n_heads, 1, 1)) if has_prompt else None
        self.new_gate = nn.Parameter(torch.ones(1, 1, 1, 1)) if has_prompt and adapter.new_gate else None
        self.qkv_stack = StackedWeight("wq", "wk", "wv")

    def effective_gate(self) -> torch.Tensor:
        """act(gate) * new_gate, shape [1, n_heads, 1, 1]: how strongly each head mixes in the prompt."""
        gate = self.gate.tanh() if self.gate_activation == "tanh" else self.gate
        if self.new_gate is not None:
            gate = gate * self.new_gate
        return gate

    def prompt_kv(self, prompt: torch.Tensor, delta_scale: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the adaption prompt [B|1, K, dim], without RoPE: through the frozen wk/wv (the official
        formula), through them with their v2 deltas ("tuned"), or as litgpt 0.5.5+ reads them ("litgpt-qkv")."""
        if delta_scale is None:
            delta_scale = torch.ones((), device=prompt.device)
        if self.prompt_projection == "frozen":
            k, v = self.wk(prompt), self.wv(prompt)
        else:
            k = _linear(self.wk, self.wk_delta, prompt, delta_scale)
            v = _linear(self.wv, self.wv_delta, prompt, delta_scale)
        if self.prompt_projection == "litgpt-qkv":
            k, v = self._litgpt_prompt_kv(_linear(self.wq, self.wq_delta, prompt, delta_scale), k, v)
        batch, length = k.shape[:2]
        pk = k.reshape(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        pv = v.reshape(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        return pk, pv

    def _litgpt_prompt_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """litgpt 0.5.5+ projects the prompt with its fused linear, whose rows are all queries, then all keys,
        then all values (q and k rows in HF's rotate-half order), and takes each query group's key and value
        as if the rows were still interleaved per group (that group's r queries, key, value): the head-sized
        chunks g(r+2)+r and g(r+2)+r+1. Its adapters were trained so, so this reads them as trained."""
        batch, length = max(t.shape[0] for t in (q, k, v)), q.shape[1]  # a row each when the delta scale is per row
        q, k, v = (t.expand(batch, -1, -1) for t in (q, k, v))
        per_group = self.n_heads // self.kv_heads
        rows = torch.cat([_meta_to_rotate_half(q, self.head_dim), _meta_to_rotate_half(k, self.head_dim), v], dim=-1)
        grouped = rows.view(batch, length, self.kv_heads, per_group + 2, self.head_dim)
        keys = _rotate_half_to_meta(grouped[..., per_group, :], self.head_dim)  # met by Meta-ordered queries
        return keys.flatten(-2), grouped[..., per_group + 1, :].flatten(-2)

    def forward(
        self,
        x: torch.Tensor,
        ctx: StepContext,
        prompt_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        record: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self._project(x, ctx)
        if ctx.cache is not None:
            k, v = ctx.cache.store(self.layer_id, ctx.start, k, v)
        gqa = self.kv_heads != self.n_heads
        out = _attention(q, k, v, ctx.fp32_attention, attn_mask=ctx.attn_mask, is_causal=ctx.is_causal,
                         enable_gqa=gqa)
        if prompt_kv is not None:
            pk, pv = prompt_kv
            if pk.shape[0] != batch:
                pk, pv = pk.expand(batch, -1, -1, -1), pv.expand(batch, -1, -1, -1)
            prompt_out = _attention(q, pk, pv, ctx.fp32_attention, enable_gqa=gqa)
            scale = ctx.gate_scale
            if scale.dim() == 5:  # one scale per adapter layer (and head): this layer's [B|1, H|1, 1, 1]
                scale = scale[self.prompt_index]
            prompt_out = (scale * self.effective_gate()).to(prompt_out.dtype) * prompt_out
            if record is not None:
                record.append(_prompt_share(out, prompt_out))
            out = out + prompt_out
        out = out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)
        return _linear(self.wo, self.wo_delta, out, ctx.delta_scale)

    def _project(self, x: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys (both rotated) and values, [B, heads, T, head_dim]."""
        batch, length, _ = x.shape
        s_d = ctx.delta_scale
        stacked = self.qkv_stack.weight if ctx.fused else None
        if stacked is None:
            q = _linear(self.wq, self.wq_delta, x, s_d).view(batch, length, self.n_heads, self.head_dim)
            k = _linear(self.wk, self.wk_delta, x, s_d).view(batch, length, self.kv_heads, self.head_dim)
            v = _linear(self.wv, self.wv_delta, x, s_d).view(batch, length, self.kv_heads, self.head_dim)
            q = apply_rope(q, ctx.rope)
            k = apply_rope(k, ctx.rope)
        else:
            parts = ((self.wq, self.wq_delta), (self.wk, self.wk_delta), (self.wv, self.wv_delta))
            qkv = _stacked_linear(stacked, parts, x, s_d).view(batch, length, -1, self.head_dim)
            rotated = self.n_heads + self.kv_heads
            qk = apply_rope(qkv[:, :, :rotated], ctx.rope)  # one rotation for queries and keys
            q, k, v = qk[:, :, :self.n_heads], qk[:, :, self.n_heads:], qkv[:, :, rotated:]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _meta_to_rotate_half(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Each head's features [..., heads * head_dim] from Meta's pair order (0, D/2, 1, D/2 + 1, ...) to HF's
    rotate-half order (0, 1, ..., D - 1)."""
    return x.unflatten(-1, (-1, head_dim // 2, 2)).transpose(-1, -2).flatten(-3)


def _rotate_half_to_meta(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of `_meta_to_rotate_half`, for [..., head_dim] features."""
    return x.unflatten(-1, (2, head_dim // 2)).transpose(-1, -2).flatten(-2)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp32: bool, **options: Any) -> torch.Tensor:
    """Scaled dot-product attention; with `fp32`, in float32 outside autocast, the result cast back to the
    lowest input precision (Transformer.fp32_attention says why). Inputs may mix precisions: a v2 bias added
    to a bf16 projection gives float32."""
    if not fp32:
        return F.scaled_dot_product_attention(q, k, v, **options)
    low = next((t.dtype for t in (q, k, v) if t.dtype != torch.float32), torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **options).to(low)


def _prompt_share(text_out: torch.Tensor, prompt_out: torch.Tensor) -> torch.Tensor:
    """Per token, the fraction of the attention output's norm that came through the prompt [B, T]."""
    prompt_norm = prompt_out.float().norm(dim=-1).mean(1)
    text_norm = text_out.float().norm(dim=-1).mean(1)
    return prompt_norm / (prompt_norm + text_norm).clamp_min(1e-12)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, adapter: AdapterArgs) -> None:
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)
        self.w1_delta = _make_delta(adapter, "w1", args.dim, hidden)
        self.w2_delta = _make_delta(adapter, "w2", hidden, args.dim)
        self.w3_delta = _make_delta(adapter, "w3", args.dim, hidden)
        self.w13_stack = StackedWeight("w1", "w3")

    def forward(self, x: torch.Tensor, delta_scale: torch.Tensor, fused: bool = False) -> torch.Tensor:
        weight = self.w13_stack.weight if fused else None
        if weight is None:
            gated = (F.silu(_linear(self.w1, self.w1_delta, x, delta_scale))
                     * _linear(self.w3, self.w3_delta, x, delta_scale))
        else:
            parts = ((self.w1, self.w1_delta), (self.w3, self.w3_delta))
            up, gate = _stacked_linear(weight, parts, x, delta_scale).chunk(2, dim=-1)
            gated = F.silu(up) * gate
        return _linear(self.w2, self.w2_delta, gated, delta_scale)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, adapter: AdapterArgs, layer_id: int, has_prompt: bool) -> None:
        super().__init__()
        self.attention = Attention(args, adapter, layer_id, has_prompt)
        self.feed_forward = FeedForward(args, adapter)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, tunable=adapter.norm)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, tunable=adapter.norm)

    def forward(self, x: torch.Tensor, ctx: StepContext, prompt_kv=None, record=None) -> torch.Tensor:
        s_d, fused = ctx.delta_scale, ctx.fused
        h = x + self.attention(self.attention_norm(x, s_d, fused), ctx, prompt_kv, record)
        return h + self.feed_forward(self.ffn_norm(h, s_d, fused), s_d, fused)


class Transformer(nn.Module):
    """A frozen LLaMA plus an adapter. `m(tokens)` gives logits; `step` runs with a KV cache."""

    def __init__(self, args: ModelArgs, adapter: AdapterArgs | None = None) -> None:
        super().__init__()
        adapter = adapter or NO_ADAPTER
        adapter.check_fits(args)
        self.args = args
        self.adapter_args = adapter
        self.first_prompt_layer = adapter.first_prompt_layer(args.n_layers)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(args, adapter, i, has_prompt=i >= self.first_prompt_layer) for i in range(args.n_layers)
        )
        self.norm = RMSNorm(args.dim, args.norm_eps, tunable=adapter.norm)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.output_delta = _make_delta(adapter, "output", args.dim, args.vocab_size)  # litgpt v2's tuned head
        self.adapter_query = None
        if adapter.has_prompts:
            self.adapter_query = nn.Embedding(adapter.prompt_layers * adapter.prompt_len, args.dim)
        self.visual_prompt = None  # learned: CLIP features -> added to the prompts (adapter.visual)
        if adapter.visual != "none":
            from .visual import build_visual_prompt

            self.visual_prompt = build_visual_prompt(adapter, args.dim)
        self.image_encoder = None  # frozen CLIP tower, attached by adapter.load(..., clip=...)
        self.tokenizer: Tokenizer | None = None
        self.quantization: str | None = None
        self.base_format: str | None = None  # where the weights came from (set by adapter.load)
        self.base_packing: str | None = None  # how a GPTQ / AWQ / compressed-tensors file packed them
        self.base_family: str | None = None  # "LLaMA" or "Mistral" (set by adapter.load)
        self.adapter_format: str | None = None
        self.base_path: str | None = None  # what adapter.load was given (tiny names resolved), for people to see
        self.adapter_path: str | None = None
        # how the adapter's questions are written (adapter.prompts): what it was trained on, saved with it
        self.prompt_format = "alpaca"
        self.base_prompt_format: str | None = None  # the base folder's chat template's format (adapter.load)
        self._gate_scale = torch.tensor(1.0, device="cpu")
        self._delta_scale = torch.tensor(1.0, device="cpu")
        self._rope: torch.Tensor | None = None
        # True: decode without gradients through stacked projections and one-call norms (the plain path's
        # tokens) at the cost of a second copy of wq|wk|wv and w1|w3 (see adapter.fused). Off by default:
        # bench.decode measured no gain at dim 512 on 2 CPU threads, and the copy is +30 % fp32 memory
        self.fused_inference = False
        self._compiled: Callable[..., torch.Tensor] | None = None
        # the static one-token steps (adapter.static_decode) after a prompt, per value of step's `compile`: made
        # on first use on a GPU; set one to use it on the CPU as well (the tests do, without capture)
        self.static_decoders: dict[bool, StaticDecoder] = {}
        self.packed_for_inference = False  # see pack_for_inference
        # on a GPU, one-token steps replay CUDA graphs without `compile` too (2.8x the plain 7B bf16 step on an
        # H200); not yet for bitsandbytes layers, whose capture is unmeasured
        self.cuda_graphs = True
        self.kv_cache = "auto"  # how new_cache stores keys/values: "auto" (the model's dtype) or "int8"
        # step feeds a longer prompt this many tokens at a time (None: at once): the same keys/values and logits,
        # but the activations of one piece at a time, which at 2048 tokens are more than the KV cache itself
        self.prefill_chunk: int | None = 512
        self.gradient_checkpointing = False  # recompute each block in backward: less memory, more time
        # True: attention runs in float32 even under bf16 autocast. On CPU the flash kernel's bf16 backward
        # is ~6x slower than its fp32 one at adapter-training lengths (~100 tokens), so adapter.finetune sets
        # this on CPU (`python -m bench.attention`: about 2x faster steps); pretraining (256 tokens) gained nothing
        self.fp32_attention = False
        self.freeze_base()

    # ----- parameters -------------------------------------------------------------------------------
    def is_adapter_parameter(self, name: str) -> bool:
        """Everything that is learned; the rest is the frozen base."""
        leaf = name.rsplit(".", 1)[-1]
        return (name.startswith(("adapter_query.", "visual_prompt.")) or leaf in ("gate", "new_gate", "delta")
                or "_delta." in name)

    def freeze_base(self) -> None:
        for name, param in self.named_parameters():
            param.requires_grad_(self.is_adapter_parameter(name))

    def reset_adapter(self, device: torch.device | str | None = None) -> None:
        """(Re)initialise everything learned so that the model computes exactly its base.

        Gates, biases, LoRA up-projections and norm deltas start at zero, `new_gate` and scales at one, prompts and
        LoRA down-projections at random, the visual prompt as its layers initialise themselves. With
        `device`, the tensors are (re)created there in float32, which is how a model built on the `meta`
        device gets real adapter tensors.
        """
        if self.visual_prompt is not None:
            from .visual import build_visual_prompt

            with torch.device(device or self.adapter_query.weight.device):
                self.visual_prompt = build_visual_prompt(self.adapter_args, self.args.dim)
        for name, param in list(self.named_parameters()):
            if not self.is_adapter_parameter(name) or name.startswith("visual_prompt."):
                continue
            if device is not None:
                module_name, _, leaf = name.rpartition(".")
                param = nn.Parameter(torch.empty(param.shape, device=device, dtype=torch.float32))
                setattr(self.get_submodule(module_name), leaf, param)
            with torch.no_grad():
                if name.startswith("adapter_query."):
                    nn.init.normal_(param)
                elif name.endswith(("new_gate", "_delta.scale")):  # multipliers: one is the base's
                    nn.init.ones_(param)
                elif name.endswith("lora_down.weight"):
                    nn.init.kaiming_uniform_(param, a=5 ** 0.5)
                else:
                    nn.init.zeros_(param)

    def load_adapter_state(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Copy learned tensors (model names) in, requiring exactly the model's adapter keys and shapes."""
        expected = {n: p for n, p in self.named_parameters() if self.is_adapter_parameter(n)}
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing:
            raise ValueError(f"{source}: missing adapter tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            raise ValueError(f"{source}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
                             " for this adapter configuration")
        for name, param in expected.items():
            value = tensors[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
            if not value.is_floating_point():
                raise ValueError(f"{source}: {name} has dtype {value.dtype}, expected a floating point tensor")
            with torch.no_grad():
                param.copy_(value)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the learned tensors, under their model names."""
        return {n: p.detach() for n, p in self.named_parameters() if self.is_adapter_parameter(n)}

    def train(self, mode: bool = True) -> Transformer:
        """As nn.Module.train; training also keeps 4-bit layers in a layout with a backward (on CPUs with
        AVX512-BF16, bitsandbytes repacks them for inference: adapter.quantize.training_layout)."""
        if mode:
            from .quantize import training_layout

            training_layout(self)
            self.packed_for_inference = False
        return super().train(mode)

    def pack_for_inference(self) -> None:
        """Before the first inference since loading or training: 4-bit layers repacked as bitsandbytes repacks
        them at their first eval-mode forward on CPUs with AVX512-BF16 (adapter.quantize.pack_for_inference), so
        that the first answer is computed as every later one is. Not with gradients on (an eval-mode forward that
        trains): the repacked layers have no backward."""
        if not self.training and not self.packed_for_inference and not torch.is_grad_enabled():
            from .quantize import pack_for_inference

            pack_for_inference(self)
            self.packed_for_inference = True

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def count_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ----- gate and delta scales ---------------------------------------------------------------------
    def set_gate_scale(self, scale: ScaleLike) -> None:
        """Scale every learned gate: 0 = frozen base, 1 = trained adapter, >1 = exaggerated. As in every call
        that takes a gate scale, one number, one per row, or as fine as one per row and gate (see `step`)."""
        value = _scale_tensor(scale, "gate_scale", max_dims=3).clone()  # the caller's tensor may change later
        if value.dim() > 1:  # a per-layer scale's shape is checked now, not at the next call
            self._gate_for_rows(value, None, torch.device("cpu"))
        self._gate_scale = value

    def set_delta_scale(self, scale: ScaleLike) -> None:
        """Scale the v2 deltas (biases, LoRA, norm deltas): 0 = the base's own linears and norms."""
        self._delta_scale = _scale_tensor(scale, "delta_scale").clone()

    @property
    def gate_scale(self) -> torch.Tensor:
        return self._gate_scale

    @property
    def delta_scale(self) -> torch.Tensor:
        return self._delta_scale

    def effective_gates(self, gate_scale: ScaleLike | None = None) -> torch.Tensor:
        """[prompt_layers, n_heads] gates as applied (after activation, new_gate and the gate scale, which is
        one value or one row of per-layer (per-head) values)."""
        scale = self._gate_for_rows(self._gate_scale if gate_scale is None else gate_scale, 1, torch.device("cpu"))
        gates = [b.attention.effective_gate().flatten() for b in self.layers[self.first_prompt_layer:]]
        if not gates:
            return torch.zeros(0, self.args.n_heads)
        per_gate = scale[:, 0, :, 0, 0] if scale.dim() == 5 else scale.reshape(())
        return torch.stack(gates).detach().float() * per_gate

    # ----- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        *,
        gate_scale: ScaleLike | None = None,
        delta_scale: ScaleLike | None = None,
        visual_prompt: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] of a whole sequence, no cache (training and scoring).

        With `positions` (a bool mask [B, T]), only the logits of those positions, [N, vocab] in row-major
        order: training scores response tokens only, and the vocabulary head is the largest matmul of a
        small model, so it is not run where no loss is taken. With `targets` [N] as well, the summed
        cross-entropy of those positions instead (adapter.head_loss: no [N, vocab] tensors kept).
        """
        h, delta = self._hidden(tokens, gate_scale, delta_scale, visual_prompt, positions, targets)
        if self.output_delta is not None:  # a tuned head: plain logits, which its bias and scale get gradients through
            logits = self._head(h, delta).float()
            logits = logits if positions is None else logits[positions]
            return logits if targets is None else F.cross_entropy(logits, targets, reduction="sum")
        if targets is not None:
            return head_cross_entropy(h[positions], self.output.weight, targets)
        return self.output(h if positions is None else h[positions]).float()

    @torch.no_grad()
    def score(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        targets: torch.Tensor,
        *,
        gate_scale: ScaleLike | None = None,
        delta_scale: ScaleLike | None = None,
        visual_prompt: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For each of `positions` (bool mask [B, T]) in row-major order, the cross-entropy against its target
        [N] and whether the target is the most likely token [N]: what evaluation reports (adapter.evaluate),
        computed as `forward` computes the training loss, without gradients or an [N, vocab] tensor."""
        if targets is None:
            raise ValueError("targets: give the target of every scored position")
        h, delta = self._hidden(tokens, gate_scale, delta_scale, visual_prompt, positions, targets)
        if self.output_delta is not None:
            return logit_scores(self._head(h, delta).float()[positions], targets)
        return head_scores(h[positions], self.output.weight, targets)

    def _hidden(self, tokens: torch.Tensor, gate_scale, delta_scale, visual_prompt, positions,
                targets) -> tuple[torch.Tensor, torch.Tensor]:
        """The final norm's output [B, T, dim] of a whole sequence, no cache, the arguments checked, and the delta
        scale it was computed at ([] or [B, 1, 1])."""
        tokens = self._check_tokens(tokens)
        batch, length = tokens.shape
        if positions is not None and (not isinstance(positions, torch.Tensor) or positions.dtype != torch.bool
                                      or positions.shape != tokens.shape):
            got = f"{tuple(positions.shape)} {positions.dtype}" if isinstance(positions, torch.Tensor) else \
                type(positions).__name__
            raise ValueError(f"positions: expected a bool mask of the tokens' shape {tuple(tokens.shape)}, got {got}")
        if targets is not None and positions is None:
            raise ValueError("targets: give the positions they are the targets of (positions=bool mask)")
        positions = torch.arange(length, device=tokens.device)
        rope = self._rope_slice(positions)
        if self._windowed(length):
            ctx = self._context(batch, rope, gate_scale, delta_scale,
                                attn_mask=self._visible(positions, positions, None)[None, None])
        else:
            ctx = self._context(batch, rope, gate_scale, delta_scale, is_causal=length > 1)
        h = self._run_layers(self.tok_embeddings(tokens), ctx, visual_prompt, cache=None)
        return self.norm(h, ctx.delta_scale), ctx.delta_scale

    def _windowed(self, length: int) -> bool:
        """Whether `length` positions reach past the sliding window (Mistral 7B v0.1's 4096), so that the
        attention needs a mask of the window rather than a plain causal one."""
        window = self.args.sliding_window
        return window is not None and length > window

    def _visible(self, positions: torch.Tensor, keys: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        """Which keys each query may attend to: not later ones, not a row's left padding (`pad` [B]: then
        [B, T, S], else [T, S]), and, with a sliding window W, only the last W positions (j > i - W, as
        mistral-inference and transformers attend)."""
        visible = keys[None, :] <= positions[:, None]
        if self.args.sliding_window is not None:
            visible = visible & (keys[None, :] > positions[:, None] - self.args.sliding_window)
        if pad is not None:
            visible = visible[None] & (keys[None, None, :] >= pad[:, None, None])
        return visible

    def _head(self, h: torch.Tensor, delta_scale: torch.Tensor) -> torch.Tensor:
        """The vocabulary head's logits of the final norm's output, with its delta if it has one."""
        return _linear(self.output, self.output_delta, h, delta_scale)

    def new_cache(
        self,
        batch: int,
        max_len: int | None = None,
        *,
        pad: torch.Tensor | None = None,
        visual_prompt: torch.Tensor | None = None,
        kv_cache: str | None = None,
    ) -> KVCache:
        """A cache for `batch` rows; `pad[b]` = number of left-padding tokens in row b; `kv_cache` ("auto" or
        "int8", see adapter.kv_cache) overrides the model's `kv_cache`."""
        max_len = self.args.max_seq_len if max_len is None else max_len
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch: must be a whole number of rows >= 1, got {batch!r}")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len: must be a whole number of positions >= 1, got {max_len!r}")
        if max_len > self.args.max_seq_len:
            raise ValueError(f"max_len: {max_len} is more than the model's max_seq_len={self.args.max_seq_len}")
        if pad is not None and (not isinstance(pad, torch.Tensor) or pad.shape != (batch,) or pad.is_floating_point()
                                or bool((pad < 0).any()) or bool((pad >= max_len).any())):
            raise ValueError(f"pad: expected a tensor of {batch} whole numbers from 0 to {max_len - 1} (each row's "
                             f"left-padding tokens), got {pad!r:.120}")
        kind = check_kv_cache(self.kv_cache if kv_cache is None else kv_cache)
        embed = self.tok_embeddings.weight
        return KVCache(self.args.n_layers, batch, self.args.kv_heads, max_len, self.args.head_dim,
                       dtype=embed.dtype, device=embed.device, pad=pad, visual_prompt=visual_prompt,
                       int8=kind == "int8")

    def step(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        *,
        gate_scale: ScaleLike | None = None,
        delta_scale: ScaleLike | None = None,
        record: list[torch.Tensor] | None = None,
        compile: bool = False,
    ) -> torch.Tensor:
        """Feed `tokens` [B, T] after what the cache holds; logits [B, vocab] of the last position. More than
        `prefill_chunk` tokens are fed in pieces of that many (unless recording).

        The gate scale (the model's own when not given) is one number, one per row [B], or one per row and
        adapter layer [B|1, L] or per row and gate [B|1, L, H] (`adapter.gate_layers` writes these): 0 silences
        that layer's (head's) prompt, so a scale can let only some layers' prompts speak.

        With `record` (a list), each adapter layer appends the per-token share of its attention output
        that came through the prompt: what the app colours tokens by. Without gradients and with
        `fused_inference` set, the step takes the fused path; with `compile`, one-token steps without
        gradients run through `torch.compile` (see `_compiled_logits`), which takes a while the first time.
        On a GPU, one-token steps after the prompt's run as CUDA graphs (adapter.static_decode): compiled with
        `compile`, and without it where `cuda_graphs` allows; a step that fails to compile or capture warns and
        leaves that decoder for the plain path.
        """
        tokens = self._check_tokens(tokens)
        batch, length = tokens.shape
        start = cache.length
        if batch != cache.batch:
            raise ValueError(f"tokens: batch of {batch} rows does not match the cache's {cache.batch}")
        if start + length > cache.max_len:
            raise ValueError(f"tokens: {start + length} positions do not fit the cache of {cache.max_len}")
        chunk = self.prefill_chunk
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"prefill_chunk: must be a positive number of tokens or None, got {chunk!r}")
        if chunk is not None and length > chunk and record is None:
            for begin in range(0, length, chunk):
                logits = self.step(tokens[:, begin:begin + chunk], cache, gate_scale=gate_scale,
                                   delta_scale=delta_scale, compile=compile)
            return logits
        device = tokens.device
        inference = not torch.is_grad_enabled()
        decoder = None
        if inference and length == 1 and record is None and self._prompts_cached(cache) and \
                not self._windowed(start + length):  # the static steps attend to the whole cache
            decoder = self._static_decoder(compile, device)
        if decoder is not None:
            gate, delta = self._row_scales(batch, gate_scale, delta_scale, torch.device("cpu"))
            try:
                logits = decoder.step(tokens, cache, gate, delta)
            except RuntimeError as error:  # a compiler or a capture that failed: the plain path from now on
                decoder.failure = f"{type(error).__name__}: {error}".strip().splitlines()[0]
                warnings.warn(f"step: the static decode step failed ({decoder.failure}); decoding on the plain path",
                              RuntimeWarning, stacklevel=2)
            else:
                cache.length = start + length
                return logits
        positions = torch.arange(start, start + length, device=device)
        mask, is_causal = None, False
        if cache.pad is None:
            rope = self._rope_slice(positions)
            if length > 1 and start == 0 and not self._windowed(length):
                is_causal = True
            elif length > 1 or self._windowed(start + length):  # a plain one-token step needs no mask
                mask = self._visible(positions, torch.arange(start + length, device=device), None)[None, None]
        else:
            row_positions = (positions[None, :] - cache.pad[:, None]).clamp_min(0)
            rope = self._rope_slice(row_positions)
            keys = torch.arange(start + length, device=device)
            visible = self._visible(positions, keys, cache.pad)
            # a padding query sees itself, so that no row is fully masked (that would give NaN)
            mask = (visible | (keys[None, None, :] == positions[None, :, None]))[:, None]
        fused = inference and self.fused_inference
        if fused and not cache.stacks_checked:  # once per request, as for the prompts' keys/values
            self._refresh_stacks()
            cache.stacks_checked = True
        ctx = self._context(batch, rope, gate_scale, delta_scale, attn_mask=mask, is_causal=is_causal,
                            cache=cache, start=start, fused=fused)
        run = self._last_logits
        if compile and inference and length == 1 and record is None:
            run = self._compiled_logits()
        logits = run(tokens, ctx, cache, record)
        cache.length = start + length
        return logits

    # ----- generation (see adapter.generate) -------------------------------------------------------------
    def generate(self, prompt: str, **kwargs: Any) -> str:
        """The answer to one prompt (fed as given after BOS, or through `template=`)."""
        from .generate import generate

        return generate(self, prompt, **kwargs)

    def stream(self, prompt: str, **kwargs: Any) -> Iterator[str]:
        """Text pieces of the answer as they are decoded."""
        from .generate import stream

        return stream(self, prompt, **kwargs)

    # ----- internals ------------------------------------------------------------------------------------
    def _check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
            got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens: expected a LongTensor [batch, length], got {got}")
        if tokens.shape[1] > self.args.max_seq_len:
            raise ValueError(f"tokens: length {tokens.shape[1]} is more than max_seq_len={self.args.max_seq_len}")
        # (a GPU's one-token decode steps, fed the sampled ids, are not made to wait for a check)
        if tokens.numel() and (tokens.shape[1] > 1 or tokens.device.type == "cpu"):
            vocab_size = self.args.vocab_size
            low, high = torch.stack(torch.aminmax(tokens)).tolist()  # one read back from the device, not two
            if low < 0 or high >= vocab_size:
                row, place = ((tokens < 0) | (tokens >= vocab_size)).nonzero()[0].tolist()
                raise ValueError(f"tokens: token id {tokens[row, place].item()} (row {row}, place {place}) is not in "
                                 f"the vocabulary of {vocab_size}")
        return tokens

    def _rope_slice(self, positions: torch.Tensor) -> torch.Tensor:
        device = positions.device
        if self._rope is None or self._rope.device != device:
            self._rope = rope_table(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device,
                                    self.args.rope_scaling)
        return self._rope[positions]

    def _context(self, batch: int, rope: torch.Tensor, gate_scale, delta_scale, **kwargs: Any) -> StepContext:
        gate, delta = self._row_scales(batch, gate_scale, delta_scale, rope.device)
        return StepContext(rope=rope, gate_scale=gate, delta_scale=delta, fp32_attention=self.fp32_attention,
                           **kwargs)

    def _row_scales(self, batch: int, gate_scale, delta_scale,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate and delta scales of a call (the model's own where not given), checked and shaped to
        broadcast over rows: the gate's as `_gate_for_rows`, the delta's [] or [B, 1, 1] in the model's dtype."""
        gate = self._gate_for_rows(self._gate_scale if gate_scale is None else gate_scale, batch, device)
        delta = _scale_for_rows(self._delta_scale if delta_scale is None else delta_scale, "delta_scale", batch,
                                device, 3, self.tok_embeddings.weight.dtype)
        return gate, delta

    def _gate_for_rows(self, scale: ScaleLike, batch: int | None, device: torch.device) -> torch.Tensor:
        """A gate scale checked for `batch` rows (None: any number) and shaped to broadcast: one value [], one
        per row [B, 1, 1, 1], or one per row and adapter layer ([R, L]) or gate ([R, L, H]), R being 1 or B, as
        [L, R, H|1, 1, 1] float32, which each adapter layer indexes by its `prompt_index`."""
        value = _scale_tensor(scale, "gate_scale", max_dims=3)
        if value.dim() <= 1:
            return _scale_for_rows(value, "gate_scale", batch, device, 4)
        layers, heads = self.args.n_layers - self.first_prompt_layer, self.args.n_heads
        per_gate = (layers,) if value.dim() == 2 else (layers, heads)
        rows = value.shape[0]
        if tuple(value.shape[1:]) != per_gate or (batch is not None and rows not in (1, batch)):
            rows_wanted = "rows" if batch is None else "1 row" if batch == 1 else f"1 or {batch} rows"
            heads_wanted = f" x {heads} heads" if value.dim() == 3 else ""
            raise ValueError(f"gate_scale: shape {tuple(value.shape)} does not fit {rows_wanted} x {layers} adapter "
                             f"layers{heads_wanted}")
        if value.dim() == 2:
            value = value[:, :, None]
        return value.permute(1, 0, 2)[..., None, None].contiguous().to(device)

    def _last_logits(self, tokens: torch.Tensor, ctx: StepContext, cache: KVCache,
                     record: list[torch.Tensor] | None) -> torch.Tensor:
        h = self._run_layers(self.tok_embeddings(tokens), ctx, cache.visual_prompt, cache=cache, record=record)
        return self._head(self.norm(h[:, -1:], ctx.delta_scale, ctx.fused), ctx.delta_scale).float()[:, 0]

    def _compiled_logits(self) -> Callable[..., torch.Tensor]:
        """`_last_logits` through torch.compile, made on first use and kept.

        Shapes are dynamic and the scales are tensor inputs, so later positions, other requests and other
        slider values reuse the compiled graph; another batch size, one scale per row where there was one
        value, or left padding compiles again (a few times at most: torch then makes the changed sizes dynamic).
        """
        if self._compiled is None:
            row_major(self)  # its reductions read row-major weights fastest (see frozen_linear)
            self._compiled = torch.compile(self._last_logits, dynamic=True)
        return self._compiled

    def _static_decoder(self, compile: bool, device: torch.device) -> StaticDecoder | None:
        """The static step for `compile` (made on first use on a GPU: always with `compile`, and for a model
        without bitsandbytes layers with `cuda_graphs`), or None for the plain path."""
        decoder = self.static_decoders.get(compile)
        if decoder is None and device.type == "cuda" and (compile or (self.cuda_graphs and self.quantization is None)):
            decoder = self.static_decoders[compile] = StaticDecoder(self, compile=compile)
        return None if decoder is None or decoder.failure else decoder

    def _prompts_cached(self, cache: KVCache) -> bool:
        """Whether the cache holds something (a prompt was fed) and every prompt layer's keys/values."""
        prompt_layers = self.args.n_layers - self.first_prompt_layer if self.adapter_query is not None else 0
        return cache.length > 0 and len(cache.prompt_kv) == prompt_layers

    def _refresh_stacks(self) -> None:
        for block in self.layers:
            block.attention.qkv_stack.refresh(block.attention)
            block.feed_forward.w13_stack.refresh(block.feed_forward)

    def _prompts(self, visual_prompt: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """[prompt_layers, B|1, K, dim] adaption prompts, with the visual prompt added when given."""
        a = self.adapter_args
        prompts = self.adapter_query.weight.view(a.prompt_layers, 1, a.prompt_len, self.args.dim)
        if visual_prompt is not None:
            prompts = prompts + visual_prompt.unsqueeze(0)
        return prompts.to(dtype)

    def _run_layers(self, h: torch.Tensor, ctx: StepContext, visual_prompt, cache: KVCache | None,
                    record: list[torch.Tensor] | None = None) -> torch.Tensor:
        self.pack_for_inference()
        prompts = None
        reuse = cache is not None and not torch.is_grad_enabled()
        if self.adapter_query is not None and not (reuse and cache.prompt_kv):
            prompts = self._prompts(visual_prompt, h.dtype)
        for i, layer in enumerate(self.layers):
            prompt_kv = None
            if i >= self.first_prompt_layer:
                if reuse and i in cache.prompt_kv:
                    prompt_kv = cache.prompt_kv[i]
                else:
                    prompt_kv = layer.attention.prompt_kv(prompts[i - self.first_prompt_layer], ctx.delta_scale)
                    if reuse:
                        cache.prompt_kv[i] = prompt_kv
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, ctx, prompt_kv, record, use_reentrant=False)
            else:
                h = layer(h, ctx, prompt_kv, record)
        return h


def _scale_tensor(scale: ScaleLike, name: str, max_dims: int = 1) -> torch.Tensor:
    if isinstance(scale, bool) or (isinstance(scale, torch.Tensor) and (scale.dtype == torch.bool or
                                                                          scale.is_complex())):
        raise ValueError(f"{name}: expected a number or one number per row, got {scale!r}")
    try:
        value = torch.as_tensor(scale, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name}: expected a number or one number per row, got {scale!r}") from error
    if value.dim() > max_dims:
        kinds = "a number or a 1-D list of one per row"
        if max_dims > 1:
            kinds = "a number, one per row, [rows, adapter layers] or [rows, adapter layers, heads]"
        raise ValueError(f"{name}: expected {kinds}, got shape {tuple(value.shape)}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name}: must be finite, got {scale!r}")
    return value


def _scale_for_rows(scale: ScaleLike, name: str, batch: int, device: torch.device, ndim: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A scalar tensor, or [B, 1, ...] with `ndim` dims so that it broadcasts over one row each."""
    value = _scale_tensor(scale, name)
    if value.dim() == 1:
        if value.numel() != batch:
            raise ValueError(f"{name}: {value.numel()} values given for a batch of {batch} rows")
        value = value.view(batch, *([1] * (ndim - 1)))
    return value.to(device=device, dtype=dtype)
