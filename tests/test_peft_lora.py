"""PEFT LoRA adapters: what peft saves loads here with peft's own logits (on an HF copy of our random GQA base), the
delta scale blending it in (0: the base; 2: the LoRA twice), and what is not plain LoRA refused by name."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

import adapter
from adapter.config import ModelArgs
from adapter.inspect import describe
from adapter.random_model import write_random_base

SHAPE = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=64)
TOKENS = torch.tensor([[1, 45, 300, 7, 99, 12, 5], [1, 3, 8, 200, 41, 17, 66]])
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> Path:
    return write_random_base(tmp_path_factory.mktemp("lora") / "meta", SHAPE, seed=6)


def peft_lora(meta: Path, folder: Path, **settings):
    """A random LoRA (B not zero) made and saved by peft on an HF copy of the base; returns the peft model."""
    import peft

    from bench.peers import hf_llama, quiet

    quiet()
    logging.getLogger("peft").setLevel(logging.ERROR)
    torch.manual_seed(11)
    options = dict(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False, lora_dropout=0.0)
    model = peft.get_peft_model(hf_llama(adapter.load(meta, device="cpu")), peft.LoraConfig(**{**options, **settings}))
    model.eval().save_pretrained(folder)
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(TOKENS)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


@pytest.mark.parametrize("settings", [
    {},
    {"target_modules": ["q_proj", "v_proj"], "r": 8, "lora_alpha": 16},
    {"rank_pattern": {"q_proj": 2, "down_proj": 6}, "alpha_pattern": {"v_proj": 32}},
    {"use_rslora": True, "lora_alpha": 3},
    {"layers_to_transform": [1], "target_modules": ["k_proj", "up_proj"]},
], ids=["all-linears", "q-v", "rank-and-alpha-patterns", "rslora", "one-layer"])
def test_peft_loras_give_peft_logits(meta, tmp_path, settings):
    reference = peft_lora(meta, tmp_path / "lora", **settings)
    ours = adapter.load(meta, adapter=tmp_path / "lora", device="cpu")
    assert ours.adapter_format == "peft-lora" and not ours.adapter_args.has_prompts
    assert torch.allclose(logits(ours), logits(reference), atol=1e-5)
    with reference.disable_adapter():
        base = logits(reference)
    assert not torch.allclose(base, logits(reference), atol=1e-3)  # the LoRA changes the answer
    assert torch.allclose(ours(TOKENS, delta_scale=0.0), base, atol=1e-5)


def test_the_delta_scale_multiplies_the_lora(meta, tmp_path):
    peft_lora(meta, tmp_path / "lora")
    twice = peft_lora(meta, tmp_path / "twice", lora_alpha=16)  # the same A and B (same seed), twice the scaling
    ours = adapter.load(meta, adapter=tmp_path / "lora", device="cpu")
    with torch.no_grad():
        assert torch.allclose(ours(TOKENS, delta_scale=2.0), logits(twice), atol=1e-5)


def test_inspect_and_the_app_engine_see_a_lora(meta, tmp_path):
    from adapter.app_config import ServeConfig, load_engines

    peft_lora(meta, tmp_path / "lora", target_modules=["q_proj", "v_proj"])
    text = "\n".join(describe(tmp_path / "lora"))
    assert "peft-lora format" in text and "LoRA rank 4" in text
    from adapter.app_handlers import GATE_LABEL, Handlers

    engines = load_engines(ServeConfig(base=str(meta), adapter=(str(tmp_path / "lora"),), device="cpu"))
    info = engines.default.model_info()
    assert info["adapter_format"] == "peft-lora" and info["v2_parts"] == "LoRA rank 4"
    assert "no adaption prompts, so no gates: the delta scale in Advanced blends it" in \
        Handlers(engines).gate_slider(None)["label"]
    bare = load_engines(ServeConfig(base=str(meta), device="cpu"))
    assert Handlers(bare).gate_slider(None)["label"] == f"{GATE_LABEL} (no adapter: the frozen base answers)"


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(use_dora=True), "use_dora=True is not supported"),
    (lambda c: c.update(modules_to_save=["lm_head"]), "modules_to_save=['lm_head'] is not supported"),
    (lambda c: c.update(bias="all"), "bias='all' is not supported"),
    (lambda c: c.update(lora_alpha=0), "lora_alpha must be a positive number, got 0"),
    (lambda c: c.update(lora_alpha=float("nan")), "lora_alpha must be a positive number, got nan"),  # logits NaN
    (lambda c: c.update(use_rslora="no"), "use_rslora must be true or false, got 'no'"),  # read as true
    (lambda c: c.update(alpha_pattern={"q_proj": "16"}), "alpha_pattern['q_proj'] must be a positive number, got '16'"),
    (lambda c: c.update(alpha_pattern={"q_proj(": 16}), "alpha_pattern: 'q_proj(' is not a module pattern"),
    # patterns that backtrack for hours over a module's name (an upload held the server) are not run
    (lambda c: c.update(alpha_pattern={"(.|.)*!": 8}), "alpha_pattern: '(.|.)*!' is not read: a pattern of"),
    (lambda c: c.update(rank_pattern={".*" * 8 + "!": 8}), "rank_pattern: '" + ".*" * 8 + "!' is not read"),
])
def test_lora_variants_that_compute_something_else_are_refused(meta, tmp_path, change, message):
    peft_lora(meta, tmp_path / "lora", target_modules=["q_proj"])
    config_path = tmp_path / "lora" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    change(config)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{config_path}: {re.escape(message)}"):
        adapter.load(meta, adapter=tmp_path / "lora", device="cpu")


def test_a_lora_of_rank_0_is_refused(meta, tmp_path):
    """Rank-0 lora_A/lora_B divided lora_alpha by zero (a ZeroDivisionError traceback)."""
    from safetensors.torch import load_file, save_file

    peft_lora(meta, tmp_path / "lora", target_modules=["q_proj"])
    weights = tmp_path / "lora" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({name: t[:0] if "lora_A" in name else t[:, :0] for name, t in tensors.items()}, weights)
    with pytest.raises(ValueError, match=r"lora_A \(0, 64\) and lora_B \(64, 0\) are not matrices of rank 1 or more"):
        adapter.load(meta, adapter=tmp_path / "lora", device="cpu")


@pytest.mark.parametrize("change, declared", [({"r": 8}, 8), ({"rank_pattern": {"q_proj": 2}}, 2)])
def test_a_lora_of_another_rank_than_its_config_says_is_refused(meta, tmp_path, change, declared):
    """PEFT refuses such a folder (its LoRA is built at the config's rank); it loaded, scaled by the tensors' rank."""
    peft_lora(meta, tmp_path / "lora", target_modules=["q_proj"])
    config_path = tmp_path / "lora" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: model.layers.0.self_attn.q_proj: LoRA of rank 4, "
                                         rf"but adapter_config.json gives it rank {declared} \(r or rank_pattern\)$"):
        adapter.load(meta, adapter=tmp_path / "lora", device="cpu")


def test_a_lora_tensor_stored_twice_is_refused(meta, tmp_path):
    """One copy with PEFT's base_model.model. prefix and one without: the later one was read."""
    from safetensors.torch import load_file, save_file

    peft_lora(meta, tmp_path / "lora", target_modules=["q_proj"])
    weights = tmp_path / "lora" / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = next(name for name in tensors if "layers.0." in name and "lora_A" in name)
    save_file({**tensors, name.removeprefix("base_model.model."): tensors[name] * 2}, weights)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.lora_A.weight is stored twice \(with and "
                                         r"without the base_model.model. prefix\)$"):
        adapter.load(meta, adapter=tmp_path / "lora", device="cpu")


def test_loras_on_other_modules_or_other_bases_are_refused(meta, tmp_path):
    from safetensors.torch import load_file, save_file

    peft_lora(meta, tmp_path / "lora", target_modules=["q_proj", "lm_head"])
    weights = tmp_path / "lora" / "adapter_model.safetensors"
    with pytest.raises(ValueError, match=r"unexpected entry 'base_model.model.lm_head\."):
        adapter.load(meta, adapter=tmp_path / "lora", device="cpu")
    state = {k: v for k, v in load_file(weights).items() if "lm_head" not in k}
    state.pop(next(k for k in state if k.endswith("layers.0.self_attn.q_proj.lora_B.weight")))
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.lora_B.weight is missing"):
        adapter.load(meta, adapter=tmp_path / "lora", device="cpu")
    peft_lora(meta, tmp_path / "other")
    wider = write_random_base(tmp_path / "wider", ModelArgs(dim=128, n_layers=3, n_heads=4, vocab_size=512,
                                                            multiple_of=32), seed=1)
    with pytest.raises(ValueError, match=r"adapter was made for a different base: dim=64 \(base has 128\)"):
        adapter.load(wider, adapter=tmp_path / "other", device="cpu")


def test_a_lora_of_ours_is_written_as_peft_loads_it(meta, tmp_path):
    import peft

    from adapter.config import AdapterArgs
    from adapter.convert import convert
    from bench.peers import hf_llama
    from tests.conftest import randomize_adapter

    lora = AdapterArgs(prompt_len=0, prompt_layers=0, lora_rank=3, lora_targets=("wq", "wk", "w2"))
    ours = randomize_adapter(adapter.load(meta, adapter=lora, device="cpu"), seed=2)
    adapter.save_adapter(ours, tmp_path / "native")
    convert(tmp_path / "native", tmp_path / "peft", "peft", meta)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["q_proj", "k_proj", "down_proj"]
    theirs = peft.PeftModel.from_pretrained(hf_llama(adapter.load(meta, device="cpu")), tmp_path / "peft").eval()
    assert torch.allclose(logits(ours), logits(theirs), atol=1e-5)
    back = adapter.load(meta, adapter=tmp_path / "peft", device="cpu")  # and read back, the same function
    assert torch.allclose(logits(back), logits(ours), atol=1e-6)
    with_prompts = randomize_adapter(adapter.load(meta, adapter=AdapterArgs(prompt_len=2, prompt_layers=1, lora_rank=2),
                                                  device="cpu"))
    adapter.save_adapter(with_prompts, tmp_path / "both")
    with pytest.raises(ValueError, match="gate_activation is tanh; PEFT uses raw gates"):
        convert(tmp_path / "both", tmp_path / "nothing", "peft", meta)
    assert not (tmp_path / "nothing").exists()


def test_training_continues_a_peft_lora(meta, tmp_path):
    from adapter.finetune import train
    from tests.finetune_helpers import alpaca_records, tiny_config, write_json

    reference = peft_lora(meta, tmp_path / "lora", target_modules=["q_proj", "down_proj"])
    data = write_json(tmp_path / "data.json", alpaca_records(8))
    result = train(tiny_config(meta, data, tmp_path / "run", mode="lora", init_adapter=str(tmp_path / "lora"),
                               epochs=1, lr=1e-12, prompt_len=1, prompt_layers=1))
    continued = adapter.load(meta, adapter=result.adapter, device="cpu")
    assert continued.adapter_args.lora_targets == ("wq", "w2")
    assert torch.allclose(logits(continued), logits(reference), atol=1e-5)
