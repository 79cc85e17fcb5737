"""AdamW as the official recipe sets it up: betas (0.9, 0.95), weight decay on matrices only.

Like timm's `add_weight_decay` (which the official code calls), 1-D tensors and biases get no decay.
"""

from __future__ import annotations

import torch
from torch import nn

BETAS = (0.9, 0.95)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.dim() <= 1 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=BETAS)
