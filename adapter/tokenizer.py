"""SentencePiece tokenizer with the LLaMA conventions (BOS/EOS ids from the model file)."""

from __future__ import annotations

import os
from pathlib import Path

import sentencepiece as spm


class Tokenizer:
    def __init__(self, model_path: str | os.PathLike) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer: {path} does not exist")
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.Load(str(path))
        except (OSError, RuntimeError) as error:
            raise ValueError(f"tokenizer: {path} is not a sentencepiece model ({error})") from error
        self.path = path
        self.n_words: int = self.processor.vocab_size()
        self.bos_id: int = self.processor.bos_id()
        self.eos_id: int = self.processor.eos_id()
        self.pad_id: int = self.processor.pad_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text: expected a string, got {type(text).__name__}")
        ids = self.processor.EncodeAsIds(text)
        if bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos and self.eos_id >= 0:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.processor.DecodeIds([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        """The raw piece of one id (for showing tokens one by one)."""
        return self.processor.IdToPiece(int(token_id))
