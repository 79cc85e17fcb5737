"""Small synthetic datasets and tiny training settings shared by the fine-tuning tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from adapter.finetune import TrainConfig

WORDS = "the a red blue green circle square left right top answer shape colour".split()


def alpaca_records(count: int, seed: int = 0, with_input: bool = False) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for index in range(count):
        record = {"instruction": " ".join(rng.choice(WORDS) for _ in range(4)),
                  "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))}
        if with_input and index % 2:
            record["input"] = rng.choice(WORDS)
        records.append(record)
    return records


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    """Dicts are dumped; strings are written as given (for broken lines)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def tiny_config(base: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    """A few fast steps on the tiny base: the whole dataset in one step, all 4 layers adapted."""
    settings = dict(base=str(base), data=str(data), out=str(out), prompt_len=4, prompt_layers=4, epochs=4,
                    warmup_epochs=0, lr=0.1, batch_size=16, micro_batch_size=4, max_seq_len=128, val_fraction=0,
                    progress=False, device="cpu")
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(autouse=True)
def one_thread_and_own_rng():
    """One torch thread: the tiny models gain nothing from more, and OpenMP threads slow down many times over
    when other work shares the CPUs. Training seeds (and on resume restores) the global generators: give the
    other tests theirs back, since some build models from whatever state the generator is in."""
    threads, state = torch.get_num_threads(), random.getstate()
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(state)
    torch.set_num_threads(threads)
