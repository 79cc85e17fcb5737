"""An independent, deliberately plain implementation of the official formulas, to check the model against.

It follows the structure of Meta's LLaMA and the official LLaMA-Adapter code: complex-number RoPE,
explicit score matrices with an additive -inf mask, float32 softmax, the adaption prompt attended with its
own softmax and multiplied by tanh(gate) (or the raw gate) and new_gate, prompts taken from
`adapter_query.weight.reshape(layers, len, dim)` for `layers[-prompt_layers:]`, LoRA as l2(l1(x)), a v2
linear as `W(x * scale) + bias` (the official V2 dialog code's forward_linear_with_scale_and_bias).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from adapter.model import Transformer


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x, positions, theta):
    d = x.shape[-1]
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    freqs_cis = torch.polar(torch.ones(len(positions), d // 2), torch.outer(positions.float(), freqs))
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)


def reference_logits(model: Transformer, tokens: torch.Tensor, gate_scale: float = 1.0,
                     delta_scale: float = 1.0) -> torch.Tensor:
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    args, adapter = model.args, model.adapter_args
    hd, nh, nkv = args.head_dim, args.n_heads, args.kv_heads
    bsz, seqlen = tokens.shape

    def norm(prefix, x):
        w = sd[prefix + ".weight"]
        if prefix + ".delta" in sd:
            w = w + delta_scale * sd[prefix + ".delta"]
        return _rms(x, w, args.norm_eps)

    def linear(prefix, name, x):
        delta = f"{prefix}.{name}_delta"
        if delta + ".scale" in sd:  # the V2 paper's W(s * x) + b, blended toward x by the delta scale
            y = (x * (1 + delta_scale * (sd[delta + ".scale"] - 1))) @ sd[f"{prefix}.{name}.weight"].T
        else:
            y = x @ sd[f"{prefix}.{name}.weight"].T
        extra = 0
        if delta + ".bias" in sd:
            extra = extra + sd[delta + ".bias"]
        if delta + ".lora_down.weight" in sd:
            extra = extra + (x @ sd[delta + ".lora_down.weight"].T) @ sd[delta + ".lora_up.weight"].T
        return y + delta_scale * extra

    positions = torch.arange(seqlen)
    mask = torch.triu(torch.full((seqlen, seqlen), float("-inf")), diagonal=1)
    h = sd["tok_embeddings.weight"][tokens]
    prompts = None
    if adapter.has_prompts:
        prompts = sd["adapter_query.weight"].reshape(adapter.prompt_layers, adapter.prompt_len, args.dim)
    for i in range(args.n_layers):
        p = f"layers.{i}"
        x = norm(f"{p}.attention_norm", h)
        q = linear(f"{p}.attention", "wq", x).view(bsz, seqlen, nh, hd)
        k = linear(f"{p}.attention", "wk", x).view(bsz, seqlen, nkv, hd)
        v = linear(f"{p}.attention", "wv", x).view(bsz, seqlen, nkv, hd)
        q, k = _rope(q, positions, args.rope_theta), _rope(k, positions, args.rope_theta)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        scores = q @ k.transpose(2, 3) / math.sqrt(hd) + mask
        out = F.softmax(scores.float(), dim=-1) @ v
        prompt_index = i - (args.n_layers - adapter.prompt_layers)
        if prompts is not None and prompt_index >= 0:
            prompt = prompts[prompt_index]
            pk = (prompt @ sd[f"{p}.attention.wk.weight"].T).view(1, -1, nkv, hd).transpose(1, 2)
            pv = (prompt @ sd[f"{p}.attention.wv.weight"].T).view(1, -1, nkv, hd).transpose(1, 2)
            pk, pv = pk.repeat_interleave(nh // nkv, 1), pv.repeat_interleave(nh // nkv, 1)
            gate = sd[f"{p}.attention.gate"]
            gate = gate.tanh() if adapter.gate_activation == "tanh" else gate
            if f"{p}.attention.new_gate" in sd:
                gate = sd[f"{p}.attention.new_gate"] * gate
            prompt_scores = gate_scale * gate * F.softmax((q @ pk.transpose(2, 3) / math.sqrt(hd)).float(), dim=-1)
            out = out + prompt_scores @ pv
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)
        h = h + linear(f"{p}.attention", "wo", out)
        x = norm(f"{p}.ffn_norm", h)
        gated = F.silu(linear(f"{p}.feed_forward", "w1", x)) * linear(f"{p}.feed_forward", "w3", x)
        h = h + linear(f"{p}.feed_forward", "w2", gated)
    return norm("norm", h) @ sd["output.weight"].T
