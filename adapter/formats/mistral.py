"""Mistral's own folders (as mistral-inference and Mistral's repositories ship them): `params.json` in Mistral's
keys (`hidden_dim`, `head_dim`, `sliding_window`), the weights under Meta's names in `consolidated.safetensors`
(or split into `consolidated-0000N-of-0000M.safetensors`, each tensor whole in one file), and a SentencePiece
`tokenizer.model`, `tokenizer.model.v3` or `tokenizer.model.v1`. Mistral 7B v0.1's release, with
`consolidated.00.pth`, is a Meta folder (adapter.formats.meta reads Mistral's params.json keys too).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .hf import SafetensorsFile
from .meta import ParamsJson

TOKENIZER_NAMES = ("tokenizer.model", "tokenizer.model.v3", "tokenizer.model.v1", "tekken.json")


def is_mistral_folder(path: Path) -> bool:
    return (path.is_dir() and (path / "params.json").is_file() and any(path.glob("consolidated*.safetensors"))
            and not any(path.glob("consolidated.*.pth")))


class MistralCheckpoint(ParamsJson):
    """Lazy access to a Mistral folder's tensors (already under Meta's names and in Meta's layout)."""

    format = "mistral"
    tied_output = False

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.source = str(folder)
        super().__init__(folder)
        found = [folder / name for name in TOKENIZER_NAMES if (folder / name).is_file()]
        if not found:
            raise FileNotFoundError(f"tokenizer: {folder} has none of {', '.join(TOKENIZER_NAMES)}")
        self.tokenizer_path = found[0]
        self._where: dict[str, SafetensorsFile] = {}
        for path in sorted(folder.glob("consolidated*.safetensors")):
            file = SafetensorsFile(path)
            for name in sorted(file.names):
                if name in self._where:
                    raise ValueError(f"{path}: tensor {name} is also in {self._where[name].path}")
                self._where[name] = file

    def keys(self) -> set[str]:
        return set(self._where)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ValueError(f"{self.source}: missing tensor {name}")
        return self._where[name].get(name)
