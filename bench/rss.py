"""Peak resident memory of this process since a chosen moment (Linux: VmHWM after resetting it through
/proc/self/clear_refs), so that a figure covers generation or training and not the loading before it; and another
process's memory (an app a benchmark started)."""

from __future__ import annotations

import resource
from pathlib import Path


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Start a new peak from the current resident memory; False where the kernel does not allow it (then
    `peak_mb` is the whole process's)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def current_mb() -> float:
    value = _status_mb("VmRSS")
    return value if value is not None else peak_mb()


def peak_mb() -> float:
    """Peak resident memory in MB since the last `reset_peak` (or since the process started)."""
    value = _status_mb("VmHWM")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_gib(pid: int, field: str) -> float:
    """A /proc/PID/status memory field (VmRSS, VmHWM) of another process, in GiB."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"/proc/{pid}/status has no {field}")
