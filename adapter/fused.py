"""Stacked frozen projections for decoding without gradients: wq|wk|wv and w1|w3 as one matrix each.

A CPU decode step is a chain of small matrix-vector products, each with a fixed cost of its own (dispatch,
BLAS set-up, an OpenMP fork and join); stacking the projections that read the same input turns seven of them
per layer into four, and lets one rotation serve queries and keys. The stacked weight is a cache beside the
parameters, never a parameter itself, so `state_dict` and the Meta names do not change and training never
sees it. `Transformer.step` refreshes it at the start of each request (the first step on a new cache, when the
prompts' keys/values are computed too): it is made again when a part was replaced or changed in place (a
change made through `.data` is not seen). It costs a second copy of those weights, which is why it is kept to
the CPU: on a GPU that memory belongs to the KV cache. Quantized (bitsandbytes) linears are subclasses of
`nn.Linear` with packed weights, so only plain `nn.Linear`s of one dtype are stacked, and only where no v2
scale gives each linear an input of its own.

One matmul over the stacked weight computes each output as the separate matmuls do; only where the BLAS
splits the sums differently for the wider matrix do the last bits differ (seen in the prefill of some shapes;
one-token steps matched in every shape tried).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layout import is_column_major


class StackedWeight:
    """The weights of an owner's bias-free linears `names` (which read the same input), stacked along their
    outputs in that order."""

    def __init__(self, *names: str) -> None:
        self.names = names
        self._key: tuple[tuple[torch.Tensor, int, int], ...] = ()
        self.weight: torch.Tensor | None = None

    def refresh(self, owner: nn.Module) -> None:
        """Bring `weight` up to date with the owner's linears (None where stacking does not apply)."""
        linears = [getattr(owner, name) for name in self.names]
        deltas = [getattr(owner, f"{name}_delta", None) for name in self.names]
        if not _stackable(linears) or any(getattr(delta, "scale", None) is not None for delta in deltas):
            self._key, self.weight = (), None
            return
        key = tuple((linear.weight, linear.weight.data_ptr(), linear.weight._version) for linear in linears)
        if not _same(key, self._key):
            # a plain tensor even under inference_mode, so that later no_grad calls may use it too
            with torch.inference_mode(False), torch.no_grad():
                self.weight = _stack([linear.weight for linear in linears])
            self._key = key


def _stackable(linears: Sequence[nn.Module]) -> bool:
    if not all(type(linear) is nn.Linear and linear.bias is None for linear in linears):
        return False
    weights = [linear.weight for linear in linears]
    return all(w.device.type == "cpu" and w.dtype == weights[0].dtype for w in weights)


def _stack(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """The weights one under the other, column-major if they all are (the layout chosen for them: adapter.layout)."""
    if all(is_column_major(w) for w in weights):
        return torch.cat([w.t() for w in weights], dim=1).t()
    return torch.cat(list(weights))


def _same(key: tuple, other: tuple) -> bool:
    """Same parameter objects, same storage, no in-place change since (tensors compared by identity)."""
    return len(key) == len(other) and all(
        a is b and ptr == other_ptr and version == other_version
        for (a, ptr, version), (b, other_ptr, other_version) in zip(key, other)
    )
