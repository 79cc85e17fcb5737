"""The training path's operations written out one by one, as the model ran them before it had a fused
inference path (stacked projections, one-call norms, compiled steps).

`Transformer.forward` with gradients must give exactly these floats, and their gradients (torch.equal, not
close): then adapters and tiny models trained before and after the inference work are bit-for-bit the same.
Unlike `tests.reference` (the official formulas, equal only up to rounding), this follows our own operation
order, so any change of the training computation, however small, shows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapter.model import Transformer


def _norm(module, x, s_d):
    normed = x.float()
    normed = (normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + module.eps)).type_as(x)
    weight = module.weight
    if module.delta is not None:
        weight = weight + s_d * module.delta
    return normed * weight.to(x.dtype)


def _linear(layer, delta, x, s_d):
    out = F.linear(x, layer.weight)
    if delta is None:
        return out
    extra = None
    if delta.lora_down is not None:
        extra = F.linear(F.linear(x, delta.lora_down.weight.to(x.dtype)), delta.lora_up.weight.to(x.dtype))
    if delta.bias is not None:
        bias = delta.bias.to(x.dtype)
        extra = bias if extra is None else extra + bias
    return out + s_d * extra


def _rope_table(head_dim, max_len, theta):
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def _rope(x, rope):
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rope.unsqueeze(-2)).flatten(-2).type_as(x)


def unfused_logits(model: Transformer, tokens: torch.Tensor, gate_scale: float = 1.0,
                   delta_scale: float = 1.0) -> torch.Tensor:
    """Logits [B, T, vocab] of `tokens`, computed from the model's own tensors (CPU, no cache)."""
    args, adapter = model.args, model.adapter_args
    batch, length = tokens.shape
    heads, kv_heads, head_dim = args.n_heads, args.kv_heads, args.head_dim
    s_g = torch.tensor(gate_scale, dtype=torch.float32)
    s_d = torch.tensor(delta_scale, dtype=model.tok_embeddings.weight.dtype)
    rope = _rope_table(head_dim, args.max_seq_len, args.rope_theta)[torch.arange(length)]
    h = model.tok_embeddings(tokens)
    prompts = None
    if model.adapter_query is not None:
        prompts = model.adapter_query.weight.view(adapter.prompt_layers, 1, adapter.prompt_len, args.dim).to(h.dtype)
    for i, block in enumerate(model.layers):
        a, f = block.attention, block.feed_forward
        x = _norm(block.attention_norm, h, s_d)
        q = _linear(a.wq, a.wq_delta, x, s_d).view(batch, length, heads, head_dim)
        k = _linear(a.wk, a.wk_delta, x, s_d).view(batch, length, kv_heads, head_dim)
        v = _linear(a.wv, a.wv_delta, x, s_d).view(batch, length, kv_heads, head_dim)
        q = _rope(q, rope).transpose(1, 2)
        k = _rope(k, rope).transpose(1, 2)
        v = v.transpose(1, 2)
        gqa = kv_heads != heads
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=length > 1, enable_gqa=gqa)
        if i >= model.first_prompt_layer:
            prompt = prompts[i - model.first_prompt_layer]
            pk = F.linear(prompt, a.wk.weight).view(1, -1, kv_heads, head_dim).transpose(1, 2)
            pv = F.linear(prompt, a.wv.weight).view(1, -1, kv_heads, head_dim).transpose(1, 2)
            if batch != 1:
                pk, pv = pk.expand(batch, -1, -1, -1), pv.expand(batch, -1, -1, -1)
            prompt_out = F.scaled_dot_product_attention(q, pk, pv, enable_gqa=gqa)
            gate = a.gate.tanh() if a.gate_activation == "tanh" else a.gate
            if a.new_gate is not None:
                gate = gate * a.new_gate
            out = out + (s_g * gate).to(prompt_out.dtype) * prompt_out
        out = out.transpose(1, 2).reshape(batch, length, heads * head_dim)
        h = h + _linear(a.wo, a.wo_delta, out, s_d)
        x = _norm(block.ffn_norm, h, s_d)
        gated = F.silu(_linear(f.w1, f.w1_delta, x, s_d)) * _linear(f.w3, f.w3_delta, x, s_d)
        h = h + _linear(f.w2, f.w2_delta, gated, s_d)
    return F.linear(_norm(model.norm, h, s_d), model.output.weight).float()
