"""Resumable checkpoints: `OUT/checkpoints/step-NNNNNN/` plus a `latest` pointer.

A checkpoint is written completely into a temporary folder, renamed into place, and only then does
`latest` (itself replaced atomically) point at it; older ones are removed after that. A crash at any
moment leaves `latest` naming a complete checkpoint. Each holds:

    adapter.safetensors   the learned tensors (our native format; `adapter.load` reads it as is)
    optimizer.pt          AdamW state (torch.save; read back with weights_only=True)
    rng.safetensors       torch CPU (and CUDA) generator states
    trainer.json          step, epoch, step within the epoch, that epoch's batch order, config, data hash,
                          Python's `random` state
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..formats.common import save_tensors, write_text_atomically, writing
from ..formats.native import save_adapter
from ..model import Transformer
from .step import TrainingStopped

FOLDER = "checkpoints"
LATEST = "latest"
ADAPTER = "adapter.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.safetensors"
TRAINER = "trainer.json"


@dataclass
class TrainerState:
    step: int  # optimizer steps done
    epoch: int  # where the next step is
    step_in_epoch: int
    order: list[list[list[int]]]  # that epoch's steps (micro-batches of example indices)
    config: dict[str, Any]
    data_sha256: str
    python_random: list | None = None  # random.getstate(), as JSON
    val_losses: list[list] | None = None  # [step, validation loss] of every validation so far (--early-stop)
    val_data_sha256: str | None = None  # --val-data's (older checkpoints: not recorded)


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None. Without `latest` (a run stopped between its
    first checkpoint's rename and the pointer's write, a pointer deleted by hand), the complete folder of the
    highest step: taken as no checkpoint, the run started over and removed it."""
    pointer = out / FOLDER / LATEST
    if not pointer.is_file():
        complete = [path for path in (out / FOLDER).glob("step-*")
                    if path.name[5:].isdigit() and (path / TRAINER).is_file()]
        return max(complete, key=lambda path: int(path.name[5:]), default=None)
    path = out / FOLDER / pointer.read_text(encoding="utf-8").strip()
    if not (path / TRAINER).is_file():
        raise ValueError(f"--resume: {pointer} names {path}, which is not a complete checkpoint")
    return path


def check_finite(model: Transformer, step: int) -> None:
    """A checkpoint with NaN/inf parameters is never written: it would replace the last good one."""
    bad = [name for name, value in model.adapter_state_dict().items() if not torch.isfinite(value).all()]
    if bad:
        raise TrainingStopped(f"step {step}: {bad[0]} is not finite; no checkpoint written")


def save(out: Path, model: Transformer, optimizer: torch.optim.Optimizer, state: TrainerState) -> Path:
    """Write a checkpoint atomically and make it the latest (after `check_finite`)."""
    root = out / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:06d}"
    state.python_random = _jsonable(random.getstate())
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        with writing(root / name):
            save_adapter(model, tmp / ADAPTER)
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
            save_tensors(_rng_tensors(), tmp / RNG)
            (tmp / TRAINER).write_text(json.dumps(asdict(state)) + "\n", encoding="utf-8")
        if (root / name).exists():
            shutil.rmtree(root / name)
        tmp.rename(root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomically(root / LATEST, name + "\n")
    for old in root.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return root / name


# what each field of trainer.json holds (None: may be missing, from an older version)
STATE_TYPES = {"step": int, "epoch": int, "step_in_epoch": int, "order": list, "config": dict, "data_sha256": str,
               "python_random": (list, type(None)), "val_losses": (list, type(None)),
               "val_data_sha256": (str, type(None))}


def read_state(path: Path) -> TrainerState:
    try:
        state = TrainerState(**json.loads((path / TRAINER).read_text(encoding="utf-8")))
    except (OSError, TypeError, ValueError, RecursionError) as error:  # (not UTF-8, not JSON, not its fields)
        raise ValueError(f"--resume: {path / TRAINER} is not a readable trainer state ({error})") from error
    for name, kind in STATE_TYPES.items():
        value = getattr(state, name)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise ValueError(f"--resume: {path / TRAINER} is not a readable trainer state ({name}: {value!r:.60})")
    return state


def restore(path: Path, optimizer: torch.optim.Optimizer, state: TrainerState) -> None:
    """Optimizer and generator states back in place (`state` is `read_state(path)`). The adapter tensors are
    loaded with the model (`adapter.load(base, adapter=path / ADAPTER)`)."""
    try:
        optimizer.load_state_dict(torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True))
        rng = load_file(path / RNG)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(rng["cuda"]))
        version, internal, gauss = state.python_random  # (a trainer.json without it: a TypeError, a traceback)
        random.setstate((version, tuple(internal), gauss))
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError,
            SafetensorError) as error:  # damaged
        raise ValueError(f"--resume: {path} is not a readable checkpoint ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else error!r}); resume from an earlier one or "
                         "start a new run") from error


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return tensors


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple) else value
