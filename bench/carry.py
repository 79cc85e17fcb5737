"""A trimmed copy of the installed packages that bench/gpu.sh needs and a bare GPU machine lacks (bitsandbytes,
open_clip with timm, ftfy and wcwidth, torchvision), small enough to carry along (under 64 MiB).

bitsandbytes ships one library per CUDA/ROCm/XPU version (125 MB); only the CPU one and the CUDA ones asked for
are kept (by default the CUDA version of the torch installed here). Compiled caches, console scripts and
open_clip's training code are left out.

    python -m bench.carry [--out build/vendor] [--cuda 130[,128]]

Then, on the GPU machine: `bash bench/gpu.sh` (it appends build/vendor to sys.path, so packages the machine
has itself win), or `PYTHONPATH=build/vendor python -m bench.gpu`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import torch

from bench.args import run_main

DISTRIBUTIONS = ("bitsandbytes", "open_clip_torch", "timm", "ftfy", "wcwidth", "torchvision")
LEFT_OUT = ("open_clip_train/",)  # open_clip's training scripts
LIMIT = 64 * 2**20


def wanted(path: str, cuda: Sequence[str]) -> bool:
    """Whether one file of a distribution goes into the copy."""
    name = path.rsplit("/", 1)[-1]
    if "__pycache__" in path or path.startswith(("..", *LEFT_OUT)):
        return False
    if path.startswith("bitsandbytes/") and name.startswith("libbitsandbytes_"):
        return name.startswith("libbitsandbytes_cpu.") or any(name.startswith(f"libbitsandbytes_cuda{v}.")
                                                             for v in cuda)
    return True


def copy(out: Path, cuda: Sequence[str]) -> dict[str, int]:
    """Copy every distribution's wanted files (with its .dist-info, which transformers reads versions from) into
    `out`, replacing what was there; bytes per distribution."""
    if out.exists():
        shutil.rmtree(out)
    sizes = {}
    for name in DISTRIBUTIONS:
        try:
            dist = distribution(name)
        except PackageNotFoundError as error:
            raise SystemExit(f"bench.carry: {name} is not installed here, so it cannot be carried") from error
        total = 0
        for file in dist.files or ():
            path = str(file)
            source = Path(dist.locate_file(file))
            if not wanted(path, cuda) or not source.is_file():
                continue
            target = out / path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            total += source.stat().st_size
        sizes[name] = total
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.carry", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="build/vendor", help="where to write the copy (replaced)")
    default_cuda = (torch.version.cuda or "").replace(".", "")
    parser.add_argument("--cuda", default=default_cuda, help="comma-separated CUDA versions of the bitsandbytes "
                        f"libraries to keep, as in libbitsandbytes_cuda130.so (default: {default_cuda or 'none'})")
    options = parser.parse_args(argv)
    cuda = [v for v in options.cuda.split(",") if v]
    out = Path(options.out)
    sizes = copy(out, cuda)
    for name, size in sizes.items():
        print(f"{name:16s} {size / 2**20:6.1f} MiB")
    total = sum(sizes.values())
    print(f"{'total':16s} {total / 2**20:6.1f} MiB in {out} (bitsandbytes CUDA libraries: {', '.join(cuda) or 'none'})")
    if total > LIMIT:
        print(f"bench.carry: {total / 2**20:.1f} MiB is more than the {LIMIT // 2**20} MiB that can be carried; keep "
              "fewer CUDA versions (--cuda)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
