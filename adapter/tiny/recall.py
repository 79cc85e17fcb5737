"""A key -> value recall drill: how many steps a fresh LLaMA of a given shape needs to find a value by its key.

Reading a scene by content ("What colour is the star?") is such a lookup, and the tiny base reads scenes only
by the order they are described in (docs/tiny.md, "Tried"). This drill takes the scene away and leaves the
lookup: `BOS (k v ;) x P (? k v) x P`, P distinct keys, each asked once in a random order, the loss on the
answers only, trained with the base's own optimiser and schedule (`pretrain.train_step`). The last question
can be answered without any lookup (the one value not yet given back), so held-out accuracy per question slot
tells recall (every slot right) from elimination (the last slot right, the others at a guess among the values).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import ModelArgs
from .pretrain import PretrainSettings, fresh_model, new_optimizer, train_step

BOS, SEP, ASK = 1, 2, 3
FIRST_KEY = 4  # keys are FIRST_KEY .. FIRST_KEY + keys - 1, values follow them
NOT_SCORED = -100


@dataclass(frozen=True)
class RecallDrill:
    pairs: int = 4  # key -> value pairs per sequence, and questions
    keys: int = 100  # distinct key tokens
    values: int = 6  # distinct value tokens (the scenes have 6 colours)

    def __post_init__(self) -> None:
        if self.pairs < 1 or self.keys < self.pairs or self.values < 1:
            raise ValueError(f"recall drill: need 1 <= pairs <= keys and values >= 1, got pairs={self.pairs} "
                             f"keys={self.keys} values={self.values}")

    @property
    def vocab_size(self) -> int:
        return FIRST_KEY + self.keys + self.values

    @property
    def length(self) -> int:
        """Input tokens per sequence (BOS, P pairs of 3, P questions of 3, less the last answer)."""
        return 6 * self.pairs


def drill_batch(drill: RecallDrill, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` sequences: inputs [count, T] and their next-token targets, NOT_SCORED except the answers."""
    keys = torch.stack([torch.randperm(drill.keys, generator=generator)[: drill.pairs] for _ in range(count)])
    keys = keys + FIRST_KEY
    values = torch.randint(drill.values, (count, drill.pairs), generator=generator) + FIRST_KEY + drill.keys
    asked = torch.stack([torch.randperm(drill.pairs, generator=generator) for _ in range(count)])
    column = torch.ones(count, 1, dtype=torch.long)
    tokens, labels = [BOS * column], [NOT_SCORED * column]
    for i in range(drill.pairs):
        tokens += [keys[:, i:i + 1], values[:, i:i + 1], SEP * column]
        labels += [NOT_SCORED * column.repeat(1, 3)]
    for j in range(drill.pairs):
        key, value = keys.gather(1, asked[:, j:j + 1]), values.gather(1, asked[:, j:j + 1])
        tokens += [ASK * column, key, value]
        labels += [NOT_SCORED * column.repeat(1, 2), value]
    sequence, scored = torch.cat(tokens, 1), torch.cat(labels, 1)
    return sequence[:, :-1], scored[:, 1:]


def guess_floor(drill: RecallDrill) -> list[float]:
    """Per slot, the accuracy of no lookup at all: a uniform guess among the values not yet given back
    (the asked one, plus each of the other r - 1 left that happens to be the same value)."""
    left = range(drill.pairs, 0, -1)
    return [(1 + (r - 1) / drill.values) / r for r in left]


@torch.no_grad()
def slot_accuracy(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Greedy accuracy of each question slot, in the order they are asked."""
    was_training = model.training
    model.eval()
    guesses = model(inputs).argmax(-1)
    model.train(was_training)
    columns = (targets[0] != NOT_SCORED).nonzero().flatten()
    return [(guesses[:, c] == targets[:, c]).float().mean().item() for c in columns.tolist()]


def recall_curve(args: ModelArgs, drill: RecallDrill, settings: PretrainSettings, seed: int, every: int,
                 held_out: int = 512, log: Callable[[str], None] = print) -> list[dict]:
    """Train a fresh model of `args`' shape on the drill; every `every` steps, held-out accuracy per slot."""
    if min(settings.steps, settings.batch_size, every) < 1:
        raise ValueError(f"recall drill: steps, batch and every must be at least 1, got {settings.steps}, "
                         f"{settings.batch_size}, {every}")
    if args.vocab_size != drill.vocab_size:
        raise ValueError(f"recall drill: the model's vocab_size is {args.vocab_size}, the drill's {drill.vocab_size}")
    model = fresh_model(args, seed)
    optimizer = new_optimizer(model, settings)
    generator = torch.Generator().manual_seed(seed)
    test_inputs, test_targets = drill_batch(drill, held_out, torch.Generator().manual_seed(seed + 1))
    rows, running = [], None
    for step in range(settings.steps):
        inputs, targets = drill_batch(drill, settings.batch_size, generator)
        loss = train_step(model, optimizer, inputs, targets, step, settings)
        running = loss if running is None else 0.98 * running + 0.02 * loss
        if (step + 1) % every == 0 or step + 1 == settings.steps:
            slots = slot_accuracy(model, test_inputs, test_targets)
            rows.append({"step": step + 1, "loss": running, "slots": slots})
            log(f"step {step + 1:6d}  loss {running:.3f}  " + "  ".join(f"{a:4.0%}" for a in slots)
                + f"  all {sum(slots) / len(slots):4.0%}")
    return rows
