"""What `python -m adapter.tiny eval` writes: OUT/accuracy.json, OUT/accuracy.png (accuracy against gate
scale) and its own `## ` section of BENCHMARKS.md."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..benchmarks_file import replace_section
from ..cpu_features import describe_machine
from ..formats.common import atomic_write, write_text_atomically
from .evaluate import FROZEN, FROZEN_LABEL, Accuracy
from .questions import IMAGE_CATEGORIES, TEXT_CATEGORIES

HEADING = "Tiny model: exact-answer accuracy on held-out scenes against gate scale"
ACCURACY_JSON, ACCURACY_PNG = "accuracy.json", "accuracy.png"


def write_accuracy(results: dict[str, Accuracy], out: Path, counts: dict[str, int],
                   native: dict[str, float] | None = None,
                   clip_read: dict[str, dict[str, float]] | None = None) -> None:
    """accuracy.json (with `native`: the base alone asked in its corpus's dialogue form, see probe.py; with
    `clip_read`: what classifiers read from the CLIP's features, see clip_probe.py) and the plot."""
    content = {"questions": counts, "accuracy": results, **({"base_dialogue_form": native} if native else {}),
               **({"clip_probe": clip_read} if clip_read else {})}
    write_text_atomically(out / ACCURACY_JSON, json.dumps(content, indent=2) + "\n")
    plot(results, out / ACCURACY_PNG)


def plot(results: dict[str, Accuracy], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.2), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colours = {"text": "tab:blue", "image": "tab:orange"}
    for kind, table in results.items():
        gated = {float(s): row for s, row in table.items() if s != FROZEN}
        axes.plot(list(gated), [100 * row["all"] for row in gated.values()], marker="o", linewidth=2.2,
                  color=colours[kind], label=f"{kind} questions (all)")
        for category in next(iter(gated.values())):
            if category != "all":
                axes.plot(list(gated), [100 * row[category] for row in gated.values()], linewidth=0.8, alpha=0.35,
                          color=colours[kind])
        if FROZEN in table:
            axes.plot([0.0], [100 * table[FROZEN]["all"]], marker="x", markersize=9, linestyle="none",
                      color=colours[kind], label=f"{kind}: {FROZEN_LABEL}")
    axes.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("gate scale (0 = frozen base, 1 = trained adapter)")
    axes.set_ylabel("exact answers, % (thin: per category)")
    axes.set_ylim(-2, 102)
    axes.set_title("Tiny LLaMA-Adapter on held-out scenes")
    axes.legend(loc="center right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def _table(kind: str, table: Accuracy, categories: tuple[str, ...]) -> str:
    present = [c for c in categories if c in next(iter(table.values()))]
    lines = [f"| gate scale | {kind}: all | " + " | ".join(present) + " |",
             "|---|---|" + "---|" * len(present)]
    for scale, row in table.items():
        scale = FROZEN_LABEL if scale == FROZEN else scale
        lines.append(f"| {scale} | **{100 * row['all']:.1f}** | " + " | ".join(f"{100 * row[c]:.1f}" for c in present)
                     + " |")
    return "\n".join(lines)


def section(results: dict[str, Accuracy], counts: dict[str, int], image_path: str) -> str:
    parts = [f"## {HEADING}\n",
             f"Machine: {describe_machine()}. Command: `python -m adapter.tiny eval`. Greedy decoding; an answer "
             "counts when the generated text, stripped, equals the expected string (\"red\", \"3\", \"left\", "
             "\"red, blue\"). Held-out scenes never reach training (split by a hash of the scene). "
             f"Questions: {', '.join(f'{n} {k}' for k, n in counts.items())}. Plot: `{image_path}`. The gate "
             "scale moves the adaption prompts (and so the picture) only; the image adapter's v2 biases and norms "
             "follow the delta scale (1 in every gate-scale row), so its last row, both at 0, is the frozen base.\n"]
    for kind, categories in (("text", TEXT_CATEGORIES), ("image", IMAGE_CATEGORIES)):
        if kind in results:
            parts.append(_table(kind, results[kind], categories) + "\n")
    return "\n".join(parts)


def write_benchmarks(results: dict[str, Accuracy], counts: dict[str, int], path: Path, image: Path) -> None:
    relative = os.path.relpath(image, path.parent)
    replace_section(path, HEADING, section(results, counts, relative))
