"""Decode benchmark: greedy tokens/s at batch 1 and time to first token, beside the hardware floor.

The floor is one matrix-vector product per weight matrix (every weight read once), which is what one
decode step cannot beat; it is timed for both kernels a step uses (the BLAS's, and the fused reduction of the
compiled path: adapter.model.frozen_linear), beside a plain sum over every weight (how fast the memory gives
them). Shape: LLaMA dim 512, 8 layers, 8 heads, vocab 32000, fp32, random weights,
with a v1 adapter (prompt_len 10 on all 8 layers), its weights laid out as `adapter.load` lays them out on a
CPU (adapter.layout: the wide ones column-major). Decoding is timed on the default (plain) path, on the
fused path (`fused_inference = True`: stacked projections, see adapter.fused) and through torch.compile
(on a second copy of the model, whose first compiled step puts its weights row-major), all in the same rounds
as the floors; the BLAS floor and the plain path are timed in the checkpoints' row-major layout too, in turn
with ours (what the layout buys).

    python -m bench.decode [--threads 2] [--repeats 5] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from adapter.config import AdapterArgs, ModelArgs
from adapter.cpu_features import describe_machine as machine
from adapter.layout import column_major_wide, row_major
from adapter.model import Transformer, reduction_matvec
from bench.args import positive_int, run_main
from bench.compare import synced
from bench.report import publish

SHAPE = ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=32000, max_seq_len=1024)
ADAPTER = AdapterArgs(prompt_len=10, prompt_layers=8)


def build_model(args: ModelArgs = SHAPE, adapter: AdapterArgs = ADAPTER) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(args, adapter).eval()
    with torch.no_grad():
        for block in model.layers:
            block.attention.gate.fill_(0.1)
    column_major_wide(model)
    return model


def measure(fn: Callable[[], float], repeats: int) -> tuple[float, float, float]:
    """Median, min, max of `repeats` runs of fn (which returns its own figure)."""
    return measure_side_by_side([fn], repeats)[0]


def measure_side_by_side(fns: Sequence[Callable[[], float]], repeats: int) -> list[tuple[float, float, float]]:
    """Median, min, max of each fn over `repeats` rounds that run every fn once, in turn: on a shared machine
    whose speed drifts from minute to minute, the sides then see the same drift and their ratio holds."""
    for fn in fns:
        fn()  # warm-up
    values = [[] for _ in fns]
    for _ in range(repeats):
        for fn, runs in zip(fns, values):
            runs.append(fn())
    return [(statistics.median(runs), min(runs), max(runs)) for runs in values]


def decode_tokens_per_s(model: Transformer, prompt_len: int = 16, new_tokens: int = 64, batch: int = 1,
                        compile: bool = False) -> float:
    tokens = torch.randint(0, model.args.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = model.new_cache(batch, prompt_len + new_tokens + 1)
        logits = model.step(tokens, cache)
        start = time.perf_counter()
        for _ in range(new_tokens):
            next_ids = logits.argmax(-1, keepdim=True)
            logits = model.step(next_ids, cache, compile=compile)
        elapsed = time.perf_counter() - start
    return batch * new_tokens / elapsed


def fused_tokens_per_s(model: Transformer) -> float:
    """Decoding through the stacked projections and one-call norms: what the fused path gains."""
    model.fused_inference = True
    try:
        return decode_tokens_per_s(model)
    finally:
        model.fused_inference = False


def first_compiled_step_s(model: Transformer) -> float:
    """The first decode step through torch.compile, which compiles it (torch's on-disk caches may shorten it)."""
    start = time.perf_counter()
    decode_tokens_per_s(model, new_tokens=1, compile=True)
    return time.perf_counter() - start


def time_to_first_token_ms(model: Transformer, prompt_len: int = 64) -> float:
    tokens = torch.randint(0, model.args.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        start = time.perf_counter()
        cache = model.new_cache(1, prompt_len + 1)
        model.step(tokens, cache).argmax(-1)
        return (time.perf_counter() - start) * 1000


def frozen_matrices(model: Transformer) -> list[torch.Tensor]:
    """The weights one decode step reads: the layers' frozen linears and the output head (not the adapter's
    own, nor a CLIP tower's)."""
    linears = [m for m in model.layers.modules() if isinstance(m, torch.nn.Linear)] + [model.output]
    return [m.weight for m in linears if not m.weight.requires_grad]


def floor_tokens_per_s(model: Transformer, steps: int = 64) -> float:
    """One GEMV per weight matrix (and the output head) through the BLAS (`F.linear`), in the layout the model
    holds them, nothing else: the floor of the plain decode path."""
    weights = frozen_matrices(model)
    x = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    return _steps_per_s(lambda: [torch.nn.functional.linear(x[w.shape[1]], w) for w in weights], steps)


def reduction_floor_tokens_per_s(model: Transformer, steps: int = 64) -> float:
    """One GEMV per weight matrix as the compiled decode step computes it (`reduction_matvec` under
    torch.compile, row-major weights): the floor of the compiled path. Its first call compiles."""
    weights = [w.detach().contiguous() for w in frozen_matrices(model)]
    xs = [torch.randn(1, w.shape[1]) for w in weights]
    return _steps_per_s(lambda: _compiled_matvecs(xs, weights), steps)


def read_tokens_per_s(model: Transformer, steps: int = 64) -> float:
    """A sum over each weight matrix: how fast the memory gives every weight once, the hardware's own floor
    (on a GPU, its memory bandwidth)."""
    weights = frozen_matrices(model)
    return _steps_per_s(lambda: [w.sum() for w in weights], steps)


def bandwidth_tokens_per_s(model: Transformer, buffer_bytes: int = 2**31, reads: int = 16) -> float:
    """The memory's bandwidth, as tokens/s of `model`'s frozen weights: one large buffer (at most `buffer_bytes`,
    at most the weights' size) summed `reads` times, its bytes per second over the bytes a decode step reads. A
    floor that the per-matrix one (`read_tokens_per_s`, a kernel per matrix) stays below where kernels are short."""
    weights = frozen_matrices(model)
    step_bytes = sum(w.numel() * w.element_size() for w in weights)
    device = weights[0].device
    buffer = torch.ones(min(buffer_bytes, step_bytes) // 2, dtype=torch.bfloat16, device=device)
    read = buffer.numel() * buffer.element_size()
    return _steps_per_s(lambda: [buffer.sum()], reads) * read / step_bytes


@torch.compile(dynamic=False)
def _compiled_matvecs(xs: list[torch.Tensor], weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return [reduction_matvec(x, w) for x, w in zip(xs, weights)]


def _steps_per_s(one_step: Callable[[], list[torch.Tensor]], steps: int) -> float:
    with torch.inference_mode():
        synced(one_step()[-1])  # a warm-up (and the compilation, where there is one)
        start = time.perf_counter()
        for _ in range(steps):
            out = one_step()
        synced(out[-1])
        return steps / (time.perf_counter() - start)


def run(threads: int, repeats: int) -> list[tuple[str, str, str]]:
    torch.set_num_threads(threads)
    model, compiled_model = build_model(), build_model()
    compile_s = first_compiled_step_s(compiled_model)  # it puts the weights row-major (adapter.model.frozen_linear)
    paths = measure_side_by_side([lambda: floor_tokens_per_s(model),
                                  lambda: reduction_floor_tokens_per_s(compiled_model),
                                  lambda: read_tokens_per_s(model), lambda: decode_tokens_per_s(model),
                                  lambda: decode_tokens_per_s(compiled_model, compile=True)], repeats)
    blas_floor, reduction_floor, read, decode, compiled = paths
    floor = max(blas_floor[0], reduction_floor[0])
    rows = [row("floor: one GEMV per weight matrix through the BLAS (`F.linear`), tokens/s", blas_floor),
            row("floor: one GEMV per weight matrix as the compiled step computes it (fused multiply-and-sum), "
                "tokens/s", reduction_floor),
            row("every weight read once (a sum over each matrix), tokens/s", read),
            row("greedy decode, batch 1, tokens/s", decode),
            ("decode / floor (the faster of the two)", f"{decode[0] / floor:.0%}", ""),
            ("first compiled decode step (compiles it), s", f"{compile_s:.1f}", ""),
            row("greedy decode, batch 1, through `step(compile=True)`, tokens/s", compiled),
            ("compiled decode / floor (the faster of the two)", f"{compiled[0] / floor:.0%}", ""),
            ("compiled decode / plain decode (the same rounds)", f"{compiled[0] / decode[0]:.2f}", "")]
    floors = measure_side_by_side([in_layout(model, True, lambda: floor_tokens_per_s(model)),
                                   in_layout(model, False, lambda: floor_tokens_per_s(model))], repeats)
    decodes = measure_side_by_side([in_layout(model, True, lambda: decode_tokens_per_s(model)),
                                    in_layout(model, False, lambda: decode_tokens_per_s(model))], repeats)
    column_major_wide(model)
    rows += [row("BLAS floor, our layout (wide weights column-major), in turn with row-major, tokens/s", floors[0]),
             row("BLAS floor, weights row-major as in checkpoints, tokens/s", floors[1]),
             row("greedy decode, batch 1, our layout, in turn with row-major, tokens/s", decodes[0]),
             row("greedy decode, batch 1, weights row-major as in checkpoints, tokens/s", decodes[1]),
             ("decode, our layout / row-major (the same rounds)", f"{decodes[0][0] / decodes[1][0]:.2f}", ""),
             row("greedy decode, fused path (`fused_inference = True`), tokens/s",
                 measure(lambda: fused_tokens_per_s(model), repeats)),
             row("time to first token, 64-token prompt, ms", measure(lambda: time_to_first_token_ms(model, 64),
                                                                      repeats))]
    return rows


def row(name: str, stat: tuple[float, float, float]) -> tuple[str, str, str]:
    med, lo, hi = stat
    return name, f"{med:.1f}", f"{lo:.1f} / {hi:.1f}"


def in_layout(model: Transformer, column_major: bool, fn: Callable[[], float]) -> Callable[[], float]:
    """fn, run with the model's wide weights column-major (as adapter.load lays them out) or all row-major."""
    def run() -> float:
        (column_major_wide if column_major else row_major)(model)
        return fn()
    return run


def render(rows: list[tuple[str, str, str]], command: str) -> str:
    lines = [
        "## Decode (CPU, fp32): LLaMA dim 512, 8 layers, 8 heads, vocab 32000, v1 adapter on 8 layers",
        "",
        f"Machine: {machine()}. Command: `{command}`. Median of the runs, min / max beside it.",
        "",
        "| measure | median | min / max |",
        "|---|---|---|",
        *(f"| {name} | {value} | {spread} |" for name, value, spread in rows),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--write", help="replace the decode section of this markdown file (e.g. BENCHMARKS.md)")
    options = parser.parse_args(argv)
    command = "python -m bench.decode " + " ".join(argv if argv is not None else sys.argv[1:])
    text = render(run(options.threads, options.repeats), command.strip())
    publish(text, "Decode (CPU, fp32)", options.write)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
