"""Optional downloads, only when asked for: from the Hugging Face hub with an explicit `hf:owner/name` (or one GGUF
file of a repository, `hf:owner/name/FILE.gguf`), and the official release files with `official:NAME`
(adapter.releases).

Nothing else in the project touches the network: a plain path that does not exist is an error, never a
guess at a repository.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PREFIX = "hf:"
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Meta's Llama 3 repositories hold a second copy of the weights, in Meta's format, under original/, and
# Mistral's theirs as consolidated*.safetensors beside the HF files; the HF files are the ones read, so the
# copies (2.5 GB for Llama 3.2 1B, 16 GB for 3.1 8B, 14.5 GB for Mistral 7B) are not fetched
SKIPPED = ["original/*", "consolidated*.safetensors"]


def is_remote(value: str | os.PathLike) -> bool:
    """Whether `value` names something to download (`hf:owner/name`, `official:NAME`), not a local path."""
    from .releases import PREFIX as OFFICIAL

    return str(value).startswith((PREFIX, OFFICIAL))


def resolve(value: str | os.PathLike, what: str) -> Path:
    """A local path as given, the local snapshot of `hf:owner/name`, or the cached official release
    `official:NAME` (each downloaded if needed)."""
    from . import releases

    text = str(value)
    if text.startswith(releases.PREFIX):
        return releases.fetch(text[len(releases.PREFIX):], what)
    if not text.startswith(PREFIX):
        return Path(value)
    repo, file_name = _repo_and_file(text[len(PREFIX):])
    if not _REPO.match(repo):
        raise ValueError(f"{what}: {text!r} is not a hub repository id like hf:owner/name (or hf:owner/name/FILE.gguf)")
    try:
        import huggingface_hub
    except ImportError as error:
        raise ValueError(f"{what}: downloading {repo} needs the huggingface_hub package "
                         "(pip install huggingface_hub)") from error
    try:
        if file_name is not None:
            return Path(huggingface_hub.hf_hub_download(repo_id=repo, filename=file_name))
        return Path(huggingface_hub.snapshot_download(repo_id=repo, ignore_patterns=SKIPPED))
    except Exception as error:  # offline, unknown repository, gated model, network failure...
        raise ValueError(f"{what}: could not get {repo} from the Hugging Face hub ({type(error).__name__}: "
                         f"{error}); download it yourself and pass the folder") from error


def _repo_and_file(name: str) -> tuple[str, str | None]:
    """`owner/name` -> (it, None); `owner/name/path/FILE.gguf` -> (owner/name, path/FILE.gguf): a GGUF repository
    holds one file per quantization (tens of GB in all), so one of them is fetched, not the repository."""
    owner, _, rest = name.partition("/")
    repo, _, file_name = rest.partition("/")
    if file_name.endswith(".gguf"):
        return f"{owner}/{repo}", file_name
    return name, None
