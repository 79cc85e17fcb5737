"""Meta's LLaMA folders: `params.json`, `consolidated.NN.pth` model-parallel shards, `tokenizer.model`.

Shards are opened with `torch.load(weights_only=True, mmap=True)`, so nothing is read until a tensor is
asked for, and merged per tensor on the dimension Meta split it along.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelArgs
from ..memory import release_file_pages
from .common import named_tensors, parsed_json, torch_load
from .window import sliding_window, windowed_args

# dimension each tensor is split along across model-parallel shards (None: replicated)
_SHARD_DIMS = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
}
IGNORED_KEYS = ("rope.freqs",)


def is_meta_folder(path: Path) -> bool:
    """params.json, unless the folder is an HF one that also ships it without Meta's shards (Mistral's
    repositories keep params.json beside config.json, their own copy of the weights being consolidated.safetensors,
    which adapter.formats.mistral reads)."""
    if not (path.is_dir() and (path / "params.json").is_file()):
        return False
    return any(path.glob("consolidated.*.pth")) or not (path / "config.json").is_file()


def shard_dim(name: str) -> int | None:
    suffix = name.split(".", 2)[-1] if name.startswith("layers.") else name
    return _SHARD_DIMS.get(suffix)


def read_json(path: Path) -> dict:
    try:
        value = parsed_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # (not UTF-8, not JSON, a number too long, nested too deeply)
        raise ValueError(f"{path}: cannot read JSON ({error})") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


class ParamsJson:
    """A folder's `params.json`, Meta's keys or Mistral's (its own releases: `hidden_dim`, `head_dim`,
    `sliding_window`): the model's shape, its family and its attention window."""

    def __init__(self, folder: Path) -> None:
        self.params_path = folder / "params.json"
        self.params = read_json(self.params_path)
        self.family = "Mistral" if "hidden_dim" in self.params else "LLaMA"  # Meta's never names hidden_dim
        self.window = sliding_window(self.params.get("sliding_window"), self.params_path)

    def model_args(self, tokenizer_words: int, max_seq_len: int | None = None) -> ModelArgs:
        """LLaMA 1's `vocab_size: -1` is taken from the tokenizer; a sliding window is Mistral's attention window
        (adapter.formats.window); `max_seq_len` overrides the context."""
        overrides = {}
        if self.params.get("vocab_size", -1) in (-1, None):
            overrides["vocab_size"] = tokenizer_words
        return windowed_args(lambda **values: ModelArgs.from_params(self.params, **values), self.params_path,
                             self.window, self.params.get("max_seq_len"), max_seq_len, **overrides)


class MetaCheckpoint(ParamsJson):
    """Lazy access to the merged tensors of all `consolidated.*.pth` shards of a folder (Mistral 7B v0.1's own
    release is such a folder too)."""

    format = "meta"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.tokenizer_path = folder / "tokenizer.model"
        self.paths = sorted(folder.glob("consolidated.*.pth"))
        if not self.paths:
            raise FileNotFoundError(f"base: {folder} has params.json but no consolidated.*.pth")
        self.shards = []
        for path in self.paths:
            self.shards.append(named_tensors(torch_load(path), path))
        self.source = str(folder)
        super().__init__(folder)

    @property
    def tied_output(self) -> bool:
        """Whether the file holds the head as the embedding tensor itself (torch.save keeps one storage for a
        tied pair), so that it is loaded once; model-parallel shards split the two along different dims."""
        if len(self.shards) != 1:
            return False
        head, embeddings = self.shards[0].get("output.weight"), self.shards[0].get("tok_embeddings.weight")
        if not (isinstance(head, torch.Tensor) and isinstance(embeddings, torch.Tensor)):
            return False
        return (head.untyped_storage().data_ptr() == embeddings.untyped_storage().data_ptr()
                and (head.storage_offset(), head.shape, head.stride(), head.dtype)
                == (embeddings.storage_offset(), embeddings.shape, embeddings.stride(), embeddings.dtype))

    def keys(self) -> set[str]:
        return {k for k in self.shards[0] if k not in IGNORED_KEYS}

    def release(self, name: str) -> None:
        """The tensor has been copied: give its file pages back (see adapter.memory)."""
        for shard in self.shards:
            if name in shard:
                release_file_pages(shard[name])

    def tensor(self, name: str) -> torch.Tensor:
        parts = []
        for path, shard in zip(self.paths, self.shards):
            if name not in shard:
                raise ValueError(f"{path}: missing tensor {name}")
            parts.append(shard[name])
        if len(parts) == 1:
            return parts[0]
        dim, first = shard_dim(name), parts[0]
        for path, part in zip(self.paths[1:], parts[1:]):  # torch.cat named neither, or cast an integer shard
            if part.dtype != first.dtype or part.dim() != first.dim() or \
                    any(a != b for i, (a, b) in enumerate(zip(part.shape, first.shape)) if i != dim):
                raise ValueError(f"{path}: {name} is {tuple(part.shape)} {part.dtype}, which does not go with "
                                 f"{self.paths[0].name}'s {tuple(first.shape)} {first.dtype}")
            if dim is None and not torch.equal(part, first):
                raise ValueError(f"{path}: {name} differs from {self.paths[0].name}'s, which every shard holds alike")
        return first if dim is None else torch.cat(parts, dim=dim)
