"""The shipped tiny model's files, each changed at random (seeded: the same cases every run), loaded and asked a
question: each case works, or fails with one ValueError or OSError that names the file, never another exception
from deep inside torch, open_clip or bitsandbytes, and never a hang. MUTATED_CASES=500 runs more cases of each kind
(16 by default).

A longer run of the same mutations found what these cases keep fixed: a CLIP config open_clip could not build
(a TypeError, ZeroDivisionError, ... from its classes), CLIP weights of another model (torch's RuntimeError), a
`head_dim` that was no number, JSON's `true` taken as a width of 1, a config's 10**12 layers built one by one,
4-bit block scales in a second dimension (an IndexError in bitsandbytes' kernels while answering), and a GGUF file's
embedding_length given as a list (divided before it was checked)."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import adapter
from adapter.tiny.assets import ASSETS

ODD_VALUES = (None, True, False, 0, -1, 3, 10**12, 0.5, -0.5, float("nan"), float("inf"), "", "x", "tanh", "v2", [],
              [1], ["wq", "wq"], {}, {"a": 1})
ADDED_KEYS = ("n_kv_heads", "ffn_dim_multiplier", "head_dim", "hidden_dim", "use_scaled_rope", "rope_scaling",
              "sliding_window", "visual", "lora_rank", "prompt_format", "quick_gelu")
CASES = int(os.environ.get("MUTATED_CASES", "16"))  # per kind of file
GGUF_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "rope.dimension_count", "rope.freq_base", "attention.layer_norm_rms_epsilon")


def paths(document: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON document, as the keys and indices that lead to it."""
    found = [prefix] if prefix else []
    children = document.items() if isinstance(document, dict) else enumerate(document) \
        if isinstance(document, list) else ()
    for key, value in children:
        found += paths(value, prefix + (key,))
    return found


def mutated(document: Any, rng: random.Random) -> Any:
    """The document with one to three places changed: a value replaced by an odd one, a key dropped or added."""
    document = copy.deepcopy(document)
    for _ in range(rng.choice((1, 1, 2, 3))):
        place = rng.choice(paths(document))
        parent = document
        for key in place[:-1]:
            parent = parent[key]
        roll = rng.random()
        if roll < 0.2 and isinstance(parent, dict):
            del parent[place[-1]]
        elif roll < 0.35 and isinstance(parent, dict):
            parent[rng.choice(ADDED_KEYS)] = rng.choice(ODD_VALUES)
        else:
            parent[place[-1]] = rng.choice(ODD_VALUES)
    return document


def rewrite_json(path: Path, rng: random.Random) -> None:
    path.write_text(json.dumps(mutated(json.loads(path.read_text(encoding="utf-8")), rng)), encoding="utf-8")


def rewrite_safetensors_header(path: Path, change) -> None:
    """A safetensors file with its JSON header changed by `change(header)` (its tensors' bytes kept)."""
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size:])


def adapter_metadata(rng: random.Random):
    def change(header: dict) -> None:
        metadata = header["__metadata__"]
        key = rng.choice(sorted(metadata))
        metadata[key] = json.dumps(mutated(json.loads(metadata[key]), rng)) if metadata[key][:1] in "{[" \
            else str(rng.choice(ODD_VALUES))
    return change


def block_scales_reshaped(rng: random.Random):
    def change(header: dict) -> None:
        names = sorted(name for name in header if name.endswith((".absmax", ".quant_map", ".nested_absmax")))
        entry = header[rng.choice(names)]
        count = int(torch.tensor(entry["shape"]).prod())
        entry["shape"] = rng.choice(([1, count], [count, 1]))
    return change


def gguf_metadata_changed(rng: random.Random):
    """A GGUF writer's callback that gives one to three of the shape's keys an odd value (or none)."""
    def change(writer) -> None:
        for key in rng.sample(GGUF_KEYS, rng.choice((1, 1, 2, 3))):
            writer.kv_data[0].pop(f"llama.{key}", None)
            value = rng.choice((None, 0, -1, 10**9, 0.0, float("nan"), "x", True, [64, 64]))  # int32s
            if value is None:
                continue
            add = {bool: writer.add_bool, int: writer.add_int32, float: writer.add_float32, str: writer.add_string,
                   list: writer.add_array}[type(value)]
            add(f"llama.{key}", value)
    return change


def write_gguf_of_tiny(path: Path, rng: random.Random) -> None:
    from adapter.formats.meta import MetaCheckpoint
    from adapter.tokenizer import open_tokenizer
    from bench.gguf_file import sentencepiece_vocab, write_gguf

    checkpoint = MetaCheckpoint(ASSETS / "base")
    args = checkpoint.model_args(open_tokenizer(checkpoint.tokenizer_path).n_words)
    tensors = {name: checkpoint.tensor(name).float() for name in sorted(checkpoint.keys())}
    write_gguf(path, args, tensors, lambda writer: sentencepiece_vocab(writer, ASSETS / "base" / "tokenizer.model"),
               metadata=gguf_metadata_changed(rng))


@pytest.fixture(scope="module")
def nf4_folder(tmp_path_factory) -> Path:
    from adapter.quantize_base import main as quantize_base

    folder = tmp_path_factory.mktemp("nf4") / "tiny-nf4"
    assert quantize_base(["tiny", str(folder), "--mode", "nf4"]) == 0
    return folder


def load_and_ask(work: Path, kind: str) -> None:
    if kind in ("clip config", "image adapter"):
        model = adapter.load(work / "base", adapter=work / "image", clip=work / "clip" / "visual.safetensors",
                             clip_model=work / "clip" / "tiny-clip.json")
        model.generate("What colour is the star?", image=Image.new("RGB", (64, 64), (200, 30, 30)),
                       max_new_tokens=1, temperature=0.0)
        return
    base = {"gguf metadata": work / "tiny.gguf"}.get(kind, work / ("nf4" if kind.startswith("nf4") else "base"))
    model = adapter.load(base, adapter=work / "text" if kind in ("params.json", "adapter metadata") else None)
    model.generate("What is 3 + 4?", max_new_tokens=1, temperature=0.0)


MUTATIONS = {
    "params.json": lambda work, rng: rewrite_json(work / "base" / "params.json", rng),
    "adapter metadata": lambda work, rng: rewrite_safetensors_header(work / "text" / "adapter.safetensors",
                                                                     adapter_metadata(rng)),
    "image adapter": lambda work, rng: rewrite_safetensors_header(work / "image" / "adapter.safetensors",
                                                                  adapter_metadata(rng)),
    "clip config": lambda work, rng: rewrite_json(work / "clip" / "tiny-clip.json", rng),
    "gguf metadata": lambda work, rng: write_gguf_of_tiny(work / "tiny.gguf", rng),
    "nf4 config.json": lambda work, rng: rewrite_json(work / "nf4" / "config.json", rng),
    "nf4 block scales": lambda work, rng: rewrite_safetensors_header(work / "nf4" / "model.safetensors",
                                                                     block_scales_reshaped(rng)),
}


@pytest.mark.parametrize("kind", sorted(MUTATIONS))
def test_a_mutated_file_loads_or_is_named_in_one_clear_error(kind, nf4_folder, tmp_path):
    rng = random.Random(kind)  # str seeds are stable across runs and Python versions
    parts = [("nf4", nf4_folder)] if kind.startswith("nf4") else [] if kind.startswith("gguf") else [
        (part, ASSETS / part) for part in ("base", "text", "image", "clip")]
    outcomes = []
    for case in range(CASES):
        work = tmp_path / str(case)
        work.mkdir()
        for name, source in parts:
            shutil.copytree(source, work / name)
        MUTATIONS[kind](work, rng)
        try:
            load_and_ask(work, kind)
            outcomes.append("answered")
        except (ValueError, OSError) as error:
            assert str(work) in str(error), f"case {case}: the error names no file: {error}"
            outcomes.append("refused")
    assert "refused" in outcomes, "every case loaded: the mutations changed nothing that matters"
