"""LLaMA-Adapter: zero-init gated adaption prompts (v1, v2) on a frozen, optionally 4/8-bit LLaMA."""

from .config import AdapterArgs, ModelArgs
from .formats.native import save_adapter
from .loading import load, load_many, load_sharing
from .model import Transformer
from .prompts import alpaca, apply_template, chat, image_question

__all__ = ["AdapterArgs", "ModelArgs", "Transformer", "alpaca", "apply_template", "chat", "image_question", "load",
           "load_many", "load_sharing", "save_adapter"]
