"""Whether this CPU computes bf16 natively, because that decides whether bf16 autocast is worth asking for.

On x86 CPUs with AMX or AVX512-BF16, bf16 matrix products are native and about 1.7x faster than fp32 (the
tiny model's pretraining steps). Without them (AVX2-only CPUs, e.g. many AMD EPYC and laptop chips) torch
emulates bf16 and the tiny recipe's training steps are 12-17x slower than in fp32 (`python -m bench.autocast`
on a 2-core AMD EPYC). Other architectures are not judged.
"""

from __future__ import annotations

import platform

import torch


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe_cpu() -> str:
    """Model name and bf16 support, e.g. "AMD EPYC (bf16 emulated)": what a timing depends on."""
    bf16 = cpu_bf16()
    return cpu_name() + (f" (bf16 {'emulated' if bf16 == 'emulated' else 'native: ' + bf16})" if bf16 else "")


def describe_machine() -> str:
    """What a timing was measured on: the CPU (and its bf16), the torch version and its threads."""
    return f"{describe_cpu()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def cpu_bf16() -> str | None:
    """"amx", "avx512-bf16" or "emulated" on x86; None where torch cannot tell (other architectures)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    probe = torch.cpu  # private probes, present in torch 2.x; absent ones count as "no"
    if getattr(probe, "_is_amx_tile_supported", lambda: False)():
        return "amx"
    if getattr(probe, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512-bf16"
    return "emulated"


def bf16_emulation_warning(what: str) -> str | None:
    """A warning for `what` (e.g. "bf16 autocast") when this CPU would emulate bf16; None when it is native
    or unknown."""
    if cpu_bf16() != "emulated":
        return None
    return (f"{what}: this CPU has neither AMX nor AVX512-BF16, so torch emulates bf16 and it runs several "
            "times slower than float32 (the tiny model's training steps 12-17x slower: python -m bench.autocast)")
