"""What a run tells people: one-line notices, a progress bar, and `OUT/log.jsonl`, one JSON object per line:

    {"type": "start", "step": 0, "steps": ..., "first_prompt_layer": ..., "config": {...}, ...}
    {"type": "train", "step": 1, "epoch": 0.05, "loss": ..., "lr": ..., "tokens_per_s": ..., "grad_norm": ...,
     "gates": [[per head] per prompt layer]}
    {"type": "val", "step": 20, "epoch": 1.0, "val_loss": ...}
    {"type": "early_stop", "step": ..., "best_step": ..., "best_val_loss": ...}   (--early-stop)
    {"type": "end", "step": ..., "adapter": "OUT/adapter/adapter.safetensors"}

(with --keep-best, the adapter of the lowest "val" record is kept in OUT/best.)

Only the main process writes; the others get a log that does nothing.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..formats.common import write_text_atomically, writing

LOG = "log.jsonl"


def notice(text: str, enabled: bool = True) -> None:
    if enabled:
        print(text, file=sys.stderr, flush=True)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a run's log. A last line cut short (a run killed while writing it) is left out; any other
    that is no JSON object is refused naming its line."""
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else None
        except (ValueError, RecursionError) as error:
            if number == len(lines):
                break
            raise ValueError(f"{path}, line {number}: not a JSON record ({error})") from None
        if record is not None and not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: not a JSON object, got {line:.60}")
        records += [] if record is None else [record]
    return records


ENDINGS = ("end", "early_stop")  # the records that end a run


def records_until(path: Path, step: int) -> list[dict[str, Any]]:
    """What a run resumed at `step` (its checkpoint) keeps of its log: the records up to it, less the end of a run
    stopped, cut (--max-steps) or stopped early there, which the resumed run may go past."""
    return [r for r in read_log(path) if r.get("step", 0) <= step and r.get("type") not in ENDINGS]


def trim_log(path: Path, step: int) -> None:
    """Drop what was logged after `step` (the checkpoint a run resumes from): those steps are redone."""
    kept = records_until(path, step)
    write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))


class RunLog:
    """Appends records to the JSONL log and keeps the progress bar up to date (main process only); `listener`
    gets each record too (a program that shows the run as it goes)."""

    def __init__(self, path: Path | None, total_steps: int, start_step: int, progress: bool,
                 listener: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path, self.listener = path, listener
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=path is None or not progress)

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with writing(self.path), open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.listener is not None:
            self.listener(record)

    def step(self, record: dict[str, Any]) -> None:
        self.write(record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
