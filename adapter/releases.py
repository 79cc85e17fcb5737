"""The official LLaMA-Adapter release files by name (`official:BIAS-7B`), fetched from the official repository's
GitHub releases only when asked for, the v2 files checked against the SHA-256 their names carry (as the
official loader checks them), and kept in a cache folder so that the next start reads them from disk.

`ADAPTER_CACHE` names the cache folder (default ~/.cache/llama-adapter). Like `hf:`, this is the only way a
name reaches the network; a name that is neither is a local path.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

from .formats.common import atomic_write

PREFIX = "official:"
RELEASES = "https://github.com/OpenGVLab/LLaMA-Adapter/releases/download/"
# name -> file under RELEASES (the official loader's names for the v2 files; "v1" is the v1 release)
OFFICIAL = {
    "v1": "v.1.0.0/llama_adapter_len10_layer30_release.pth",
    "BIAS-7B": "v.2.0.0/7fa55208379faf2dd862565284101b0e4a2a72114d6490a95e432cf9d9b6c813_BIAS-7B.pth",
    "LORA-BIAS-7B": "v.2.0.0/1bcbffc43484332672092e0024a8699a6eb5f558161aebf98a7c6b1db67224d1_LORA-BIAS-7B.pth",
    "CAPTION-7B": "v.2.0.0/5088aeb63a89746b90bcfd5cb819e1c7411b2771b267c6d131ce73e250a8abf0_CAPTION-7B.pth",
    "LORA-BIAS-7B-v21":
        "v.2.1.0/d26d107eec32127ac86ef1997cf7169de1c56a59c539fc1258c6798b969e289c_LORA-BIAS-7B-v21.pth",
}
_SHA256_NAME = re.compile(r"^([0-9a-f]{64})_")
_CHUNK = 1 << 20


def cache_folder() -> Path:
    return Path(os.environ.get("ADAPTER_CACHE") or Path.home() / ".cache" / "llama-adapter")


def fetch(name: str, what: str) -> Path:
    """The local copy of the official release `name`, downloaded into the cache if it is not there (or not
    whole); a ValueError naming `what` (the flag) for an unknown name, a failed download or a wrong checksum."""
    if name not in OFFICIAL:
        raise ValueError(f"{what}: {PREFIX}{name} is no official release; choose from "
                         f"{', '.join(PREFIX + known for known in OFFICIAL)}")
    url = RELEASES + OFFICIAL[name]
    target = cache_folder() / url.rsplit("/", 1)[1]
    match = _SHA256_NAME.match(target.name)
    expected = match.group(1) if match else None
    if target.is_file() and (expected is None or _sha256(target) == expected):
        return target
    print(f"downloading {url} to {target}", file=sys.stderr)
    atomic_write(target, lambda tmp: _download(url, Path(tmp), expected, what))
    return target


def _download(url: str, path: Path, expected: str | None, what: str) -> None:
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as source, open(path, "wb") as out:
            while chunk := source.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
    except (urllib.error.URLError, OSError) as error:
        raise ValueError(f"{what}: could not download {url} ({error}); download it yourself and pass the "
                         "file (in the app: upload it)") from None
    if expected is not None and digest.hexdigest() != expected:
        raise ValueError(f"{what}: {url} was downloaded, but its SHA-256 is {digest.hexdigest()}, not the "
                         f"{expected} its name gives; nothing was kept")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
