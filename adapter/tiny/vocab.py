"""The tiny model's sentencepiece tokenizer, trained on the corpus alone (the base never sees anything else).

BPE with byte fallback, so any text (the Alpaca template's '#', other languages, emoji) still encodes;
LLaMA's special ids: unk 0, bos 1, eos 2, no pad. `vocab_size` is an upper bound (a small corpus has fewer
words to merge). One thread, so the model file is the same every time.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path


def train_tokenizer(lines: Sequence[str], path: Path, vocab_size: int) -> Path:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2, num_threads=1,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path
