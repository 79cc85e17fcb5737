"""The model shapes of the CPU benchmarks: the full ones (bench.decode's) and the tiny `--smoke` ones that tests
run, which exercise every code path in seconds and whose figures mean nothing."""

from __future__ import annotations

import dataclasses

from adapter.config import AdapterArgs, ModelArgs
from bench.decode import ADAPTER, SHAPE

# bench.decode's LLaMA (dim 512, 8 layers, vocab 32000) with room for 2048 tokens of context and more
LONG = dataclasses.replace(SHAPE, max_seq_len=4096)
SMOKE = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=4096)
SMOKE_ADAPTER = AdapterArgs(prompt_len=4, prompt_layers=2)


def shapes(smoke: bool) -> tuple[ModelArgs, AdapterArgs]:
    """(model, v1 adapter) for a run."""
    return (SMOKE, SMOKE_ADAPTER) if smoke else (LONG, ADAPTER)


def with_layers(adapter: AdapterArgs, layers: int) -> AdapterArgs:
    """The same prompts on `layers` top layers (0: no adapter at all)."""
    return dataclasses.replace(adapter, prompt_layers=layers, prompt_len=adapter.prompt_len if layers else 0)


def describe(args: ModelArgs, adapter: AdapterArgs) -> str:
    """How a section heading names the shape."""
    return (f"LLaMA dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, vocab {args.vocab_size}, "
            f"v1 adapter on {adapter.prompt_layers} layers")
