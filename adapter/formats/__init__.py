"""One module per on-disk format; `open_base` and `read_adapter` detect which one they were given.

Every reader hands back tensors under the model's (Meta) names and layout, so the model itself never
needs to know where its weights came from.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..paths import missing
from . import litgpt, meta, native, official
from .common import LoadedAdapter, torch_load

BASE_FORMATS = ("a Meta folder (params.json, consolidated.*.pth), a Mistral one (params.json, "
                "consolidated*.safetensors), a litgpt one (lit_model.pth, model_config.yaml), an HF folder "
                "(config.json) or a llama.cpp .gguf file")
# what every command line's --base takes
BASE_HELP = ("base LLaMA: a folder (Meta, HF, Mistral, litgpt, bitsandbytes, GPTQ, AWQ or compressed-tensors "
             "layout), a llama.cpp .gguf file, "
             "hf:owner/name[@revision] (or one file, hf:owner/name/FILE.gguf), or tiny (the embedded model)")
ADAPTER_FORMATS = ("our adapter.safetensors (or a folder with it), a PEFT adaption_prompt or LoRA folder "
                   "(adapter_config.json), an official LLaMA-Adapter v1/v2 .pth file, or a litgpt "
                   "lit_model.pth.adapter(_v2)")


def open_base(path: str | os.PathLike):
    """A lazy view of a base LLaMA (or Mistral) checkpoint, under Meta's parameter names and layout."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"base: {missing(folder)}")
    from . import gguf, hf, litgpt_base, mistral

    if gguf.is_gguf_file(folder):
        return gguf.GGUFCheckpoint(folder)
    if litgpt_base.is_litgpt_folder(folder):  # before HF: litgpt keeps the HF config.json beside its weights
        return litgpt_base.LitGPTCheckpoint(folder)
    if mistral.is_mistral_folder(folder):
        return mistral.MistralCheckpoint(folder)
    if meta.is_meta_folder(folder):
        return meta.MetaCheckpoint(folder)
    if hf.is_hf_folder(folder):
        return hf.HFCheckpoint(folder)
    files = sorted(path for path in folder.glob("*.gguf") if gguf.is_gguf_file(path)) if folder.is_dir() else []
    if len(files) == 1:  # a folder one GGUF file was downloaded into
        return gguf.GGUFCheckpoint(files[0])
    if files:
        raise ValueError(f"base: {folder} holds {len(files)} GGUF files ({', '.join(p.name for p in files[:4])}"
                         f"{', ...' if len(files) > 4 else ''}); pass the one to load")
    raise ValueError(f"base: {folder} is not a LLaMA folder: expected {BASE_FORMATS}")


def read_adapter(path: str | os.PathLike, what: str = "adapter") -> LoadedAdapter:
    """Read an adapter file or folder in any supported format (`what`: the flag named where it is missing)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what}: {missing(path)}")
    from . import peft

    if peft.is_peft(path):
        return peft.read_peft(path)
    if path.is_dir() and not (path / native.FILE_NAME).exists():
        saved = [path / name for name in litgpt.FILE_NAMES if (path / name).is_file()]
        if len(saved) == 1:  # a litgpt run's output folder (out/finetune/adapter-v2/final)
            return read_adapter(saved[0])
        raise ValueError(f"adapter: {path} holds no adapter; expected {ADAPTER_FORMATS}")
    if path.is_dir() or path.suffix == ".safetensors":
        return native.read_adapter(path)
    state = torch_load(path)
    if official.is_official(path, state):
        return official.read_official(path, state)
    if litgpt.is_litgpt(state):
        return litgpt.read_litgpt(path, state)
    raise ValueError(f"{path}: unknown adapter format; expected {ADAPTER_FORMATS}")
