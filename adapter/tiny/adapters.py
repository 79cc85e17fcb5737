"""Training the tiny model's adapters with `adapter.finetune`, the same code users run, and copying the
final adapter into the assets folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..formats.common import atomic_write, write_text_atomically
from .recipe import AdapterSettings


def train_adapter(settings: AdapterSettings, base: Path, data: Path, run: Path, seed: int, *, max_seq_len: int,
                  image_folder: Path | None = None, clip: tuple[Path, Path] | None = None) -> Path:
    """One fine-tuning run in `run` (a fresh folder); returns the native adapter it wrote.

    With `clip` (weights, model config), the run trains a visual prompt of kind `settings.visual`.
    """
    from ..finetune import TrainConfig, train

    options = dict(base=str(base), data=str(data), out=str(run), mode="v1", prompt_len=settings.prompt_len,
                   prompt_layers=settings.prompt_layers, epochs=settings.epochs,
                   warmup_epochs=settings.warmup_epochs, lr=settings.lr, min_lr=settings.lr / 20,
                   batch_size=settings.batch_size, micro_batch_size=settings.batch_size, max_seq_len=max_seq_len,
                   val_fraction=0.02, seed=seed, weight_decay=0.0, device="cpu", progress=False,
                   autocast="bf16" if settings.bf16 else "off")
    if clip is not None:
        vision = dict(mode="vision", image_folder=str(image_folder), clip=str(clip[0]), clip_model=str(clip[1]),
                      visual=settings.visual, visual_dim=settings.visual_dim, visual_depth=settings.visual_depth,
                      visual_heads=settings.visual_heads, visual_lr=settings.visual_lr)
        options.update(vision)
    if run.exists():
        shutil.rmtree(run)
    return train(TrainConfig(**options)).adapter


def install(adapter_file: Path, folder: Path, clip_model: Path | None = None) -> Path:
    """Copy a run's adapter (and its adapter.json) into an assets folder, its header made canonical, and the
    run's gates.png beside it, which the app's Gates tab shows (the gates opening during training).

    A `clip_model` config file is then named relative to the folder (adapter.load reads it so), so that the
    assets still load wherever they are copied.
    """
    from ..gate_view import GATE_PLOT, find_gate_plot

    folder.mkdir(parents=True, exist_ok=True)
    for source in (adapter_file, adapter_file.with_name("adapter.json")):
        shutil.copyfile(source, folder / source.name)
    plot = find_gate_plot(adapter_file)
    if plot is not None:
        shutil.copyfile(plot, folder / GATE_PLOT)
    relative = None if clip_model is None else os.path.relpath(clip_model, folder)
    if relative is not None:
        config_path = folder / "adapter.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["adapter_args"]["clip_model"] = relative
        write_text_atomically(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return canonical_header(folder / adapter_file.name, clip_model=relative)


def canonical_header(path: Path, clip_model: str | None = None) -> Path:
    """Rewrite a safetensors header with sorted keys (and `clip_model` in its adapter arguments, when
    given), the tensor bytes untouched.

    safetensors writes the metadata in hash-map order, which changes from one process to the next; the
    build promises the same bytes on every rebuild.
    """
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + size])
    if clip_model is not None:
        metadata = header["__metadata__"]
        metadata["adapter_args"] = json.dumps({**json.loads(metadata["adapter_args"]), "clip_model": clip_model},
                                              sort_keys=True)
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data stays 8-byte aligned, as safetensors writes it
    rewritten = len(encoded).to_bytes(8, "little") + encoded + raw[8 + size:]
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(rewritten))
    return path
