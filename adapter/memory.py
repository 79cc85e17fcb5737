"""Giving back the pages of memory-mapped checkpoint tensors once they have been copied.

`torch.load(mmap=True)` maps the file privately; every page read stays resident (and counts in the
process's RSS) for as long as the mapping lives, so loading a 13 GB checkpoint block by block would
still end up holding all of it. `madvise(MADV_DONTNEED)` drops those clean file pages; touching them
again would simply re-read the file. Only for file-backed tensors: on anonymous memory it would zero data.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

_MADV_DONTNEED = 4
_libc = None


def _c_library():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else False
    return _libc


def _madvise():
    libc = _c_library()
    return libc.madvise if libc else None


def trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc keeps it otherwise, and RSS only grows while a
    model is filled block by block with large temporary tensors)."""
    libc = _c_library()
    trim = getattr(libc, "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)


def release_file_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages under a tensor that lives in a file mapping (best effort, Linux only)."""
    madvise = _madvise()
    if madvise is None or tensor.device.type != "cpu":
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    page = mmap.PAGESIZE
    first, last = (start + page - 1) // page * page, end // page * page  # whole pages inside the tensor only
    if last > first:
        madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)
