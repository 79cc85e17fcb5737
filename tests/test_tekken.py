"""Mistral's tekken.json (Mistral NeMo's tokenizer): the same ids as transformers' own tekken converter gives, and
a Mistral NeMo-shaped folder of Mistral's own layout with it."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers.integrations.mistral import convert_tekken_tokenizer

import adapter
from adapter.bpe_tokenizer import TEKKEN_SPECIALS, TEKKEN_SPLIT, read_ranks
from adapter.config import ModelArgs
from adapter.inspect import describe
from adapter.prompts import PROMPT_FORMATS
from adapter.random_model import train_bpe_ranks, write_random_mistral
from adapter.tokenizer import open_tokenizer

SPECIALS = 40  # NeMo's files reserve 1000
KEPT = 400  # ranks kept (default_vocab_size - SPECIALS); the file holds more, as NeMo's holds 150000 for 131072
TEXTS = ["Name a colour.", "  What is\nthe star?  12345 ünïcödé 🙂", "[INST]Hi[/INST]Hello!</s>", "<s>x<pad>",
         "There is a small red circle in the centre."]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[bytes]:
    path = train_bpe_ranks(tmp_path_factory.mktemp("ranks") / "ranks.model", ranks=KEPT + 60, seed=1)
    return [token for token, _ in sorted(read_ranks(path).items(), key=lambda item: item[1])]


def tekken(folder: Path, ranks: list[bytes], specials: list[str] | None) -> Path:
    """A tekken.json as Mistral writes one: the vocab (token_bytes in base64), the config, and in newer files
    (v7+) the special tokens with their ranks."""
    data = {"config": {"pattern": TEKKEN_SPLIT, "num_vocab_tokens": len(ranks), "default_vocab_size": SPECIALS + KEPT,
                       "default_num_special_tokens": SPECIALS, "version": "v7" if specials else "v3"},
            "vocab": [{"rank": rank, "token_bytes": base64.b64encode(token).decode(),
                       "token_str": token.decode("utf-8", errors="replace")} for rank, token in enumerate(ranks)]}
    if specials is not None:
        data["special_tokens"] = [{"rank": rank, "token_str": name, "is_control": True}
                                  for rank, name in enumerate(specials)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tekken.json").write_text(json.dumps(data))
    return folder / "tekken.json"


@pytest.mark.parametrize("listed", [True, False], ids=["special_tokens-listed", "mistral-common-defaults"])
def test_tekken_ids_are_transformers_converters(ranks, tmp_path, listed):
    """A file without special_tokens (NeMo's, v3) gets mistral-common's defaults: the same ids as the file that
    lists them, which the reference converter reads without mistral-common."""
    listing = tekken(tmp_path / "listed", ranks, list(TEKKEN_SPECIALS))
    path = listing if listed else tekken(tmp_path / "bare", ranks, None)
    ours, reference = open_tokenizer(path), convert_tekken_tokenizer(str(listing))
    assert ours.n_words == SPECIALS + KEPT == len(reference)
    assert (ours.bos_id, ours.eos_id) == (1, 2) and ours.stop_ids == {2}
    for text in TEXTS:
        expected = reference.encode(text, add_special_tokens=False)
        assert ours.encode(text, bos=False) == expected, text
        assert ours.encode(text, bos=True) == [1, *expected]
        assert ours.decode(expected) == reference.decode(expected, skip_special_tokens=True)
    assert ours.encode("[INST][/INST][SYSTEM_PROMPT]<SPECIAL_39>", bos=False) == [3, 4, 17, 39]
    assert max(ours.encode(" ".join(TEXTS), bos=False)) < SPECIALS + KEPT, "ranks past default_vocab_size dropped"
    assert ours.kind == "byte-level BPE, Mistral tekken.json"


def test_a_mistral_nemo_shaped_folder_with_tekken_json(ranks, tmp_path):
    """Mistral's own layout of NeMo: params.json with head_dim, consolidated.safetensors, tekken.json; asked in
    mistral-v3 ([INST] and [/INST] are control tokens 3 and 4)."""
    nemo = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_size=8, vocab_size=SPECIALS + KEPT,
                     ffn_dim=96, rope_theta=1e6)
    folder = write_random_mistral(tmp_path / "nemo", nemo, seed=3)
    (folder / "tokenizer.model.v3").unlink()
    shutil.copy(tekken(tmp_path / "t", ranks, None), folder / "tekken.json")
    model = adapter.load(folder, device="cpu")
    assert model.tokenizer.path.name == "tekken.json" and model.args.head_dim == 8
    fmt = PROMPT_FORMATS["mistral-v3"]
    fmt.check(model.tokenizer)
    prompt = fmt.chat([("Hi", "Hello!")], "Name a colour.")
    ids = model.tokenizer.encode(prompt, bos=True)
    assert ids[:2] == [1, 3] and ids.count(3) == 2 and ids.count(4) == 2 and ids.count(2) == 1
    assert model.generate("Name a colour.", max_new_tokens=3, temperature=0.0) is not None
    assert "tekken.json (byte-level BPE, Mistral tekken.json, 440 pieces" in "\n".join(describe(folder))
    with torch.no_grad():
        assert model(torch.tensor([ids])).shape == (1, len(ids), SPECIALS + KEPT)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["config"].pop("pattern"), "a tekken.json needs 'vocab' and 'config' with pattern"),
    (lambda d: d.update(special_tokens=[{"rank": 0, "token_str": "<s>"}, {"rank": 2, "token_str": "</s>"}]),
     r"special token ranks are not 0..1"),
    (lambda d: d["config"].update(default_num_special_tokens=5), "20 special tokens for default_num_special_tokens=5"),
    (lambda d: d["vocab"].pop(3), r"the first 400 vocab ranks .* are not 0..399"),
    # garbled fields: TypeErrors, the tokenizers library's bare Exception, or (<s> twice) every id shifted by one
    (lambda d: d["config"].update(default_vocab_size="420"), "config.default_vocab_size must be a whole number, got "
                                                             "'420'"),
    (lambda d: d["config"].update(default_num_special_tokens="20"), "config.default_num_special_tokens must be a "
                                                                    "whole number, got '20'"),
    (lambda d: d["vocab"][3].update(rank="3"), r"the first 400 vocab ranks .* are not 0..399"),
    (lambda d: d["config"].update(pattern="(["), r"config.pattern is not a regular expression \(Oniguruma error"),
    (lambda d: d["config"].update(pattern=5), "config.pattern must be a regular expression, got 5"),
    (lambda d: d.update(special_tokens=[{"rank": 0, "token_str": "<s>"}, {"rank": 1, "token_str": "<s>"},
                                        {"rank": 2, "token_str": "</s>"}]),
     "special_tokens lists '<s>' more than once"),
])
def test_a_broken_tekken_json_names_the_file_and_the_field(ranks, tmp_path, change, message):
    path = tekken(tmp_path, ranks, None)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"tokenizer: .*tekken.json: {message}"):
        open_tokenizer(path)
