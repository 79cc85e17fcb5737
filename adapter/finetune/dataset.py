"""Training and validation sets: a seeded split of the records, then every example encoded."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..tokenizer import Tokenizer
from .encode import Encoded, encoded_examples
from .records import Example


@dataclass
class Dataset:
    train: list[Encoded]
    val: list[Encoded]
    truncated: int  # examples longer than --max-seq-len, cut at its end
    emptied: int  # of those, the ones cut before their response: they teach nothing

    @property
    def has_images(self) -> bool:
        return any(e.image is not None for e in self.train + self.val)


def split_records(count: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) record indices from a seeded permutation, never simply the first records.

    A non-zero fraction holds out at least one record, as long as one is left to train on.
    """
    order = list(range(count))
    random.Random(f"split:{seed}").shuffle(order)
    n_val = min(max(round(count * val_fraction), 1 if val_fraction > 0 else 0), count - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


def build_dataset(records: list[list[Example]], tokenizer: Tokenizer, max_seq_len: int, val_fraction: float,
                  seed: int, answer_end: int | None = None,
                  val_records: list[list[Example]] | None = None) -> Dataset:
    """Split by record (a conversation's turns stay on one side, a document's windows too), or train on all of them
    and validate on `val_records`, then encode every example (each response ended by `answer_end`, default EOS;
    a plain-text document in windows of `max_seq_len`)."""
    if val_records is None:
        train_ids, val_ids = split_records(len(records), val_fraction, seed)
        train, val = [records[i] for i in train_ids], [records[i] for i in val_ids]
    else:
        train, val = records, val_records
    dataset = Dataset([], [], 0, 0)
    for chosen, target in ((train, dataset.train), (val, dataset.val)):
        for record in chosen:
            for example in record:
                encoded, truncated = encoded_examples(example, tokenizer, max_seq_len, answer_end)
                dataset.truncated += truncated
                dataset.emptied += truncated and encoded[0].targets == 0
                target.extend(encoded)
    return dataset
