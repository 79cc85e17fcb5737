"""Tokenizers with the LLaMA conventions: a BOS id put in front, generation ends at one of the stop ids.

LLaMA 1/2 ship a SentencePiece model (`tokenizer.model`); Llama 3 ships a byte-level BPE, as HF's
`tokenizer.json` or as Meta's tiktoken ranks in a `tokenizer.model` of its own, and Mistral NeMo one as
`tekken.json` (adapter.bpe_tokenizer); a GGUF file carries either in its metadata (adapter.gguf_tokenizer).
`open_tokenizer` tells them apart by their content, so every loader opens whichever a checkpoint has.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from .paths import not_a_file

# the file names a checkpoint folder may keep its tokenizer under, in the order they are looked for
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tekken.json")


def lone_surrogate(text: str) -> str | None:
    """Why `text` cannot be tokenized: it holds a lone surrogate ("\\ud800"), half of a character, which JSON may
    escape and Python makes of a command line's undecodable bytes, but no tokenizer reads (sentencepiece and
    tokenizers raised from deep inside); None where it can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"holds {text[error.start]!r}, half of a character (a lone surrogate)"
    return None


class Tokenizer:
    """What generation and training need of a tokenizer, whatever kind the checkpoint ships."""

    kind: str  # what `python -m adapter.inspect` calls it
    path: Path
    n_words: int
    bos_id: int  # -1: the tokenizer has none
    eos_id: int
    stop_ids: frozenset[int]  # generation ends at any of these (eos_id and, e.g., Llama 3's <|eot_id|>)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text: expected a string, got {type(text).__name__}")
        if (problem := lone_surrogate(text)) is not None:
            raise ValueError(f"text: {problem}")
        ids = self._encode(text)
        if bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos and self.eos_id >= 0:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def token_text(self, token_id: int) -> str:
        """One token as it reads on its own, its leading space kept (" red"); special tokens by their name.
        For showing tokens one at a time (adapter.next_token), where decode() would drop that space."""
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to a text (its leading space kept; special tokens as their name): a token
        holding part of a character (a byte-fallback piece, a byte-level piece) gives those bytes, where its text
        can only name them ("<0xC3>") or stand in for them ("\ufffd")."""
        return self.token_text(token_id).encode()

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    """LLaMA 1/2's tokenizer: BOS/EOS ids from the model file.

    Control tokens written in a text (BOS and EOS as "<s>" and "</s>": Llama 2 Chat's turns, adapter.prompts;
    Mistral's [INST] and [/INST], where its tokenizer has them) become their ids, and the text between them is
    encoded part by part, as Meta's Llama 2 chat code and mistral-common encode each message on its own;
    transformers too reads special tokens written in a text as those tokens."""

    kind = "SentencePiece"

    def __init__(self, model_path: str | os.PathLike) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer: {not_a_file(path)}")
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except (OSError, RuntimeError) as error:
            raise ValueError(f"tokenizer: {path} is not a sentencepiece model ({error})") from error
        self._take(processor, path)

    @classmethod
    def from_proto(cls, proto: bytes, path: Path) -> "SentencePieceTokenizer":
        """A model given as its serialized ModelProto (rebuilt from a GGUF file's vocabulary); `path` says where
        it came from."""
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(proto)
        except (OSError, RuntimeError) as error:
            raise ValueError(str(error)) from error
        tokenizer = cls.__new__(cls)
        tokenizer._take(processor, path)
        return tokenizer

    def _take(self, processor: spm.SentencePieceProcessor, path: Path) -> None:
        self.processor = processor
        self.path = path
        self.n_words = self.processor.vocab_size()
        self.bos_id = self.processor.bos_id()
        self.eos_id = self.processor.eos_id()
        self.pad_id: int = self.processor.pad_id()
        self.stop_ids = frozenset({self.eos_id} - {-1})
        self.specials = {self.processor.IdToPiece(i): i for i in range(self.n_words) if self.processor.IsControl(i)}
        longest_first = sorted(self.specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if self.specials else None

    def _encode(self, text: str) -> list[int]:
        if self._split is None:
            return self.processor.EncodeAsIds(text)
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self.specials:
                ids.append(self.specials[part])
            elif part:
                ids += self.processor.EncodeAsIds(part)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; an id past the pieces (a head padded beyond them) reads as nothing, as in the BPE
        tokenizers (sentencepiece raised IndexError: a 500 from /detokenize, a traceback mid-answer)."""
        return self.processor.DecodeIds([int(i) for i in ids if 0 <= int(i) < self.n_words])

    def token_text(self, token_id: int) -> str:
        """The piece with its word-start mark as a space ("\u2581red" -> " red"); a byte-fallback piece as its
        character when it is one ASCII byte ("<0x0A>" -> "\\n"), else as named ("<0xE2>", "</s>")."""
        token_id = int(token_id)
        piece = self.processor.IdToPiece(token_id)
        if self.processor.IsByte(token_id):
            value = int(piece[3:-1], 16)
            return chr(value) if value < 0x80 else piece
        if self.processor.IsControl(token_id) or self.processor.IsUnknown(token_id):
            return piece
        return piece.replace("\u2581", " ")

    def token_bytes(self, token_id: int) -> bytes:
        if self.processor.IsByte(int(token_id)):
            return bytes([int(self.processor.IdToPiece(int(token_id))[3:-1], 16)])
        return super().token_bytes(token_id)


def find_tokenizer(folder: Path) -> Path:
    """The tokenizer file of a checkpoint folder (`tokenizer.model` first, as LLaMA 2's HF folders hold both)."""
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            return folder / name
    return folder / TOKENIZER_FILES[0]  # opening it names the file that is missing


def open_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer in `path`: a SentencePiece model, HF's `tokenizer.json`, Meta's tiktoken ranks, Mistral's
    tekken.json, or the vocabulary in a GGUF file's metadata."""
    from .bpe_tokenizer import BPETokenizer, is_tiktoken_file
    from .formats.gguf import is_gguf_file

    path = Path(path)
    if not path.is_file():
        names = " or ".join(TOKENIZER_FILES)
        raise FileNotFoundError(f"tokenizer: {not_a_file(path)} (a checkpoint folder needs {names})")
    if is_gguf_file(path):
        from .gguf_tokenizer import gguf_tokenizer

        return gguf_tokenizer(path)
    if path.name == "tekken.json":
        return BPETokenizer.from_tekken(path)
    if path.suffix == ".json":
        return BPETokenizer.from_json(path)
    if is_tiktoken_file(path):
        return BPETokenizer.from_tiktoken(path)
    return SentencePieceTokenizer(path)
