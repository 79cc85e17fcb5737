"""Scaling: decode tokens/s and memory of generation as the context grows (128 to 2048 tokens) and as the number
of adapter layers grows (0 to all), ours beside transformers + peft, fp32; a table and a PNG plot.

Each point is a fresh process per side (bench.memory's worker): the first generation gives the peak memory
above the loaded model, the next ones the tokens/s. Every adapter-layer count's pair is checked to compute the
same thing first (bench.compare).

    python -m bench.scaling [--threads 2] [--repeats 3] [--smoke] [--write BENCHMARKS.md] [--plot docs/scaling.png]

With --write and no --plot, the plot goes to docs/scaling.png next to the markdown file.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.args import positive_int, run_main
from bench.compare import check_lines, checked_pair
from bench.decode import machine
from bench.memory import PAIR, run_worker
from bench.peers import quiet, write_weights
from bench.report import command_line, publish, ratio, spread, stat, table, versions
from bench.shapes import describe, shapes, with_layers

HEADING = "Scaling (CPU, fp32)"
CONTEXTS, LAYER_CONTEXT, NEW_TOKENS = (128, 256, 512, 1024, 2048), 512, 32
LABELS = {"ours": "ours", "peer": "transformers + peft"}
Point = dict[str, dict]  # side -> {"rate": Stat, "own_mb": float | None}


def layer_counts(n_layers: int) -> list[int]:
    """0, 1, 2, 4, ... up to every layer."""
    counts, k = [0], 1
    while k < n_layers:
        counts.append(k)
        k *= 2
    return counts + [n_layers]


def point(folder: str, context: int, layers: int | None, repeats: int, threads: int, smoke: bool) -> Point:
    out = {}
    for side in PAIR:
        run = run_worker(folder, side, "fp32", context, threads=threads, smoke=smoke, new_tokens=NEW_TOKENS,
                         layers=layers, timed=repeats)
        out[side] = {"rate": stat(run["tokens_per_s"]), "own_mb": run["own_mb"]}
    return out


def rows_for(sweep: str, value: int, p: Point) -> list[tuple[str, ...]]:
    a, b = p["ours"], p["peer"]
    rows = [(sweep, str(value), "greedy decode, tokens/s", spread(a["rate"]), spread(b["rate"]),
             ratio(a["rate"], b["rate"]))]
    if a["own_mb"] is not None:
        rows.append((sweep, str(value), "memory above the loaded model, MB", f"{a['own_mb']:.0f}", f"{b['own_mb']:.0f}",
                     f"{a['own_mb'] / max(b['own_mb'], 1e-9):.2f}"))
    return rows


def plot(path: Path, contexts: dict[int, Point], layers: dict[int, Point], title: str) -> None:
    """Four panels: tokens/s and memory against context and against adapter layers; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for column, (points, xlabel) in enumerate(((contexts, "context (tokens)"), (layers, "adapter layers"))):
        xs = list(points)
        for side in PAIR:
            axes[0][column].errorbar(xs, [points[x][side]["rate"][0] for x in xs], marker="o", label=LABELS[side],
                                     yerr=[[points[x][side]["rate"][0] - points[x][side]["rate"][1] for x in xs],
                                           [points[x][side]["rate"][2] - points[x][side]["rate"][0] for x in xs]])
            if all(points[x][side]["own_mb"] is not None for x in xs):
                axes[1][column].plot(xs, [points[x][side]["own_mb"] for x in xs], marker="o", label=LABELS[side])
        for row, ylabel in enumerate(("greedy decode, tokens/s", "memory above the loaded model, MB")):
            axis = axes[row][column]
            if column == 0:
                axis.set_xscale("log", base=2)
            axis.set(xlabel=xlabel, ylabel=ylabel, xticks=xs, xticklabels=[str(x) for x in xs])
            axis.legend()
    figure.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed generations per point and side")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one run: checks the harness, not speed")
    parser.add_argument("--write", help="replace this section of the markdown file (e.g. BENCHMARKS.md)")
    parser.add_argument("--plot", help="where to write the PNG (default: docs/scaling.png next to --write)")
    options = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(options.threads)
    args, adapter = shapes(options.smoke)
    repeats = 1 if options.smoke else options.repeats
    plot_path = Path(options.plot) if options.plot else (Path(options.write).parent / "docs" / "scaling.png"
                                                         if options.write else None)
    counts = layer_counts(args.n_layers)
    contexts = CONTEXTS
    if options.smoke:  # the two ends of each sweep
        contexts, counts = (CONTEXTS[0], CONTEXTS[-1]), [counts[0], counts[-1]]
    checks = []
    with tempfile.TemporaryDirectory() as folder:
        weights = write_weights(folder, args)
        for k in counts:
            check = checked_pair(weights, "fp32", with_layers(adapter, k))[2]
            checks.append(dataclasses.replace(check, precision=f"fp32, {k} adapter layers"))
            gc.collect()
        by_context = {c: point(folder, c, None, repeats, options.threads, options.smoke) for c in contexts}
        by_layers = {k: point(folder, LAYER_CONTEXT, k, repeats, options.threads, options.smoke) for k in counts}
    title = f"{describe(args, adapter)}; fp32, {machine()}"
    if plot_path:
        plot(plot_path, by_context, by_layers, title)
    rows = [row for c, p in by_context.items() for row in rows_for("context", c, p)]
    rows += [row for k, p in by_layers.items() for row in rows_for(f"adapter layers (context {LAYER_CONTEXT})", k, p)]
    heading = f"{HEADING}: {describe(args, adapter)}" + (" (--smoke: tiny shapes, figures mean nothing)"
                                                         if options.smoke else "")
    picture = []
    if plot_path and options.write:
        link = os.path.relpath(plot_path, Path(options.write).parent)
        picture = [f"![Decode tokens/s and memory against context and adapter layers]({link})", ""]
    text = "\n".join([
        f"## {heading}",
        "",
        (f"Machine: {machine()}; {versions()}. Command: `{command_line('bench.scaling', argv)}`. Each point: a "
         f"fresh process per side greedy-decodes {NEW_TOKENS} tokens after a prompt of (context - {NEW_TOKENS}) "
         f"tokens; the first run gives the peak memory above the loaded model (VmHWM reset after loading), the "
         f"next {repeats} the tokens/s (median, min / max in brackets). The adapter-layer sweep keeps "
         f"{adapter.prompt_len} prompt tokens per layer at context {LAYER_CONTEXT}; at 0 layers the peer is bare "
         "transformers (peft cannot adapt zero layers)."),
        "",
        *picture,
        *check_lines(checks),
        "",
        *table(("sweep", "value", "measure", "ours", "transformers + peft", "ours / peer"), rows),
        "",
    ])
    publish(text, HEADING, options.write, smoke=options.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
