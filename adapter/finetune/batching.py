"""Which examples go into each optimizer step, how a step is split over processes and micro-batches, and
how a micro-batch becomes tensors.

An epoch's order depends only on (seed, epoch, lengths), so an interrupted run recomputes it exactly. The
order is length-grouped: shuffle, sort chunks of GROUP steps by length (little padding), cut them into steps
of `batch_size` examples, shuffle the steps, cut each into micro-batches. Process `rank` of `world` takes every
world-th micro-batch of a step, so any number of processes, and any micro-batch size, computes the same global
batch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .encode import IGNORE_INDEX, Encoded

GROUP = 50  # optimizer steps per length-sorted chunk
PAD_ID = 0  # any id will do: padded positions are never attended to by real tokens nor trained on


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] right-padded
    labels: torch.Tensor  # [B, T], IGNORE_INDEX on the prompt and the padding
    images: list[Path | None] | None  # one per row when any row has an image, else None
    n_tokens: int  # real (unpadded) tokens


def collate(items: Sequence[Encoded], device: torch.device | str = "cpu") -> Batch:
    """Right-pad to the longest item. No items gives one fully-masked row: a process with nothing left in the
    last, smaller step still takes part in the gradient all-reduce, contributing zero."""
    if not items:
        return Batch(torch.full((1, 2), PAD_ID, dtype=torch.long, device=device),
                     torch.full((1, 2), IGNORE_INDEX, dtype=torch.long, device=device), None, 0)
    width = max(len(item.tokens) for item in items)
    tokens = torch.full((len(items), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        tokens[row, : len(item.tokens)] = torch.tensor(item.tokens)
        labels[row, : len(item.labels)] = torch.tensor(item.labels)
    images = [item.image for item in items] if any(item.image is not None for item in items) else None
    return Batch(tokens.to(device), labels.to(device), images, sum(len(item.tokens) for item in items))


def epoch_batches(lengths: Sequence[int], batch_size: int, micro_batch_size: int, seed: int,
                  epoch: int) -> list[list[list[int]]]:
    """The epoch's optimizer steps, each a list of micro-batches of example indices (the last may be smaller).
    Which examples make each step depends on the batch size alone, never on `micro_batch_size`, which only cuts
    a step into forward passes: so the micro-batch size does not change what a run learns."""
    rng = random.Random(f"order:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = GROUP * batch_size
    steps = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: -lengths[i])
        steps += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(steps)
    return [[step[i:i + micro_batch_size] for i in range(0, len(step), micro_batch_size)] for step in steps]


def shard(step: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches of one step; [[]] (one empty micro-batch) when it has none."""
    return step[rank::world] or [[]]


def eval_batches(lengths: Sequence[int], micro_batch_size: int, rank: int, world: int) -> list[list[int]]:
    """Length-sorted validation micro-batches, this process's share."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    micro_batches = [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    return micro_batches[rank::world]
