"""Mistral's own folders (params.json in Mistral's keys, consolidated*.safetensors, tokenizer.model.v3) and
Mistral 7B v0.1's Meta-style release give the logits of the same weights in a Meta folder; the SwiGLU width
comes from `hidden_dim`, the sliding window is kept (the default context when none is recorded), and bad folders
name the file at fault."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import adapter
from adapter.config import ModelArgs
from adapter.inspect import describe
from adapter.prompts import PROMPT_FORMATS
from adapter.random_model import main as random_model_main
from adapter.random_model import write_random_base, write_random_mistral

# an FFN width Meta's rule would not give from dim 64 (multiple_of 256 -> 256): a reader that ignored Mistral's
# `hidden_dim` would build the wrong shape and fail to load
ARGS = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_dim=96, rope_theta=1e6)
WINDOW = 32
TOKENS = torch.tensor([[1, 45, 300, 7, 99, 12, 5], [1, 3, 8, 200, 41, 17, 66]])


@pytest.fixture(scope="module")
def meta_base(tmp_path_factory) -> Path:
    return write_random_base(tmp_path_factory.mktemp("meta") / "base", ARGS, seed=7)


def mistral_params(window: int | None = WINDOW, **changes) -> dict:
    """params.json as Mistral writes it (no multiple_of, no ffn_dim_multiplier)."""
    params = {"dim": ARGS.dim, "n_layers": ARGS.n_layers, "head_dim": ARGS.head_dim, "hidden_dim": ARGS.ffn_dim,
              "n_heads": ARGS.n_heads, "n_kv_heads": ARGS.n_kv_heads, "norm_eps": ARGS.norm_eps,
              "vocab_size": ARGS.vocab_size, "rope_theta": ARGS.rope_theta}
    if window is not None:
        params["sliding_window"] = window
    return {**params, **changes}


def mistral_folder(meta_base: Path, folder: Path, files: int = 1, tokenizer: str = "tokenizer.model.v3",
                   **params) -> Path:
    """The Meta base's weights in Mistral's layout: one consolidated.safetensors, or `files` split files."""
    folder.mkdir(parents=True)
    state = torch.load(meta_base / "consolidated.00.pth", weights_only=True)
    names = sorted(state)
    if files == 1:
        save_file(state, folder / "consolidated.safetensors")
    for index in range(files if files > 1 else 0):
        part = {name: state[name] for name in names[index::files]}
        save_file(part, folder / f"consolidated-{index + 1:05d}-of-{files:05d}.safetensors")
    shutil.copy(meta_base / "tokenizer.model", folder / tokenizer)
    (folder / "params.json").write_text(json.dumps(mistral_params(**params)))
    return folder


def logits(model: adapter.Transformer) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


@pytest.mark.parametrize("files", [1, 2])
def test_mistral_folders_give_the_logits_of_the_same_weights(meta_base, files, tmp_path):
    expected = logits(adapter.load(meta_base, device="cpu"))
    folder = mistral_folder(meta_base, tmp_path / "mistral", files=files)
    model = adapter.load(folder, device="cpu")
    assert (model.base_format, model.base_family, model.args.ffn_hidden_dim) == ("mistral", "Mistral", ARGS.ffn_dim)
    assert (model.args.max_seq_len, model.args.sliding_window, model.args.rope_theta) == (WINDOW, WINDOW,
                                                                                          ARGS.rope_theta)
    assert torch.equal(logits(model), expected)
    about = describe(folder)
    assert about[0] == f"{folder}: base Mistral, mistral format"
    assert "  context 32 tokens; attention over a sliding window of 32" in about


def test_mistral_7b_v01s_meta_style_release_reads_mistrals_keys(meta_base, tmp_path):
    folder = tmp_path / "v0.1"
    shutil.copytree(meta_base, folder)
    (folder / "params.json").write_text(json.dumps(mistral_params()))
    model = adapter.load(folder, device="cpu")
    assert model.base_format == "meta" and model.args.max_seq_len == WINDOW
    assert torch.equal(logits(model), logits(adapter.load(meta_base, device="cpu")))
    assert describe(folder)[0] == f"{folder}: base Mistral, meta format"
    without_window = tmp_path / "v0.3"
    shutil.copytree(meta_base, without_window)
    (without_window / "params.json").write_text(json.dumps(mistral_params(window=None)))
    assert adapter.load(without_window, device="cpu").args.max_seq_len == ModelArgs().max_seq_len


def test_an_adapter_on_a_mistral_folder_is_the_adapter_on_the_same_weights(meta_base, tmp_path):
    v1 = adapter.AdapterArgs(prompt_len=3, prompt_layers=2)
    trained = adapter.load(meta_base, adapter=v1, device="cpu")
    with torch.no_grad():
        for layer in trained.layers[trained.first_prompt_layer:]:
            layer.attention.gate.normal_()
        trained.adapter_query.weight.normal_()
    path = adapter.save_adapter(trained, tmp_path / "run")
    on_mistral = adapter.load(mistral_folder(meta_base, tmp_path / "mistral"), adapter=path, device="cpu")
    assert torch.equal(logits(on_mistral), logits(trained))


def test_heads_narrower_than_dim_over_heads_as_mistral_nemo_has_them(tmp_path):
    """NeMo's params.json has head_dim 128 at dim 5120 and 32 heads (not 160); here 8 at dim 64 and 4 heads."""
    nemo = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_size=8, vocab_size=512, ffn_dim=96,
                     rope_theta=1e6)
    folder = write_random_mistral(tmp_path / "nemo", nemo, seed=5)
    assert json.loads((folder / "params.json").read_text())["head_dim"] == 8
    model = adapter.load(folder, device="cpu")
    assert model.args.head_dim == 8 and model.layers[0].attention.wo.weight.shape == (64, 32)
    assert torch.equal(logits(model), logits(adapter.load(write_random_base(tmp_path / "meta", nemo, seed=5),
                                                          device="cpu")))


BAD = {
    "head_dim": (dict(head_dim=7), "head dim 7 must be even for rotary embeddings"),
    "window": (dict(window="4k"), "params.json: sliding_window must be an integer >= 2 or null, got '4k'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_mistral_params_name_the_file(meta_base, case, tmp_path):
    changes, message = BAD[case]
    folder = mistral_folder(meta_base, tmp_path / "bad", **changes)
    with pytest.raises(ValueError, match=message):
        adapter.load(folder, device="cpu")


def test_a_context_beyond_the_window_and_broken_folders_are_refused_naming_the_file(meta_base, tmp_path):
    folder = mistral_folder(meta_base, tmp_path / "mistral")
    longer = adapter.load(folder, device="cpu", max_seq_len=64).args
    assert (longer.max_seq_len, longer.sliding_window) == (64, WINDOW), "past the window, attention slides"
    assert adapter.load(folder, device="cpu", max_seq_len=16).args.max_seq_len == 16
    (folder / "tokenizer.model.v3").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer: .*mistral has none of tokenizer.model, "
                                                r"tokenizer.model.v3, tokenizer.model.v1"):
        adapter.load(folder, device="cpu")
    split = mistral_folder(meta_base, tmp_path / "split", files=2, tokenizer="tokenizer.model")
    shutil.copy(split / "consolidated-00001-of-00002.safetensors", split / "consolidated-00003-of-00002.safetensors")
    with pytest.raises(ValueError, match=r"consolidated-00003-of-00002.safetensors: tensor .* is also in "
                                         r".*consolidated-00001-of-00002.safetensors"):
        adapter.load(split, device="cpu")


def test_the_random_model_command_writes_mistrals_layout(tmp_path, capsys):
    folder = tmp_path / "mistral"
    assert random_model_main([str(folder), "--mistral", "--n-kv-heads", "2", "--sliding-window", "64"]) == 0
    assert capsys.readouterr().out == f"wrote a random Mistral (64 dim, 4 layers, vocab 512) to {folder}\n"
    assert sorted(p.name for p in folder.iterdir()) == ["consolidated.safetensors", "params.json", "tokenizer.model.v3"]
    model = adapter.load(folder, device="cpu")
    assert (model.base_format, model.args.max_seq_len, model.args.kv_heads, model.args.rope_theta) == \
        ("mistral", 64, 2, 1e6)
    PROMPT_FORMATS["mistral-v3"].check(model.tokenizer)  # [INST] and [/INST] are tokens of their own
    assert random_model_main([str(tmp_path / "x"), "--sliding-window", "64"]) == 2
    assert capsys.readouterr().err == "error: --sliding-window: only with --mistral\n"
    # (a window of 0 was written, and the folder then refused by loading)
    assert random_model_main([str(tmp_path / "w"), "--mistral", "--sliding-window", "0"]) == 2
    assert capsys.readouterr().err == "error: --sliding-window: must be at least 2, got 0\n"
    assert not (tmp_path / "w").exists()
    with pytest.raises(SystemExit):
        random_model_main([str(tmp_path / "y"), "--mistral", "--llama3"])
    assert random_model_main([str(tmp_path / "nemo"), "--mistral", "--head-dim", "32", "--n-layers", "1"]) == 0
    assert adapter.load(tmp_path / "nemo", device="cpu").layers[0].attention.wq.weight.shape == (128, 64)
    capsys.readouterr()
    assert random_model_main([str(tmp_path / "z"), "--head-dim", "0"]) == 2
    assert capsys.readouterr().err == "error: head_size: must be a positive integer, got 0\n"
