"""The tiny model's sentencepiece tokenizer, trained on the corpus alone (the base never sees anything else).

BPE with byte fallback, so any text (the Alpaca template's '#', other languages, emoji) still encodes;
LLaMA's special ids: unk 0, bos 1, eos 2, no pad. `vocab_size` is an upper bound (a small corpus has fewer
words to merge). One thread, so the model file is the same every time.

Pieces may span spaces (`split_by_whitespace=False`), so the world's phrases become one piece each
("▁on▁the▁left", "▁There▁is▁a"): "There is a large red star at the top." is 6 pieces for 9 words, and a
thing's place sits right after it. The words a question names a thing by (colours, shapes, sizes) are fixed
pieces of their own (`user_defined_symbols`) that never fuse with their neighbours: "Where is the star?" then
ends in the very piece that the scene's "▁star" is, so the base finds the thing by an exact match (what
induction heads do) and reads the place after it. When "▁red▁star" was one piece, the question's "▁star"
matched nothing in the scene: the base answered places at 35%; with fixed pieces at 71%. Digits stay pieces of
their own (`split_digits`), so a number never fuses with the punctuation around it ("answered:▁1.") and an
answer is the same tokens wherever it stands.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from .world import COLOURS, SHAPES, SIZES

NAMING_WORDS = tuple(f"▁{word}" for word in (*COLOURS, *SHAPES, *SIZES))  # fixed pieces (see above)


def train_tokenizer(lines: Sequence[str], path: Path, vocab_size: int) -> Path:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2, num_threads=1,
        split_by_whitespace=False, split_digits=True, user_defined_symbols=list(NAMING_WORDS),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path
