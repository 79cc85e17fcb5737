"""Adapters users upload to the running app (the Model tab): a file in any format `adapter.load` reads (ours, the
official releases' .pth, litgpt's, a PEFT adaption-prompt or LoRA folder zipped, the Train tab's zip), checked
against the served base and served beside the others as `uploaded-N`, an image adapter on the served CLIP tower;
or one named on the hub (`hf:owner/name`, a repository of at most MAX_FETCHED bytes) or an official release
(`official:NAME`), fetched by the server, never a path on the server.

Nothing in an upload runs: weights are read with `torch.load(weights_only=True)` or safetensors, and a zip is
unpacked only after every member's name and size are checked (no absolute paths or `..`, no links, at most
MAX_MEMBERS files and MAX_UNPACKED bytes)."""

from __future__ import annotations

import shutil
import tempfile
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from . import hub
from .added_adapters import AddedAdapters, served_sight
from .engine import Engine, Engines
from .formats.litgpt import FILE_NAMES as LITGPT_FILES
from .loading import load_sharing
from .model import Transformer

MAX_UPLOADED = 4  # uploaded adapters served at once, the oldest giving way
UPLOADED_PREFIX = "uploaded-"
MAX_MEMBERS = 64  # files a zip may hold
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")  # what an adapter's weights are in (litgpt's: LITGPT_FILES)
MAX_FETCHED = 2 << 30  # bytes a hub adapter's repository may download (a whole base is refused)
MAX_UNPACKED = 256 << 20  # bytes a zip may unpack to (adapters hardly compress: a zip that would unpack to far
# more than it holds is a zip bomb, not an adapter)


def unpack(upload: Path, folder: Path) -> Path:
    """The adapter an uploaded file holds: a .zip's (its files unpacked into `folder`: the adapter's folder, or
    the one folder or file inside it), else the file itself."""
    if upload.suffix.lower() != ".zip":  # a torch .pth is a zip too, read as it is
        return upload
    try:
        archive = zipfile.ZipFile(upload)
    except zipfile.BadZipFile as error:
        raise ValueError(f"adapter: {upload.name} is not a readable zip ({error})") from None
    with archive:
        members = [member for member in archive.infolist() if not member.is_dir() and not _metadata(member)]
        _check_members(upload.name, members)
        folder.mkdir(parents=True, exist_ok=True)
        try:  # a member whose bytes do not match its header (size, CRC), encrypted, or compressed unknowably
            archive.extractall(folder, members)
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError) as error:
            raise ValueError(f"adapter: {upload.name} could not be unpacked ({error})") from None
        except OSError as error:  # members that cannot be files here ("a" and "a/b", ".", a name too long)
            raise ValueError(f"adapter: {upload.name} could not be unpacked ({error.strerror})") from None
    entries = list(folder.iterdir())
    if not entries:
        raise ValueError(f"adapter: {upload.name} holds no files")
    files = [path for path in folder.rglob("*") if path.is_file()]
    if not any(path.suffix.lower() in WEIGHT_SUFFIXES or path.name in LITGPT_FILES for path in files):
        names = ", ".join(sorted(path.name for path in files)[:5])
        raise ValueError(f"adapter: {upload.name} holds no adapter weights ({names}); zip an adapter's folder or "
                         f"its {', '.join(WEIGHT_SUFFIXES[:-1])} or {WEIGHT_SUFFIXES[-1]} file")
    return entries[0] if len(entries) == 1 else folder


def _metadata(member: zipfile.ZipInfo) -> bool:
    """What macOS's Finder adds to the zips it makes (__MACOSX/ resource forks, .DS_Store), not the adapter's."""
    parts = PurePosixPath(member.filename).parts
    return parts[:1] == ("__MACOSX",) or parts[-1:] == (".DS_Store",)


def _check_members(name: str, members: list[zipfile.ZipInfo]) -> None:
    if len(members) > MAX_MEMBERS:
        raise ValueError(f"adapter: {name} holds {len(members)} files, more than the {MAX_MEMBERS} an adapter's "
                         "folder may")
    unpacked = sum(member.file_size for member in members)
    if unpacked > MAX_UNPACKED:
        raise ValueError(f"adapter: {name} unpacks to {unpacked:,} bytes, more than {MAX_UNPACKED:,}")
    for member in members:
        path = PurePosixPath(member.filename.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or ":" in member.filename:
            raise ValueError(f"adapter: {name}: {member.filename!r} points outside the zip's folder")
        if (member.external_attr >> 16) & 0o170000 == 0o120000:  # a symbolic link (Unix mode in the high bits)
            raise ValueError(f"adapter: {name}: {member.filename!r} is a link; only files are read")


class AdapterUploads:
    """Serves uploaded adapters on the base that `engines` serve (`make_engine` wraps a model as the app wraps
    the others); each upload's files are kept in a folder of `folder` while it is served."""

    def __init__(self, engines: Engines, make_engine: Callable[[Transformer], Engine],
                 folder: str | Path | None = None, private: bool = False) -> None:
        self.engines = engines
        self.uploaded = AddedAdapters(engines, make_engine, UPLOADED_PREFIX, MAX_UPLOADED, private)
        self.folder = Path(folder) if folder is not None else Path(tempfile.gettempdir()) / "llama-adapter-uploads"
        self._one_at_a_time = threading.Lock()  # names and the oldest's removal stay in order

    def serve(self, upload: str | Path | None, named: str | None = None, owner: str | None = None) -> str:
        """Read the uploaded adapter (or the one `named` on the hub, `hf:owner/name`, or an official release,
        `official:NAME`), fit it to the served base (and tower) and serve it (with private adapters, to session
        `owner` alone); returns its name. ValueError (FileNotFoundError) naming what is wrong, with nothing served
        and nothing kept."""
        named = (named or "").strip()
        if not upload and not named:
            raise ValueError("adapter: upload an adapter file first (.safetensors, .pth, .bin, or a .zip of its "
                             "folder), or name one on the hub (hf:owner/name) or an official release "
                             "(official:NAME)")
        if upload and named:
            raise ValueError(f"adapter: both a file and {named!r:.200} given; serve one at a time")
        if named and not hub.is_remote(named):
            raise ValueError(f"adapter: {named!r:.200} is not hf:owner/name or official:NAME; files on the server are "
                             "not read by name, upload the file instead")
        self.folder.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=self.folder))
        try:
            with self._one_at_a_time:
                if named:
                    label, source = named, hub.resolve(named, "adapter", max_bytes=MAX_FETCHED)
                else:
                    label, source = Path(upload).name, unpack(Path(upload), folder / Path(upload).stem)
                model = load_sharing(self.engines.default.model, source)
                if model.adapter_args.learns_nothing:
                    raise ValueError(f"adapter: {label} holds no adapter tensors")
                sight = None if model.visual_prompt is None else \
                    served_sight(self.engines, f"adapter: {label} has a visual prompt, which")
                return self.uploaded.add(model, folder, sight, owner)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
