"""Pretraining the tiny base LLaMA: next-token loss on the plain-text corpus only, then written as a Meta
folder (params.json, consolidated.00.pth in fp16, tokenizer.model) that `adapter.load` reads like any other.

Documents are packed BOS ... EOS back to back and cut into `max_seq_len` windows, so no compute goes to
padding. The model is `adapter.model.Transformer` itself, with every parameter made trainable.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelArgs
from ..formats.common import atomic_write, write_text_atomically, writing
from ..model import Transformer
from ..tokenizer import Tokenizer


@dataclass(frozen=True)
class PretrainSettings:
    steps: int
    batch_size: int  # windows per step
    lr: float
    warmup: int
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    bf16: bool = False  # bf16 autocast: on CPUs with AMX about 1.7x faster steps (master weights stay fp32)
    copy_steps: int = 0  # the first steps train on repeated text (see repeated_windows), counted in `steps`


def pack(documents: Sequence[str], tokenizer: Tokenizer, window: int) -> torch.Tensor:
    """[N, window + 1] token windows (inputs and their next tokens) from BOS doc EOS ... streams."""
    stream: list[int] = []
    for document in documents:
        stream += tokenizer.encode(document, bos=True, eos=True)
    count = (len(stream) - 1) // window
    if count < 1:
        raise ValueError(f"corpus: {len(stream)} tokens do not fill one window of {window}")
    data = torch.tensor(stream[: count * window + 1])
    return torch.stack([data[i * window: (i + 1) * window + 1] for i in range(count)])


def repeated_windows(windows: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` windows of the corpus's shape whose second half repeats the first (a corpus span said twice).

    Only looking back predicts the repeat, which is what makes a small model form induction heads (attend to
    what followed the last occurrence of this token). On the corpus alone the tiny base never formed them in
    the steps it had: it answered questions about a one-shape scene with a colour that was not in it.
    """
    half = windows.shape[1] // 2
    spans = windows[torch.randint(len(windows), (count,), generator=generator), :half]
    return torch.cat([spans, spans, spans], 1)[:, : windows.shape[1]]


def init_weights(model: Transformer) -> None:
    """GPT-2 style: N(0, 0.02), the residual outputs (wo, w2) scaled down by sqrt(2 * layers)."""
    residual_std = 0.02 / math.sqrt(2 * model.args.n_layers)
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue
        std = residual_std if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else 0.02
        nn.init.normal_(param, 0.0, std)


def lr_at(step: int, settings: PretrainSettings) -> float:
    """Linear warm-up, then cosine down to a tenth of the peak."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def new_optimizer(model: Transformer, settings: PretrainSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (not on norms), as for every tiny base."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95))


def train_step(model: Transformer, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
               step: int, settings: PretrainSettings) -> float:
    """One optimiser step on the next-token loss of `targets` [B, T] (-100: not scored); returns the loss."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
        logits = model(inputs)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, settings)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def fresh_model(args: ModelArgs, seed: int) -> Transformer:
    """A newly initialised base with every parameter trainable."""
    torch.manual_seed(seed)
    model = Transformer(args)
    init_weights(model)
    return model.requires_grad_(True).train()


def pretrain(args: ModelArgs, windows: torch.Tensor, settings: PretrainSettings, seed: int,
             log: Callable[[str], None] = print) -> Transformer:
    """Train a fresh base on `windows` ([N, T + 1]) for `settings.steps` steps; the order is seeded."""
    model = fresh_model(args, seed)
    optimizer = new_optimizer(model, settings)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(windows), generator=generator)
    position, running = 0, None
    for step in range(settings.steps):
        if position + settings.batch_size > len(order):
            order, position = torch.randperm(len(windows), generator=generator), 0
        if step < settings.copy_steps:
            batch = repeated_windows(windows, settings.batch_size, generator)
        else:
            batch = windows[order[position: position + settings.batch_size]]
            position += settings.batch_size
        loss = train_step(model, optimizer, batch[:, :-1], batch[:, 1:], step, settings)
        running = loss if running is None else 0.98 * running + 0.02 * loss
        if (step + 1) % max(1, settings.steps // 20) == 0 or step + 1 == settings.steps:
            log(f"pretrain step {step + 1}/{settings.steps}: loss {running:.3f}")
    return model.requires_grad_(False).eval()


@torch.no_grad()
def mean_loss(model: Transformer, windows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token loss over `windows` (for the model card: held-out text, fp32 vs fp16)."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start: start + batch_size]
        logits = model(batch[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count


def round_to_fp16(model: Transformer) -> Transformer:
    """The model as it is shipped: every weight rounded to fp16 (computed in fp32 again after loading)."""
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())
    return model


def write_meta_folder(model: Transformer, folder: Path, tokenizer_path: Path) -> Path:
    """params.json (with max_seq_len, which adapter.load honours), consolidated.00.pth (fp16), tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().half().contiguous() for name, tensor in model.state_dict().items()}
    with tempfile.TemporaryDirectory(dir=folder) as staging:  # whole or not at all; torch.save names its zip's
        # folder after the file, so the temp file has the final name (the shipped bytes)
        with writing(folder / "consolidated.00.pth"):
            torch.save(state, Path(staging) / "consolidated.00.pth")
        os.replace(Path(staging) / "consolidated.00.pth", folder / "consolidated.00.pth")
    params = {k: v for k, v in model.args.to_dict().items() if v is not None}
    write_text_atomically(folder / "params.json", json.dumps(params, indent=2, sort_keys=True) + "\n")
    target = folder / "tokenizer.model"
    if tokenizer_path.resolve() != target.resolve():
        atomic_write(target, lambda tmp: shutil.copyfile(tokenizer_path, tmp))
    return folder
