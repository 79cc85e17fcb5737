"""A random model to try the app with: a random base, a randomized v2 adapter with a visual prompt, and a
tiny random open_clip tower (its config .json and weights), all written to one folder.

For the app's tests and benchmark, and for trying `python app.py` without real weights:
`python -m adapter.random_demo DIR` prints the command that serves it. Its answers are noise by design, but
the gates are not zero, so the gate slider visibly changes them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .arg_types import refused, unicode_output
from .config import AdapterArgs
from .formats.common import atomic_folder, save_tensors
from .formats.native import save_adapter
from .loading import load
from .random_model import write_random_base

CLIP_CONFIG = {"embed_dim": 24, "quick_gelu": True,
               "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16,
                              "mlp_ratio": 2.0},
               "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
CLIP_NAME = "tiny-random-clip"


@dataclass(frozen=True)
class DemoFiles:
    base: Path
    adapter: Path
    clip: Path
    clip_model: Path

    def flags(self) -> list[str]:
        """The app's flags that serve these files."""
        return ["--base", str(self.base), "--adapter", str(self.adapter), "--clip", str(self.clip),
                "--clip-model", str(self.clip_model)]


def write_clip(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny open_clip model: its config (named `<name>.json`, as open_clip wants) and random weights."""
    import open_clip
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{CLIP_NAME}.json"
    config.write_text(json.dumps(CLIP_CONFIG), encoding="utf-8")
    torch.manual_seed(seed)
    model = open_clip.CLIP(**{k: v for k, v in CLIP_CONFIG.items() if k != "quick_gelu"}, quick_gelu=True)
    weights = folder / "clip.safetensors"
    save_tensors({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    return config, weights


def write_random_demo(folder: str | Path, base: str | Path | None = None, *, seed: int = 0,
                      std: float = 0.5) -> DemoFiles:
    """Write the files (a random base too, unless `base` is given); every learned tensor gets N(0, std) noise."""
    folder = Path(folder)
    base = Path(base) if base is not None else write_random_base(folder / "base", seed=seed)
    config, weights = write_clip(folder / "clip", seed)
    args = AdapterArgs(prompt_len=5, prompt_layers=3, bias=True, norm=True, lora_rank=4, new_gate=True, visual="v2",
                       clip_dim=CLIP_CONFIG["embed_dim"], visual_dim=32, visual_depth=1, visual_heads=4,
                       clip_model=CLIP_NAME)
    model = load(base, adapter=args, device="cpu")
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, param in model.trainable_parameters():
            param.add_(torch.randn(param.shape, generator=generator) * std)
    adapter = save_adapter(model, folder / "adapter").parent
    return DemoFiles(base=base, adapter=adapter, clip=weights, clip_model=config)


def main(argv: Sequence[str] | None = None) -> int:
    unicode_output()
    parser = argparse.ArgumentParser(prog="python -m adapter.random_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="where to write the files")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    written: list[tuple[Path, DemoFiles]] = []

    def write(staging: Path) -> None:
        written.append((staging, write_random_demo(staging, seed=options.seed)))

    try:
        out = atomic_folder(Path(options.folder), write)  # whole or not at all, never into a folder already there
    except (ValueError, OSError) as error:
        return refused(error, parser)
    staging, files = written[0]
    moved = DemoFiles(**{name: out / Path(path).relative_to(staging) for name, path in vars(files).items()})
    print(shlex.join(["python", "app.py", *moved.flags()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
