"""AdamW as the official recipe sets it up: betas (0.9, 0.95), weight decay on matrices only.

Like timm's `add_weight_decay` (which the official code calls), 1-D tensors and biases get no decay.
"""

from __future__ import annotations

import torch
from torch import nn

BETAS = (0.9, 0.95)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, visual_lr: float | None = None,
                    ) -> torch.optim.AdamW:
    """AdamW over the trainable tensors. With `visual_lr`, the visual prompt's tensors (ViT blocks and
    projections, which want a far smaller step than prompts and gates) get their own peak lr; each group
    keeps its `lr_scale` (its peak over `lr`) so that the schedule moves all groups together."""
    visual_scale = 1.0 if visual_lr is None else visual_lr / lr
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            decays = not (param.dim() <= 1 or name.endswith(".bias"))
            scale = visual_scale if "visual_prompt" in name.split(".") else 1.0
            groups.setdefault((decays, scale), []).append(param)
    return torch.optim.AdamW([{"params": params, "weight_decay": weight_decay if decays else 0.0,
                               "lr": lr * scale, "lr_scale": scale}
                              for (decays, scale), params in groups.items()],
                             lr=lr, betas=BETAS)
