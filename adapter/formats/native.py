"""Our own adapter format: one safetensors file holding only the learned tensors under the model's
parameter names, with the adapter configuration (and the base shape it was trained for) in its metadata,
and the prompt format it was trained with (adapter.prompts) unless that is Alpaca: a file without one is
Alpaca, so Alpaca adapters are written byte for byte as before it was recorded (the shipped tiny ones too).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..config import AdapterArgs
from ..paths import not_a_file
from ..prompts import format_named
from .common import LoadedAdapter, atomic_write, base_shape, parsed_json, write_text_atomically
from .peft import CONFIG_NAME as PEFT_CONFIG_NAME

if TYPE_CHECKING:
    from ..model import Transformer

FORMAT_NAME = "llama-adapter"
FORMAT_VERSION = "1"
FILE_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter.json"


def resolve(path: str | os.PathLike) -> Path:
    """A file, or a folder holding `adapter.safetensors`."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"adapter: {not_a_file(path)}")
    return path


def save_adapter(model: "Transformer", path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write the learned tensors atomically (temp file in the same folder, then rename).

    A path without the `.safetensors` suffix is a folder that gets `adapter.safetensors` and, for people
    and tools, `adapter.json` with the same configuration (and an image adapter's CLIP model config file, copied
    beside them: the folder works wherever it is moved or published). A single `.safetensors` file carries its
    configuration in its own metadata, which is what loading reads.
    """
    if not hasattr(model, "adapter_state_dict"):
        raise ValueError(f"model: expected a loaded model (adapter.load(...)), got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path: expected a file or folder path, got {type(path).__name__}")
    metadata = _checked_metadata(metadata)
    path = Path(path)
    folder_layout = path.is_dir() or path.suffix != ".safetensors"
    if folder_layout:
        if (path / PEFT_CONFIG_NAME).is_file():
            raise ValueError(f"{path} holds a PEFT adapter ({PEFT_CONFIG_NAME}), which readers would find instead "
                             "of ours; write into another folder (or remove that one)")
        path = path / FILE_NAME
    args = (_clip_config_beside if folder_layout else _clip_config_from)(model.adapter_args, path.parent)
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in model.adapter_state_dict().items()}
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "adapter_args": args.to_json(),
        "base_shape": json.dumps(base_shape(model.args), sort_keys=True),
        **_prompt_format(model),
        **metadata,
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    if folder_layout:
        config = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "adapter_args": args.to_dict(),
                  "base_shape": base_shape(model.args), **_prompt_format(model), **metadata}
        write_text_atomically(path.parent / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


# the header fields save_adapter writes itself, which metadata given by a caller may not replace (a file whose
# "format" or "adapter_args" was replaced no longer loads, or loads as another adapter)
WRITTEN_FIELDS = ("format", "format_version", "adapter_args", "base_shape", "prompt_format")


def _checked_metadata(metadata: object) -> dict[str, str]:
    """The caller's metadata: text fields of its own (ValueError naming the field at fault)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata: expected a dict of text fields, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata: {key!r:.80} must be text naming text (safetensors stores only text), got "
                             f"{type(value).__name__}")
        if key in WRITTEN_FIELDS:
            raise ValueError(f"metadata: {key!r} is written by save_adapter itself; name your field otherwise")
    return metadata


def clip_config_file(args: AdapterArgs) -> Path | None:
    """The CLIP model config file (.json) an image adapter names (None: it names an open_clip model, or sees
    nothing)."""
    return Path(args.clip_model) if args.visual != "none" and args.clip_model.endswith(".json") else None


def clip_config_name(config: Path) -> str:
    """The name a CLIP model config file gets beside the adapter (its own, unless it is one of the adapter's)."""
    return config.name if config.name not in (FILE_NAME, CONFIG_NAME) else "clip-model.json"


def _clip_config_beside(args: AdapterArgs, folder: Path) -> AdapterArgs:
    """`args` naming their CLIP model config file by its name alone, that file copied into `folder` (readers
    take such a name as relative to the adapter)."""
    config = clip_config_file(args)
    if config is None:
        return args
    if not config.is_file():
        raise ValueError(f"clip_model: the CLIP model config {config} does not exist; it is written beside the "
                         "adapter")
    name = clip_config_name(config)
    target = folder / name
    if not (target.is_file() and target.samefile(config)):
        data = config.read_bytes()
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
    return dataclasses.replace(args, clip_model=name)


def _clip_config_from(args: AdapterArgs, folder: Path) -> AdapterArgs:
    """`args` naming a CLIP model config file (.json) as readers find it from `folder`, where the adapter is
    written: a relative path (as read, relative to the working folder) made relative to `folder`; an absolute one
    (a fine-tuning run's) stays."""
    config = clip_config_file(args)
    if config is None or config.is_absolute() or not config.is_file():
        return args
    return dataclasses.replace(args, clip_model=os.path.relpath(config.resolve(), folder.resolve()))


def _prompt_format(model: "Transformer") -> dict[str, str]:
    return {} if model.prompt_format == "alpaca" else {"prompt_format": model.prompt_format}


def read_adapter(path: str | os.PathLike) -> LoadedAdapter:
    path = resolve(path)
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a {FORMAT_NAME} file (metadata format={metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {metadata.get('format_version')!r} is not supported "
                         f"(this version reads {FORMAT_VERSION})")
    try:
        args = AdapterArgs.from_dict(parsed_json(metadata["adapter_args"]))
        shape = parsed_json(metadata.get("base_shape", "{}"))
        written_with = format_named(metadata.get("prompt_format", "alpaca"), "prompt_format").name
    except KeyError as error:
        raise ValueError(f"{path}: bad adapter metadata (no {error.args[0]})") from error
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: bad adapter metadata ({error})") from error
    if not isinstance(shape, dict) or not all(isinstance(value, int) and not isinstance(value, bool)
                                              for value in shape.values()):
        raise ValueError(f"{path}: bad adapter metadata (base_shape must be an object of whole numbers, got "
                         f"{shape!r:.80})")
    if args.clip_model.endswith(".json") and not Path(args.clip_model).is_absolute():
        # a model config shipped beside the adapter: read relative to it, wherever the folder was copied
        args = dataclasses.replace(args, clip_model=str(path.parent / args.clip_model))
    return LoadedAdapter(path=path, format="native", args=args, tensors=tensors, base_shape=shape,
                         prompt_format=written_with)
