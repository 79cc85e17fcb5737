"""Every number of the tiny model's recipe in one place: `FULL` (what assets/tiny is built with) and `MICRO`
(a few steps of each stage, for the end-to-end test)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .clip import ClipSettings
from .pretrain import PretrainSettings


@dataclass(frozen=True)
class AdapterSettings:
    """One `python -m adapter.finetune` run."""

    examples: int
    epochs: int
    batch_size: int
    lr: float
    prompt_len: int
    prompt_layers: int
    warmup_epochs: float = 0.2
    visual: str = "none"  # "v1" | "v2" for the image adapter
    visual_dim: int = 128
    visual_depth: int = 2
    visual_heads: int = 4
    visual_lr: float | None = None  # the visual prompt's peak lr (adapter.finetune --visual-lr); None = lr
    bf16: bool = False  # adapter.finetune --autocast bf16


@dataclass(frozen=True)
class Recipe:
    seed: int
    threads: int
    documents: int  # corpus lines
    vocab_size: int  # an upper bound; the corpus decides (see vocab.py)
    dim: int
    n_layers: int
    n_heads: int
    max_seq_len: int
    pretrain: PretrainSettings
    clip: ClipSettings
    text: AdapterSettings
    image: AdapterSettings
    eval_per_category: int  # held-out questions per category
    clip_probe_pictures: int  # train pictures for the CLIP feature probe (clip_probe.py), run by the eval
    clip_probe_epochs: int
    gate_scales: tuple[float, ...] = field(default=tuple(i / 4 for i in range(9)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def bf16_stages(self) -> tuple[str, ...]:
        """The build stages that train under bf16 autocast."""
        return tuple(stage for stage, name in TRAINING_STAGES if getattr(self, name).bf16)

    def in_fp32(self) -> Recipe:
        """The same recipe with bf16 autocast off in every stage (`build --fp32`): a different model from the
        shipped one, but on CPUs without native bf16 each training step is several times faster."""
        return dataclasses.replace(self, **{name: dataclasses.replace(getattr(self, name), bf16=False)
                                            for _, name in TRAINING_STAGES})


TRAINING_STAGES = (("base", "pretrain"), ("clip", "clip"), ("text", "text"), ("image", "image"))  # build stage, field

FULL = Recipe(
    seed=0, threads=2, documents=50_000, vocab_size=1024, dim=192, n_layers=4, n_heads=6, max_seq_len=256,
    pretrain=PretrainSettings(steps=2000, batch_size=16, lr=3e-3, warmup=100, bf16=True, copy_steps=400),
    clip=ClipSettings(embed_dim=128, width=128, layers=4, text_width=128, text_layers=2, context_length=48,
                      steps=400, batch_size=128, lr=2e-3, warmup=40, bf16=True),
    text=AdapterSettings(examples=12000, epochs=12, batch_size=32, lr=2e-2, prompt_len=20, prompt_layers=4, bf16=True),
    image=AdapterSettings(examples=12000, epochs=4, batch_size=32, lr=2e-2, prompt_len=10, prompt_layers=4,
                          visual="v1", visual_lr=3e-3, bf16=True),
    eval_per_category=100, clip_probe_pictures=12000, clip_probe_epochs=30,
)

MICRO = Recipe(
    seed=0, threads=2, documents=300, vocab_size=400, dim=32, n_layers=2, n_heads=2, max_seq_len=256,
    pretrain=PretrainSettings(steps=3, batch_size=4, lr=3e-3, warmup=1, bf16=True, copy_steps=1),
    clip=ClipSettings(embed_dim=16, width=32, layers=1, text_width=32, text_layers=1, context_length=48,
                      steps=2, batch_size=8, lr=1e-3, warmup=1, bf16=True),
    text=AdapterSettings(examples=24, epochs=1, batch_size=8, lr=1e-2, prompt_len=2, prompt_layers=2, bf16=True),
    image=AdapterSettings(examples=16, epochs=1, batch_size=8, lr=1e-2, prompt_len=2, prompt_layers=2, visual="v2",
                          visual_dim=32, visual_depth=1, visual_heads=2, bf16=True),
    eval_per_category=2, clip_probe_pictures=16, clip_probe_epochs=1, gate_scales=(0.0, 1.0),
)

RECIPES = {"full": FULL, "micro": MICRO}
