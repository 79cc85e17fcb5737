"""Writing the trained adapter in other formats (`--export`), checked before training so that a run never
ends with an adapter that cannot be written as asked."""

from __future__ import annotations

from pathlib import Path

from ..config import AdapterArgs
from ..formats.official import write_official_v1
from ..formats.peft_lora import write_peft_lora
from ..model import Transformer
from .config import adapter_kind


def check_export(fmt: str | None, adapter: AdapterArgs) -> None:
    if fmt == "peft" and adapter_kind(adapter) == "lora":
        return  # PEFT LoRA
    if fmt == "peft":
        raise ValueError("--export peft: PEFT's adaption_prompt has one raw gate per layer shared by its heads, and "
                         "this trainer learns one tanh gate per head (as the official recipe does), so the result "
                         "cannot be written as PEFT; use --export official-v1 or the native adapter (--mode lora "
                         "trains a LoRA, which is)")
    if fmt == "official-v1" and adapter.beyond_v1:
        raise ValueError("--export official-v1: the official v1 format holds only prompts and gates; train with "
                         "--mode v1 to export it")


def export_official_v1(model: Transformer, out: Path) -> Path:
    """The official v1 release layout; the file name carries the prompt length, as readers expect."""
    a = model.adapter_args
    return write_official_v1(model, out / f"llama_adapter_len{a.prompt_len}_layer{a.prompt_layers}.pth")


def export_peft(model: Transformer, out: Path, base: str) -> Path:
    """A LoRA (--mode lora) as a PEFT LoRA folder, OUT/peft."""
    return write_peft_lora(model, out / "peft", base_model_name_or_path=base)
