"""How a benchmark publishes its `## ` section of BENCHMARKS.md (`adapter.benchmarks_file` rewrites only that
section), and the small pieces every section is built from: the machine line, markdown tables, median (min / max).
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from adapter.benchmarks_file import replace_section

REPOSITORY_BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
SMOKE_MARK = " (--smoke: tiny shapes, figures mean nothing)"


def publish(text: str, heading: str, write: str | os.PathLike | None, echo: bool = True, smoke: bool = False) -> None:
    """Print a benchmark's section (with `echo`) and, with `--write FILE`, replace its section there; a --smoke
    section says so in its heading, and never goes into the repository's BENCHMARKS.md."""
    if smoke:
        refuse_smoke_write(write)
        first, _, rest = text.partition("\n")
        text = text if "--smoke" in first else f"{first}{SMOKE_MARK}\n{rest}"
    if echo:
        print(text)
    if write:
        replace_section(write, heading, text)


def refuse_smoke_write(write: str | os.PathLike | None) -> None:
    """SystemExit where --smoke would write into the repository's BENCHMARKS.md (its figures replaced the real
    ones): smoke sections go to a file of their own."""
    if write and Path(write).resolve() == REPOSITORY_BENCHMARKS:
        raise SystemExit(f"--write: --smoke figures mean nothing; they would replace the real ones in "
                         f"{write}: give a file of its own (e.g. /tmp/smoke.md)")


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command as the user typed it, for the section's `Command:` line."""
    return " ".join(["python -m", module, *(argv if argv is not None else sys.argv[1:])])


def versions() -> str:
    """Versions of the libraries the figures depend on besides torch (which bench.decode.machine names)."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in ("bitsandbytes", "transformers", "peft"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} not installed")
    return ", ".join(parts)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table; every row must have one cell per header."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"table: row {list(row)} has {len(row)} cells for {len(headers)} headers")
        lines.append("| " + " | ".join(row) + " |")
    return lines


Stat = tuple[float, float, float]  # median, min, max (what bench.decode.measure returns)


def spread(stat: Stat, digits: int = 1) -> str:
    """`median (min / max)`, the way every repeated figure is shown."""
    med, lo, hi = stat
    return f"{med:.{digits}f} ({lo:.{digits}f} / {hi:.{digits}f})"


def stat(values: Sequence[float]) -> Stat:
    return statistics.median(values), min(values), max(values)


def ratio(ours: Stat, peer: Stat) -> str:
    """ours / peer, of the medians ("n/a" when the peer's is zero or either is negative: every figure here is a
    rate, a time or a size, so a negative one is a measurement at the noise floor, and its ratio means nothing)."""
    return f"{ours[0] / peer[0]:.2f}" if ours[0] >= 0 and peer[0] > 0 else "n/a"


def error_line(error: BaseException, limit: int | None = None) -> str:
    """`Type: first line of the message` (cut to `limit` characters), for a table cell or a list item."""
    first = (str(error).splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:limit]}"
