"""litgpt adapter (`lit_model.pth.adapter`) and adapter v2 (`lit_model.pth.adapter_v2`) checkpoints, fabricated
with the real key names and checked against litgpt's forward written out in tests/litgpt_reference.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import adapter
from adapter.config import AdapterArgs, ModelArgs, RopeScaling
from adapter.convert import convert
from adapter.formats.peft import write_peft
from adapter.inspect import describe
from adapter.inspect import main as inspect_main
from adapter.random_model import write_random_base
from tests.conftest import TINY
from tests.litgpt_reference import fused_qkv, litgpt_logits
from tests.reference import reference_logits

TOKENS = torch.tensor([[1, 45, 30, 7, 90, 12], [3, 8, 60, 2, 5, 77]])
CURRENT_CONFIG = "name: Llama-2-7b-hf\nn_embd: 4096\nnorm_qk: false\nrope_base: 10000\n"  # litgpt 0.5.5+
GQA = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=64)
NARROW = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_size=8, vocab_size=512, multiple_of=32,
                   max_seq_len=64)
OLD_CONFIG = "name: Llama-2-7b-hf\nn_embd: 4096\nrope_base: 10000\n"  # litgpt 0.5.4 has no norm_qk


def litgpt_state(args: ModelArgs, start: int = 1, prompt_len: int = 4, v2: str | None = None,
                 head: bool = True, norms: bool = True) -> dict:
    """A litgpt adapter state with random values: prompts and gates on layers `start`.., and with `v2` ("qkv" or
    "attn", the fused linear's name) every layer's adapter bias and scale, the tuned norms and the head's."""
    g = torch.Generator().manual_seed(0)
    qkv_rows = (args.n_heads + 2 * args.kv_heads) * args.head_dim
    model = {}

    def near(value: float, *shape: int) -> torch.Tensor:
        return value + 0.2 * torch.randn(*shape, generator=g)

    for n in range(args.n_layers):
        h = f"transformer.h.{n}."
        if n >= start:
            model[h + "attn.adapter_wte.weight"] = torch.randn(prompt_len, args.dim, generator=g)
            model[h + "attn.gating_factor"] = torch.randn(1, 1, args.n_heads, 1, generator=g)
        if v2 is None:
            continue
        for name, rows in ((f"attn.{v2}", qkv_rows), ("attn.proj", args.dim), ("mlp.fc_1", args.ffn_hidden_dim),
                           ("mlp.fc_2", args.ffn_hidden_dim), ("mlp.proj", args.dim)):
            model[h + name + ".adapter_bias"] = near(0.0, rows)
            model[h + name + ".adapter_scale"] = near(1.0, rows)
        if norms:
            model[h + "norm_1.weight"], model[h + "norm_2.weight"] = near(1.0, args.dim), near(1.0, args.dim)
    if v2 is not None and norms:
        model["transformer.ln_f.weight"] = near(1.0, args.dim)
    if v2 is not None and head:
        model["lm_head.adapter_bias"], model["lm_head.adapter_scale"] = near(0.0, args.vocab_size), \
            near(1.0, args.vocab_size)
    return {"model": model}


@pytest.fixture(scope="module")
def gqa_folder(tmp_path_factory):
    return write_random_base(tmp_path_factory.mktemp("gqa_base"), GQA, seed=2)


@pytest.fixture(scope="module")
def narrow_folder(tmp_path_factory):
    """Heads narrower than dim / n_heads, as Mistral NeMo's: only model_config.yaml's head_size tells the q|k|v
    vectors' split."""
    return write_random_base(tmp_path_factory.mktemp("narrow_base"), NARROW, seed=4)


def write(tmp_path, state: dict, config: str | None = None, name: str = "lit_model.pth.adapter"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (tmp_path / "model_config.yaml").write_text(config)
    torch.save(state, tmp_path / name)
    return tmp_path / name


def expected(folder, state: dict, interleaved: bool) -> torch.Tensor:
    base = adapter.load(folder, device="cpu")
    with torch.no_grad():
        return litgpt_logits(base, state["model"], TOKENS[:, :6] % base.args.vocab_size, interleaved)


@pytest.mark.parametrize("config, interleaved", [(CURRENT_CONFIG, False), (None, False), (OLD_CONFIG, True)])
@pytest.mark.parametrize("shape", ["mha", "gqa"])
def test_litgpt_adapter_computes_what_litgpt_computes(base_folder, gqa_folder, tmp_path, config, interleaved, shape):
    folder, args = (base_folder, TINY) if shape == "mha" else (gqa_folder, GQA)
    state = litgpt_state(args)
    model = adapter.load(folder, adapter=write(tmp_path, state, config), device="cpu")
    projection = "frozen" if interleaved else "litgpt-qkv"
    assert model.adapter_args == AdapterArgs(prompt_len=4, prompt_layers=args.n_layers - 1, gate_activation="raw",
                                             prompt_projection=projection)
    assert model.adapter_format == "litgpt"
    assert torch.equal(model.adapter_query.weight.view(-1, 4, args.dim)[0],
                       state["model"]["transformer.h.1.attn.adapter_wte.weight"])
    tokens = TOKENS % args.vocab_size
    with torch.no_grad():
        ours = model(tokens)
        torch.testing.assert_close(ours, expected(folder, state, interleaved), atol=2e-4, rtol=1e-4)
        if interleaved:  # litgpt 0.5.4 fed the prompt as the official formula does
            torch.testing.assert_close(ours, reference_logits(model, tokens), atol=2e-4, rtol=1e-4)
        else:  # 0.5.5+ reads other rows: a different function, which only the litgpt-qkv reading gives
            assert not torch.allclose(ours, reference_logits(model, tokens), atol=1e-2)
        cache = model.new_cache(2, 8)
        torch.testing.assert_close(model.step(tokens, cache), ours[:, -1], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("qkv, interleaved", [("qkv", False), ("attn", True)])
@pytest.mark.parametrize("shape", ["mha", "gqa", "narrow"])
def test_litgpt_adapter_v2_computes_what_litgpt_computes(base_folder, gqa_folder, narrow_folder, tmp_path, qkv,
                                                         interleaved, shape):
    folder, args = {"mha": (base_folder, TINY), "gqa": (gqa_folder, GQA), "narrow": (narrow_folder, NARROW)}[shape]
    state = litgpt_state(args, v2=qkv)
    config = f"head_size: {args.head_dim}\nn_head: {args.n_heads}\n" if shape == "narrow" else None
    model = adapter.load(folder, adapter=write(tmp_path, state, config, name="lit_model.pth.adapter_v2"),
                         device="cpu")
    a = model.adapter_args
    assert model.adapter_format == "litgpt-v2"
    assert (a.bias, a.scale, a.scale_at, a.head_delta, a.norm) == (True, True, "output", True, True)
    assert a.prompt_projection == ("tuned" if interleaved else "litgpt-qkv")
    assert a.v2_parts == ["bias", "output scale", "norm", "head bias/scale"]
    tokens = TOKENS % args.vocab_size
    base = adapter.load(folder, device="cpu")
    with torch.no_grad():
        ours = model(tokens)
        torch.testing.assert_close(ours, expected(folder, state, interleaved), atol=3e-4, rtol=1e-4)
        cache = model.new_cache(2, 8)
        torch.testing.assert_close(model.step(tokens, cache), ours[:, -1], atol=3e-4, rtol=1e-4)
        # the sliders: delta scale 0 and gate 0 give the base back; gate 0 alone keeps the v2 deltas
        torch.testing.assert_close(model(tokens, gate_scale=0.0, delta_scale=0.0), base(tokens), atol=1e-5,
                                   rtol=1e-5)
        no_prompt = {k: v for k, v in state["model"].items() if "adapter_wte" not in k and "gating" not in k}
        torch.testing.assert_close(model(tokens, gate_scale=0.0),
                                   litgpt_logits(base, no_prompt, tokens, interleaved), atol=3e-4, rtol=1e-4)
        # the training loss and the evaluation scores go through the tuned head too
        positions = torch.ones_like(tokens, dtype=torch.bool)
        positions[:, 0] = False
        targets = tokens.roll(-1, 1)[positions]
        loss = torch.nn.functional.cross_entropy(ours[positions], targets, reduction="sum")
        torch.testing.assert_close(model(tokens, positions=positions, targets=targets), loss, atol=1e-3, rtol=1e-5)
        losses, hits = model.score(tokens, positions, targets)
        torch.testing.assert_close(losses.sum(), loss, atol=1e-3, rtol=1e-5)
        assert torch.equal(hits, ours[positions].argmax(-1) == targets)


def test_litgpt_v2_converts_to_ours_and_back_the_same_and_not_to_peft(base_folder, tmp_path, capsys):
    path = write(tmp_path / "lit", litgpt_state(TINY, v2="qkv"), name="lit_model.pth.adapter_v2")
    model = adapter.load(base_folder, adapter=path, device="cpu")
    native = convert(path, tmp_path / "ours", "native", base_folder)
    again = adapter.load(base_folder, adapter=native, device="cpu")
    assert again.adapter_args == model.adapter_args
    with torch.no_grad():
        torch.testing.assert_close(again(TOKENS), model(TOKENS), atol=1e-6, rtol=1e-6)
    v1 = adapter.load(base_folder, adapter=write(tmp_path / "v1", litgpt_state(TINY), CURRENT_CONFIG), device="cpu")
    with pytest.raises(ValueError, match="has no place for litgpt 0.5.5\\+ prompt keys/values"):
        write_peft(v1, tmp_path / "peft")
    from adapter.engine import Engine

    info = Engine(model).model_info()
    assert (info["adapter_format"], info["v2_parts"], info["prompt_keys_values"]) == \
        ("litgpt-v2", "bias, output scale, norm, head bias/scale", "litgpt-qkv")
    folder_read = adapter.load(base_folder, adapter=path.parent, device="cpu")  # litgpt's output folder
    assert folder_read.adapter_args == model.adapter_args and folder_read.adapter_format == "litgpt-v2"
    assert inspect_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "litgpt-v2 format" in out and "v2 parts: bias, output scale, norm, head bias/scale" in out
    assert "prompt keys/values: litgpt 0.5.5+'s" in out


def test_litgpt_adapter_with_gaps_or_odd_keys_is_refused(base_folder, tmp_path):
    state = litgpt_state(TINY)
    del state["model"]["transformer.h.2.attn.adapter_wte.weight"], state["model"]["transformer.h.2.attn.gating_factor"]
    with pytest.raises(ValueError, match=r"lit_model.pth.adapter: adapter layers \[1, 3\] are not contiguous"):
        adapter.load(base_folder, adapter=write(tmp_path, state), device="cpu")
    state = litgpt_state(TINY)
    state["model"]["transformer.wte.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match="unexpected key transformer.wte.weight"):
        adapter.load(base_folder, adapter=write(tmp_path, state), device="cpu")


def v2_broken(change) -> dict:
    state = litgpt_state(TINY, v2="qkv")
    change(state["model"])
    return state


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("transformer.h.2.mlp.fc_2.adapter_scale"),
     r"transformer.h.2.mlp.fc_2.adapter_scale is missing \(a litgpt adapter v2 has it on every layer\)"),
    (lambda m: m.update({"transformer.h.0.attn.qkv.adapter_bias": torch.zeros(100)}),
     r"transformer.h.0.attn.qkv.adapter_bias has shape \(100,\), which is no q\|k\|v vector of 4 heads of 16"),
    (lambda m: m.pop("transformer.h.3.norm_2.weight"), "tuned norms for only some layers"),
    (lambda m: m.pop("lm_head.adapter_scale"), "lm_head has only one of adapter_bias and adapter_scale"),
    (lambda m: m.update({"transformer.h.1.attn.attn.adapter_bias": torch.zeros(192)}),
     r"found \['attn.attn', 'attn.qkv'\]"),
    (lambda m: m.update({"transformer.h.1.norm_1.bias": torch.zeros(64)}),
     "unexpected key transformer.h.1.norm_1.bias for a litgpt adapter v2"),
])
def test_a_broken_litgpt_v2_file_is_refused_naming_the_key(base_folder, tmp_path, change, message):
    path = write(tmp_path, v2_broken(change), name="lit_model.pth.adapter_v2")
    with pytest.raises(ValueError, match=message):
        adapter.load(base_folder, adapter=path, device="cpu")


def test_a_litgpt_v2_file_for_another_base_is_refused(gqa_folder, tmp_path):
    path = write(tmp_path, litgpt_state(TINY, v2="qkv"), name="lit_model.pth.adapter_v2")
    with pytest.raises(ValueError, match="adapter was made for a different base: n_layers=4 \\(base has 3\\), "
                                         "kv_heads=4 \\(base has 2\\)"):
        adapter.load(gqa_folder, adapter=path, device="cpu")


def litgpt_base(meta_folder, folder, interleaved: bool = False, tied: bool = False, **config) -> Path:
    """The Meta folder's weights as `litgpt download` leaves a LLaMA: lit_model.pth under litgpt's names with the
    fused q|k|v (0.5.5+'s layout, or 0.5.4's interleaved one), model_config.yaml, the tokenizer, and the HF
    config.json litgpt keeps beside them."""
    import shutil

    import yaml

    base = adapter.load(meta_folder, device="cpu")
    a = base.args
    sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    state = {"transformer.wte.weight": sd["tok_embeddings.weight"], "transformer.ln_f.weight": sd["norm.weight"],
             "lm_head.weight": sd["tok_embeddings.weight"] if tied else sd["output.weight"]}
    for n in range(a.n_layers):
        p, h = f"layers.{n}.", f"transformer.h.{n}."
        state[h + ("attn.attn.weight" if interleaved else "attn.qkv.weight")] = fused_qkv(
            sd[p + "attention.wq.weight"], sd[p + "attention.wk.weight"], sd[p + "attention.wv.weight"], a.n_heads,
            a.kv_heads, interleaved)
        for ours, theirs in (("attention_norm", "norm_1"), ("attention.wo", "attn.proj"), ("ffn_norm", "norm_2"),
                             ("feed_forward.w1", "mlp.fc_1"), ("feed_forward.w3", "mlp.fc_2"),
                             ("feed_forward.w2", "mlp.proj")):
            state[f"{h}{theirs}.weight"] = sd[f"{p}{ours}.weight"]
    folder.mkdir(parents=True)
    torch.save(state, folder / "lit_model.pth")
    settings = {"name": "Llama-2-7b-hf", "block_size": 64, "vocab_size": a.vocab_size, "padded_vocab_size":
                a.vocab_size, "n_layer": a.n_layers, "n_embd": a.dim, "n_head": a.n_heads,
                "n_query_groups": a.kv_heads, "head_size": a.head_dim, "rotary_percentage": 1.0,
                "parallel_residual": False, "bias": False, "norm_class_name": "RMSNorm", "norm_eps": a.norm_eps,
                "norm_qk": False, "mlp_class_name": "LLaMAMLP", "intermediate_size": a.ffn_hidden_dim,
                "rope_base": int(a.rope_theta), "rope_adjustments": None, "n_expert": 0, **config}
    (folder / "model_config.yaml").write_text(yaml.safe_dump(settings))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    shutil.copy(meta_folder / "tokenizer.model", folder)
    return folder


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape", ["mha", "gqa"])
def test_a_litgpt_base_folder_gives_the_logits_of_the_same_weights(base_folder, gqa_folder, tmp_path, interleaved,
                                                                   shape):
    meta = base_folder if shape == "mha" else gqa_folder
    folder = litgpt_base(meta, tmp_path / "litgpt", interleaved)
    model = adapter.load(folder, device="cpu")
    assert (model.base_format, model.base_family, model.args.max_seq_len) == ("litgpt", "LLaMA", 64)
    with torch.no_grad():
        assert torch.equal(model(TOKENS), adapter.load(meta, device="cpu")(TOKENS))
    # loaded in the file's own dtype, wv was a view keeping the whole fused q|k|v tensor (a 7B in bf16: +2 GiB)
    held = {id(p.untyped_storage()): p.untyped_storage().nbytes() for p in model.parameters()}
    assert sum(held.values()) == sum(p.numel() * p.element_size() for p in model.parameters())
    # its adapter v2, served on it, computes what litgpt computes
    state = litgpt_state(TINY if shape == "mha" else GQA, v2="attn" if interleaved else "qkv")
    tuned = adapter.load(folder, adapter=write(tmp_path / "run", state, name="lit_model.pth.adapter_v2"),
                         device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(tuned(TOKENS), expected(meta, state, interleaved), atol=3e-4, rtol=1e-4)
    assert describe(folder)[0] == f"{folder}: base LLaMA, litgpt format"


def test_a_litgpt_llama32_base_reads_its_rope_adjustments_and_tied_head(base_folder, tmp_path):
    scaled = {"rope_adjustments": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_seq_len": 32}}
    folder = litgpt_base(base_folder, tmp_path / "l32", tied=True, **scaled)
    model = adapter.load(folder, device="cpu")
    assert model.args.rope_scaling == RopeScaling("llama3", 32.0, original_max_len=32)
    assert model.output.weight is model.tok_embeddings.weight, "one tensor for the tied head"
    assert adapter.load(folder, device="cpu", quantize="nf4").quantization == "nf4"


@pytest.mark.parametrize("config, message", [
    (dict(mlp_class_name="GptNeoxMLP"), r"model_config.yaml: mlp_class_name='GptNeoxMLP' is not supported \(a LLaMA "
                                        r"has 'LLaMAMLP'\)"),
    (dict(parallel_residual=True), "parallel_residual=True is not supported"),
    (dict(sliding_window_size=8, sliding_window_indices=[1, 0, 1, 0]), r"sliding_window_indices=\[1, 0, 1, 0\] is not"),
    (dict(rope_adjustments={"beta_fast": 32.0}), "rope_adjustments .* is not supported"),
    # garbled fields: bare TypeErrors and ValueErrors naming no file
    (dict(rope_base=None), "model_config.yaml: rope_base must be a number, got None"),
    (dict(rope_base="abc"), "model_config.yaml: rope_base must be a number, got 'abc'"),
    (dict(rope_condense_ratio="x"), "model_config.yaml: rope_condense_ratio must be a number, got 'x'"),
    (dict(rope_condense_ratio=0.5), "model_config.yaml: rope_condense_ratio: rope_scaling: factor must be a number "
                                    ">= 1, got 0.5"),
    (dict(sliding_window_size=8, sliding_window_indices=5), r"model_config.yaml: sliding_window_indices must be a "
                                                             r"list \(1 or 0 per layer\), got 5"),
    (dict(n_query_groups=2), r"transformer.h.0.attn.qkv.weight has shape \(192, 64\), expected \(128, 64\) \(4 "
                             r"query and 2 key/value heads of 16\)"),
])
def test_a_litgpt_base_of_another_kind_is_refused_naming_the_field(base_folder, tmp_path, config, message):
    folder = litgpt_base(base_folder, tmp_path / "other", **config)
    with pytest.raises(ValueError, match=message):
        adapter.load(folder, device="cpu")


def test_a_litgpt_config_that_is_not_utf8_is_named(base_folder, tmp_path):
    folder = litgpt_base(base_folder, tmp_path / "other")
    (folder / "model_config.yaml").write_bytes(b"name: \xff\n")
    with pytest.raises(ValueError, match=r"model_config.yaml: cannot read YAML \('utf-8' codec can't decode"):
        adapter.load(folder, device="cpu")
