"""A trimmed copy of the installed packages that bench/gpu.sh needs and the lent GPU machines lack (bitsandbytes,
open_clip with ftfy and wcwidth), small enough to carry along (under 64 MiB). Their image has torch, torchvision,
timm, transformers, peft, pillow and sentencepiece (/work/.library/device/KINDS.md); `--also` carries more for a
machine without one of them (a copy built for this machine's torch, which may not import beside another's).

bitsandbytes ships one library per CUDA/ROCm/XPU version (125 MB); only the CPU one and the CUDA ones asked for
are kept (by default the CUDA version of the torch installed here). Compiled caches, console scripts and
open_clip's training code are left out.

    python -m bench.carry [--out build/vendor] [--cuda 130[,128]] [--also timm,torchvision]

Then, on the GPU machine: `bash bench/gpu.sh` (it appends build/vendor to sys.path, so packages the machine
has itself win), or `PYTHONPATH=build/vendor python -m bench.gpu`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import torch

from bench.args import run_main

DISTRIBUTIONS = ("bitsandbytes", "open_clip_torch", "ftfy", "wcwidth")
MARKER = ".bench-carry"  # in every copy: a folder without it is not replaced (--out . would have wiped the checkout)
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


def copy(out: Path, cuda: Sequence[str], also: Sequence[str] = ()) -> dict[str, int]:
    """Copy every distribution's wanted files (with its .dist-info, which transformers reads versions from) into
    `out`, replacing an earlier copy (a folder holding anything else is refused); bytes per distribution."""
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file()):
            raise SystemExit(f"bench.carry: --out {out} holds files that are not an earlier copy ({MARKER} is "
                             "missing); name a new folder or an earlier copy's")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by python -m bench.carry; replaced by its next run\n", encoding="utf-8")
    sizes = {}
    for name in (*DISTRIBUTIONS, *also):
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
    parser.add_argument("--out", default="build/vendor", help="where to write the copy (an earlier copy there is "
                        "replaced; a folder holding anything else is refused)")
    default_cuda = (torch.version.cuda or "").replace(".", "")
    parser.add_argument("--cuda", default=default_cuda, help="comma-separated CUDA versions of the bitsandbytes "
                        f"libraries to keep, as in libbitsandbytes_cuda130.so (default: {default_cuda or 'none'})")
    parser.add_argument("--also", default="", help="comma-separated distributions to carry besides (e.g. "
                        "timm,torchvision for a machine without them)")
    options = parser.parse_args(argv)
    cuda = [v.strip() for v in options.cuda.split(",") if v.strip()]
    if not cuda:  # nf4/int8 would fail only on the GPU machine
        parser.error("--cuda: name the CUDA version(s) of the GPU machine's torch (e.g. 130); this torch has none")
    shipped = {path.name.removeprefix("libbitsandbytes_cuda").split(".")[0]
               for path in Path(distribution("bitsandbytes").locate_file("bitsandbytes")).glob(
                   "libbitsandbytes_cuda*")}
    if missing := sorted(set(cuda) - shipped):
        parser.error(f"--cuda: bitsandbytes here has no library for CUDA {', '.join(missing)} (it has "
                     f"{', '.join(sorted(shipped, key=int)) or 'none'})")
    also = [name.strip() for name in options.also.split(",") if name.strip()]
    out = Path(options.out)
    sizes = copy(out, cuda, also)
    for name, size in sizes.items():
        print(f"{name:16s} {size / 2**20:6.1f} MiB")
    tree = working_tree_bytes()
    total = sum(sizes.values()) + tree
    print(f"{'working tree':16s} {tree / 2**20:6.1f} MiB (it travels with the copy)")
    print(f"{'total':16s} {total / 2**20:6.1f} MiB, the copy in {out} (bitsandbytes CUDA libraries: "
          f"{', '.join(cuda)})")
    if total > LIMIT:
        print(f"bench.carry: {total / 2**20:.1f} MiB is more than the {LIMIT // 2**20} MiB that can be carried; keep "
              "fewer CUDA versions (--cuda) or packages (--also)", file=sys.stderr)
        return 2
    return 0


def working_tree_bytes() -> int:
    """The bytes of the repository's tracked files, which travel to the GPU machine beside the copy (0 outside a
    git checkout)."""
    root = Path(__file__).resolve().parents[1]
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum((root / name).stat().st_size for name in listed.decode().split("\0")
               if name and (root / name).is_file())


if __name__ == "__main__":
    sys.exit(run_main(main))
