"""HF-format LLaMA folders, fabricated from random Meta folders: same logits as the Meta folder and as
transformers' own LlamaForCausalLM, in every weight layout, and a clear error for each kind of bad file."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import adapter
from adapter.config import ModelArgs, RopeScaling
from adapter.formats.hf import hf_to_meta_rows, meta_to_hf_rows
from adapter.random_model import write_random_base
from tests.conftest import TINY, randomize_adapter

TOKENS = torch.tensor([[1, 45, 300, 7, 99, 12]])
GQA = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, rope_theta=500000.0)
# Llama 3.1's scaling, its original context shortened so that the 8 frequencies of a 16-wide head fall in all
# three bands (kept, blended, divided)
LLAMA3 = dataclasses.replace(GQA, rope_scaling=RopeScaling("llama3", 8.0, original_max_len=64))
MAX_POSITIONS = 128
LAYOUTS = ("safetensors", "safetensors-sharded", "bin", "bin-sharded")
# Meta module -> HF module inside a layer (written out here, independently of adapter.formats.hf)
HF_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
HF_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}


class Base(NamedTuple):
    folder: Path
    args: ModelArgs
    nested_rope: bool  # config.json as transformers 5 writes it (rope_theta inside rope_parameters)


@pytest.fixture(scope="module", params=["tiny", "gqa", "llama3", "llama3-nested"])
def meta_base(request, tmp_path_factory) -> Base:
    """The plain TINY folder (transformers 4 style config), a GQA one (transformers 5 style) and a Llama 3.1
    style one (GQA, scaled RoPE) in both styles."""
    if request.param == "tiny":
        return Base(request.getfixturevalue("base_folder"), TINY, nested_rope=False)
    args = GQA if request.param == "gqa" else LLAMA3
    return Base(write_random_base(tmp_path_factory.mktemp("gqa"), args, seed=3), args,
                nested_rope=request.param != "llama3")


def logits(model: adapter.Transformer) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def hf_config(args: ModelArgs, nested_rope: bool) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps, "max_position_embeddings": MAX_POSITIONS, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False, "mlp_bias": False,
    }
    rope = {"rope_type": "default"}
    if args.rope_scaling is not None:
        scaling = args.rope_scaling
        rope = {"rope_type": scaling.kind, "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
                "high_freq_factor": scaling.high_freq_factor,
                "original_max_position_embeddings": scaling.original_max_len}
    if nested_rope:
        config["rope_parameters"] = {**rope, "rope_theta": args.rope_theta}
    else:
        config.update(rope_theta=args.rope_theta, rope_scaling=None if args.rope_scaling is None else rope)
    return config


def hf_name(name: str) -> str:
    if not name.startswith("layers."):
        return HF_TOP_NAMES[name]
    _, layer, rest = name.split(".", 2)
    return f"model.layers.{layer}.{HF_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def hf_state(base: Base) -> dict[str, torch.Tensor]:
    """The Meta folder's weights under HF names, with q/k rows in HF's rotate-half order."""
    state = torch.load(base.folder / "consolidated.00.pth", weights_only=True)
    heads = {"attention.wq.weight": base.args.n_heads, "attention.wk.weight": base.args.kv_heads}
    out = {}
    for name, weight in state.items():
        head_count = heads.get(name.split(".", 2)[-1])
        out[hf_name(name)] = (weight if head_count is None else meta_to_hf_rows(weight, head_count)).contiguous()
    return out


def save(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file(state, path) if path.suffix == ".safetensors" else torch.save(state, path)


def write_hf(base: Base, folder: Path, layout: str) -> Path:
    """An HF folder holding `base`'s weights in `layout` (see LAYOUTS)."""
    folder.mkdir(parents=True)
    shutil.copy(base.folder / "tokenizer.model", folder / "tokenizer.model")
    (folder / "config.json").write_text(json.dumps(hf_config(base.args, base.nested_rope), indent=2))
    state = hf_state(base)
    single = "model.safetensors" if layout.startswith("safetensors") else "pytorch_model.bin"
    if not layout.endswith("-sharded"):
        save(state, folder / single)
        return folder
    stem, suffix = single.split(".")
    names = list(state)
    weight_map = {}
    for index, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), start=1):
        file_name = f"{stem}-{index:05d}-of-00002.{suffix}"
        save({name: state[name] for name in part}, folder / file_name)
        weight_map.update(dict.fromkeys(part, file_name))
    index_json = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                  "weight_map": weight_map}
    (folder / f"{single}.index.json").write_text(json.dumps(index_json, indent=2))
    return folder


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hf_layouts_give_the_meta_logits(meta_base, layout, tmp_path):
    hf_model = adapter.load(write_hf(meta_base, tmp_path / "hf", layout), device="cpu")
    meta_model = adapter.load(meta_base.folder, device="cpu")
    assert float((logits(hf_model) - logits(meta_model)).abs().max()) < 1e-5
    assert hf_model.args.rope_theta == meta_base.args.rope_theta
    assert hf_model.args.rope_scaling == meta_model.args.rope_scaling == meta_base.args.rope_scaling
    assert hf_model.args.max_seq_len == MAX_POSITIONS and hf_model.args.kv_heads == meta_base.args.kv_heads


def test_transformers_llama_gives_the_same_logits(meta_base, tmp_path):
    """The reference implementation proves the name map and the q/k permutation."""
    folder = write_hf(meta_base, tmp_path / "hf", "safetensors")
    config = transformers.LlamaConfig.from_dict(json.loads((folder / "config.json").read_text()))
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.load_state_dict(load_file(folder / "model.safetensors"))
    with torch.no_grad():
        expected = reference(TOKENS).logits
    torch.testing.assert_close(logits(adapter.load(folder, device="cpu")), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(64, 16), (64,), (64, 4)])
def test_row_permutations_are_inverses(shape):
    w = torch.randn(shape)
    for heads in (1, 4, 8):
        assert torch.equal(hf_to_meta_rows(meta_to_hf_rows(w, heads), heads), w)
        assert not torch.equal(meta_to_hf_rows(w, heads), w)


def test_row_permutation_is_hf_conversion_formula():
    """Same as transformers' convert_llama_weights_to_hf permute(); a bias permutes like a one-column weight."""
    heads, head_dim, dim = 4, 8, 16
    w = torch.randn(heads * head_dim, dim)
    expected = w.view(heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(heads * head_dim, dim)
    assert torch.equal(meta_to_hf_rows(w, heads), expected)
    bias = torch.randn(heads * head_dim)
    assert torch.equal(meta_to_hf_rows(bias, heads), meta_to_hf_rows(bias[:, None], heads)[:, 0])
    with pytest.raises(ValueError, match="do not split into 3 heads"):
        meta_to_hf_rows(w, 3)


class Payload:
    """Stands for pickled code: weights-only loading must refuse it."""


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def edit_safetensors(folder: Path, **changes) -> None:
    state = load_file(folder / "model.safetensors")
    state.update(changes)
    save_file(state, folder / "model.safetensors")


def drop_tensor(folder: Path, name: str) -> None:
    state = load_file(folder / "model.safetensors")
    del state[name]
    save_file(state, folder / "model.safetensors")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def add_payload(folder: Path) -> None:
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["payload"] = Payload()
    torch.save(state, folder / "pytorch_model.bin")


# case -> (layout, how to break the folder, error, message, the file the message must name)
BAD_CASES: dict[str, tuple[str, Callable[[Path], None], type[Exception], str, str]] = {
    "config not JSON": ("safetensors", lambda f: (f / "config.json").write_text("{not json"), ValueError,
                        "cannot read JSON", "config.json"),
    "config nested": ("safetensors", lambda f: (f / "config.json").write_text("[" * 100_000 + "]" * 100_000),
                      ValueError, r"cannot read JSON \(nested too deeply\)", "config.json"),  # (a RecursionError)
    "config number": ("safetensors", lambda f: (f / "config.json").write_text('{"hidden_size": ' + "1" * 5000 + "}"),
                      ValueError, r"cannot read JSON \(Exceeds the limit \(4300 digits\)", "config.json"),
    "qwen2": ("safetensors", lambda f: edit_config(f, model_type="qwen2"), ValueError,
              "model_type 'qwen2' is not supported", "config.json"),
    "mistral window": ("safetensors", lambda f: edit_config(f, model_type="mistral", sliding_window="4k"), ValueError,
                       "sliding_window must be an integer >= 2 or null, got '4k'", "config.json"),
    "rope scaling": ("safetensors", lambda f: edit_config(f, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
                     ValueError, "rope_scaling: type 'dynamic' is not supported", "config.json"),
    "missing shard": ("safetensors-sharded", lambda f: (f / "model-00002-of-00002.safetensors").unlink(),
                      FileNotFoundError, "model.safetensors.index.json names the weight shard .* does not exist",
                      "model-00002-of-00002.safetensors"),
    "shard a folder": ("safetensors-sharded", lambda f: ((f / "model-00002-of-00002.safetensors").unlink(),
                                                         (f / "model-00002-of-00002.safetensors").mkdir()),
                       FileNotFoundError, "names the weight shard .*model-00002-of-00002.safetensors is a folder, "
                                          "not a file", "model-00002-of-00002.safetensors"),
    "no weights": ("safetensors", lambda f: (f / "model.safetensors").unlink(), FileNotFoundError,
                   "has config.json but no weights", ""),
    "truncated": ("safetensors", lambda f: truncate(f / "model.safetensors"), ValueError,
                  "not a readable safetensors file", "model.safetensors"),
    "pickled class": ("bin", add_payload, ValueError, "not a readable weights-only torch checkpoint",
                      "pytorch_model.bin"),
    "unknown tensor": ("safetensors", lambda f: edit_safetensors(f, **{"model.layers.0.self_attn.q_proj.bias":
                                                                       torch.zeros(64)}),
                       ValueError, "unexpected tensor model.layers.0.self_attn.q_proj.bias", "model.safetensors"),
    "lm_head shape": ("safetensors", lambda f: edit_safetensors(f, **{"lm_head.weight": torch.zeros(3, 64)}),
                      ValueError, r"output.weight has shape \(3, 64\), expected \(512, 64\)", ""),
    # the embeddings answered as the head: other logits, without a word
    "no lm_head, untied": ("safetensors", lambda f: drop_tensor(f, "lm_head.weight"), ValueError,
                           "missing tensor lm_head.weight \\(config.json says tie_word_embeddings: false\\)", ""),
    # a text "false" read as true: the stored lm_head ignored
    "tie as text": ("safetensors", lambda f: edit_config(f, tie_word_embeddings="false"), ValueError,
                    "tie_word_embeddings must be true or false, got 'false'", "config.json"),
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_hf_folders_get_one_clear_error(base_folder, case, tmp_path):
    layout, breaks, error_type, message, file_name = BAD_CASES[case]
    folder = write_hf(Base(base_folder, TINY, nested_rope=False), tmp_path / "hf", layout)
    breaks(folder)
    with pytest.raises(error_type, match=message) as error:
        adapter.load(folder, device="cpu")
    assert str(folder / file_name).rstrip("/") in str(error.value)


def test_v2_adapter_gives_the_same_logits_on_both_bases(meta_base, tmp_path):
    """Adapters are stored in Meta layout and the HF base is converted on load: no adapter permutation."""
    v2 = adapter.AdapterArgs(prompt_len=3, prompt_layers=2, bias=True, lora_rank=4)
    trained = randomize_adapter(adapter.load(meta_base.folder, adapter=v2, device="cpu"))
    path = adapter.save_adapter(trained, tmp_path / "run")
    hf_folder = write_hf(meta_base, tmp_path / "hf", "safetensors")
    on_hf = logits(adapter.load(hf_folder, adapter=path, device="cpu"))
    assert float((on_hf - logits(adapter.load(meta_base.folder, adapter=path, device="cpu"))).abs().max()) < 1e-5
    assert float((on_hf - logits(adapter.load(hf_folder, device="cpu"))).abs().max()) > 1e-2, "adapter changes logits"
