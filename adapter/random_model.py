"""A randomly initialised LLaMA written as a Meta-format folder, with a small tokenizer trained on filler text.

For tests, benchmarks and trying the command lines without any real weights:
`python -m adapter.random_model DIR [--dim 64 --n-layers 4 ...]`. Its answers are noise by design.
`--llama3` writes a Llama 3.1-style folder instead: a tiktoken BPE `tokenizer.model` with the 256 special
tokens after the ranks, `use_scaled_rope` and theta 500000 in params.json (`--n-kv-heads` for grouped-query
attention). `--mistral` writes Mistral's own layout: params.json in Mistral's keys, consolidated.safetensors and
a `tokenizer.model.v3` with the [INST]/[/INST] control tokens (`--sliding-window N` for Mistral 7B v0.1's window).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from .arg_types import refused, unicode_output
from .config import ModelArgs, RopeScaling
from .formats.common import atomic_folder, save_tensors, writing
from .formats.meta import shard_dim
from .model import Transformer

_WORDS = ("the a one red blue green small large circle square triangle star left right top bottom centre "
          "is are has and or of to in on with three two four answer question instruction response colour shape "
          "count where what which how many there picture scene below above next beside").split()
# multi-byte text, so that byte-fallback pieces (and streaming that must not split them) get exercised
_UNICODE = ("café", "naïve", "über", "smörgåsbord", "日本語", "東京", "🙂", "🚀", "π≈3.14", "€5")


DEFAULT_ARGS = ModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=256)


def corpus(lines: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic filler text for training the tokenizer."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.1:
            words.insert(rng.randrange(len(words)), rng.choice(_UNICODE))
        out.append(" ".join(words).capitalize() + rng.choice(".?!"))
    return out


def train_tokenizer(path: Path, vocab_size: int = 512, seed: int = 0, control_symbols: Sequence[str] = (),
                    keep_spaces: bool = False) -> Path:
    """A BPE sentencepiece model with LLaMA's special ids (unk 0, bos 1, eos 2, no pad) and byte fallback;
    `control_symbols` get the ids after EOS (Mistral's tokenizer V3: [INST] 3, [/INST] 4); `keep_spaces`: as
    LLaMA's own model normalizes, i.e. not at all (every space kept; sentencepiece's default folds runs of them)."""
    import sentencepiece as spm

    text = "\n".join(corpus(seed=seed))
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(text.splitlines()), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, character_coverage=0.995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            control_symbols=list(control_symbols), minloglevel=2, num_threads=1,
            **({"normalization_rule_name": "identity", "remove_extra_whitespaces": False} if keep_spaces else {}),
        )
    except RuntimeError as error:  # sentencepiece's own check of the size, worded for its command line
        raise ValueError(f"vocab_size: {vocab_size} does not fit the random tokenizer: {_size_bound(str(error))}") \
            from None
    path.write_bytes(model.getvalue())
    return path


def _size_bound(message: str) -> str:
    """What sentencepiece's refusal of a vocabulary size says the size must be."""
    low, high = re.search(r"(\d+) vs (\d+)", message), re.search(r"<= (\d+)", message)
    if low:
        return f"its bytes, characters and special pieces need at least {low.group(2)}"
    if high:
        return f"its corpus yields at most {high.group(1)} pieces"
    return message


def train_bpe_ranks(path: Path, ranks: int = 512, seed: int = 0) -> Path:
    """A byte-level BPE with `ranks` tokens (the 256 bytes first) written as a tiktoken ranks file, as
    Meta ships Llama 3's tokenizer; trained with Llama 3's split pattern so its merges stay inside pieces."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, trainers

    from .bpe_tokenizer import BYTE_CHARS, byte_level_llama3, text_to_bytes, write_ranks

    backend = byte_level_llama3(Backend(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=ranks, initial_alphabet=BYTE_CHARS, show_progress=False)
    backend.train_from_iterator(corpus(seed=seed), trainer)
    vocab = sorted(backend.get_vocab(), key=backend.token_to_id)
    write_ranks(path, [text_to_bytes(text) for text in vocab])
    return path


def write_random_base(
    folder: str | Path,
    args: ModelArgs | None = None,
    *,
    seed: int = 0,
    shards: int = 1,
    dtype: torch.dtype = torch.float32,
    tokenizer: str = "sentencepiece",
) -> Path:
    """Write params.json, `shards` consolidated.NN.pth files (split like Meta's) and tokenizer.model
    (`tokenizer`: "sentencepiece" as LLaMA 1/2, or "tiktoken" as Llama 3, its 256 special tokens included
    in `args.vocab_size`)."""
    from .bpe_tokenizer import LLAMA3_SPECIAL_COUNT
    from .tokenizer import open_tokenizer

    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards: must be a whole number from 1, got {shards!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args = args or DEFAULT_ARGS
    target = folder / "tokenizer.model"
    if tokenizer == "sentencepiece":
        train_tokenizer(target, vocab_size=args.vocab_size, seed=seed)
    elif tokenizer == "tiktoken":
        if args.vocab_size < 256 + LLAMA3_SPECIAL_COUNT:
            raise ValueError(f"vocab_size: a tiktoken tokenizer needs at least {256 + LLAMA3_SPECIAL_COUNT} "
                             f"(256 bytes and {LLAMA3_SPECIAL_COUNT} special tokens), got {args.vocab_size}")
        train_bpe_ranks(target, args.vocab_size - LLAMA3_SPECIAL_COUNT, seed=seed)
    else:
        raise ValueError(f"tokenizer: expected 'sentencepiece' or 'tiktoken', got {tokenizer!r}")
    words = open_tokenizer(target).n_words
    if words != args.vocab_size:
        raise ValueError(f"vocab_size: the tokenizer got {words} pieces, asked for {args.vocab_size}")
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        model.tok_embeddings.weight.normal_(0, 1)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    for index in range(shards):
        part = {}
        for name, tensor in state.items():
            dim = shard_dim(name)
            if dim is None:
                part[name] = tensor.clone()
            else:
                if tensor.shape[dim] % shards:
                    raise ValueError(f"shards: {name} dim {dim} of size {tensor.shape[dim]} does not split in {shards}")
                part[name] = tensor.chunk(shards, dim=dim)[index].clone()
        with writing(folder / f"consolidated.{index:02d}.pth"):
            torch.save(part, folder / f"consolidated.{index:02d}.pth")
    params = {k: v for k, v in args.to_dict().items() if v is not None and k != "max_seq_len"}
    if "head_size" in params:  # Mistral's params.json name for it
        params["head_dim"] = params.pop("head_size")
    scaling = args.rope_scaling
    if scaling is not None and scaling == RopeScaling("llama3", scaling.factor):  # Meta's own spelling of it
        params.pop("rope_scaling")
        params.update(use_scaled_rope=True, rope_scaling_factor=scaling.factor)
    (folder / "params.json").write_text(json.dumps(params, indent=2), encoding="utf-8")
    return folder


def write_random_mistral(folder: str | Path, args: ModelArgs | None = None, *, seed: int = 0,
                         window: int | None = None) -> Path:
    """The random base in Mistral's own layout (adapter.formats.mistral): params.json in Mistral's keys (the
    sliding `window` when given), consolidated.safetensors, and tokenizer.model.v3 with Mistral V3's [INST] and
    [/INST] control tokens (ids 3 and 4)."""
    args = args or DEFAULT_ARGS
    folder = write_random_base(folder, args, seed=seed)
    weights = folder / "consolidated.00.pth"
    save_tensors(torch.load(weights, weights_only=True), folder / "consolidated.safetensors")
    weights.unlink()
    train_tokenizer(folder / "tokenizer.model.v3", vocab_size=args.vocab_size, seed=seed,
                    control_symbols=("[INST]", "[/INST]"))
    (folder / "tokenizer.model").unlink()
    params = {"dim": args.dim, "n_layers": args.n_layers, "head_dim": args.head_dim, "hidden_dim": args.ffn_hidden_dim,
              "n_heads": args.n_heads, "n_kv_heads": args.kv_heads, "norm_eps": args.norm_eps,
              "vocab_size": args.vocab_size, "rope_theta": args.rope_theta}
    if window is not None:
        params["sliding_window"] = window
    (folder / "params.json").write_text(json.dumps(params, indent=2), encoding="utf-8")
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    unicode_output()
    parser = argparse.ArgumentParser(prog="python -m adapter.random_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="where to write the Meta-format folder")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--n-kv-heads", type=int)
    parser.add_argument("--head-dim", type=int,
                        help="a head's width when not dim / n-heads (Mistral NeMo's shape: 128 at dim 5120, 32 heads)")
    parser.add_argument("--vocab-size", type=int, help="default 512 (768 with --llama3)")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    family = parser.add_mutually_exclusive_group()
    family.add_argument("--llama3", action="store_true",
                        help="a Llama 3.1-style folder: tiktoken tokenizer (vocab size includes its 256 special "
                             "tokens; default 768), llama3 RoPE scaling, theta 500000")
    family.add_argument("--mistral", action="store_true",
                        help="Mistral's own layout: params.json in its keys, consolidated.safetensors, "
                             "tokenizer.model.v3 with [INST]/[/INST] tokens; theta 1000000")
    parser.add_argument("--sliding-window", type=int, help="--mistral: attention window (Mistral 7B v0.1: 4096)")
    options = parser.parse_args(argv)
    try:
        if options.sliding_window is not None and not options.mistral:
            raise ValueError("--sliding-window: only with --mistral")
        if options.sliding_window is not None and options.sliding_window < 2:  # what loading reads (formats.window)
            raise ValueError(f"--sliding-window: must be at least 2, got {options.sliding_window}")
        if options.mistral and options.shards != 1:
            raise ValueError("--shards: Mistral's layout is one consolidated.safetensors")
        shape = dict(dim=options.dim, n_layers=options.n_layers, n_heads=options.n_heads,
                     n_kv_heads=options.n_kv_heads, head_size=options.head_dim,
                     vocab_size=(768 if options.llama3 else 512) if options.vocab_size is None else options.vocab_size,
                     multiple_of=32)
        if options.llama3:
            shape.update(rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 8.0))
        if options.mistral:
            shape.update(rope_theta=1000000.0)
        args = ModelArgs(**shape)
        if options.mistral:
            write = partial(write_random_mistral, args=args, seed=options.seed, window=options.sliding_window)
        else:
            write = partial(write_random_base, args=args, seed=options.seed, shards=options.shards,
                            tokenizer="tiktoken" if options.llama3 else "sentencepiece")
        folder = atomic_folder(Path(options.folder), write)  # whole or not at all
    except (ValueError, OSError) as error:
        return refused(error, parser)
    family = "Mistral" if options.mistral else "LLaMA"
    print(f"wrote a random {family} ({args.dim} dim, {args.n_layers} layers, vocab {args.vocab_size}) to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
