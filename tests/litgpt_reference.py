"""litgpt's adapter / adapter v2 forward, written out plainly to check our reading of its files against.

It follows litgpt's structure (litgpt/model.py, adapter.py, adapter_v2.py), not ours: the base is converted to
litgpt's layout (HF's rotate-half q/k rows, one fused q|k|v weight: all queries, keys, values from 0.5.5 on,
interleaved per query group before), RoPE rotates halves, every linear is `s * (Wx + b)` with the file's
adapter_bias / adapter_scale when it has them, and the adapter prompt goes through the fused linear and is read
with litgpt's `view(1, aT, n_query_groups, q_per_kv + 2, head_size)`, whatever the layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapter.formats.hf import meta_to_hf_rows
from adapter.model import Transformer


def fused_qkv(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, heads: int, groups: int,
              interleaved: bool) -> torch.Tensor:
    """litgpt's q|k|v rows from Meta-layout weights (or vectors): rotate-half q/k rows; per query group
    [its queries, key, value] when `interleaved` (up to 0.5.4), else all queries, keys, values."""
    q, k = meta_to_hf_rows(wq, heads), meta_to_hf_rows(wk, groups)
    if not interleaved:
        return torch.cat([q, k, wv])
    per_group, head_dim = heads // groups, q.shape[0] // heads
    parts = []
    for g in range(groups):
        parts += [q[g * per_group * head_dim:(g + 1) * per_group * head_dim], k[g * head_dim:(g + 1) * head_dim],
                  wv[g * head_dim:(g + 1) * head_dim]]
    return torch.cat(parts)


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE of [B, heads, T, D]."""
    d, t = x.shape[-1], x.shape[-2]
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
    angles = torch.outer(torch.arange(t).float(), freqs).repeat(1, 2)
    half = torch.cat([-x[..., d // 2:], x[..., :d // 2]], dim=-1)
    return x * angles.cos() + half * angles.sin()


def litgpt_logits(base: Transformer, adapter_state: dict[str, torch.Tensor], tokens: torch.Tensor,
                  interleaved: bool) -> torch.Tensor:
    """Logits [B, T, vocab] of `base`'s weights with a litgpt adapter (v1 or v2) state dict, as litgpt computes
    them (`interleaved`: litgpt 0.5.4's fused q|k|v layout, else 0.5.5+'s)."""
    sd = {k: v.detach().float() for k, v in base.state_dict().items()}
    ad = {k: v.float() for k, v in adapter_state.items()}
    args = base.args
    heads, groups, hs = args.n_heads, args.kv_heads, args.head_dim
    per_group = heads // groups
    qkv_name = "attn.attn" if interleaved else "attn.qkv"

    def linear(x, weight, prefix):  # AdapterV2Linear: s * (Wx + b), or a plain linear without them
        y = x @ weight.T
        if f"{prefix}.adapter_bias" in ad:
            y = ad[f"{prefix}.adapter_scale"] * (y + ad[f"{prefix}.adapter_bias"])
        return y

    def rms(x, key, base_key):
        w = ad.get(key, sd[base_key])
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + args.norm_eps) * w

    x = sd["tok_embeddings.weight"][tokens]
    b, t, _ = x.shape
    for n in range(args.n_layers):
        p, lp = f"layers.{n}.", f"transformer.h.{n}."
        w_qkv = fused_qkv(sd[p + "attention.wq.weight"], sd[p + "attention.wk.weight"],
                          sd[p + "attention.wv.weight"], heads, groups, interleaved)
        h = rms(x, lp + "norm_1.weight", p + "attention_norm.weight")
        qkv = linear(h, w_qkv, lp + qkv_name)
        if interleaved:
            grouped = qkv.view(b, t, groups, per_group + 2, hs)
            q = grouped[:, :, :, :per_group].reshape(b, t, heads, hs)
            k, v = grouped[:, :, :, per_group], grouped[:, :, :, per_group + 1]
        else:
            q, k, v = qkv.split((heads * hs, groups * hs, groups * hs), dim=-1)
            q, k, v = q.view(b, t, heads, hs), k.view(b, t, groups, hs), v.view(b, t, groups, hs)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = _rope(q, args.rope_theta), _rope(k, args.rope_theta)
        k, v = k.repeat_interleave(per_group, dim=1), v.repeat_interleave(per_group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if lp + "attn.adapter_wte.weight" in ad:
            prefix = ad[lp + "attn.adapter_wte.weight"][None]
            a_len = prefix.shape[1]
            aqkv = linear(prefix, w_qkv, lp + qkv_name).view(1, a_len, groups, per_group + 2, hs)
            _, ak, av = aqkv.permute(0, 2, 3, 1, 4).split((per_group, 1, 1), dim=2)
            ak = ak.repeat_interleave(per_group, dim=2).reshape(1, heads, a_len, hs)
            av = av.repeat_interleave(per_group, dim=2).reshape(1, heads, a_len, hs)
            ay = F.scaled_dot_product_attention(q, ak, av)
            y = y + ad[lp + "attn.gating_factor"].reshape(1, heads, 1, 1) * ay
        y = y.transpose(1, 2).reshape(b, t, heads * hs)
        x = x + linear(y, sd[p + "attention.wo.weight"], lp + "attn.proj")
        h = rms(x, lp + "norm_2.weight", p + "ffn_norm.weight")
        up = F.silu(linear(h, sd[p + "feed_forward.w1.weight"], lp + "mlp.fc_1"))
        up = up * linear(h, sd[p + "feed_forward.w3.weight"], lp + "mlp.fc_2")
        x = x + linear(up, sd[p + "feed_forward.w2.weight"], lp + "mlp.proj")
    x = rms(x, "transformer.ln_f.weight", "norm.weight")
    return linear(x, sd["output.weight"], "lm_head")
