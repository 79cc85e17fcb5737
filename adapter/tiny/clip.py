"""The tiny image encoder: a small open_clip CLIP trained contrastively (open_clip's own `ClipLoss`) on
rendered train scenes and their descriptions, then frozen.

The text tower reads the base model's sentencepiece ids plus one end-of-text id, the largest, so that
open_clip's default argmax pooling finds it. Only the vision tower is shipped (`visual.*` tensors, fp16),
with an open_clip model-config .json that `adapter.load(..., clip_model=path.json)` accepts.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..tokenizer import Tokenizer
from ..visual import preprocess
from .language import describe
from .world import IMAGE_SIZE, Scene, render, scenes, twin

CONFIG_NAME = "tiny-clip.json"
WEIGHTS_NAME = "visual.safetensors"


@dataclass(frozen=True)
class ClipSettings:
    embed_dim: int
    width: int
    layers: int
    text_width: int
    text_layers: int
    context_length: int
    steps: int
    batch_size: int
    lr: float
    warmup: int
    weight_decay: float = 0.1
    bf16: bool = False  # bf16 autocast for the towers (the loss in fp32), as the base's pretraining
    twin_share: float = 0.0  # the chance that a scene's twin (world.twin, a hard negative) joins its batch


def clip_config(settings: ClipSettings, vocab_size: int) -> dict[str, Any]:
    """The open_clip model config: 64x64 images, 8x8 patches, class-token pooling."""
    return {
        "embed_dim": settings.embed_dim,
        "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 8, "width": settings.width, "layers": settings.layers,
                       "head_width": 32, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": settings.context_length, "vocab_size": vocab_size + 1,
                     "width": settings.text_width, "heads": max(1, settings.text_width // 32),
                     "layers": settings.text_layers},
    }


def tokenize(texts: list[str], tokenizer: Tokenizer, context_length: int) -> torch.Tensor:
    """[B, context_length] ids: the text (cut to fit), then end-of-text (id = vocab size), then zeros."""
    end = tokenizer.n_words
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = tokenizer.encode(text, bos=False, eos=False)[: context_length - 1] + [end]
        out[row, : len(ids)] = torch.tensor(ids)
    return out


def train_clip(settings: ClipSettings, tokenizer: Tokenizer, seed: int, log: Callable[[str], None] = print):
    """A fresh CLIP trained for `settings.steps` batches of new train scenes, each described in a random wording."""
    import open_clip

    config = clip_config(settings, tokenizer.n_words)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**config).train()
    loss_fn = open_clip.ClipLoss()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.98))
    rng = random.Random(f"clip:{seed}")
    running = None
    for step, batch in enumerate(batches(settings, seed)):
        pixels = torch.stack([preprocess(render(scene), IMAGE_SIZE) for scene in batch])
        texts = tokenize([describe(scene, rng) for scene in batch], tokenizer, settings.context_length)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
            image_features, text_features, logit_scale = model(pixels, texts)[:3]
        loss = loss_fn(image_features.float(), text_features.float(), logit_scale)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, settings)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # at most 100, as open_clip's training does
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % max(1, settings.steps // 10) == 0 or step + 1 == settings.steps:
            log(f"clip step {step + 1}/{settings.steps}: loss {running:.3f}")
    return model.eval().requires_grad_(False), config


def batches(settings: ClipSettings, seed: int) -> Iterator[list[Scene]]:
    """`settings.steps` batches of new train scenes; after each scene, with chance `twin_share`, its twin
    (when the batch has room for both)."""
    rng = random.Random(f"clip-twins:{seed}")
    pool = iter(scenes(seed + 3, "train", settings.steps * settings.batch_size))
    for _ in range(settings.steps):
        batch: list[Scene] = []
        while len(batch) < settings.batch_size:
            scene = next(pool)
            batch.append(scene)
            if len(batch) < settings.batch_size and rng.random() < settings.twin_share:
                changed = twin(scene, rng)
                if changed is not None:
                    batch.append(changed)
        yield batch


def _lr(step: int, settings: ClipSettings) -> float:
    """Linear warm-up, then cosine to zero."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    return settings.lr * 0.5 * (1 + math.cos(math.pi * (step - settings.warmup) / max(1, settings.steps - settings.warmup)))


@torch.no_grad()
def retrieval_accuracy(model, tokenizer: Tokenizer, context_length: int, seed: int, count: int = 256) -> float:
    """Share of held-out pictures whose own description is the closest of `count` (for the model card)."""
    rng = random.Random(f"clip-eval:{seed}")
    batch = scenes(seed + 4, "held-out", count, unique=True)
    pixels = torch.stack([preprocess(render(scene), IMAGE_SIZE) for scene in batch])
    texts = tokenize([describe(scene, rng) for scene in batch], tokenizer, context_length)
    image_features, text_features, _ = model(pixels, texts)[:3]
    best = (image_features @ text_features.T).argmax(dim=1)
    return (best == torch.arange(count)).float().mean().item()


def write_clip(model, config: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """The model config (.json) and the vision tower's weights in fp16 (.safetensors)."""
    from ..formats.common import save_tensors, write_text_atomically

    folder.mkdir(parents=True, exist_ok=True)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    write_text_atomically(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    visual = {f"visual.{k}": v.detach().half().contiguous() for k, v in model.visual.state_dict().items()}
    save_tensors(visual, weights_path)
    return config_path, weights_path
