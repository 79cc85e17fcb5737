"""Letting only some adapter layers' prompts speak: gate scales per adapter layer.

The papers put prompts into the top L layers of the frozen model and find that more layers answer better.
On a trained adapter the same question can be asked of each layer: silence all but some of its layers (their
gates scaled to 0, which is exactly as if they had no prompt) and ask again. Layers are named by the base's
layer numbers (0 = the lowest), as `python -m adapter.inspect` lists them; `Transformer.step` takes the result
as its gate scale, one row of per-layer scales per batch row.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import Transformer

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_END = re.compile(r"^(top|bottom)\s*(\d+)$")
LAYER_SWEEP_ROWS = 9  # the most top-N selections a layer sweep of the command lines tries (evenly spread)
FLAG_HELP = ("only these adapter layers' prompts speak, the others' gates scaled to 0: 'all', 'top N', 'bottom N' or "
             "the base's layer numbers and ranges, e.g. '28-31' (python -m adapter.inspect lists them)")


def adapter_layers(model: Transformer) -> list[int]:
    """The layer numbers that get an adaption prompt (the top ones), lowest first."""
    return list(range(model.first_prompt_layer, model.args.n_layers))


def describe(layers: Iterable[int]) -> str:
    """Layer numbers written short: "20-23, 31" ("none" for none)."""
    runs: list[list[int]] = []
    for layer in sorted(set(layers)):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def top_layers(model: Transformer, count: int) -> list[int]:
    """The top `count` adapter layers (0 to all of them)."""
    layers = adapter_layers(model)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= len(layers):
        raise ValueError(f"gate_layers: the top N layers needs N from 0 to {len(layers)} (this adapter's prompt "
                         f"layers), got {count!r}")
    return layers[len(layers) - count:]


def parse_layers(spec: str, model: Transformer) -> list[int]:
    """The adapter layers `spec` names: "all", "top N", "bottom N", or layer numbers and ranges ("28-31,25")."""
    text = spec.strip().lower() if isinstance(spec, str) else ""
    layers = adapter_layers(model)
    if text == "all":
        return layers
    end = _END.match(text)
    if end:
        count = int(end.group(2))
        chosen = top_layers(model, count)
        return chosen if end.group(1) == "top" else layers[:count]
    chosen: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        found = _RANGE.match(part)
        if not found:
            raise ValueError(f"gate_layers: {part!r} is not a layer number or a range A-B (or give 'all', "
                             f"'top N' or 'bottom N'); got {spec!r}")
        low, high = int(found.group(1)), int(found.group(2) or found.group(1))
        chosen.update(range(low, high + 1))
    if not chosen:
        raise ValueError(f"gate_layers: no layers named in {spec!r} (give 'all', 'top N', 'bottom N' or numbers "
                         "such as '28-31')")
    _require_adapter_layers(chosen, layers)
    return sorted(chosen)


def layer_mask(model: Transformer, layers: Iterable[int]) -> torch.Tensor:
    """[prompt_layers] float32: 1 for each of `layers`, 0 for the adapter's other layers."""
    own = adapter_layers(model)
    chosen = set(layers)
    _require_adapter_layers(chosen, own)
    return torch.tensor([1.0 if layer in chosen else 0.0 for layer in own])


def gate_scale_rows(model: Transformer, scales: Sequence[float],
                    layers: Iterable[int] | None = None) -> list[float] | torch.Tensor:
    """The gate scale of a batch whose row i is at `scales[i]` with only `layers` speaking: [rows, prompt_layers]
    (the scales as they are when `layers` is None: every layer speaks)."""
    if layers is None:
        return [float(scale) for scale in scales]
    return torch.tensor([float(scale) for scale in scales])[:, None] * layer_mask(model, layers)[None]


def _require_adapter_layers(chosen: set[int], own: list[int]) -> None:
    outside = sorted(chosen - set(own))
    if outside:
        raise ValueError(f"gate_layers: layer(s) {describe(outside)} have no adaption prompt; this adapter's "
                         f"prompts are in layers {describe(own)}")


def layers_from_flag(spec: str | None, model: Transformer) -> list[int] | None:
    """--gate-layers' selection for `model` (None when not given: every layer speaks), errors naming the flag."""
    if spec is None:
        return None
    try:
        return parse_layers(spec, model)
    except ValueError as error:
        raise ValueError(f"--gate-layers: {str(error).removeprefix('gate_layers: ')}") from None


def sweep_counts(total: int, most: int) -> list[int]:
    """How many top layers each row of a layer sweep lets speak: 0 to `total`, at most `most` counts spread
    evenly (every count when they fit)."""
    if total < most:
        return list(range(total + 1))
    return sorted({round(i * total / (most - 1)) for i in range(most)})


def speaking(model: Transformer, layers: Iterable[int] | None) -> str:
    """Which layers' prompts speak, said for people."""
    if layers is None:
        return "every adapter layer's prompt speaks"
    return f"the prompts speak in layers {describe(layers)} only, of this adapter's {describe(adapter_layers(model))}"


def layer_sweep(model: Transformer, most: int, name: str = "layer sweep") -> list[list[int]]:
    """A layer sweep's selections: the top N adapter layers for N from 0 to all (at most `most`, `sweep_counts`).
    `name` is what an error calls the sweep (a flag, say)."""
    if model.adapter_query is None:
        raise ValueError(f"{name}: this model has no adaption prompts (no layers to choose from)")
    return [top_layers(model, count) for count in sweep_counts(model.adapter_args.prompt_layers, most)]


def layer_sweep_rows(model: Transformer, scale: float, most: int,
                     name: str = "layer sweep") -> tuple[list[str], torch.Tensor]:
    """A layer sweep's rows: labels ("top 2: 30-31") and the [rows, prompt_layers] gate scale of each row, the
    selections of `layer_sweep` at `scale`."""
    chosen = layer_sweep(model, most, name)
    labels = [f"top {len(layers)}: {describe(layers)}" for layers in chosen]
    return labels, torch.stack([float(scale) * layer_mask(model, layers) for layers in chosen])
