"""The two figures of a run, drawn from its log: `loss.png` (train and validation loss) and `gates.png`
(per-layer mean |effective gate| over steps: the zero-init gates opening as the adapter learns).

Drawn with matplotlib's Agg canvas directly, so no display and no global backend switch are needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..formats.common import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(width: float = 7.0, height: float = 4.0) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> None:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def plot_loss(records: list[dict[str, Any]], path: Path) -> None:
    _save(loss_figure(records), path)


def plot_gates(records: list[dict[str, Any]], path: Path, first_layer: int) -> None:
    _save(gates_figure(records, first_layer), path)


def loss_figure(records: list[dict[str, Any]]) -> Figure:
    """Train loss per step and validation loss per epoch, from a run's log records (so far)."""
    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("type") == "val"]
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
    if train or val:
        axes.legend()
    figure.tight_layout()
    return figure


def gates_figure(records: list[dict[str, Any]], first_layer: int) -> Figure:
    """Each adapted layer's mean |effective gate| per step, from 0 where every gate starts."""
    steps = [r for r in records if r.get("type") == "train" and r.get("gates")]
    figure = _figure()
    axes = figure.add_subplot()
    if steps:
        x = [0] + [r["step"] for r in steps]  # every gate starts at exactly zero
        n_layers = len(steps[0]["gates"])
        for layer in range(n_layers):
            y = [0.0] + [sum(abs(g) for g in r["gates"][layer]) / len(r["gates"][layer]) for r in steps]
            axes.plot(x, y, label=f"layer {first_layer + layer}", color=_colour(layer, n_layers), linewidth=1.0)
        axes.legend(fontsize="small", ncol=max(1, n_layers // 10))
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("mean |effective gate| over heads")
    axes.set_title("Zero-init gates opening, per adapted layer")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def _colour(index: int, count: int):
    from matplotlib import colormaps

    return colormaps["viridis"](index / max(count - 1, 1))
