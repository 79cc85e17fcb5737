"""Whether a Space's hardware holds what the app's flags serve, known before a deploy from the base's shape alone
(`adapter.footprint`), so that a Space is not built, billed and left crashing on a card too small for its base.

What is counted: the base's weights in the precision the flags load it in, the CLIP tower's (where its model is known
without fetching an adapter: `--clip-model`, an official release, the embedded tiny tower), the KV cache of an
answer at 2,048 tokens of context (the base's, if shorter) for each request decoded at once (`--concurrency`), what
reading such a prompt holds for a moment (its activations: the feed-forward's three and attention's four widths per
token, in the compute dtype; for a quantized base also one layer's linears unpacked to that dtype, which is what
bitsandbytes' CPU path was measured to hold), and a fixed part: on a GPU 0.5 GiB for CUDA's context, on a CPU
1 GiB for the app's process (0.8 to 0.9 GiB measured), and there what gradio keeps per session, up to
`--max-sessions` of them (0.31 MiB each: `python -m bench.sessions`). `python -m bench.space_fit` measures the app
against this sum (BENCHMARKS.md). The adapters' own tensors (megabytes; an official v2 release's 0.1 GiB) are not
counted. The app serves from one device: on hardware with several GPUs, one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .app_config import parsed_flags
from .config import ModelArgs
from .footprint import footprint, layer_linears, size_text, tower_bytes
from .formats.official import OFFICIAL_CLIP_MODEL
from .loading import DTYPES
from .quantize import check_mode
from .releases import PREFIX as OFFICIAL_PREFIX
from .tiny.assets import BASE_NAME, IMAGE_NAME, TEXT_NAME
from .tiny.assets import resolve as resolve_tiny
from .tokenizer import open_tokenizer

GB, GIB = 10**9, 2**30
CONTEXT = 2048  # tokens of KV cache counted per request: the app decodes no more at once (served_cache_tokens)
GPU_FIXED, CPU_FIXED = 0.5 * GIB, 1.0 * GIB  # CUDA's context; the app's process (Python, torch, gradio)
SESSION_BYTES = 325_000  # what gradio keeps per session of the app, in the process's memory (bench.sessions: 0.31 MiB)


def served_cache_rows(concurrency: int, max_seq_len: int) -> tuple[int, int]:
    """The KV cache the fit check counts: (rows, tokens each), CONTEXT tokens (the base's context, if shorter) for
    each of `concurrency` requests."""
    return max(1, concurrency), min(CONTEXT, max_seq_len)


def served_cache_tokens(concurrency: int, max_seq_len: int) -> int:
    """The KV cache the app lets one decode hold (Engine.max_cached_tokens), in tokens: what the fit check counts."""
    rows, context = served_cache_rows(concurrency, max_seq_len)
    return rows * context


@dataclass(frozen=True)
class Hardware:
    """A Space hardware kind as the hub's documentation lists it (memory in GB, 10^9 bytes)."""

    name: str
    label: str
    ram_gb: int
    gpu_gb: int = 0  # each GPU's
    gpus: int = 0
    bf16: bool = True  # a T4 has no bfloat16: the app computes in float16 there

    def memory(self, on_gpu: bool) -> float:
        return (self.gpu_gb if on_gpu else self.ram_gb) * GB

    def describe(self, on_gpu: bool) -> str:
        if not on_gpu:
            return f"{self.label}, {self.ram_gb} GB of memory"
        several = f" on each of {self.gpus} GPUs, of which the app uses one" if self.gpus > 1 else ""
        return f"{self.label}, {self.gpu_gb} GB of GPU memory{several}"


# https://huggingface.co/docs/hub/spaces-gpus, cheapest first (the first that holds a base is the one suggested)
HARDWARE = (
    Hardware("cpu-basic", "2 vCPU", 16), Hardware("cpu-upgrade", "8 vCPU", 32),
    Hardware("t4-small", "Nvidia T4", 15, 16, 1, bf16=False), Hardware("t4-medium", "Nvidia T4", 30, 16, 1, bf16=False),
    Hardware("l4x1", "Nvidia L4", 30, 24, 1), Hardware("a10g-small", "Nvidia A10G", 15, 24, 1),
    Hardware("a10g-large", "Nvidia A10G", 46, 24, 1), Hardware("l40sx1", "Nvidia L40S", 62, 48, 1),
    Hardware("a100-large", "Nvidia A100", 142, 80, 1), Hardware("a10g-largex2", "2x Nvidia A10G", 92, 24, 2),
    Hardware("l4x4", "4x Nvidia L4", 186, 24, 4), Hardware("a10g-largex4", "4x Nvidia A10G", 184, 24, 4),
    Hardware("l40sx4", "4x Nvidia L40S", 382, 48, 4), Hardware("l40sx8", "8x Nvidia L40S", 1534, 48, 8),
)
BY_NAME = {kind.name: kind for kind in HARDWARE}


@dataclass(frozen=True)
class Need:
    """The memory the app takes on one device: a GPU, or the CPU's memory."""

    on_gpu: bool
    precision: str  # the base's: nf4, int8, or its dtype's name
    weights: int
    tower: int | None  # None: the tower's model is not known from here; 0: no tower
    kv_per_token: int
    rows: int
    context: int
    transient: int  # what reading a prompt holds for a moment: activations (and a quantized layer unpacked)
    sessions: int = 0  # sessions whose state the process keeps (--max-sessions), counted in the CPU's memory

    @property
    def fixed(self) -> float:
        return GPU_FIXED if self.on_gpu else CPU_FIXED

    @property
    def total(self) -> float:
        return (self.weights + (self.tower or 0) + self.kv_per_token * self.rows * self.context + self.transient
                + self.sessions * SESSION_BYTES + self.fixed)

    def sum_text(self, memory: float) -> str:
        parts = [f"base {self.precision} {size_text(self.weights)}"]
        if self.tower:
            parts.append(f"CLIP tower {size_text(self.tower)}")
        elif self.tower is None:
            parts.append("the CLIP tower (its model is the adapter's; --clip-model NAME counts it)")
        parts.append(f"KV cache {size_text(self.kv_per_token * self.rows * self.context)} "
                     f"({self.rows} x {self.context:,} tokens)")
        parts.append(f"reading the prompt {size_text(self.transient)}")
        if self.sessions:
            parts.append(f"sessions {size_text(self.sessions * SESSION_BYTES)} ({self.sessions:,} kept)")
        parts.append(f"{self.fixed / GIB:.2f} GiB for " + ("CUDA" if self.on_gpu else "the app itself"))
        return " + ".join(parts) + f" = {self.total / GIB:.2f} of {memory / GIB:.2f} GiB"

    def room_text(self, memory: float) -> str:
        room = int((memory - self.total) // self.kv_per_token) + self.rows * self.context
        return f"the KV cache has room for about {round(room, -3 if room >= 10_000 else -2):,} tokens in all"


@dataclass(frozen=True)
class Served:
    """What the app's flags serve, read once: the parsed flags, the base's shape, the CLIP towers' shapes."""

    options: Mapping[str, object]
    args: ModelArgs
    tied_output: bool
    stored: str | None  # a pre-quantized base's mode
    towers: list[nn.Module] | None  # None: a tower whose model is not known from here
    double_quant: bool = True  # a pre-quantized 4-bit base's block scales quantized too

    @classmethod
    def read(cls, variables: Mapping[str, str], checkpoint) -> Served:
        options = parsed_flags([], variables)
        args = checkpoint.model_args(open_tokenizer(checkpoint.tokenizer_path).n_words)
        return cls(options, args, checkpoint.tied_output, getattr(checkpoint, "quantization", None),
                   _tower_shapes(options), getattr(checkpoint, "double_quant", True))

    def need(self, kind: Hardware, on_gpu: bool, quantize: str | None = None) -> Need:
        """On `kind`'s GPU or CPU, in the dtype the app would choose there (16 bits on a GPU, float32 on a CPU)
        unless --dtype says; `quantize` in place of the flags' --quantize."""
        options = self.options
        dtype = DTYPES[options["dtype"]] if options["dtype"] else torch.float32 if not on_gpu else \
            torch.bfloat16 if kind.bf16 else torch.float16
        mode = self.stored or check_mode(quantize or options["quantize"])
        sizes = footprint(self.args, mode, dtype, self.tied_output, bool(self.stored), self.double_quant)
        tower_mode, tower_dtype = check_mode(options["clip_quantize"], "clip_quantize"), dtype if on_gpu \
            else torch.float32
        tower = None if self.towers is None else max((tower_bytes(shape, tower_mode, tower_dtype)
                                                      for shape in self.towers), default=0)
        rows, context = served_cache_rows(int(options["concurrency"]), self.args.max_seq_len)
        return Need(on_gpu, mode or str(dtype).removeprefix("torch."), sizes.weights, tower,
                    sizes.kv_per_token_int8 if options["kv_cache"] == "int8" else sizes.kv_per_token, rows, context,
                    _transient(self.args, rows * context, dtype, quantized=mode is not None),
                    0 if on_gpu else int(options["max_sessions"]))

    def on_gpu(self, kind: Hardware) -> bool:
        return bool(kind.gpus) and (self.options["device"] or "cuda").startswith("cuda")

    def cannot_run_on(self, kind: Hardware) -> bool:
        """Whether `--device cuda` was asked of hardware without a GPU."""
        return (self.options["device"] or "").startswith("cuda") and not kind.gpus


def check_fit(variables: Mapping[str, str], hardware: str, checkpoint) -> list[str]:
    """Lines saying how the app, run with the Space's `variables`, fits `hardware` with the base `checkpoint` (opened
    without its weights); ValueError naming what would fit instead where it does not."""
    kind = BY_NAME.get(hardware)
    if kind is None:
        return [f"hardware {hardware}: its memory is not in adapter.space_fit's table; not checked"]
    served = Served.read(variables, checkpoint)
    if served.cannot_run_on(kind):
        raise ValueError(f"--hardware {hardware}: it has no GPU, so --device {served.options['device']} cannot run "
                         "there; choose GPU hardware (t4-small, ...) or leave --device out")
    on_gpu = served.on_gpu(kind)
    need, memory = served.need(kind, on_gpu), kind.memory(on_gpu)
    if need.total <= memory:
        return [f"hardware {hardware} ({kind.describe(on_gpu)}): holds it",
                f"  {need.sum_text(memory)}; {need.room_text(memory)}"]
    raise ValueError(f"--hardware {hardware} ({kind.describe(on_gpu)}) cannot hold the app's base in "
                     f"{need.precision}: {need.sum_text(memory)}; {_what_would_fit(served, kind, need)}"
                     "--no-fit-check deploys anyway")


def _transient(args: ModelArgs, tokens: int, dtype: torch.dtype, quantized: bool) -> int:
    """The bytes reading `tokens` prompt tokens at once holds beside the weights and the cache: the feed-forward's
    three and attention's four widths per token, and for a quantized base one layer's linears unpacked."""
    head, kv = args.n_heads * args.head_dim, args.kv_heads * args.head_dim
    activations = tokens * (3 * args.ffn_hidden_dim + 2 * head + 2 * kv) * dtype.itemsize
    layer = sum(out * inp for out, inp in layer_linears(args))
    return activations + (layer * dtype.itemsize if quantized else 0)


def _tower_shapes(options: Mapping[str, object]) -> list[nn.Module] | None:
    """The shapes of the CLIP towers the flags serve (`visual.tower_shape`): [] where none is; None where a tower's
    model is the adapter's own, not known without fetching it."""
    from .visual import tower_shape

    adapters = list(options["adapter"]) or ([TEXT_NAME, IMAGE_NAME] if options["base"] == BASE_NAME else [])
    models = set()
    for adapter in adapters:
        _, _, clip, model = resolve_tiny("", adapter, options["clip"], options["clip_model"])
        if clip is None or adapter == OFFICIAL_PREFIX + "v1":  # no tower, or the v1 release: no visual prompt
            continue
        models.add(model or (OFFICIAL_CLIP_MODEL if adapter.startswith(OFFICIAL_PREFIX) else None))
    return None if None in models else [tower_shape(model) for model in sorted(models)]


def _what_would_fit(served: Served, kind: Hardware, need: Need) -> str:
    """Advice: the other precisions that fit this hardware, and the cheapest hardware that holds the base as asked."""
    advice = []
    for mode in ("nf4", "int8") if served.stored is None else ():
        other = served.need(kind, need.on_gpu, quantize=mode)
        if mode != need.precision and other.total <= kind.memory(need.on_gpu):
            advice.append(f"--quantize {mode} would ({other.total / GIB:.2f} GiB)")
    for other_kind in HARDWARE:
        if served.cannot_run_on(other_kind):
            continue
        on_gpu = served.on_gpu(other_kind)
        other = served.need(other_kind, on_gpu)
        if other.total <= other_kind.memory(on_gpu):
            advice.append(f"--hardware {other_kind.name} would ({other_kind.label}, {other.total / GIB:.2f} GiB)")
            break
    return "".join(f"{line}; " for line in advice) or "no listed hardware holds it as asked; "
