"""PEFT `adaption_prompt` folders: what peft saves loads here with peft's logits (on a tiny HF copy of our base),
what `write_peft` writes loads in peft with ours, unrepresentable adapters are refused, bad folders get one
clear error naming the file."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import adapter
from adapter.config import AdapterArgs, ModelArgs, RopeScaling
from adapter.formats.peft import write_peft
from adapter.inspect import describe, describe_adapter
from adapter.model import Transformer
from adapter.random_model import write_random_base
from tests.conftest import TINY, V2, make_model, randomize_adapter
from tests.reference import reference_logits

TOKENS = torch.tensor([[1, 45, 300, 7, 99, 12, 5], [1, 3, 8, 200, 41, 17, 66]])
GATES = (0.7, -0.4, 1.3)
RAW = AdapterArgs(prompt_len=3, prompt_layers=2, gate_activation="raw")
GQA = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32)
# Llama 3.1's shape in small: tiktoken BPE with its special tokens, theta 500000, llama3 RoPE scaling
LLAMA3 = dataclasses.replace(GQA, vocab_size=768, rope_theta=500000.0,
                             rope_scaling=RopeScaling("llama3", 8.0, original_max_len=64))
PREFIX = "base_model.model.model.layers"


@pytest.fixture(scope="module")
def gqa_folder(tmp_path_factory) -> Path:
    return write_random_base(tmp_path_factory.mktemp("gqa"), GQA, seed=3)


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory) -> Path:
    return write_random_base(tmp_path_factory.mktemp("llama3"), LLAMA3, seed=4, tokenizer="tiktoken")


def logits(model: Transformer) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def meta_to_hf_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta rotates adjacent pairs, HF rotates the two halves of each head: reorder q/k rows to match."""
    head_dim, dim = w.shape[0] // heads, w.shape[1]
    return w.view(heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(heads * head_dim, dim)


def hf_llama(base: Path, mistral_window: int | None = None, mistral: bool = False):
    """A transformers LlamaForCausalLM holding exactly the weights of the Meta folder `base` (a
    MistralForCausalLM with `mistral`, or attending over `mistral_window` tokens when that is given)."""
    mistral = mistral or mistral_window is not None
    ours = adapter.load(base, device="cpu")
    a = ours.args
    shape = dict(
        hidden_size=a.dim, intermediate_size=a.ffn_hidden_dim, num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab_size,
        rms_norm_eps=a.norm_eps, rope_parameters=hf_rope(a), max_position_embeddings=a.max_seq_len,
        tie_word_embeddings=False, head_dim=a.head_dim)
    config = (transformers.MistralConfig(**shape, sliding_window=mistral_window) if mistral
              else transformers.LlamaConfig(**shape))
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    state = {"model.embed_tokens.weight": ours.tok_embeddings.weight, "model.norm.weight": ours.norm.weight,
             "lm_head.weight": ours.output.weight}
    for i, layer in enumerate(ours.layers):
        for meta, hf in names.items():
            w = layer.get_parameter(f"{meta}.weight").detach()
            if meta in ("attention.wq", "attention.wk"):
                w = meta_to_hf_rows(w, a.n_heads if meta == "attention.wq" else a.kv_heads)
            state[f"model.layers.{i}.{hf}.weight"] = w
    model = (transformers.MistralForCausalLM if mistral else transformers.LlamaForCausalLM)(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def hf_rope(args: ModelArgs) -> dict:
    scaling = args.rope_scaling
    if scaling is None:
        return {"rope_type": "default", "rope_theta": args.rope_theta}
    return {"rope_type": scaling.kind, "rope_theta": args.rope_theta, "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_len}


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits.float()


def peft_trained(base: transformers.PreTrainedModel, seed: int = 0):
    """PEFT's own adaption-prompt model on a transformers copy of our base, with random prompts and non-zero
    gates."""
    config = peft.AdaptionPromptConfig(adapter_len=RAW.prompt_len, adapter_layers=RAW.prompt_layers,
                                       task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    gates = iter(GATES)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("adaption_prompt"):
                param.copy_(torch.randn(param.shape, generator=generator))
            elif name.endswith("adaption_gate"):
                param.fill_(next(gates))
    return model.eval()


@pytest.mark.parametrize("base_name, safe", [("base_folder", True), ("base_folder", False), ("gqa_folder", True),
                                             ("llama3_folder", True)],
                         ids=["mha-safetensors", "mha-bin", "gqa-safetensors", "llama3-safetensors"])
def test_peft_saved_adapter_gives_peft_logits(base_name, safe, request, tmp_path):
    base = request.getfixturevalue(base_name)
    trained = peft_trained(hf_llama(base))
    trained.save_pretrained(tmp_path / "peft", safe_serialization=safe)
    assert (tmp_path / "peft" / ("adapter_model.safetensors" if safe else "adapter_model.bin")).is_file()
    loaded = adapter.load(base, adapter=tmp_path / "peft", device="cpu")
    assert loaded.adapter_args == RAW and loaded.adapter_format == "peft"
    n_layers = loaded.args.n_layers
    for i, gate in enumerate(GATES[: RAW.prompt_layers]):
        assert torch.all(loaded.layers[n_layers - RAW.prompt_layers + i].attention.gate == torch.tensor(gate))
    torch.testing.assert_close(logits(loaded), hf_logits(trained), atol=1e-4, rtol=0)
    assert not torch.allclose(logits(loaded), logits(adapter.load(base, device="cpu")), atol=1e-3), "adapter acts"


MISTRAL_WINDOW = 6  # shorter than LONG: each token attends to its last 6 positions only
LONG = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(9))


def test_peft_adapter_on_a_mistral_folder_gives_peft_logits(gqa_folder, tmp_path):
    """Mistral's layers are LLaMA's, with attention over a sliding window: an HF Mistral folder (as transformers
    saves it) gives transformers' logits past the window, a PEFT adaption prompt on it gives PEFT's."""
    reference = hf_llama(gqa_folder, mistral_window=MISTRAL_WINDOW)
    folder = tmp_path / "mistral"
    reference.save_pretrained(folder)
    shutil.copy(gqa_folder / "tokenizer.model", folder)
    (folder / "params.json").write_text(json.dumps({"dim": GQA.dim, "sliding_window": MISTRAL_WINDOW}))  # as Mistral's
    base = adapter.load(folder, device="cpu")
    assert (base.args.sliding_window, base.args.max_seq_len, base.args.kv_heads) == \
        (MISTRAL_WINDOW, GQA.max_seq_len, GQA.kv_heads)
    with torch.no_grad():
        ours = base(LONG)
        torch.testing.assert_close(ours, reference(input_ids=LONG).logits.float(), atol=1e-4, rtol=0)
        assert not torch.allclose(ours, hf_llama(gqa_folder, mistral=True)(input_ids=LONG).logits.float(),
                                  atol=1e-3), "the window matters at this length"
    about = describe(folder)
    assert about[0] == f"{folder}: base Mistral, hf format"
    assert f"  context {GQA.max_seq_len} tokens; attention over a sliding window of 6" in about

    trained = peft_trained(reference, seed=5)
    trained.save_pretrained(tmp_path / "peft")
    loaded = adapter.load(folder, adapter=tmp_path / "peft", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(loaded(LONG), trained(input_ids=LONG).logits.float(), atol=1e-4, rtol=0)
    assert not torch.allclose(logits(loaded), logits(base), atol=1e-3), "adapter acts"


def test_a_sliding_window_decodes_as_the_whole_sequence_computes(gqa_folder, tmp_path):
    """Step by step with the KV cache, rows left-padded to a common length, past the window: each step's logits
    are the whole sequence's at that position (the window masks the cache as it masks the sequence)."""
    model = adapter.load(gqa_folder, adapter=RAW, device="cpu")
    share_gates(model)
    windowed = adapter.load(gqa_folder, adapter=RAW, device="cpu", max_seq_len=64)
    windowed.load_adapter_state(model.adapter_state_dict(), "test")
    windowed.args = dataclasses.replace(windowed.args, sliding_window=MISTRAL_WINDOW)
    short = LONG[1, 5:]
    with torch.no_grad():
        whole = [windowed(LONG[:1])[0], windowed(short[None])[0]]
        cache = windowed.new_cache(2, 20, pad=torch.tensor([0, 5]))
        batch = torch.stack([LONG[0], torch.cat([torch.zeros(5, dtype=torch.long), short])])
        first = windowed.step(batch[:, :8], cache)
        torch.testing.assert_close(first, torch.stack([whole[0][7], whole[1][2]]), atol=1e-4, rtol=0)
        for position in range(8, 20):
            step = windowed.step(batch[:, position:position + 1], cache)
            torch.testing.assert_close(step, torch.stack([whole[0][position], whole[1][position - 5]]),
                                       atol=1e-4, rtol=0)
        assert not torch.allclose(whole[0], model(LONG[:1])[0], atol=1e-3)


# heads whose width is not dim / n_heads, as Mistral NeMo's (32 heads of 128 at dim 5120, narrower than 160); here wider
NEMO = dataclasses.replace(GQA, head_size=32, rope_theta=1e6)


def test_heads_not_dim_over_heads_wide_give_transformers_logits(tmp_path):
    """q/k/v project to n_heads * head_dim = 128 features from dim 64 (NeMo: 4096 from 5120). An HF folder of
    that shape gives transformers' logits, a Meta folder with `head_dim` in params.json the same, and a v2
    adapter on it what the reference formulas give."""
    meta = write_random_base(tmp_path / "meta", NEMO, seed=6)
    assert json.loads((meta / "params.json").read_text())["head_dim"] == 32
    ours = adapter.load(meta, device="cpu")
    assert (ours.args.head_dim, ours.layers[0].attention.wq.weight.shape) == (32, (128, 64))
    reference = hf_llama(meta, mistral=True)
    folder = tmp_path / "nemo"
    reference.save_pretrained(folder)
    shutil.copy(meta / "tokenizer.model", folder)
    base = adapter.load(folder, device="cpu")
    assert (base.args.head_dim, base.args.ffn_hidden_dim, base.args.kv_heads) == (32, ours.args.ffn_hidden_dim, 2)
    torch.testing.assert_close(logits(base), hf_logits(reference), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(ours), logits(base), atol=1e-5, rtol=0)
    assert describe(folder)[1].startswith("  dim 64, layers 3, heads 4 of 32 (kv heads 2), ")
    # peft's adaption prompt cannot take this shape (it views k_proj's output as dim / n_heads wide heads), so
    # our adapters are checked against the plain reference of the formulas
    loaded = randomize_adapter(adapter.load(folder, adapter=V2, device="cpu"))
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded), reference_logits(loaded, TOKENS), atol=2e-4, rtol=1e-4)
    assert not torch.allclose(logits(loaded), logits(base), atol=1e-3), "adapter acts"
    with pytest.raises(ValueError, match="cannot hold this adapter: the base's heads are 32 wide, not dim / n_heads"):
        write_peft(share_gates(adapter.load(folder, adapter=RAW, device="cpu")), tmp_path / "out")


def raw_adapter(base: Path) -> Transformer:
    """Our raw-gate v1 adapter with random prompts and one (different) gate value per layer."""
    model = adapter.load(base, adapter=RAW, device="cpu")
    return share_gates(model)


def share_gates(model: Transformer) -> Transformer:
    """PEFT can only hold one gate per layer: give all heads of each layer the same value."""
    with torch.no_grad():
        for layer, gate in zip(model.layers[model.first_prompt_layer:], GATES):
            layer.attention.gate.fill_(gate)
    return model


def test_written_peft_folder_round_trips_and_loads_in_peft(base_folder, tmp_path):
    ours = raw_adapter(base_folder)
    folder = write_peft(ours, tmp_path / "out", base_model_name_or_path="tiny-llama")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config == {"adapter_layers": 2, "adapter_len": 3, "auto_mapping": None,
                      "base_model_name_or_path": "tiny-llama", "inference_mode": True, "peft_type": "ADAPTION_PROMPT",
                      "revision": None, "target_modules": "self_attn", "task_type": "CAUSAL_LM"}
    assert sorted(load_file(folder / "adapter_model.safetensors")) == [
        f"{PREFIX}.{n}.self_attn.{leaf}" for n in (2, 3) for leaf in ("adaption_gate", "adaption_prompt")]
    assert torch.equal(logits(adapter.load(base_folder, adapter=folder, device="cpu")), logits(ours))
    theirs = peft.PeftModel.from_pretrained(hf_llama(base_folder), folder).eval()
    torch.testing.assert_close(hf_logits(theirs), logits(ours), atol=1e-4, rtol=0)
    # (inspect gave the file's count as the adapter's: a gate a layer is one a head when served)
    stored = sum(t.numel() for t in load_file(folder / "adapter_model.safetensors").values())
    assert stored < ours.count_parameters(trainable_only=True)
    assert f"  parameters {stored:,} as stored (2 gates of one value a layer, which become one a head when served)" \
        in describe_adapter(folder)


def test_older_keys_without_the_wrapper_prefix_load(base_folder, tmp_path):
    ours = raw_adapter(base_folder)
    path = write_peft(ours, tmp_path / "old") / "adapter_model.safetensors"
    save_file({k.removeprefix("base_model.model."): v for k, v in load_file(path).items()}, path)
    assert torch.equal(logits(adapter.load(base_folder, adapter=path.parent, device="cpu")), logits(ours))


def unequal_heads(model: Transformer) -> Transformer:
    with torch.no_grad():
        model.layers[-1].attention.gate[0, 1] += 0.5
    return model


REFUSED = {
    "tanh": (lambda: share_gates(make_model(TINY, AdapterArgs(prompt_len=3, prompt_layers=2))),
             "gate_activation is tanh; PEFT uses raw gates"),
    "per-head": (lambda: unequal_heads(share_gates(make_model(TINY, RAW))),
                 "layer 3 has a different gate value per head"),
    "v2": (lambda: share_gates(make_model(TINY, AdapterArgs(prompt_len=3, prompt_layers=2, gate_activation="raw",
                                                            bias=True))), "has no place for bias"),
    "scale": (lambda: share_gates(make_model(TINY, AdapterArgs(prompt_len=3, prompt_layers=2, gate_activation="raw",
                                                               scale=True))), "has no place for scale"),
    "litgpt-qkv": (lambda: share_gates(make_model(TINY, AdapterArgs(
        prompt_len=3, prompt_layers=2, gate_activation="raw", prompt_projection="litgpt-qkv"))),
        "has no place for litgpt 0.5.5\\+ prompt keys/values"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_write_peft_refuses_what_peft_cannot_hold(name, tmp_path):
    build, message = REFUSED[name]
    with pytest.raises(ValueError, match=message):
        write_peft(build(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture()
def good_folder(tmp_path) -> Path:
    """A valid PEFT folder for TINY (layers 2 and 3), written without the peft library."""
    return write_peft(share_gates(make_model(TINY, RAW)), tmp_path / "good")


def rewrite_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, folder / "adapter_model.safetensors")


def prompts_for(layers: tuple[int, ...], dim: int = TINY.dim) -> dict[str, torch.Tensor]:
    tensors = {}
    for n in layers:
        tensors[f"{PREFIX}.{n}.self_attn.adaption_prompt"] = torch.randn(1, RAW.prompt_len, dim)
        tensors[f"{PREFIX}.{n}.self_attn.adaption_gate"] = torch.tensor([0.5])
    return tensors


def set_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


BAD = {
    "not-json": (lambda f: (f / "adapter_config.json").write_text("{not json"), ValueError,
                 "adapter_config.json: cannot read JSON"),
    "prefix-tuning": (lambda f: set_config(f, peft_type="PREFIX_TUNING"), ValueError,
                      "adapter_config.json: peft_type 'PREFIX_TUNING' is not supported; only ADAPTION_PROMPT "
                      r"\(LLaMA-Adapter\) and LORA"),
    "no-weights": (lambda f: (f / "adapter_model.safetensors").unlink(), FileNotFoundError,
                   "adapter_model.safetensors does not exist"),
    "bottom-layers": (lambda f: rewrite_weights(f, prompts_for((0, 1))), ValueError,
                      "adapter_model.safetensors: adapter was made for a different base: n_layers=2 \\(base has 4\\)"),
    "gap": (lambda f: rewrite_weights(f, prompts_for((1, 3))), ValueError,
            r"adapter_model.safetensors: prompts for layers \[1, 3\] are not 2 contiguous top layers"),
    "layer-count": (lambda f: set_config(f, adapter_layers=3), ValueError,
                    "adapter_model.safetensors: prompts for 2 layers .* adapter_layers=3"),
    "other-dim": (lambda f: rewrite_weights(f, prompts_for((2, 3), dim=32)), ValueError,
                  "adapter_model.safetensors: adapter was made for a different base: dim=32 \\(base has 64\\)"),
    "truncated": (lambda f: truncate(f / "adapter_model.safetensors"), ValueError,
                  "adapter_model.safetensors: not a readable safetensors file"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_peft_folders_get_one_clear_error(name, base_folder, good_folder):
    change, error_type, message = BAD[name]
    change(good_folder)
    with pytest.raises(error_type, match=message) as error:
        adapter.load(base_folder, adapter=good_folder, device="cpu")
    assert str(good_folder) in str(error.value)


def test_bad_bin_weights_get_a_clear_error(base_folder, good_folder):
    (good_folder / "adapter_model.safetensors").unlink()
    shutil.copy(base_folder / "params.json", good_folder / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.bin: not a readable weights-only torch checkpoint"):
        adapter.load(base_folder, adapter=good_folder, device="cpu")
