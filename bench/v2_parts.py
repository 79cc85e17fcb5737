"""What each v2 part costs: decode tokens/s (batch 1, plain and fused paths) and a training step's time, for a
v1 adapter, v2 biases and norms, with LoRA, with the input scales of the V2 paper (`W(s * x) + b`), the
official V2 dialog model's parts without prompts, and litgpt's adapter v2 (output scales `s * (Wx + b)` on every
linear and the vocabulary head), each as a ratio to v1, in the same rounds; the LoRA, V2 dialog and litgpt kinds
also decoded merged (`adapter.merge.merged_model`: LoRA, scales and norms in the base's weights, the rest left).

Shape: bench.decode's (LLaMA dim 512, 8 layers, 8 heads, vocab 32000, fp32, random weights), adapter parts on all
8 layers with non-zero values (a fresh adapter's zeros would cost the same, but look untrained). A training step is
forward and backward of 4 sequences of 128 tokens (no optimizer: the same for every kind).

    python -m bench.v2_parts [--threads 2] [--repeats 5] [--smoke] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from adapter.config import LORA_TARGETS, AdapterArgs, ModelArgs
from adapter.layout import column_major_wide
from adapter.merge import merged_model
from adapter.model import Transformer
from bench.args import positive_int, run_main
from bench.decode import SHAPE, decode_tokens_per_s, fused_tokens_per_s, machine, measure_side_by_side
from bench.report import command_line, publish, ratio, spread, table

HEADING = "v2 parts"
SMOKE_SHAPE = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=512, max_seq_len=256)
PROMPTS = dict(prompt_len=10, gate_activation="tanh")


def kinds(layers: int) -> dict[str, AdapterArgs]:
    prompts = dict(PROMPTS, prompt_layers=layers)
    return {
        "v1 (prompts, gates)": AdapterArgs(**prompts),
        "v2: + biases, norms": AdapterArgs(**prompts, bias=True, norm=True),
        "v2: + biases, norms, LoRA 8": AdapterArgs(**prompts, bias=True, norm=True, lora_rank=8),
        "v2: + biases, norms, input scales": AdapterArgs(**prompts, bias=True, norm=True, scale=True),
        "V2 dialog: biases and scales on all 7 linears, norms, no prompts": AdapterArgs(
            prompt_len=0, prompt_layers=0, bias=True, bias_targets=LORA_TARGETS, scale=True, norm=True),
        "litgpt v2: biases and output scales on all 7 linears and the head, norms": AdapterArgs(
            **dict(prompts, gate_activation="raw"), bias=True, bias_targets=LORA_TARGETS, scale=True,
            scale_at="output", head_delta=True, norm=True, prompt_projection="litgpt-qkv"),
    }


# the kinds also measured merged: their LoRA, scales and norms in the base's weights, their prompts and biases left
MERGED = ("v2: + biases, norms, LoRA 8", "V2 dialog: biases and scales on all 7 linears, norms, no prompts",
          "litgpt v2: biases and output scales on all 7 linears and the head, norms")


def build(shape: ModelArgs, adapter: AdapterArgs) -> Transformer:
    """The random base with every learned tensor moved off its initial value, laid out as adapter.load does."""
    torch.manual_seed(0)
    model = Transformer(shape, adapter).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in model.trainable_parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.01)
    column_major_wide(model)
    return model


def checked_merge(model: Transformer) -> Transformer:
    """`merged_model(model)`, checked to give `model`'s logits before it is timed."""
    merged = merged_model(model)
    tokens = torch.randint(0, model.args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        if not torch.allclose(merged(tokens), model(tokens), atol=1e-4):
            raise AssertionError("the merged model's logits differ from the adapter's")
    return merged


def training_step_s(model: Transformer, batch: int = 4, length: int = 128) -> float:
    tokens = torch.randint(0, model.args.vocab_size, (batch, length), generator=torch.Generator().manual_seed(2))
    model.train()
    start = time.perf_counter()
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    model.eval()
    return elapsed


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.v2_parts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one round: checks the harness only")
    parser.add_argument("--write", help="replace this section of a BENCHMARKS.md")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    shape, repeats = (SMOKE_SHAPE, 1) if options.smoke else (SHAPE, options.repeats)
    models = {name: build(shape, adapter) for name, adapter in kinds(shape.n_layers).items()}
    merged = {f"{name}; merged (adapter.merge)": checked_merge(models[name]) for name in models if name in MERGED}
    measures = {"decode, plain path, tokens/s": decode_tokens_per_s, "decode, fused path, tokens/s": fused_tokens_per_s,
                "training step, ms": lambda model: 1000 * training_step_s(model)}
    rows = []
    for measure, run in measures.items():
        measured = models if measure.startswith("training") else {**models, **merged}  # merged: to serve, not train
        figures = measure_side_by_side([lambda m=model, run=run: run(m) for model in measured.values()], repeats)
        for (name, _), figure in zip(measured.items(), figures):
            rows.append([measure, name, spread(figure), ratio(figure, figures[0])])
    lines = [f"## {HEADING} (CPU, fp32): what each costs, {shape.dim}-dim LLaMA, {shape.n_layers} layers, "
             f"vocab {shape.vocab_size}", "",
             (f"Machine: {machine()}. Command: `{command_line('bench.v2_parts', argv)}`. Median of {repeats} rounds "
              "(min / max), every kind once per round in turn. Decode: greedy, batch 1, a 16-token prompt then 64 "
              "tokens; the fused path stacks the projections that read one input (input scales give each its own, "
              "so nothing is stacked there). Merged: the kind's LoRA, scales and norms merged into the base's "
              "weights by `adapter.merge.merged_model`, its prompts and biases left (the same logits; decode "
              "only: a merged model serves, the adapter trains). Training: forward and backward of 4 x 128 "
              "tokens."), "",
             *table(["measure", "adapter", "figure", "/ v1"], rows)]
    publish("\n".join(lines) + "\n", HEADING, options.write, smoke=options.smoke)


if __name__ == "__main__":
    sys.exit(run_main(main))
