"""What every adapter format reader returns, and how it is put into a model."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import AdapterArgs, ModelArgs
from ..footprint import size_text

if TYPE_CHECKING:
    from ..model import Transformer


def unrecorded_format_note(model: "Transformer", written_as: str) -> str | None:
    """What to tell someone who writes `model`'s adapter in a format that cannot record its prompt format
    (all but ours), when that matters: the adapter is not asked in Alpaca, which every reader assumes."""
    if model.prompt_format == "alpaca" or written_as == "native":
        return None
    return (f"note: the {written_as} format does not record the prompt format; ask this adapter in "
            f"{model.prompt_format} (e.g. generate --template {model.prompt_format})")


@dataclass
class LoadedAdapter:
    """An adapter read from disk, already renamed to the model's parameter names (Meta layout)."""

    path: Path
    format: str
    args: AdapterArgs
    tensors: dict[str, torch.Tensor]
    base_shape: dict[str, int] = field(default_factory=dict)  # subset of dim, n_layers, n_heads, kv_heads
    norm_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # tuned norm weights (official v2)
    prompt_format: str = "alpaca"  # how its questions are written (adapter.prompts); only our format records it
    # for formats that cannot know the base's shape alone (PEFT LoRA: head counts, layers): the tensors made the
    # model's (a ValueError when they cannot be)
    fit: Callable[[dict[str, torch.Tensor], "Transformer"], dict[str, torch.Tensor]] | None = None

    def check_base(self, args: ModelArgs) -> None:
        """An adapter only fits the base shape it was made for."""
        have = base_shape(args)
        wrong = {k: (v, have[k]) for k, v in self.base_shape.items() if k in have and have[k] != v}
        if wrong:
            detail = ", ".join(f"{k}={want} (base has {got})" for k, (want, got) in wrong.items())
            raise ValueError(f"{self.path}: adapter was made for a different base: {detail}")
        try:
            self.args.check_fits(args)
        except ValueError as error:
            raise ValueError(f"{self.path}: {error}") from error

    def check_declared(self, model: "Transformer") -> None:
        """The tensors held under the model's names against the shapes the adapter's settings give the model,
        before its tensors are made (a file of small tensors declaring a prompt or LoRA rank of millions asked for
        gigabytes before its shapes were compared); and that every value is a number (a NaN answered nonsense)."""
        places = dict(model.named_parameters())
        for name, value in {**self.tensors, **self.norm_weights}.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                count = int((~torch.isfinite(value)).sum())
                raise ValueError(f"{self.path}: {name} holds {count:,} NaN or infinite value(s) of {value.numel():,}: "
                                 "the adapter is broken (a training run that diverged, or float16 that overflowed) "
                                 "and would answer nonsense")
        for name, value in self.tensors.items():
            place = places.get(name)
            if place is None or (name.endswith(".attention.gate") and value.numel() == 1):  # placed by apply_to
                continue
            if tuple(value.shape) != tuple(place.shape):
                a = self.args
                raise ValueError(f"{self.path}: {name} has shape {tuple(value.shape)}, expected {tuple(place.shape)} "
                                 f"by its settings (prompt_len {a.prompt_len}, prompt_layers {a.prompt_layers}, "
                                 f"lora_rank {a.lora_rank})")

    def apply_to(self, model: "Transformer") -> None:
        """Check the fit, share single-value gates (PEFT, older files) across heads, turn tuned norm weights
        into deltas against this base, copy everything in; the model is then asked in this adapter's prompt
        format."""
        self.check_base(model.args)
        tensors = dict(self.tensors)
        if self.fit is not None:
            try:
                tensors = self.fit(tensors, model)
            except ValueError as error:
                raise ValueError(f"{self.path}: {error}") from error
        for name, value in self.tensors.items():
            if name.endswith(".attention.gate") and value.numel() == 1:
                tensors[name] = expand_gate(value, model.args.n_heads, str(self.path), name)
        for name, tuned in self.norm_weights.items():
            try:
                base = model.get_parameter(name)
            except AttributeError as error:
                raise ValueError(f"{self.path}: norm weight {name} has no place in this model") from error
            if tuple(tuned.shape) != tuple(base.shape):
                raise ValueError(f"{self.path}: {name} has shape {tuple(tuned.shape)}, expected {tuple(base.shape)}")
            tensors[name[: -len("weight")] + "delta"] = tuned.float() - base.detach().float().cpu()
        model.load_adapter_state(tensors, str(self.path))
        model.prompt_format = self.prompt_format


def renamed(name: str, top: dict[str, str], layer_key: re.Pattern, parts: dict[str, str]) -> str | None:
    """Meta's name for a base checkpoint's tensor `name`, from its format's top-level names (`top`), the pattern of
    its per-layer names (`layer_key`: groups layer index and part) and its parts' Meta names (`parts`); None when
    it is not part of a LLaMA."""
    if name in top:
        return top[name]
    match = layer_key.fullmatch(name)
    if match and match.group(2) in parts:
        return f"layers.{match.group(1)}.{parts[match.group(2)]}.weight"
    return None


def base_shape(a: ModelArgs) -> dict[str, int]:
    return {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "kv_heads": a.kv_heads}


def expand_gate(gate: torch.Tensor, n_heads: int, source: str, name: str) -> torch.Tensor:
    """A gate as [1, n_heads, 1, 1]; a single value (older files, PEFT) is shared by all heads."""
    if gate.numel() == 1:
        return gate.reshape(1, 1, 1, 1).expand(1, n_heads, 1, 1).clone()
    if gate.numel() != n_heads:
        raise ValueError(f"{source}: {name} has {gate.numel()} values; expected 1 or one per head ({n_heads})")
    return gate.reshape(1, n_heads, 1, 1)


def torch_load(path: Path) -> object:
    """Weights-only torch.load (never runs pickled code), with a clear error for a bad file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for damaged, truncated or unsafe files
        if zipfile.is_zipfile(path):  # torch's own format, damaged or holding what weights-only refuses
            raise ValueError(f"{path}: not a readable weights-only torch checkpoint ({_refusal(error)})") from error
        try:
            return torch.load(path, map_location="cpu", weights_only=True)  # old (non-zip) torch files
        except Exception as legacy:  # torch's words here suggest weights_only=False: not advice to pass on
            if "Unsupported global" in str(legacy):  # an older torch file holding more than tensors
                raise ValueError(f"{path}: not a readable weights-only torch checkpoint ({_refusal(legacy)})") \
                    from legacy
            with open(path, "rb") as file:
                start = file.read(16)
            raise ValueError(f"{path}: not a readable weights-only torch checkpoint (neither torch's zip format "
                             f"nor its older one; the file starts with {start!r})") from legacy


def named_tensors(state: object, path: Path, floating: bool = False) -> dict[str, torch.Tensor]:
    """`state` as the dict of named tensors a weights file holds (with `floating`, of floating-point tensors: an
    adapter's, which is learned); ValueError naming the file and its first odd entries otherwise (a number key or a
    list value reached our readers and torch as a TypeError or AttributeError, an integer tensor was cast)."""
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    odd = sorted(str(key) for key, value in state.items() if not (
        isinstance(key, str) and isinstance(value, torch.Tensor) and (value.is_floating_point() or not floating)))
    if odd:
        kind = "floating-point tensors" if floating else "tensors"
        raise ValueError(f"{path}: entries that are not named {kind}: {odd[:5]}")
    return state


def _refusal(error: Exception) -> str:
    """torch's reason, less its advice to load with weights_only=False (which would run the file's code)."""
    found = re.search(r"WeightsUnpickler error: (.*?)(\. |\.?$)", str(error), re.MULTILINE)
    return f"it holds what weights-only loading refuses: {found.group(1)}" if found else str(error)


def save_tensors(tensors: dict[str, "torch.Tensor"], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, the file given the mode a new file gets (safetensors makes its files owner-only: a
    merged or quantized base's shards could not be read by another user, or a container's)."""
    from safetensors.torch import save_file

    with writing(path):
        save_file(tensors, path, metadata=metadata)
    os.chmod(path, new_file_mode())


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """A failed write as an OSError naming `path` and the space left on its disk, which every command line reports
    in one line: a full disk made torch.save raise RuntimeError ("unexpected pos 64 vs 0") and safetensors its own
    error, tracebacks from inside them at the end of a run, and Python's own OSError named no file. Nested, the
    outermost names it (a checkpoint's folder rather than a temporary file in it)."""
    from safetensors import SafetensorError

    try:
        yield
    except WriteFailed as error:
        raise WriteFailed(path, error.original) from error.original
    except (OSError, RuntimeError, SafetensorError) as error:
        raise WriteFailed(path, error) from error


class WriteFailed(OSError):
    """A write that failed, as `writing` names it; `original`: the writer's own error."""

    def __init__(self, path: str | os.PathLike, original: BaseException) -> None:
        super().__init__(f"{path}: could not be written ({original}){_space_left(Path(path))}")
        self.original = original


def _space_left(path: Path) -> str:
    folder = _nearest_folder(path)
    try:
        free = shutil.disk_usage(folder).free if folder is not None else None
    except OSError:
        free = None
    return "" if free is None else f"; {size_text(free)} free on its disk"


def new_file_mode(folder: bool = False) -> int:
    """What open() (or mkdir) would give a new file (folder): 0o666 (0o777) less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def parsed_json(text: str | bytes) -> Any:
    """`json.loads` whose every failure is a ValueError saying what is wrong: not JSON, a number of over 4,300
    digits, or nested too deeply (a RecursionError, from a file of 100,000 opening brackets)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def check_file_target(path: str | os.PathLike, flag: str = "",
                      inputs: Mapping[str, str | os.PathLike | None] | None = None) -> None:
    """ValueError naming `path` (after `flag`, e.g. "--out: ") where no file can be written there: it is a folder,
    or lies under a file, or it is one of the command's `inputs` (by their flag: written, the input would be lost).
    Commands call it before their work, not only when they write its result."""
    path = Path(path)
    for name, given in (inputs or {}).items():
        if given is not None and path.resolve() == Path(given).resolve():
            raise ValueError(f"{flag}{path} is the file {name} names; it would be overwritten")
    if path.is_dir():
        raise ValueError(f"{flag}{path} is a folder; name a file to write")
    check_not_under_a_file(path, flag)
    check_writable(path, flag)


def check_not_under_a_file(path: Path, flag: str = "") -> None:
    """ValueError naming the file `path` would lie under (nothing can be written there)."""
    for folder in path.parents:
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{flag}{folder} is a file, not a folder to write {path.name} into")


def _nearest_folder(path: Path) -> Path | None:
    """The folder a write to `path` lands in: itself where it is one, else its nearest ancestor that exists; None
    where that is a file (nothing can be written under it)."""
    candidates = [path, *path.parents] if path.is_dir() else list(path.parents)
    found = next((parent for parent in candidates if parent.exists()), None)
    return found if found is not None and found.is_dir() else None


def check_writable(path: str | os.PathLike, flag: str = "") -> None:
    """ValueError naming the folder `path` would be written into (itself where it is one, else its nearest that
    exists) where this process may not write there (a read-only disk, another user's folder): said before a
    command's work, not after it."""
    path = Path(path)
    folder = _nearest_folder(path)
    if folder is not None and not os.access(folder, os.W_OK):
        raise ValueError(f"{flag}{path} cannot be written: {folder} may not be written into here (a read-only "
                         "disk, or another user's folder)")


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """`write(tmp)` into a temp file beside `path`, then rename: readers never see a half-written file. A path
    that is a folder, or lies under a file, is refused (ValueError naming it) before anything is written."""
    check_file_target(path)
    with writing(path):  # named as asked, not as its temporary file
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        with writing(path):
            write(tmp)
        os.chmod(tmp, new_file_mode())  # mkstemp made it owner-only; a written file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    """`text` (UTF-8) in `path`, whole or not at all (atomic_write)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def refuse_existing(out: Path) -> None:
    """A folder to be written whole is a new one: ValueError naming `out` where it exists."""
    if out.exists():
        raise ValueError(f"out: {out} already exists; name a new folder")
    check_not_under_a_file(out, "out: ")  # (was "could not be written ([Errno 17] File exists: ...)" at the end)
    check_writable(out, "out: ")


def atomic_folder(out: Path, write: Callable[[Path], object], replace: bool = False) -> Path:
    """`write(tmp)` into a temp folder beside the new folder `out`, then rename: `out` appears whole or not at
    all, whatever `write` raises. With `replace`, a folder already at `out` (an earlier run's output) is replaced
    once the new one is whole, rather than refused."""
    if not replace:
        refuse_existing(out)
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent))
    aside: Path | None = None  # the earlier folder, moved aside until the new one is in its place
    try:
        try:
            write(staging)
        except WriteFailed as error:  # named after the folder asked for, not a file of its temporary one
            raise WriteFailed(out, error.original) from error.original
        os.chmod(staging, new_file_mode(folder=True))  # mkdtemp made it owner-only
        if replace and out.is_dir():
            aside = Path(tempfile.mkdtemp(prefix=out.name + ".", suffix=".old", dir=out.parent)) / out.name
            os.rename(out, aside)
        os.rename(staging, out)
    except BaseException:
        if aside is not None and aside.is_dir() and not out.exists():
            os.rename(aside, out)  # interrupted between the renames: the earlier folder back where it was
        for left in (staging, *(() if aside is None else (aside.parent,))):
            shutil.rmtree(left, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside.parent, ignore_errors=True)
    return out


def write_zip(path: Path, folder_name: str, files: list[Path]) -> Path:
    """`files` in a zip at `path` (atomically), inside one folder `folder_name`: unzipped, a folder that
    `--adapter` reads when they are an adapter's."""

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for file in files:
                archive.write(file, f"{folder_name}/{file.name}")

    atomic_write(path, write)
    return path
