"""One optimizer step: forward and backward over this process's micro-batches, gradients averaged over
processes, a finite-loss check, clipping, AdamW.

The loss of a step is the mean cross-entropy over every response token of the global batch (not a mean of
per-micro-batch means), so the result does not depend on how the batch is split into micro-batches or
over how many processes.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .batching import Batch
from .distributed import Processes, no_sync, unwrap
from .encode import IGNORE_INDEX


class TrainingStopped(RuntimeError):
    """Training cannot go on (a NaN/inf loss or gradient); the message names the step."""


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over the global batch's response tokens
    grad_norm: float  # before clipping


def require_image_encoder(model: nn.Module) -> None:
    if getattr(unwrap(model), "image_encoder", None) is None:
        raise ValueError("image records need an adapter that sees (--mode vision: a visual prompt reading a CLIP "
                         "tower, or an --init-adapter that has one); this one has none, so train on text records or "
                         "in vision mode")


def summed_loss(model: nn.Module, batch: Batch, positions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of `positions` against `targets` (Transformer.forward with targets); rows
    with images get the visual prompt of `adapter.visual.encode_images`."""
    if batch.images is None:
        return model(batch.tokens, positions=positions, targets=targets)
    require_image_encoder(model)
    from ..visual import encode_images

    return model(batch.tokens, visual_prompt=encode_images(unwrap(model), batch.images), positions=positions,
                 targets=targets)


def scored_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool mask [B, T] of the positions whose logits are scored, their targets [N]): the logits at t
    predict the label at t + 1, and IGNORE_INDEX labels (prompt, padding) are never scored."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    scored = targets != IGNORE_INDEX
    return scored, targets[scored]


def micro_batch_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed loss of one micro-batch (what the step backpropagates); the vocabulary head runs only at the
    scored positions."""
    return summed_loss(model, batch, *scored_positions(batch.labels))


def autocast(device: torch.device, mode: str = "auto") -> AbstractContextManager:
    """bf16 autocast: `auto` on GPU only (CPUs without AMX gain nothing), `bf16` on any device, `off` never."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[Batch], targets: int,
                   processes: Processes, *, lr: float, clip_grad: float, step: int,
                   precision: str = "auto") -> StepResult:
    """Apply one step of the global batch whose `targets` response tokens are spread over all processes.

    Raises TrainingStopped before touching the parameters when the loss or the gradient is not finite.
    """
    device = micro_batches[0].tokens.device
    scale = processes.world / max(targets, 1)  # DDP averages over processes; we want the sum over tokens
    total = torch.zeros((), device=device, dtype=torch.float64)
    for index, batch in enumerate(micro_batches):
        with no_sync(model, sync=index == len(micro_batches) - 1), autocast(device, precision):
            loss = micro_batch_loss(model, batch)
            (loss * scale).backward()
        total += loss.detach()
    loss_value = processes.sum(total).item() / max(targets, 1)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingStopped(f"step {step}: the loss is {loss_value}; training stopped")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad > 0 else math.inf))
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingStopped(f"step {step}: the gradient norm is {grad_norm}; training stopped")
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_value, grad_norm)


def evaluate(model: nn.Module, micro_batches: list[Batch], targets: int, processes: Processes,
             precision: str = "auto") -> float:
    """Mean response-token loss over a held-out set (spread over processes), without gradients."""
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    device = next(inner.parameters()).device
    total = torch.zeros((), device=device, dtype=torch.float64)
    with torch.no_grad(), autocast(device, precision):
        for batch in micro_batches:
            total += micro_batch_loss(inner, batch).double()
    inner.train(was_training)
    return processes.sum(total).item() / max(targets, 1)
