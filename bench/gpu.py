"""GPU benchmark, for a lent GPU and under 8 minutes: a LLaMA-7B-shaped model with random weights built directly
on the GPU, at bf16, nf4 and int8: decode tokens/s, time to first token, peak memory at 2048 tokens of context
(and of an image question through a ViT-L/14-shaped open_clip tower with random weights and the v2 visual
prompt), and one nf4 training step; the same for transformers + peft on the very same tensors. For bf16 also the
card's floor (every weight read once) and our decode beside it: plain, as CUDA graphs of the static step, and
through `step(compile=True)` (compiled, as CUDA graphs). And a check of the device path of pre-quantized bases
(`adapter.quantize_base` on the device, loaded bit for bit as quantized while loading).

    bash bench/gpu.sh [--write BENCHMARKS.md]     (see bench/gpu.sh for the packages to carry along)
    python -m bench.gpu --smoke [--device cuda]    (tiny shapes, seconds: checks the script, figures mean nothing)

The peer's nf4/int8 linears are made by replacing its nn.Linear layers with bitsandbytes Linear4bit /
Linear8bitLt holding the same tensors (what `BitsAndBytesConfig` does while loading), because loading through
`from_pretrained` would first need the 13.5 GB model written to disk. Every pair is checked to compute the same
thing before it is timed; a pair that differs is reported and its peer figures left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from adapter.config import AdapterArgs, ModelArgs
from adapter.footprint import quant_state_tensors
from adapter.formats.common import write_text_atomically
from bench.args import positive_int, run_main
from bench.compare import TOLERANCE, Check, Greedy, Ours, Peer, PeerMismatch, check_lines, check_same, greedy, prompt
from bench.decode import measure, measure_side_by_side
from bench.peers import quiet
from bench.report import Stat, command_line, error_line, publish, ratio, spread, table, versions

LLAMA_7B = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-6,
                     max_seq_len=2048)
TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=2048)
QUANTIZED = ("nf4", "int8")
PREQUANTIZED_SHAPE = ModelArgs(dim=1024, n_layers=8, n_heads=8, vocab_size=512, multiple_of=256, max_seq_len=2048)
CONTEXT = 2048
HEADING = "GPU"
# bf16 compute through 32 layers on both sides, for every precision on the GPU (nf4/int8 compute in bf16 too);
# int8 adds the per-token activation rounding that differs between our wo and peft's separate o_proj
# (bench.compare); --smoke computes in float32, with bench.compare's tolerances
GPU_TOLERANCE = {"bf16": 6e-2, "nf4": 6e-2, "int8": 1e-1}


@dataclasses.dataclass(frozen=True)
class Setup:
    """What one run uses: the device and compute dtype, the shapes, the CLIP tower's, the sizes, the budget."""

    device: torch.device
    dtype: torch.dtype  # bf16 on the GPU; float32 for --smoke (the CPU has no fast bf16 matmuls)
    precisions: tuple[str, ...]  # the unquantized dtype's name, then the bitsandbytes modes
    tolerance: dict[str, float]
    new_tokens: int
    train_lengths: tuple[int, int]
    args: ModelArgs
    adapter: AdapterArgs
    clip: dict | None  # open_clip model config, None when open_clip/timm cannot be imported
    clip_name: str
    no_clip: str  # why there is no CLIP tower ("" when there is one)
    budget_s: float
    profile: Path | None = None  # --profile: where the profiles of the decode and training steps go


def add_vendor() -> None:
    """Packages carried along (bench/carry.py) come last on sys.path, so the machine's own copies win."""
    vendor = os.environ.get("BENCH_VENDOR")
    if vendor and os.path.isdir(vendor) and vendor not in sys.path:
        sys.path.append(vendor)


def setup(smoke: bool, budget_s: float, device: str | None = None) -> Setup:
    device = torch.device(device or ("cpu" if smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.gpu: no CUDA device here; run it on a GPU machine, or with --smoke on the CPU")
    args = TINY if smoke else LLAMA_7B
    try:
        import open_clip
        import timm  # noqa: F401  (the v2 visual prompt's blocks)

        from adapter.random_demo import CLIP_CONFIG, CLIP_NAME

        name = CLIP_NAME if smoke else "ViT-L-14-quickgelu"
        clip, no_clip = (CLIP_CONFIG if smoke else open_clip.get_model_config(name)), ""
    except (ImportError, RuntimeError) as error:  # missing, or built for another torch (torchvision's operators)
        name, clip, no_clip = "", None, f"not measured: {error} (carry it, see bench/gpu.sh)"
    visual = {} if clip is None else {
        "visual": "v2", "clip_model": name, "clip_dim": clip["embed_dim"],
        **({"visual_dim": 32, "visual_depth": 1, "visual_heads": 4} if smoke else {})}
    adapter = AdapterArgs(prompt_len=10, prompt_layers=args.n_layers if smoke else 30, **visual)
    if smoke:
        sizes = (torch.float32, ("fp32", *QUANTIZED), TOLERANCE, 4, (8, 16))
    else:
        sizes = (torch.bfloat16, ("bf16", *QUANTIZED), GPU_TOLERANCE, 32, (256, 512))
    return Setup(device, *sizes, args, adapter, clip, name, no_clip, budget_s)


def build(s: Setup) -> torch.nn.Module:
    """Our model with random weights made on the device in the compute dtype (learned tensors in float32 but the
    visual prompt in the tower's dtype, as adapter.load gives them), every gate 0.1 so that the prompts act, and
    the CLIP tower attached."""
    from adapter.model import Transformer
    from adapter.visual import ImageEncoder, attach_image_encoder

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(s.dtype)
    try:
        with torch.device(s.device):
            model = Transformer(s.args, s.adapter)
    finally:
        torch.set_default_dtype(default)
    model.reset_adapter(s.device)
    with torch.no_grad():
        for block in model.layers[model.first_prompt_layer:]:
            block.attention.gate.fill_(0.1)
    if s.clip is not None:
        import open_clip

        config = {k: v for k, v in s.clip.items() if k != "quick_gelu"}
        with torch.device(s.device):
            tower = open_clip.CLIP(**config, quick_gelu=s.clip.get("quick_gelu", False)).visual
        attach_image_encoder(model, ImageEncoder(tower, s.clip_name), inference=True)
    return model.eval()


def quantize_peer(peer: torch.nn.Module, mode: str, dtype: torch.dtype) -> None:
    """The peer's frozen linears as bitsandbytes layers, from its own tensors (lm_head stays, as in transformers)."""
    from adapter.quantize import quantize_linear

    for layer in peer.get_base_model().model.layers:
        for parent in (layer.self_attn.model if hasattr(layer.self_attn, "model") else layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, quantize_linear(child.weight, mode, dtype, child.weight.device))


def pair(s: Setup, precision: str) -> tuple[Ours, Peer]:
    """Ours and the peer on the same tensors, at `precision` (in the run's compute dtype)."""
    from adapter.quantize import quantize_model
    from bench.peers import copy_adapter, hf_llama, peft_wrap

    model = build(s)
    peer = peft_wrap(hf_llama(model), s.adapter)
    copy_adapter(model, peer)
    if precision in QUANTIZED:
        quantize_peer(peer, precision, s.dtype)
        quantize_model(model, precision, s.dtype)
    return Ours(model), Peer(peer.eval())


def peak(device: torch.device, run: Callable[[], object]) -> float:
    """Peak memory (GiB) of `run` above what was allocated before it: torch.cuda.max_memory_allocated on a
    GPU, resident memory (bench.rss) on the CPU. The kernel's resident counters lag by a few pages, so a run
    that allocates nothing can read a hair below zero there: that reads as zero (no negative ratios)."""
    from bench.rss import current_mb, peak_mb, reset_peak

    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**30
    reset_peak()
    before = current_mb()
    run()
    return max(0.0, peak_mb() - before) / 1024


def release_static_storage(model: torch.nn.Module) -> None:
    """Drop the static decode steps' key/value storage and graphs (adapter.static_decode), which outlive a
    request, so that a peak measured next counts the KV cache its request allocates."""
    if hasattr(model, "static_decoders"):
        model.static_decoders.clear()


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work (CUDA runs asynchronously); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_profile(s: Setup, name: str, run: Callable[[], object]) -> None:
    """With --profile DIR: torch.profiler's table of the ops that took longest in `run` (by device time on a GPU)
    to DIR/<name>.txt, so that a run on a lent GPU leaves the evidence of where its time went."""
    if s.profile is None:
        return
    from torch.profiler import ProfilerActivity, profile

    cuda = s.device.type == "cuda"
    sync(s.device)
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as recorded:
        run()
        sync(s.device)
    table = recorded.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                          row_limit=40, max_name_column_width=70)
    write_text_atomically(s.profile / f"{name}.txt", table + "\n")


def weights_gib(model: torch.nn.Module) -> float:
    """Bytes of the model's own tensors, with the quantization state of its bitsandbytes weights (a tensor
    shared with another model counts for both)."""
    found = [*model.parameters(), *model.buffers()]
    found += [t for p in model.parameters() for t in quant_state_tensors(getattr(p, "quant_state", None))]
    tensors = {t.data_ptr(): t for t in found}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**30


def kv_cache_gib(s: Setup, kind: str) -> float:
    """What the KV cache of one CONTEXT-token request holds (built on the meta device: sizes only)."""
    from adapter.kv_cache import KVCache

    args = s.args
    cache = KVCache(args.n_layers, 1, args.kv_heads, CONTEXT, args.head_dim, dtype=s.dtype, device="meta",
                    int8=kind == "int8")
    return sum(t.numel() * t.element_size() for tensors in cache.tensor_lists() for t in tensors) / 2**30


def cells(a: Stat, b: Stat | None, why: str, digits: int, repeated: bool) -> tuple[str, str, str]:
    """ours, peer (or why it is missing) and ours / peer."""
    show = (lambda x: spread(x, digits)) if repeated else (lambda x: f"{x[0]:.{digits}f}")
    return show(a), show(b) if b else why, ratio(a, b) if b else ""


def decode_rows(s: Setup, precision: str, ours: Ours, peer: Peer | None, why: str,
                repeats: int) -> list[tuple[str, ...]]:
    """Tokens/s, first-token times and memory at 2048 context on both sides (peer cells say why when absent); the
    repeated figures measured with the sides in turn, round after round, so that both see the same drift."""
    vocab, device = s.args.vocab_size, s.device
    sides = [ours, *([peer] if peer else [])]

    def rate(batch: int = 1) -> Callable[[Ours | Peer], float]:
        return lambda side: greedy(side, prompt(batch, 16, vocab, device=device), s.new_tokens + 1).tokens_per_s

    def first_ms(length: int) -> Callable[[Ours | Peer], float]:
        return lambda side: 1000 * greedy(side, prompt(1, length, vocab, seed=1, device=device), 1).first_token_s

    def memory(side: Ours | Peer) -> float:
        tokens = prompt(1, CONTEXT - s.new_tokens, vocab, device=device)
        release_static_storage(side.model)
        return peak(device, lambda: greedy(side, tokens, s.new_tokens))

    def row(name: str, run: Callable[[Ours | Peer], float], digits: int, repeated: bool,
            compared: bool = True) -> tuple[str, ...]:
        found = measure_side_by_side([lambda side=side: run(side) for side in sides], repeats) if repeated else \
            [once(run(side)) for side in sides]
        a, b = found[0], (found[1] if peer else None)
        ours_cell, peer_cell, ratio_cell = cells(a, b, why, digits, repeated)
        return precision, name, ours_cell, peer_cell, ratio_cell if compared else ""

    return [row("greedy decode, batch 1, tokens/s", rate(), 1, True),
            # what the app's --concurrency 8 gives 8 users who ask at once (adapter.chat_batcher)
            row("greedy decode, batch 8, tokens/s (all rows)", rate(8), 1, True),
            row("time to first token, 64-token prompt, ms", first_ms(64), 1, True),
            row("time to first token, 512-token prompt, ms", first_ms(512), 1, True),
            row(f"peak memory generating at {CONTEXT} tokens of context, above the weights, GiB", memory, 2, False),
            # not a ratio: ours holds a CLIP tower and a visual prompt the peer has no place for
            row("weights (ours: with the CLIP tower and visual prompt; so no ratio), GiB",
                lambda side: weights_gib(side.model), 2, False,
                compared=False)]


def fast_decode_rows(s: Setup, precision: str, repeats: int) -> list[tuple[str, ...]]:
    """Two floors, and in the same rounds our decode at `precision` plainly, as CUDA graphs of the static step
    (adapter.static_decode; run without capture on the CPU), and through `step(compile=True)` (that step compiled,
    as CUDA graphs). The floors: a sum over each weight matrix (one kernel each, as a decode step reads them), and
    the memory's bandwidth (one large read) as tokens/s of these weights. A path is timed only once it gives the
    plain greedy tokens (or differs only after a near tie); one that fails or differs is reported in the table."""
    from adapter.quantize import quantize_model
    from adapter.static_decode import StaticDecoder
    from bench.decode import bandwidth_tokens_per_s, read_tokens_per_s

    model = build(s)
    if precision in QUANTIZED:
        quantize_model(model, precision, s.dtype)
    ours = Ours(model, plain=True)
    graphs = Ours(model, static=StaticDecoder(model))
    compiled = Ours(model, static=StaticDecoder(model, compile=True))
    names = ("as CUDA graphs of the static step" if s.device.type == "cuda" else "static step (no capture on CPU)",
             "through `step(compile=True)` (compiled" + (", as CUDA graphs)" if s.device.type == "cuda" else ")"))
    tokens = prompt(1, 16, s.args.vocab_size, device=s.device)
    plain = greedy(ours, tokens, 16, margins=True)
    near_tie = s.tolerance[precision] * float(plain.first_logits.abs().max())  # as bench.compare.check_same
    rows, working, labels = [], [], ["plain"]
    sides = [lambda: bandwidth_tokens_per_s(ours.model), lambda: read_tokens_per_s(ours.model),
             lambda: greedy(ours, tokens, s.new_tokens + 1).tokens_per_s]
    for name, label, side in zip(names, ("graphs", "compiled"), (graphs, compiled)):
        try:
            started = time.perf_counter()
            same = int((greedy(side, tokens, 16).tokens == plain.tokens).cumprod(-1).sum())
        except RuntimeError as error:  # torch.compile's and CUDA graphs' failures are these
            rows.append((precision, f"greedy decode {name}", f"not available: {error_line(error, 200)}", "", ""))
            continue
        tied = same < 16 and plain.margins[same] <= near_tie
        rows.append((precision, f"greedy decode {name}: first request (compiling, capturing), s; greedy tokens "
                     "equal to the plain path's", f"{time.perf_counter() - started:.1f}; {same} / 16"
                     + (" (then a near tie)" if tied else " (differs: not timed)" if same < 16 else ""), "", ""))
        if same == 16 or tied:
            working.append(name)
            labels.append(label)
            sides.append(lambda side=side: greedy(side, tokens, s.new_tokens + 1).tokens_per_s)
    bandwidth, floor, eager, *fast = measure_side_by_side(sides, repeats)
    for label, side in zip(labels, sides[2:]):
        write_profile(s, f"decode-{precision}-{label}", side)
    packed = " (their packed bytes)" if precision in QUANTIZED else ""
    rows += [(precision, f"bandwidth floor: one large read at the memory's speed, as tokens/s of these weights"
              f"{packed}", spread(bandwidth), "", ""),
             (precision, f"floor: every weight read once (a sum over each matrix{packed}), tokens/s", spread(floor),
              "", ""),
             (precision, "greedy decode, batch 1, plain path, tokens/s (in the floor's rounds)", spread(eager), "",
              "")]
    rows += [(precision, f"greedy decode, batch 1, {name}, tokens/s (in the floor's rounds)", spread(rate), "", "")
             for name, rate in zip(working, fast)]
    shares = "; ".join(f"{name}: {rate[0] / floor[0]:.0%} of the floor, {rate[0] / bandwidth[0]:.0%} of the "
                       "bandwidth floor" for name, rate in zip(("plain", *working), (eager, *fast)))
    return rows + [(precision, "decode / floors", shares, "", "")]


def once(value: float) -> Stat:
    """A figure measured once, as a (median, min, max) triple."""
    return value, value, value


def image_question(s: Setup, model: torch.nn.Module, new_tokens: int) -> Greedy:
    """A red 640x480 image and a prompt that fills CONTEXT tokens with the answer's `new_tokens`."""
    from PIL import Image

    from adapter.visual import encode_images

    image = Image.new("RGB", (640, 480), (200, 30, 40))
    tokens = prompt(1, CONTEXT - s.new_tokens, s.args.vocab_size, device=s.device)
    with torch.inference_mode():
        return greedy(Ours(model, encode_images(model, [image])), tokens, new_tokens)


def image_label(s: Setup) -> str:
    return f"image question ({s.clip_name or 'CLIP'}, v2 visual prompt) at {CONTEXT} tokens of context"


def image_rows(s: Setup, precision: str, ours: Ours, repeats: int) -> list[tuple[str, ...]]:
    """An image question at 2048 tokens of context: encode + first token, and the peak memory (ours only)."""
    if s.clip is None:
        return [(precision, image_label(s), s.no_clip, "", "")]
    no_peer = "n/a: peft adaption_prompt has no visual prompt"
    first = measure(lambda: 1000 * image_question(s, ours.model, 1).first_token_s, repeats)
    release_static_storage(ours.model)
    memory = once(peak(s.device, lambda: image_question(s, ours.model, s.new_tokens)))
    return [(precision, image_label(s) + ": encode and first token, ms", *cells(first, None, no_peer, 1, True)),
            (precision, image_label(s) + ": peak memory above the weights, GiB",
             *cells(memory, None, no_peer, 2, False))]


def memory_target_rows(s: Setup) -> list[tuple[str, ...]]:
    """nf4 base + v2 adapter + CLIP tower alone on the device, answering an image question at CONTEXT tokens:
    the memory it holds in all (on a GPU torch.cuda.memory_allocated, which counts the quantization state that
    the model's parameters leave out), with the KV cache in the compute dtype, in int8, and in int8 with the
    CLIP tower in nf4 too; and what it is made of, so that a figure above the target shows what to shrink."""
    from adapter.quantize import quantize_model, quantize_tower

    label = f"nf4 base + v2 adapter + {s.clip_name or 'CLIP'} alone on the device"
    if s.clip is None:
        return [("nf4", label, s.no_clip, "", "")]
    cuda = s.device.type == "cuda"
    sync(s.device)
    before = torch.cuda.memory_allocated(s.device) if cuda else 0
    model = quantize_model(build(s), "nf4", s.dtype)
    rows = []
    for kind, clip in (("auto", "bf16" if cuda else "fp32"), ("int8", None), ("int8", "nf4")):
        if clip == "nf4":
            quantize_tower(model.image_encoder.tower, "nf4", s.dtype)
        gc.collect()
        weights = (torch.cuda.memory_allocated(s.device) - before) / 2**30 if cuda else weights_gib(model)
        model.kv_cache = kind
        release_static_storage(model)
        total = weights + peak(s.device, lambda: image_question(s, model, s.new_tokens))
        setting = f"KV cache {kind}" + (f", CLIP tower in {clip}" if clip else "")
        rows.append(("nf4", f"{label}, {setting}: weights; with an image question at {CONTEXT} tokens of context, "
                     "GiB (GB)", f"{weights:.2f}; {total:.2f} ({total * 2**30 / 1e9:.2f})", "", ""))
        tower, visual, kv = weights_gib(model.image_encoder), weights_gib(model.visual_prompt), kv_cache_gib(s, kind)
        parts = [f"{part * 1024:.2f}" for part in (weights - tower - visual, tower, visual, kv)]
        # on the CPU, resident memory reuses pages freed by earlier runs, so the peak leaves out part of the KV cache
        rest = f"{(total - weights - kv) * 1024:.2f}" if cuda else "- (on a GPU only)"
        rows.append(("nf4", f"{label}, {setting}: of which the base and adapter, the CLIP tower, the visual prompt, "
                     f"the KV cache of {CONTEXT} tokens, the rest (activations), MiB", ", ".join([*parts, rest]),
                     "", ""))
    return rows


def prequantized_rows(s: Setup) -> list[tuple[str, ...]]:
    """A base written by `adapter.quantize_base` (quantized on the device) loads on the device as the same base
    quantized while loading: logits compared bit for bit, and both load times. A small random base on disk (the
    7B one would take minutes to write): a check of the device path, not a figure to compare."""
    import tempfile

    from adapter.loading import load
    from adapter.quantize_base import quantize_base
    from adapter.random_model import write_random_base

    shape = TINY if s.device.type == "cpu" else PREQUANTIZED_SHAPE
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        base = write_random_base(Path(folder) / "base", shape, dtype=torch.float16)
        for mode in QUANTIZED:
            stored = quantize_base(base, Path(folder) / mode, mode, dtype=str(s.dtype).removeprefix("torch."),
                                   device=str(s.device))
            tokens = torch.tensor([list(range(1, 17))], device=s.device)
            found = {}
            for name, source, asked in (("pre-quantized", stored, None), ("while loading", base, mode)):
                sync(s.device)
                started = time.perf_counter()
                model = load(source, quantize=asked, device=s.device, dtype=s.dtype)
                sync(s.device)
                seconds = time.perf_counter() - started
                with torch.no_grad():
                    found[name] = (seconds, model(tokens).float())
                del model
            (pre, pre_logits), (during, during_logits) = found["pre-quantized"], found["while loading"]
            rows.append((mode, f"pre-quantized folder of a {shape.dim}-dim {shape.n_layers}-layer base "
                         "(adapter.quantize_base): logits equal to quantizing while loading; load time, s "
                         "(pre-quantized, while loading)",
                         f"{'yes' if torch.equal(pre_logits, during_logits) else 'NO'}; {pre:.2f}, {during:.2f}",
                         "", ""))
    return rows


def train_rows(s: Setup, ours: Ours, peer: Peer | None, why: str) -> list[tuple[str, ...]]:
    """One nf4 training step (after one warm-up) on each side: tokens/s and peak memory above the weights."""
    from adapter.finetune.distributed import Processes
    from adapter.finetune.optimizer import build_optimizer
    from adapter.finetune.step import optimizer_step
    from bench.train import LR, batches, peer_optimizer, peer_step, targets

    lengths = s.train_lengths
    steps = [[dataclasses.replace(b, tokens=b.tokens.to(s.device), labels=b.labels.to(s.device)) for b in step]
             for step in batches(2, s.args.vocab_size, lengths)]

    def ours_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: list) -> None:
        optimizer_step(model, optimizer, step, targets(step), Processes(), lr=LR, clip_grad=1.0, step=1)

    def run(side: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            one_step: Callable) -> tuple[Stat, Stat]:
        model.train()
        one_step(model, optimizer, steps[0])  # warm-up
        seconds = []

        def timed() -> None:  # peak() has waited for the warm-up's queued work to finish
            start = time.perf_counter()
            one_step(model, optimizer, steps[1])
            sync(s.device)
            seconds.append(time.perf_counter() - start)

        memory = peak(s.device, timed)
        write_profile(s, f"train-nf4-{side}", lambda: one_step(model, optimizer, steps[1]))
        model.eval()
        return once(sum(b.n_tokens for b in steps[1]) / seconds[0]), once(memory)

    a, b = run("ours", ours.model, build_optimizer(ours.model, LR, 0.02), ours_step), (None, None)
    if peer is not None:
        b = run("peer", peer.model, peer_optimizer(peer.model), peer_step)
    n = len(steps[1]) * len(steps[1][0].tokens)
    return [("nf4", f"one training step ({n} sequences of {lengths[0]}-{lengths[1]} tokens), tokens/s",
             *cells(a[0], b[0], why, 0, False)),
            ("nf4", "one training step: peak memory above the weights, GiB", *cells(a[1], b[1], why, 2, False))]


def run_precision(s: Setup, precision: str, repeats: int) -> tuple[Check | str, list[tuple[str, ...]]]:
    ours, peer = pair(s, precision)
    try:
        check: Check | str = check_same(ours, peer, precision, prompt(1, 64, s.args.vocab_size, seed=7,
                                                                        device=s.device),
                                        tolerance=s.tolerance[precision])
        why = ""
    except PeerMismatch as error:
        check, why, peer = f"{precision}: {error}", "not timed: differs from ours (see above)", None
    rows = decode_rows(s, precision, ours, peer, why, repeats) + image_rows(s, precision, ours, repeats)
    if precision == "nf4":
        rows += train_rows(s, ours, peer, why)
    return check, rows


def render(s: Setup, checks: list[Check | str], rows: list[tuple[str, ...]], skipped: list[str], command: str,
           repeats: int, seconds: float, smoke: bool) -> str:
    compared = [c for c in checks if isinstance(c, Check)]  # none when only stages without a peer ran
    problems = [f"- {c}" for c in checks if isinstance(c, str)]
    problems += [f"- skipped after the {s.budget_s:g} s budget: {', '.join(skipped)}"] if skipped else []
    return "\n".join([
        (f"## {HEADING} ({card(s.device)}): LLaMA-7B-shaped, random weights, v1 prompts on "
         f"{s.adapter.prompt_layers} layers" + (" (--smoke: tiny shapes, figures mean nothing)" if smoke
                                                else "")),
        "",
        (f"Card: {card(s.device)}; torch {torch.__version__}, {versions()}. Command: `{command}`, {seconds:.0f} s in "
         f"all. Weights made on the device in {str(s.dtype).removeprefix('torch.')}; nf4/int8 quantize the frozen "
         "linears (same compute dtype). Peer: transformers LlamaForCausalLM + peft `adaption_prompt` on the same "
         "tensors, its nf4/int8 linears replaced by bitsandbytes layers (see bench/gpu.py). Ours decodes as users "
         "get it by default (on a GPU, an unquantized model's one-token steps replay CUDA graphs; "
         "adapter.static_decode). Median of "
         f"{repeats} runs after a warm-up (the two sides in turn, round after round), min / max in brackets; the "
         "nf4 training step is timed once after a warm-up; memory is torch.cuda.max_memory_allocated above "
         f"what was allocated before (resident memory on the CPU). {s.new_tokens} new tokens per generation."),
        "",
        *(check_lines(compared, "is listed below it and its peer is not timed") + [""] if compared else []),
        *([*problems, ""] if problems else []),
        *table(("precision", "measure", "ours", "transformers + peft", "ours / peer"), rows),
        "",
    ])


def positive_seconds(text: str) -> float:
    """--budget: a finite number of seconds above 0 (0, a negative or nan skipped every stage, silently)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


def card(device: torch.device) -> str:
    if device.type != "cuda":
        return "CPU"
    return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--budget", type=positive_seconds, default=420,
                        help="seconds; later stages are skipped after it")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (on the CPU unless --device): checks the "
                        "script, not the GPU")
    parser.add_argument("--device", help="where to run (default: cuda, or cpu with --smoke)")
    parser.add_argument("--only", help="comma-separated stages to run, in their usual order (default: all): the "
                        "precisions (bf16, nf4, int8; fp32 for --smoke), memory, fast-bf16, fast-nf4")
    parser.add_argument("--profile", type=Path, help="write torch.profiler tables of the decode and training "
                        "steps into this folder (e.g. $OUT/profiles)")
    parser.add_argument("--write", help="replace the GPU section of this markdown file (e.g. BENCHMARKS.md); "
                        "rewritten after each stage, so a run stopped early keeps what it measured")
    options = parser.parse_args(argv)
    if options.device is not None:
        try:
            torch.device(options.device)
        except RuntimeError:
            parser.error(f"--device: {options.device!r} is not a device name (e.g. cpu, cuda, cuda:1)")
    if options.profile is not None:
        try:  # now, not after minutes of measuring
            options.profile.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            parser.error(f"--profile: cannot make the folder {options.profile}: {error.strerror}")
    add_vendor()
    quiet()
    s = dataclasses.replace(setup(options.smoke, options.budget, options.device), profile=options.profile)
    repeats = 1 if options.smoke else options.repeats
    started = time.perf_counter()
    stages = [(p, lambda p=p: run_precision(s, p, repeats)) for p in s.precisions]
    stages.append(("memory", lambda: (None, memory_target_rows(s))))
    stages += [(f"fast-{p}", lambda p=p: (None, fast_decode_rows(s, p, repeats))) for p in s.precisions[:2]]
    stages.append(("prequantized", lambda: (None, prequantized_rows(s))))  # last: a check, never in a figure's way
    if options.only is not None:
        chosen = [name.strip() for name in options.only.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in dict(stages)]
        if unknown or not chosen:
            parser.error(f"--only: no stage {', '.join(unknown) or 'named'}; the stages are "
                         f"{', '.join(dict(stages))}")
        stages = [(name, stage) for name, stage in stages if name in chosen]
    checks, rows, skipped = [], [], []

    def written(echo: bool) -> None:
        """The section so far: into --write after every stage (a run stopped early keeps it), printed at the end."""
        publish(render(s, checks, rows, skipped, command_line("bench.gpu", argv), repeats,
                       time.perf_counter() - started, options.smoke), HEADING + " (", options.write, echo=echo,
                smoke=options.smoke)

    for name, stage in stages:
        if time.perf_counter() - started > s.budget_s:
            skipped.append(name)
            continue
        print(f"bench.gpu: [{time.perf_counter() - started:5.0f} s] {name}", file=sys.stderr, flush=True)
        try:
            check, more = stage()
        except (ImportError, RuntimeError, ValueError) as error:  # e.g. no bitsandbytes, or none for this CUDA
            check, more = f"{name}: not run: {error_line(error)}", []
        checks += [check] if check is not None else []
        rows += more
        gc.collect()
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
        if options.write:
            written(echo=False)
    written(echo=True)  # (with the stages the budget skipped: a run whose last stage was skipped printed nothing)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
