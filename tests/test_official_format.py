"""The official LLaMA-Adapter release layouts (v1 flat dict, v2 {'model', 'config'}), fabricated at tiny sizes
with the real key names, loaded and checked against the plain reference implementation."""

from __future__ import annotations

import pytest
import torch

import adapter
from adapter.config import LORA_TARGETS, AdapterArgs
from adapter.formats.official import write_official_v1
from adapter.inspect import describe
from tests.conftest import TINY
from tests.reference import reference_logits

TOKENS = torch.tensor([[1, 45, 300, 7, 99, 12, 5], [1, 3, 8, 200, 41, 17, 66]])
N, H, DIM = TINY.n_layers, TINY.n_heads, TINY.dim


def rand(*shape, seed=[0]):
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0]))


def seeded_noise(seed):
    generator = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=generator)


def logits(model):
    with torch.no_grad():
        return model(TOKENS)


def write_v1(path, prompt_len=3, prompt_layers=2, old_gates=False):
    """Like llama_adapter_len10_layer30_release.pth: gates saved for every layer, prompts for the top ones."""
    state = {"adapter_query.weight": rand(prompt_len * prompt_layers, DIM)}
    for layer in range(N):
        state[f"layers.{layer}.attention.gate"] = rand(1) if old_gates else rand(1, H, 1, 1)
    torch.save(state, path)
    return state


def test_official_v1_release_loads_with_raw_gates_on_the_top_layers(base_folder, tmp_path):
    path = tmp_path / "llama_adapter_len3_layer2_release.pth"
    state = write_v1(path)
    model = adapter.load(base_folder, adapter=path, device="cpu")
    assert model.adapter_args == AdapterArgs(prompt_len=3, prompt_layers=2, gate_activation="raw")
    assert model.adapter_format == "official-v1"
    for layer in (2, 3):
        assert torch.equal(model.layers[layer].attention.gate, state[f"layers.{layer}.attention.gate"])
    assert model.layers[0].attention.gate is None, "gates of layers without a prompt are unused"
    torch.testing.assert_close(logits(model), reference_logits(model, TOKENS), atol=2e-4, rtol=1e-4)
    assert not torch.allclose(logits(model), logits(adapter.load(base_folder, device="cpu")), atol=1e-3)


def test_older_v1_files_with_one_gate_value_share_it_across_heads(base_folder, tmp_path):
    path = tmp_path / "llama_adapter_len3_layer2_release.pth"
    state = write_v1(path, old_gates=True)
    model = adapter.load(base_folder, adapter=path, device="cpu")
    gate = model.layers[3].attention.gate
    assert gate.shape == (1, H, 1, 1) and torch.all(gate == state["layers.3.attention.gate"])


VISUAL = dict(visual="v2", clip_dim=24, visual_dim=32, visual_depth=2, visual_heads=16, visual_mlp_ratio=2.0,
              channel_order="bgr", clip_model="ViT-L-14-quickgelu")


def official_visual_state(prompt_len=3) -> dict:
    """The visual keys of a v2 release at tiny size (random values, the official names and shapes)."""
    from adapter.visual import VisualPromptV2

    noise = seeded_noise(7)
    module = VisualPromptV2(AdapterArgs(prompt_len=prompt_len, prompt_layers=1, **VISUAL), DIM)
    return {k: noise(*v.shape) * 0.2 for k, v in module.state_dict().items()}


def v2_state(base_folder, lora_rank=0, new_gate=False, prompt_len=3):
    """BIAS-7B / LORA-BIAS-7B(-v21) layout at tiny size: every layer's gate, biases, tuned norms (+ LoRA)."""
    base = torch.load(base_folder / "consolidated.00.pth", weights_only=True)
    noise = seeded_noise(11)  # the same file whatever ran before
    hidden = TINY.ffn_hidden_dim
    model = {"adapter_query.weight": noise((N - 1) * prompt_len, DIM), "llama.norm.weight": base["norm.weight"] + noise(DIM) * 0.1}
    for layer in range(N):
        p = f"llama.layers.{layer}."
        model[p + "attention.gate"] = noise(1, H, 1, 1)
        model[p + "attention.wq.bias"], model[p + "attention.wo.bias"] = noise(DIM) * 0.1, noise(DIM) * 0.1
        for w, size in (("w1", hidden), ("w2", DIM), ("w3", hidden)):
            model[p + f"feed_forward.{w}.bias"] = noise(size) * 0.1
        for norm in ("attention_norm", "ffn_norm"):
            model[p + f"{norm}.weight"] = base[f"layers.{layer}.{norm}.weight"] + noise(DIM) * 0.1
        if lora_rank:
            for w in "qkvo":
                model[p + f"attention.lora_w{w}_l1.weight"] = noise(lora_rank, DIM) * 0.1
                model[p + f"attention.lora_w{w}_l2.weight"] = noise(DIM, lora_rank) * 0.1
            for w, (i, o) in {"1": (DIM, hidden), "2": (hidden, DIM), "3": (DIM, hidden)}.items():
                model[p + f"feed_forward.lora_w{w}_l1.weight"] = noise(lora_rank, i) * 0.1
                model[p + f"feed_forward.lora_w{w}_l2.weight"] = noise(o, lora_rank) * 0.1
        if new_gate:
            model[p + "attention.new_gate"] = 1 + noise(1, 1, 1, 1) * 0.2
    model.update(official_visual_state(prompt_len))
    config = {"w_bias": True, "w_lora": bool(lora_rank), "lora_rank": lora_rank or 16}
    return {"model": model, "config": config}


@pytest.mark.parametrize("name, lora_rank, new_gate", [("BIAS-7B", 0, False), ("LORA-BIAS-7B", 4, False),
                                                       ("LORA-BIAS-7B-v21", 4, True)])
def test_official_v2_layouts_load_every_language_key(base_folder, tmp_path, name, lora_rank, new_gate):
    state = v2_state(base_folder, lora_rank, new_gate)
    path = tmp_path / f"7fa55208379faf2dd862565284101b0e_{name}.pth"
    torch.save(state, path)
    found = adapter.formats.read_adapter(path)
    model = adapter.load(base_folder, adapter=path, device="cpu")
    assert model.adapter_args == AdapterArgs(prompt_len=3, prompt_layers=N - 1, gate_activation="tanh", bias=True,
                                             norm=True, lora_rank=lora_rank, new_gate=new_gate, **VISUAL)
    m = state["model"]
    block = model.layers[2]
    torch.testing.assert_close(block.attention_norm.weight + block.attention_norm.delta,
                               m["llama.layers.2.attention_norm.weight"])
    torch.testing.assert_close(model.norm.weight + model.norm.delta, m["llama.norm.weight"])
    assert torch.equal(block.feed_forward.w2_delta.bias, m["llama.layers.2.feed_forward.w2.bias"])
    if lora_rank:
        assert torch.equal(block.attention.wk_delta.lora_up.weight, m["llama.layers.2.attention.lora_wk_l2.weight"])
        assert torch.equal(model.layers[0].feed_forward.w3_delta.lora_down.weight,
                           m["llama.layers.0.feed_forward.lora_w3_l1.weight"])
    assert model.layers[0].attention.gate is None and model.layers[1].attention.gate is not None
    visual = {k for k in m if not k.startswith(("llama.", "adapter_query"))}
    assert {k for k in found.tensors if k.startswith("visual_prompt.")} == {"visual_prompt." + k for k in visual}
    assert torch.equal(model.visual_prompt.visual_blocks[1].mlp.fc2.weight, m["visual_blocks.1.mlp.fc2.weight"])
    torch.testing.assert_close(logits(model), reference_logits(model, TOKENS), atol=2e-4, rtol=1e-4)
    with torch.no_grad():
        base = adapter.load(base_folder, device="cpu")
        assert torch.equal(model(TOKENS, gate_scale=0.0, delta_scale=0.0), base(TOKENS))


def dialog_state(base_folder) -> dict:
    """llama_adapter_v2_chat65b's layout at tiny size ("bias, scale, norm" tuning, no prompts): every linear's
    bias [out] and input scale [in], unprefixed, and the tuned norms."""
    base = torch.load(base_folder / "consolidated.00.pth", weights_only=True)
    noise = seeded_noise(13)
    hidden = TINY.ffn_hidden_dim
    sizes = {"wq": (DIM, DIM), "wk": (DIM, DIM), "wv": (DIM, DIM), "wo": (DIM, DIM), "w1": (DIM, hidden),
             "w2": (hidden, DIM), "w3": (DIM, hidden)}  # (in, out)
    model = {"norm.weight": base["norm.weight"] + noise(DIM) * 0.1}
    for layer in range(N):
        for w, (inputs, outputs) in sizes.items():
            parent = "attention" if w[1] in "qkvo" else "feed_forward"
            model[f"layers.{layer}.{parent}.{w}_bias"] = noise(outputs) * 0.1
            model[f"layers.{layer}.{parent}.{w}_scale"] = 1 + noise(inputs) * 0.1
        for norm in ("attention_norm", "ffn_norm"):
            model[f"layers.{layer}.{norm}.weight"] = base[f"layers.{layer}.{norm}.weight"] + noise(DIM) * 0.1
    return {"model": model}


def official_dialog_logits(base_folder, state: dict) -> torch.Tensor:
    """The official V2 dialog forward, written out: forward_linear_with_scale_and_bias is `W(x * scale) + bias`."""
    from tests.reference import _rms, _rope

    sd = {**torch.load(base_folder / "consolidated.00.pth", weights_only=True), **state["model"]}
    sd = {k: v.float() for k, v in sd.items()}

    def linear(prefix, name, x):
        return (x * sd[f"{prefix}.{name}_scale"]) @ sd[f"{prefix}.{name}.weight"].T + sd[f"{prefix}.{name}_bias"]

    bsz, seqlen = TOKENS.shape
    hd = DIM // H
    mask = torch.triu(torch.full((seqlen, seqlen), float("-inf")), diagonal=1)
    h = sd["tok_embeddings.weight"][TOKENS]
    for i in range(N):
        p = f"layers.{i}"
        x = _rms(h, sd[f"{p}.attention_norm.weight"], TINY.norm_eps)
        q, k, v = (linear(f"{p}.attention", w, x).view(bsz, seqlen, H, hd) for w in ("wq", "wk", "wv"))
        q, k = _rope(q, torch.arange(seqlen), TINY.rope_theta), _rope(k, torch.arange(seqlen), TINY.rope_theta)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = torch.softmax(q @ k.transpose(2, 3) / hd ** 0.5 + mask, dim=-1)
        h = h + linear(f"{p}.attention", "wo", (scores @ v).transpose(1, 2).reshape(bsz, seqlen, DIM))
        x = _rms(h, sd[f"{p}.ffn_norm.weight"], TINY.norm_eps)
        gated = torch.nn.functional.silu(linear(f"{p}.feed_forward", "w1", x)) * linear(f"{p}.feed_forward", "w3", x)
        h = h + linear(f"{p}.feed_forward", "w2", gated)
    return _rms(h, sd["norm.weight"], TINY.norm_eps) @ sd["output.weight"].T


def test_the_official_v2_dialog_layout_loads_with_the_official_logits(base_folder, tmp_path):
    state = dialog_state(base_folder)
    path = tmp_path / "llama65b_v2_chat.pth"
    torch.save(state, path)
    model = adapter.load(base_folder, adapter=path, device="cpu")
    assert (model.adapter_format, model.prompt_format) == ("official-v2-dialog", "v2-dialog")
    assert model.adapter_query is None
    assert model.adapter_args == AdapterArgs(prompt_len=0, prompt_layers=0, bias=True, bias_targets=LORA_TARGETS,
                                             scale=True, norm=True)
    m = state["model"]
    assert torch.equal(model.layers[2].attention.wk_delta.scale, m["layers.2.attention.wk_scale"])
    assert torch.equal(model.layers[2].feed_forward.w2_delta.bias, m["layers.2.feed_forward.w2_bias"])
    torch.testing.assert_close(logits(model), official_dialog_logits(base_folder, state), atol=2e-4, rtol=1e-4)
    with torch.no_grad():
        half = model(TOKENS, delta_scale=0.5)
        assert torch.equal(model(TOKENS, delta_scale=0.0), adapter.load(base_folder, device="cpu")(TOKENS))
    torch.testing.assert_close(half, reference_logits(model, TOKENS, delta_scale=0.5), atol=2e-4, rtol=1e-4)
    about = describe(path)
    assert about[0] == f"{path}: adapter, official-v2-dialog format" and "  v2 parts: bias, scale, norm" in about
    assert "  prompts: none (no gates: the delta scale is its only slider)" in about
    partial = {"model": {k: v for k, v in m.items() if not k.endswith("wv_scale")}}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial.pth: input scales on \[.*\] only; the model scales all of "
                                         "wq, wk, wv, wo, w1, w2, w3"):
        adapter.load(base_folder, adapter=tmp_path / "partial.pth", device="cpu")
    torch.save({"model": {**m, "layers.0.attention.wx_bias": rand(DIM)}}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="odd.pth: unexpected key layers.0.attention.wx_bias for an official v2 "
                                         "dialog adapter"):
        adapter.load(base_folder, adapter=tmp_path / "odd.pth", device="cpu")


@pytest.mark.parametrize("key, message", [
    ("llama.layers.3.attention.new_gate",
     r"llama.layers.3.attention.new_gate has shape \(2,\); a new gate is one value"),
    ("visual_query.weight", r"visual_query.weight has shape \(2,\), expected a matrix"),
    ("llama.layers.3.attention.lora_wq_l1.weight", r"llama.layers.3.attention.lora_wq_l1.weight has shape \(2,\), "
                                                   "expected a matrix"),
    ("visual_blocks.0.mlp.fc1.weight", r"visual_blocks.0.mlp.fc1.weight has shape \(2,\), expected a matrix"),
])
def test_official_v2_tensors_the_reader_takes_shapes_from_are_checked_first(base_folder, tmp_path, key, message):
    """Each was a RuntimeError or IndexError from inside torch."""
    state = v2_state(base_folder, lora_rank=2, new_gate=True)
    state["model"][key] = torch.ones(2)
    torch.save(state, tmp_path / "LORA-BIAS-7B-v21.pth")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'LORA-BIAS-7B-v21.pth'}: {message}$"):
        adapter.load(base_folder, adapter=tmp_path / "LORA-BIAS-7B-v21.pth", device="cpu")


def test_round_trip_native_official_v1_native(base_folder, tmp_path):
    model = adapter.load(base_folder, adapter=AdapterArgs(prompt_len=3, prompt_layers=3), device="cpu")
    with torch.no_grad():
        for _, param in model.trainable_parameters():
            param.copy_(rand(*param.shape))
    path = write_official_v1(model, tmp_path / "llama_adapter_len3_layer3_release.pth")
    official = adapter.load(base_folder, adapter=path, device="cpu")
    assert official.adapter_args.gate_activation == "raw"
    assert torch.equal(logits(official), logits(model))
    adapter.save_adapter(official, tmp_path / "native")
    assert torch.equal(logits(adapter.load(base_folder, adapter=tmp_path / "native", device="cpu")), logits(model))


@pytest.mark.parametrize("prompt_len, name, reads_as", [
    (1, "adapter_len10.pth", 10),  # "len1" is in the name, but it reads as 10
    (5, "adapter.pth", 10),  # no length in the name: the official 10
    (10, "adapter_len5.pth", 5),  # the default was never checked
])
def test_an_official_v1_file_whose_name_reads_as_another_prompt_length_is_refused(base_folder, tmp_path, prompt_len,
                                                                                  name, reads_as):
    model = adapter.load(base_folder, adapter=AdapterArgs(prompt_len=prompt_len, prompt_layers=1), device="cpu")
    with pytest.raises(ValueError, match=f"and this name reads as {reads_as}, the adapter's is {prompt_len}; name it "
                                         f"like llama_adapter_len{prompt_len}_layer1.pth$"):
        write_official_v1(model, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_v2_adapters_cannot_be_written_as_official_v1(base_folder, tmp_path):
    model = adapter.load(base_folder, adapter=AdapterArgs(prompt_len=3, prompt_layers=2, bias=True), device="cpu")
    with pytest.raises(ValueError, match="holds only prompts and gates; this adapter has bias"):
        write_official_v1(model, tmp_path / "out.pth")
    assert list(tmp_path.iterdir()) == []


class Payload:
    """Stands for pickled code."""


def test_bad_official_files_get_clear_errors(base_folder, tmp_path):
    def refused(state, message, name="adapter.pth"):
        path = tmp_path / name
        torch.save(state, path)
        with pytest.raises(ValueError, match=message) as error:
            adapter.load(base_folder, adapter=path, device="cpu")
        assert str(path) in str(error.value)

    good = {"adapter_query.weight": rand(10, DIM), **{f"layers.{i}.attention.gate": rand(1, H, 1, 1) for i in range(N)}}
    refused({**good, "layers.0.attention.wq.weight": rand(2)}, "unexpected key.*wq.weight")
    refused({**good, "adapter_query.weight": rand(7, DIM)}, "7 rows, not a multiple of the prompt length 10")
    refused({**good, "adapter_query.weight": rand(10, 128)}, "different base: dim=128")
    refused({k: v for k, v in good.items() if k != "layers.3.attention.gate"} | {"layers.2.attention.gate": rand(1)},
            "missing layers.3.attention.gate|different base: n_layers=3")
    refused({**good, "payload": Payload()}, "not a readable weights-only torch checkpoint")
    refused({"something": rand(2)}, "unknown adapter format")
    refused(good, r"its name says a prompt length of 0 \(len0\)", "llama_adapter_len0_layer30.pth")
    refused({**good, "layers.3.attention.gate": rand(1, 3, 1, 1)}, r"layers.3.attention.gate has shape \(1, 3, 1, 1\), expected \(1, 4, 1, 1\)")
    # a number key, a list or an integer tensor were TypeError/AttributeError tracebacks, or cast to float
    refused({**good, 5: rand(2)}, r"entries that are not named floating-point tensors: \['5'\]")
    refused({0: rand(2)}, "unknown adapter format")  # the litgpt check met a number key
    refused({**good, "adapter_query.weight": [1.0, 2.0]},
            r"not named floating-point tensors: \['adapter_query.weight'\]")
    refused({**good, "adapter_query.weight": torch.ones(10, DIM, dtype=torch.int64)},
            "not named floating-point tensors")
    refused({**good, "adapter_query.weight": rand(0, DIM)},
            "adapter_query.weight has no rows: an adapter has at least one prompt")  # named no file
    v2 = v2_state(base_folder)
    refused({**v2, "model": {k: v for k, v in v2["model"].items() if k != "llama.norm.weight"}},
            r"tuned norms, but not llama.norm.weight$", "BIAS-7B.pth")  # was named norm.delta
    refused({**v2, "model": {k: v for k, v in v2["model"].items() if "norm" not in k or k.startswith("llama.norm")}
             | {"llama.layers.1.ffn_norm.weight": torch.ones(DIM)}},
            r"tuned norms, but not llama.layers.0.attention_norm.weight \(and 6 more\)$", "BIAS-7B.pth")
    refused({**v2, "config": [1]}, "config: expected a dict of settings, got list")
    refused({**v2, "model": {**v2["model"], "llama.layers.3.attention.new_gate": "x"}},
            r"not named floating-point tensors: \['llama.layers.3.attention.new_gate'\]")
    refused({"transformer.h.2.attn.adapter_wte.weight": [1.0]}, "not named floating-point tensors", "lit.pth")
    path = tmp_path / "truncated.pth"
    torch.save(good, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.pth: not a readable"):
        adapter.load(base_folder, adapter=path, device="cpu")
