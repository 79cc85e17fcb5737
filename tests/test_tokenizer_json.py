"""LLaMA 1/2 HF folders that ship only `tokenizer.json` (transformers' conversion of the SentencePiece model):
they encode as transformers' own tokenizer does, as the SentencePiece model does wherever HF's conversion
agrees with it, and the folder loads with the logits of the Meta original."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

import adapter
from adapter.bpe_tokenizer import BPETokenizer
from adapter.text_stream import CONTEXT_IDS, TextStream
from adapter.tokenizer import open_tokenizer

TEXTS = ["Hello world", "The red circle is above the blue square.", "café naïve 日本語 🙂 €5",
         "two  spaces\nand a newline\n\nand\ttabs", "Numbers 12345 and 3.14", "", " leading space", "  two leading"]


@pytest.fixture(scope="module")
def converted(base_folder, tmp_path_factory) -> tuple[Path, transformers.PreTrainedTokenizerBase]:
    """tokenizer.json + tokenizer_config.json as transformers writes them for the fixture's SentencePiece model."""
    source = tmp_path_factory.mktemp("spm")
    shutil.copy(base_folder / "tokenizer.model", source / "tokenizer.model")
    (source / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    folder = tmp_path_factory.mktemp("json")
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    assert not (folder / "tokenizer.model").exists()
    return folder, transformers.AutoTokenizer.from_pretrained(folder)


def test_ids_past_the_pieces_read_as_nothing_in_both_kinds(base_folder, converted):
    """A head may be padded past the tokenizer's pieces; such an id read as nothing in a tokenizer.json and raised
    IndexError in sentencepiece (a 500 from /detokenize, a traceback in the middle of an answer)."""
    for tokenizer in (open_tokenizer(converted[0] / "tokenizer.json"), open_tokenizer(base_folder / "tokenizer.model")):
        ids = tokenizer.encode("the red star", bos=False)
        assert tokenizer.decode([*ids, tokenizer.n_words, tokenizer.n_words + 40]) == tokenizer.decode(ids)


def test_tokenizer_json_encodes_as_transformers_and_sentencepiece(base_folder, converted):
    folder, reference = converted
    tokenizer = open_tokenizer(folder / "tokenizer.json")
    sentencepiece = open_tokenizer(base_folder / "tokenizer.model")
    assert isinstance(tokenizer, BPETokenizer)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.stop_ids) == (1, 2, {2})
    assert tokenizer.n_words == sentencepiece.n_words
    for text in TEXTS:
        ids = tokenizer.encode(text, bos=False)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert tokenizer.encode(text, bos=True, eos=True) == [1, *ids, 2]
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        # HF's conversion keeps no normalizer (the fixture's collapses repeated spaces, as LLaMA's does not)
        # and treats leading spaces its own way
        if text == " ".join(text.split()):
            assert ids == sentencepiece.encode(text, bos=False), text


def test_a_file_saved_with_truncation_or_padding_on_encodes_every_text_whole(converted, tmp_path):
    """A tokenizer.json saved after `enable_truncation(max_length=...)` cut every prompt to that many tokens, without
    a word (and one saved with padding on padded it): transformers encodes the whole text unless a call asks."""
    folder, reference = converted
    saved = json.loads((folder / "tokenizer.json").read_text())
    saved["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
    saved["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                        "pad_type_id": 0, "pad_token": "<unk>"}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, tmp_path / name)
    (tmp_path / "tokenizer.json").write_text(json.dumps(saved))
    tokenizer = open_tokenizer(tmp_path / "tokenizer.json")
    text = TEXTS[1]
    assert tokenizer.encode(text, bos=False) == reference.encode(text, add_special_tokens=False)
    assert len(tokenizer.encode(text, bos=False)) > 3


def test_a_token_reads_as_the_sentencepiece_model_shows_it(base_folder, converted):
    tokenizer = open_tokenizer(converted[0] / "tokenizer.json")
    sentencepiece = open_tokenizer(base_folder / "tokenizer.model")
    ids = tokenizer.encode("The red circle is above the blue square.", bos=True, eos=True)
    assert [tokenizer.token_text(i) for i in ids] == [sentencepiece.token_text(i) for i in ids]
    assert tokenizer.token_text(ids[1]).startswith(" "), "the word-start mark is a space, first token or not"
    # every piece, the byte-fallback ones too ("<0x20>" read "", "<0x80>" read U+FFFD)
    assert [tokenizer.token_text(i) for i in range(tokenizer.n_words)] == \
           [sentencepiece.token_text(i) for i in range(sentencepiece.n_words)]


def test_hf_folder_with_only_tokenizer_json_loads(base_folder, converted, tmp_path):
    from tests.conftest import TINY
    from tests.test_hf_format import Base, write_hf

    folder = write_hf(Base(base_folder, TINY, nested_rope=False), tmp_path / "hf", "safetensors")
    (folder / "tokenizer.model").unlink()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(converted[0] / name, folder / name)
    model = adapter.load(folder, device="cpu")
    original = adapter.load(base_folder, device="cpu")
    assert model.tokenizer.path.name == "tokenizer.json"
    prompt = "The red circle is above the blue square."
    assert model.tokenizer.encode(prompt) == original.tokenizer.encode(prompt)
    tokens = torch.tensor([model.tokenizer.encode(prompt)])
    with torch.no_grad():
        assert float((model(tokens) - original(tokens)).abs().max()) < 1e-5
    assert model.generate(prompt, temperature=0.0, max_new_tokens=8) == \
        original.generate(prompt, temperature=0.0, max_new_tokens=8)


def test_a_stream_goes_on_after_the_byte_fallback_rewrites_what_it_showed(converted):
    """HF's byte fallback decodes "a\\n" + <0x80> as "a" and two U+FFFD, the newline shown already rewritten: the
    stream showed nothing more, the rest of the answer lost."""
    tokenizer = open_tokenizer(converted[0] / "tokenizer.json")
    stray = tokenizer.backend.token_to_id("<0x80>")
    ids = [*tokenizer.encode("a\n", bos=False), stray, *tokenizer.encode(" is above the blue square", bos=False)]
    stream = TextStream(tokenizer)
    shown = "".join([stream.push(i) for i in ids] + [stream.finish()])
    assert shown.startswith("a\n") and shown.endswith(" is above the blue square")
    assert len(shown) == len(tokenizer.decode(ids))


def test_a_continuation_reads_on_from_a_context_cut_inside_a_character(base_folder):
    """The prompt's last ids began inside an emoji's bytes: the whole context was dropped, and the continuation
    lost the space it starts with."""
    tokenizer = open_tokenizer(base_folder / "tokenizer.model")
    prompts = (tokenizer.encode("red 🙂x" + " x" * words, bos=False) for words in range(CONTEXT_IDS))
    prompt = next(ids for ids in prompts if tokenizer.decode(ids[-CONTEXT_IDS:]).startswith("\ufffd"))  # inside it
    word = tokenizer.encode(" circle", bos=False)
    stream = TextStream(tokenizer, context=prompt)
    assert "".join([stream.push(i) for i in word] + [stream.finish()]) == " circle"


def test_a_continuation_completes_a_character_whose_first_bytes_end_its_context(base_folder):
    """Token ids cut inside a character (byte-fallback pieces): the whole context was dropped and the continuation
    began with U+FFFD for the bytes it did not see ("A caf" + "\\ufffd 🙂 in ...")."""
    tokenizer = open_tokenizer(base_folder / "tokenizer.model")
    ids = tokenizer.encode("A café 🙂 in 東京 costs €5 🚀", bos=False)
    cuts = [cut for cut in range(1, len(ids)) if tokenizer.decode(ids[:cut]).endswith("\ufffd")]
    assert len(cuts) >= 8, "the fixture's text cuts inside characters of 2, 3 and 4 bytes"
    for cut in range(1, len(ids)):
        stream = TextStream(tokenizer, context=ids[:cut])
        shown = "".join([stream.push(i) for i in ids[cut:]] + [stream.finish()])
        assert tokenizer.decode(ids[:cut]).rstrip("\ufffd") + shown == tokenizer.decode(ids), cut
