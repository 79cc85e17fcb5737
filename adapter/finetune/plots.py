"""The two figures of a run, drawn from its log: `loss.png` (train and validation loss) and `gates.png`
(per-layer mean |effective gate| over steps: the zero-init gates opening as the adapter learns).

Drawn with matplotlib's Agg canvas directly, so no display and no global backend switch are needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..formats.common import atomic_write


def _figure(width: float = 7.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def loss_curves(records: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) per step and (step, validation loss) per validation, from a run's log records."""
    return ([(r["step"], r["loss"]) for r in records if r.get("type") == "train"],
            [(r["step"], r["val_loss"]) for r in records if r.get("type") == "val"])


def gate_curves(records: list[dict[str, Any]]) -> tuple[list[int], list[list[float]]]:
    """The steps, from 0 where every gate is exactly zero, and per adapted layer its mean |effective gate| over
    heads at each of them (none for a run without gates)."""
    steps = [r for r in records if r.get("type") == "train" and r.get("gates")]
    if not steps:
        return [], []
    return [0] + [r["step"] for r in steps], [[0.0] + [sum(abs(g) for g in r["gates"][layer]) / len(r["gates"][layer])
                                                     for r in steps] for layer in range(len(steps[0]["gates"]))]


def plot_loss(records: list[dict[str, Any]], path: Path) -> None:
    train, val = loss_curves(records)
    figure = _figure()
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train), label="train", linewidth=1.0)
    if val:
        axes.plot(*zip(*val), "o-", label="validation")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (response tokens)")
    axes.set_title("Loss")
    axes.grid(alpha=0.3)
    axes.legend()
    _save(figure, path)


def plot_gates(records: list[dict[str, Any]], path: Path, first_layer: int) -> None:
    x, layers = gate_curves(records)
    figure = _figure()
    axes = figure.add_subplot()
    if layers:
        for layer, y in enumerate(layers):
            axes.plot(x, y, label=f"layer {first_layer + layer}", color=_colour(layer, len(layers)), linewidth=1.0)
        axes.legend(fontsize="small", ncol=max(1, len(layers) // 10))
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("mean |effective gate| over heads")
    axes.set_title("Zero-init gates opening, per adapted layer")
    axes.grid(alpha=0.3)
    _save(figure, path)


def _colour(index: int, count: int):
    from matplotlib import colormaps

    return colormaps["viridis"](index / max(count - 1, 1))
