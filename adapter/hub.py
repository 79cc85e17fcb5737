"""Optional downloads, only when asked for: from the Hugging Face hub with an explicit `hf:owner/name` (or one GGUF
file of a repository, `hf:owner/name/FILE.gguf`, or one of its folders, `hf:owner/name/FOLDER`; for data, one file
of a dataset repository), at a branch, tag or commit with `hf:owner/name@revision`, and the official release files
with `official:NAME` (adapter.releases).

Nothing else in the project touches the network: a plain path that does not exist is an error, never a
guess at a repository.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .paths import require_path

PREFIX = "hf:"
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Meta's Llama 3 repositories hold a second copy of the weights, in Meta's format, under original/, and
# Mistral's theirs as consolidated*.safetensors beside the HF files; the HF files are the ones read, so the
# copies (2.5 GB for Llama 3.2 1B, 16 GB for 3.1 8B, 14.5 GB for Mistral 7B) are not fetched
SKIPPED = ["original/*", "consolidated*.safetensors"]
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")  # what a dataset repository's records may be stored as
# one file of a model repository other than a GGUF file is not fetched alone (its folder or repository is)
FILE_SUFFIXES = (".bin", ".safetensors", ".pth", ".pt", ".json", ".model")
# a base repository's files but its weights: config, tokenizer, chat template, the shards' index
WITHOUT_WEIGHTS = ["*.json", "*.model", "*.jinja", "tokenizer*"]


def is_remote(value: str | os.PathLike) -> bool:
    """Whether `value` names something to download (`hf:owner/name`, `official:NAME`), not a local path."""
    from .releases import PREFIX as OFFICIAL

    return str(value).startswith((PREFIX, OFFICIAL))


def resolve(value: str | os.PathLike, what: str, max_bytes: int | None = None) -> Path:
    """A local path as given, the local snapshot of `hf:owner/name` (of one of its folders,
    `hf:owner/name/FOLDER`, as PEFT's `subfolder` names an adapter kept beside others; of one GGUF file,
    `hf:owner/name/FILE.gguf`), or the cached official release `official:NAME` (each downloaded if needed); with
    `max_bytes`, a repository that would download more is refused before anything is fetched (a server fetching
    what its users name)."""
    from . import releases

    text = str(value)
    if text.startswith(releases.PREFIX):
        return releases.fetch(text[len(releases.PREFIX):], what)
    if not text.startswith(PREFIX):
        return Path(value)
    repo, revision, inside = _parts(text[len(PREFIX):])
    inside = inside.strip("/")
    if ".." in Path(inside).parts or "\\" in inside:  # a folder of the repository, never a path out of it
        raise ValueError(f"{what}: {text!r} names a folder outside the repository; give one of its folders")
    if not _REPO.match(repo) or Path(inside).suffix in FILE_SUFFIXES:
        raise ValueError(f"{what}: {text!r} is not a hub repository id like hf:owner/name[@revision] (or "
                         "hf:owner/name[@revision]/FILE.gguf, or a folder of it: hf:owner/name[@revision]/FOLDER)")
    hub, at = hub_module(what, repo), {} if revision is None else {"revision": revision}
    with _fetching(what, repo):
        if max_bytes is not None:
            _check_size(hub, repo, at, inside, max_bytes, what)
        if inside.endswith(".gguf"):
            return Path(hub.hf_hub_download(repo_id=repo, filename=inside, **at))
        patterns = {"allow_patterns": [f"{inside}/*"]} if inside else {}
        snapshot = Path(hub.snapshot_download(repo_id=repo, ignore_patterns=SKIPPED, **patterns, **at))
    if inside and not (snapshot / inside).is_dir():
        raise ValueError(f"{what}: hf:{repo} has no folder {inside!r}")
    return snapshot / inside if inside else snapshot


def resolve_without_weights(value: str | os.PathLike, what: str) -> tuple[Path, dict[str, set[str]]] | None:
    """For a whole repository `hf:owner/name` of safetensors weights: the local snapshot of all its files but the
    weights, and the names of the tensors each weights file holds, read from their headers (a few MB where the
    weights are GB: enough for a base's shape, settings and tensor names). None for anything else (a path, one GGUF
    file, a repository without model.safetensors), which is fetched whole when it is needed."""
    text = str(value)
    if not text.startswith(PREFIX):
        return None
    repo, revision, file_name = _parts(text[len(PREFIX):])
    if file_name or not _REPO.match(repo):
        return None
    hub, at = hub_module(what, repo), {} if revision is None else {"revision": revision}
    with _fetching(what, repo):
        try:
            headers = hub.HfApi().get_safetensors_metadata(repo, **at)
        except hub.errors.NotASafetensorsRepoError:
            return None
        folder = Path(hub.snapshot_download(repo_id=repo, allow_patterns=WITHOUT_WEIGHTS, ignore_patterns=SKIPPED,
                                            **at))
    return folder, {name: set(found.tensors) for name, found in headers.files_metadata.items()}


def _check_size(hub, repo: str, at: dict[str, str], inside: str, max_bytes: int, what: str) -> None:
    """ValueError where what would be fetched (the file or folder `inside`, or a snapshot of `repo`) is more than
    `max_bytes`."""
    info = hub.HfApi().model_info(repo, files_metadata=True, **at)
    fetched = [file for file in info.siblings or []
               if (file.rfilename == inside or file.rfilename.startswith(f"{inside}/") if inside else True)
               and not any(fnmatch.fnmatch(file.rfilename, pattern) for pattern in SKIPPED)]
    size = sum(file.size or 0 for file in fetched)
    if size > max_bytes:
        named = f"hf:{repo}/{inside}" if inside else f"hf:{repo}"
        raise ValueError(f"{what}: {named} holds {size:,} bytes, more than the {max_bytes:,} fetched here")


def resolve_data(value: str | os.PathLike, what: str) -> Path:
    """A local data file as given, or one file of a hub dataset repository: `hf:owner/name/path/FILE` that file,
    `hf:owner/name` its only data file (.parquet, .jsonl, .json), or else its only one named train*."""
    require_path(value, what)
    text = str(value)
    if not text.startswith(PREFIX):
        return Path(value)
    repo, revision, file_name = _parts(text[len(PREFIX):])
    if not _REPO.match(repo):
        raise ValueError(f"{what}: {text!r} is not a hub dataset like hf:owner/name[@revision] (or "
                         "hf:owner/name[@revision]/FILE)")
    hub, at = hub_module(what, repo), {} if revision is None else {"revision": revision}
    with _fetching(what, repo):
        file_name = file_name or _data_file(hub.list_repo_files(repo, repo_type="dataset", **at), repo, what)
        return Path(hub.hf_hub_download(repo_id=repo, filename=file_name, repo_type="dataset", **at))


def _data_file(files: list[str], repo: str, what: str) -> str:
    """The one file of a dataset repository that holds its (training) records."""
    found = sorted(f for f in files if f.endswith(DATA_SUFFIXES) and not Path(f).name.startswith("dataset_info"))
    train = [f for f in found if Path(f).name.startswith("train")]
    for candidates in (found, train):
        if len(candidates) == 1:
            return candidates[0]
    if not found:
        raise ValueError(f"{what}: hf:{repo} holds no data file ({', '.join(DATA_SUFFIXES)})")
    listed = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "")
    raise ValueError(f"{what}: hf:{repo} holds {len(found)} data files and not one named train*: {listed}; name one: "
                     f"hf:{repo}/FILE")


def hub_module(what: str, repo: str):
    """huggingface_hub, imported only when something is fetched or pushed."""
    try:
        import huggingface_hub
    except ImportError as error:
        raise ValueError(f"{what}: reaching {repo} needs the huggingface_hub package "
                         "(pip install huggingface_hub)") from error
    return huggingface_hub


def _fetching(what: str, repo: str):
    return hub_failures(what, f"could not get {repo} from the Hugging Face hub",
                        "download it yourself and pass the path (in the app: upload the file)")


@contextmanager
def hub_failures(what: str, failed: str, advice: str) -> Iterator[None]:
    """Any failure of the hub (offline, unknown repository, gated, no right to write, network) as one ValueError,
    `what: failed (the error); advice`; ValueErrors that already name `what` pass as they are."""
    try:
        yield
    except ValueError as error:
        if str(error).startswith(f"{what}: "):
            raise
        raise ValueError(f"{what}: {failed} ({_one_line(error)}); {advice}") from error
    except Exception as error:
        raise ValueError(f"{what}: {failed} ({_one_line(error)}); {advice}") from error


def _one_line(error: Exception) -> str:
    """An error as one line (huggingface_hub's messages run over several: the command's error is one line)."""
    return " ".join(f"{type(error).__name__}: {error}".split())


def repo_of(value: str) -> str:
    """The repository `owner/name` of an `hf:` name (its revision and file, if any, left out)."""
    return _parts(str(value).removeprefix(PREFIX))[0]


def repo_id(value: str, what: str) -> str:
    """`owner/name` from `owner/name` or `hf:owner/name`: a repository to write to (no revision, no file)."""
    if not isinstance(value, str):  # (None was "'NoneType' object has no attribute 'strip'")
        raise ValueError(f"{what}: expected a hub repository id like owner/name, got {value!r:.200}")
    text = value.strip()
    repo = text[len(PREFIX):] if text.startswith(PREFIX) else text
    if not _REPO.match(repo):
        raise ValueError(f"{what}: {value!r:.200} is not a hub repository id like owner/name")
    return repo


def _parts(name: str) -> tuple[str, str | None, str]:
    """`owner/name[@revision][/path/FILE]` -> (owner/name, the branch, tag or commit or None, path/FILE or "")."""
    owner, _, rest = name.partition("/")
    repo, _, file_name = rest.partition("/")
    repo, at, revision = repo.partition("@")
    return f"{owner}/{repo}", (revision or None) if at else None, file_name
