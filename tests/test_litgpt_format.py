"""litgpt adapter (`lit_model.pth.adapter`) and adapter v2 (`lit_model.pth.adapter_v2`) checkpoints, fabricated
with the real key names and checked against litgpt's forward written out in tests/litgpt_reference.py."""

from __future__ import annotations

import pytest
import torch

import adapter
from adapter.config import AdapterArgs, ModelArgs
from adapter.convert import convert
from adapter.formats.peft import write_peft
from adapter.inspect import main as inspect_main
from adapter.random_model import write_random_base
from tests.conftest import TINY
from tests.litgpt_reference import litgpt_logits
from tests.reference import reference_logits

TOKENS = torch.tensor([[1, 45, 30, 7, 90, 12], [3, 8, 60, 2, 5, 77]])
CURRENT_CONFIG = "name: Llama-2-7b-hf\nn_embd: 4096\nnorm_qk: false\nrope_base: 10000\n"  # litgpt 0.5.5+
GQA = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=64)
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
@pytest.mark.parametrize("shape", ["mha", "gqa"])
def test_litgpt_adapter_v2_computes_what_litgpt_computes(base_folder, gqa_folder, tmp_path, qkv, interleaved,
                                                         shape):
    folder, args = (base_folder, TINY) if shape == "mha" else (gqa_folder, GQA)
    state = litgpt_state(args, v2=qkv)
    model = adapter.load(folder, adapter=write(tmp_path, state, name="lit_model.pth.adapter_v2"), device="cpu")
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
