"""`adapter.merge`: an adapter's LoRA, scales and tuned norms merged into the base's weights give the answers the
adapter gave (with the rest of it, written beside, on the merged base); a PEFT LoRA merges into what peft's own
merge_and_unload makes, read back by transformers; what cannot merge is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import adapter
from adapter.config import LORA_TARGETS, AdapterArgs, ModelArgs
from adapter.formats.native import save_adapter
from adapter.merge import main, merge, merged_model
from adapter.random_model import write_random_base
from tests.conftest import randomize_adapter
from tests.test_peft_lora import logits, peft_lora

SHAPE = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=64)
TOKENS = torch.tensor([[1, 45, 300, 7, 99, 12, 5], [1, 3, 8, 200, 41, 17, 66]])


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> Path:
    return write_random_base(tmp_path_factory.mktemp("merge") / "meta", SHAPE, seed=6)


def trained(meta: Path, args: AdapterArgs, folder: Path) -> adapter.Transformer:
    """A model with a random adapter of `args` (nothing left at its zero init), saved to `folder`."""
    model = randomize_adapter(adapter.load(meta, adapter=args, device="cpu"), seed=3, std=0.2)
    save_adapter(model, folder)
    return model


def test_a_peft_lora_merges_into_what_peft_merges_it_into_and_transformers_reads_it(meta, tmp_path):
    from transformers import LlamaForCausalLM

    reference = peft_lora(meta, tmp_path / "lora").merge_and_unload()
    written = merge(meta, tmp_path / "lora", tmp_path / "merged", dtype="float32")
    assert written.adapter is None and written.merged == ["LoRA"]
    assert not (tmp_path / "merged" / "adapter").exists(), "nothing of a LoRA is left"
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and "quantization_config" not in config

    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    expected = reference.state_dict()
    for name, value in theirs.state_dict().items():
        assert torch.allclose(value, expected[name], atol=1e-6), name
    assert torch.allclose(logits(theirs), logits(reference), atol=1e-5)
    ours = adapter.load(tmp_path / "merged", device="cpu")
    assert torch.allclose(logits(ours), logits(adapter.load(meta, adapter=tmp_path / "lora", device="cpu")), atol=1e-5)


@pytest.mark.parametrize("args, left, parts", [
    # the official formula: the prompts read the frozen wk, wv, so their LoRA and scales stay with the prompts
    (AdapterArgs(prompt_len=3, prompt_layers=2, bias=True, scale=True, norm=True, lora_rank=2, new_gate=True),
     {"lora_targets": ("wk", "wv"), "scale": True, "bias": True, "norm": False},
     ["LoRA", "input scales (but wk's and wv's)", "tuned norms"]),
    # litgpt's adapter v2: output scales (the head's too), every linear's bias, prompts through the tuned linears
    (AdapterArgs(prompt_len=3, prompt_layers=2, bias=True, bias_targets=LORA_TARGETS, scale=True, scale_at="output",
                 head_delta=True, norm=True, prompt_projection="tuned", lora_rank=2),
     {"lora_rank": 0, "scale": False, "bias": True, "head_delta": True, "norm": False},
     ["LoRA", "output scales", "tuned norms"]),
    # litgpt 0.5.5+: the prompts read through the fused q|k|v linear, queries included (GQA here)
    (AdapterArgs(prompt_len=3, prompt_layers=2, gate_activation="raw", bias=True, bias_targets=LORA_TARGETS,
                 scale=True, scale_at="output", head_delta=True, norm=True, prompt_projection="litgpt-qkv"),
     {"scale": False, "bias": True, "head_delta": True, "norm": False}, ["output scales", "tuned norms"]),
    # the V2 dialog release's kind: biases, input scales and norms, no prompts
    (AdapterArgs(prompt_len=0, prompt_layers=0, bias=True, bias_targets=LORA_TARGETS, scale=True, norm=True),
     {"scale": False, "bias": True, "norm": False, "prompt_layers": 0}, ["input scales", "tuned norms"]),
], ids=["official-v2-frozen-prompts", "litgpt-output-scales", "litgpt-qkv-prompts", "v2-dialog-kind"])
def test_merged_base_and_what_is_left_answer_as_the_whole_adapter(meta, tmp_path, args, left, parts):
    whole = trained(meta, args, tmp_path / "v2")
    written = merge(meta, tmp_path / "v2", tmp_path / "merged", dtype="float32")
    assert written.adapter == tmp_path / "merged" / "adapter" and written.merged == parts
    rest = adapter.load(tmp_path / "merged", adapter=written.adapter, device="cpu")
    assert all(getattr(rest.adapter_args, key) == value for key, value in left.items()), rest.adapter_args
    with torch.no_grad():
        expected = whole(TOKENS)
        assert torch.allclose(rest(TOKENS), expected, atol=1e-4), (rest(TOKENS) - expected).abs().max()
        if args.has_prompts:  # the gate still works on what is left: the prompts speak as much as before
            assert torch.allclose(rest(TOKENS, gate_scale=0.5), whole(TOKENS, gate_scale=0.5), atol=1e-4)
        in_memory = merged_model(whole)
        assert in_memory.adapter_args == rest.adapter_args
        assert torch.allclose(in_memory(TOKENS), expected, atol=1e-4)
    card = (tmp_path / "merged" / "README.md").read_text()
    assert f"`meta` with the {', '.join(parts)} of `v2` merged into its weights" in card
    assert "python app.py --base hf:OWNER/NAME --adapter hf:OWNER/NAME/adapter   # or this folder's path\n" in card


def test_bfloat16_is_the_default_store_and_a_lora_alone_merges_in_memory_too(meta, tmp_path):
    whole = trained(meta, AdapterArgs(prompt_len=0, prompt_layers=0, lora_rank=2), tmp_path / "lora")
    merge(meta, tmp_path / "lora", tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    from adapter.formats.common import new_file_mode

    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "merged").iterdir() if path.is_file()}
    assert set(modes.values()) == {new_file_mode()}, modes  # safetensors wrote its shards owner-only
    merged = adapter.load(tmp_path / "merged", device="cpu")
    with torch.no_grad():
        assert (merged(TOKENS) - whole(TOKENS)).abs().max() < 0.05  # bf16 rounding of the weights alone
    in_memory = merged_model(whole)
    assert in_memory.adapter_args.learns_nothing, "a LoRA alone leaves a plain model"
    with torch.no_grad():
        assert torch.allclose(in_memory(TOKENS), whole(TOKENS), atol=1e-4)
    assert in_memory.generate("Hello", temperature=0.0, max_new_tokens=4) == \
        whole.generate("Hello", temperature=0.0, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"model: its base is quantized \(nf4\); merge into a 16-bit base"):
        merged_model(adapter.load(meta, adapter=tmp_path / "lora", quantize="nf4", device="cpu"))


def test_what_cannot_merge_is_refused_by_name_and_nothing_is_written(meta, tmp_path, capsys):
    trained(meta, AdapterArgs(prompt_len=3, prompt_layers=2), tmp_path / "v1")
    with pytest.raises(ValueError, match=r"nothing in .*v1 merges into a LLaMA's weights \(it has adaption prompts "
                                         r"and gates; merging takes LoRA, scales and tuned norms\)"):
        merge(meta, tmp_path / "v1", tmp_path / "out")
    trained(meta, AdapterArgs(prompt_len=3, prompt_layers=2, lora_rank=2, lora_targets=("wk", "wv")),
            tmp_path / "kv")
    with pytest.raises(ValueError, match="but on wk and wv, which its prompts read"):
        merge(meta, tmp_path / "kv", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out*")), "no staging folder left behind"

    (tmp_path / "there").mkdir()
    assert main([str(meta), str(tmp_path / "kv"), str(tmp_path / "there")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_base_stored_quantized_is_refused(meta, tmp_path):
    from adapter.quantize_base import quantize_base

    trained(meta, AdapterArgs(prompt_len=0, prompt_layers=0, lora_rank=2), tmp_path / "lora")
    quantize_base(meta, tmp_path / "nf4", "nf4")
    with pytest.raises(ValueError, match=r"is already stored quantized \(nf4\); merge into the 16-bit base"):
        merge(tmp_path / "nf4", tmp_path / "lora", tmp_path / "out")


def test_the_command_line_says_what_it_wrote_and_how_to_serve_it(meta, tmp_path, capsys):
    trained(meta, AdapterArgs(prompt_len=3, prompt_layers=2, bias=True, lora_rank=2), tmp_path / "v2")
    assert main([str(meta), str(tmp_path / "v2"), str(tmp_path / "out"), "--dtype", "float16"]) == 0
    out = tmp_path / "out"
    assert capsys.readouterr().out == (f"wrote {out} (LoRA merged; the rest of the adapter in {out / 'adapter'}); "
                                       f"serve it with python app.py --base {out} --adapter {out / 'adapter'}\n")


def test_the_tiny_image_adapter_merged_answers_the_shipped_pictures_as_before(tmp_path, capsys):
    from adapter.tiny.assets import ASSETS

    assert main(["tiny", "tiny-image", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.endswith(f"--adapter {tmp_path / 'merged' / 'adapter'} --clip CLIP (the tower it "
                                            "read before)\n")
    assert "--adapter hf:OWNER/NAME/adapter --clip CLIP   # or this folder's path\n" in \
        (tmp_path / "merged" / "README.md").read_text()
    whole = adapter.load("tiny", adapter="tiny-image", clip="tiny", device="cpu")
    rest = adapter.load(tmp_path / "merged", adapter=tmp_path / "merged" / "adapter", clip="tiny", device="cpu")
    in_memory = merged_model(whole)
    assert in_memory.image_encoder is whole.image_encoder
    examples = json.loads((ASSETS / "examples" / "examples.json").read_text())["image"][:4]
    for example in examples:
        prompt = adapter.image_question(example["question"])
        for gate in (0.5, 1.0):
            asked = dict(image=ASSETS / "examples" / example["image"], gate_scale=gate, temperature=0.0,
                         max_new_tokens=8)
            answer = whole.generate(prompt, **asked)
            assert rest.generate(prompt, **asked) == answer == in_memory.generate(prompt, **asked), (example, gate)


def test_the_merged_folder_is_pushed_with_its_adapter_and_served_from_the_hub(meta, tmp_path, monkeypatch, capsys):
    from tests.test_hub_shape import HubOfFolders
    from tests.test_push import FakeHub

    whole = trained(meta, AdapterArgs(prompt_len=3, prompt_layers=2, bias=True, lora_rank=2), tmp_path / "v2")
    hub = FakeHub(tmp_path / "hub")
    hub.install(monkeypatch)
    out = tmp_path / "merged"
    assert main([str(meta), str(tmp_path / "v2"), str(out), "--dtype", "float32", "--push-to-hub", "me/merged"]) == 0
    assert capsys.readouterr().out.endswith("pushed https://huggingface.co/me/merged/commit/0123abc; serve it with "
                                            "python app.py --base hf:me/merged --adapter hf:me/merged/adapter\n")
    pushed = hub.folder("me/merged")
    assert sorted(p.name for p in pushed.rglob("*")) == sorted(p.name for p in out.rglob("*"))
    card = (pushed / "README.md").read_text()
    assert "python app.py --base hf:me/merged --adapter hf:me/merged/adapter" in card
    assert 'from_pretrained("me/merged")' in card

    HubOfFolders({"me/merged": pushed}, tmp_path / "cache").install(monkeypatch)  # served back from the hub
    served = adapter.load("hf:me/merged", adapter="hf:me/merged/adapter", device="cpu")
    with torch.no_grad():
        assert torch.allclose(served(TOKENS), whole(TOKENS), atol=1e-4)

    hub.token = None
    assert main([str(meta), str(tmp_path / "v2"), str(tmp_path / "no"), "--push-to-hub", "me/merged"]) == 2
    assert "error: --push-to-hub: no Hugging Face token" in capsys.readouterr().err
    assert not (tmp_path / "no").exists(), "refused before anything is merged"
