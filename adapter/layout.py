"""Where in memory the frozen weights lie: the layout the CPU's matrix-vector product reads fastest.

A decode step multiplies one row per sequence by every frozen matrix, so on a CPU its speed is how fast the
BLAS streams each weight. Checkpoints store a linear's weight [out, in] row-major. On the AMD EPYC of these
machines, torch's float32 GEMV (MKL) read a wide matrix (more outputs than inputs: w1, w3, the output head)
at 7-8 GB/s that way and at 12-16 GB/s stored [in, out], i.e. column-major (`python -m bench.decode` times
both layouts in turn). So `adapter.load` copies those weights column-major
onto the CPU: each parameter keeps its [out, in] shape and values (it becomes the transposed view of an
[in, out] tensor) and `F.linear` reads it as `x @ W_t`; nothing but the speed changes. Not for 16-bit weights
(their CPU GEMV was ten times slower column-major) and not for training, whose head backward was 1.5x slower
that way: `adapter.finetune` puts the weights back with `row_major`. Nor for the compiled decode step, whose
fused reductions read every weight fastest row-major (adapter.model.frozen_linear): its first use puts them
back. The fused path's stacks (adapter.fused) take their parts' layout, so the stacked wq|wk|wv (square
parts) stays row-major.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def column_major_wide(model: nn.Module) -> int:
    """Store every weight that `prefers_column_major` column-major; returns how many moved."""
    moved = 0
    for linear in _plain_linears(model):
        w = linear.weight
        if prefers_column_major(linear, w.device, w.dtype) and not is_column_major(w):
            _relayout(w, w.detach().t().contiguous().t())
            moved += 1
    return moved


def prefers_column_major(linear: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this linear's weight, placed on `device` in `dtype`, is one that reads faster column-major:
    a frozen, wide, float32 weight of a plain `nn.Linear` on the CPU."""
    if type(linear) is not nn.Linear:
        return False
    w = linear.weight
    return device.type == "cpu" and dtype == torch.float32 and not w.requires_grad and w.shape[0] > w.shape[1]


def column_major_copy(source: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`source` on `device` in `dtype`, stored column-major, made in one copy (loading a 7B head makes no
    second transient copy of it)."""
    copy = torch.empty(tuple(reversed(source.shape)), device=device, dtype=dtype).t()
    copy.copy_(source)
    return copy


def row_major(model: nn.Module) -> int:
    """Put every column-major `nn.Linear` weight back in the checkpoints' row-major layout (for training)."""
    moved = 0
    for linear in _plain_linears(model):
        if is_column_major(linear.weight):
            _relayout(linear.weight, linear.weight.detach().contiguous())
            moved += 1
    return moved


def is_column_major(weight: torch.Tensor) -> bool:
    """A 2-D tensor that is the transposed view of a contiguous one (and not itself contiguous)."""
    return weight.dim() == 2 and not weight.is_contiguous() and weight.t().is_contiguous()


def _plain_linears(model: nn.Module) -> Iterator[nn.Linear]:
    """Unquantized linears only: bitsandbytes' are `nn.Linear` subclasses with packed weights of their own."""
    return (m for m in model.modules() if type(m) is nn.Linear)


def _relayout(parameter: torch.Tensor, values: torch.Tensor) -> None:
    with torch.no_grad():
        parameter.data = values
