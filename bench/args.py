"""What the benchmarks' command lines share: argument types (a bad number is argparse's one-line error, not a
traceback from deep inside a run) and `run_main`, which says a file or folder that cannot be written in one line."""

from __future__ import annotations

import sys
from collections.abc import Callable

from adapter.arg_types import positive_int, unicode_output


def positive_ints(text: str) -> list[int]:
    """Comma-separated whole numbers of at least 1 ("512,2048")."""
    return [positive_int(word.strip()) for word in text.split(",")]


def run_main(main: Callable[[], int | None]) -> int:
    """`main()`'s exit code (0 for None); an OSError (a --folder, --out, --plot or --write that cannot be made or
    written) as one line on stderr, exit code 2. Output as the commands write it (`unicode_output`)."""
    unicode_output()
    try:
        return main() or 0
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
