"""Letting only some adapter layers' prompts speak: gate scales per adapter layer, or per head.

The papers put prompts into the top L layers of the frozen model and find that more layers answer better.
On a trained adapter the same question can be asked of each layer: silence all but some of its layers (their
gates scaled to 0, which is exactly as if they had no prompt) and ask again; the heads of a layer can be
chosen the same way, since each head has a gate of its own (the gate heatmap shows which are large). Layers
are named by the base's layer numbers (0 = the lowest), as `python -m adapter.inspect` lists them, and heads
from 0, as the heatmap numbers them; `Transformer.step` takes the result as its gate scale, one row of
per-layer (or per-layer, per-head) scales per batch row.

A selection is a list of speakers: a layer number (the whole layer speaks) or a (layer, head) pair (that
head of a layer not wholly chosen speaks).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import Transformer

Speaker = int | tuple[int, int]  # a whole adapter layer, or (layer, head): one head of it
_ITEM = re.compile(r"^(\d+)(?:-(\d+))?(?::(\d+)(?:-(\d+))?)?$")  # layers A or A-B, then heads :H or :H-K
_END = re.compile(r"^(top|bottom)\s*(\d+)$")
LAYER_SWEEP_ROWS = 9  # the most top-N selections a layer sweep of the command lines tries (evenly spread)
FLAG_HELP = ("only these adapter layers' prompts speak, the others' gates scaled to 0: 'all', 'none', 'top N', "
             "'bottom N' or the base's layer numbers and ranges (commas or spaces between), e.g. '28-31', each with "
             "some of its heads after a colon if "
             "wanted, e.g. '31:0-3' (python -m adapter.inspect lists the layers)")


def adapter_layers(model: Transformer) -> list[int]:
    """The layer numbers that get an adaption prompt (the top ones), lowest first."""
    return list(range(model.first_prompt_layer, model.args.n_layers))


def describe(speakers: Iterable[Speaker]) -> str:
    """A selection written short, the way `parse_layers` reads it: "20-23, 31:0-3" ("none" for none)."""
    whole, heads = _split(speakers)
    parts = _runs(whole) + [f"{layer}:{run}" for layer, chosen in sorted(heads.items()) for run in _runs(chosen)]
    return ", ".join(parts) or "none"


def _runs(numbers: Iterable[int]) -> list[str]:
    """Numbers as runs: ["20-23", "31"]."""
    runs: list[list[int]] = []
    for number in sorted(set(numbers)):
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return [str(a) if a == b else f"{a}-{b}" for a, b in runs]


def _split(speakers: Iterable[Speaker]) -> tuple[set[int], dict[int, set[int]]]:
    """(whole layers, layer -> its chosen heads) of a selection; a pair may come as a JSON list."""
    whole: set[int] = set()
    heads: dict[int, set[int]] = {}
    for speaker in speakers:
        if isinstance(speaker, int) and not isinstance(speaker, bool):
            whole.add(speaker)
        elif isinstance(speaker, (tuple, list)) and len(speaker) == 2 and all(
                isinstance(n, int) and not isinstance(n, bool) for n in speaker):
            heads.setdefault(speaker[0], set()).add(speaker[1])
        else:
            raise ValueError(f"gate_layers: {speaker!r} is neither a layer number nor a (layer, head) pair")
    return whole, {layer: chosen for layer, chosen in heads.items() if layer not in whole}


def top_layers(model: Transformer, count: int, end: str = "top") -> list[int]:
    """The top (or `end` "bottom") `count` adapter layers (0 to all of them)."""
    layers = adapter_layers(model)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= len(layers):
        raise ValueError(f"gate_layers: the {end} N layers needs N from 0 to {len(layers)} (this adapter's prompt "
                         f"layers), got {count!r}")
    return layers[len(layers) - count:] if end == "top" else layers[:count]


def parse_layers(spec: str, model: Transformer) -> list[Speaker]:
    """The speakers `spec` names: "all", "top N", "bottom N", or layer numbers and ranges, each with some of its
    heads after a colon ("28-30, 31:0-3")."""
    text = spec.strip().lower() if isinstance(spec, str) else ""
    if text == "all":
        return adapter_layers(model)
    if text == "none":  # as `describe` writes an empty selection
        return []
    end = _END.match(text)
    if end:
        return top_layers(model, int(end.group(2)), end.group(1))
    speakers: list[Speaker] = []
    # commas or spaces between the items, spaces allowed around "-" and ":" ("28 - 31, 31 : 0-3")
    for part in filter(None, re.split(r"[,\s]+", re.sub(r"\s*([-:])\s*", r"\1", text))):
        found = _ITEM.match(part)
        if not found:
            raise ValueError(f"gate_layers: {part!r} is not a layer number or a range A-B, each with heads after a "
                             f"colon if wanted (31:0-3), or 'all', 'top N' or 'bottom N'; got {spec!r}")
        low, high, head_low, head_high = found.groups()
        named = _span(part, low, high, model, "layers")
        heads = None if head_low is None else _span(part, head_low, head_high, model, "heads")
        speakers += named if heads is None else [(layer, head) for layer in named for head in heads]
    if not speakers:
        raise ValueError(f"gate_layers: no layers named in {spec!r} (give 'all', 'top N', 'bottom N' or numbers "
                         "such as '28-31')")
    return normalized(model, speakers)


def _span(part: str, low: str, high: str | None, model: Transformer, what: str) -> range:
    """The layers (`what`: or heads) `low` to `high` of one item, refused when backwards or past the model's (before
    a range such as 0-30000000 is built)."""
    first, last = int(low), int(high or low)
    if last < first:
        raise ValueError(f"gate_layers: {part!r} runs backwards; write the range low to high")
    count = model.args.n_layers if what == "layers" else model.args.n_heads
    if last >= count:
        start = max(first, count)
        past = str(last) if start == last else f"{start}-{last}"
        if what == "layers":
            below = _runs(range(first, min(last + 1, model.first_prompt_layer)))  # below the adapter's layers too
            raise _no_prompt([*below, past], adapter_layers(model))
        raise _no_such_heads([past], count)
    return range(first, last + 1)


def _no_prompt(runs: list[str], own: list[int]) -> ValueError:
    return ValueError(f"gate_layers: layer(s) {', '.join(runs)} have no adaption prompt; this adapter's prompts are "
                      f"in layers {describe(own)}")


def _no_such_heads(runs: list[str], n_heads: int) -> ValueError:
    return ValueError(f"gate_layers: head(s) {', '.join(runs)} do not exist; this model's layers have heads "
                      f"0-{n_heads - 1}")


def normalized(model: Transformer, speakers: Iterable[Speaker]) -> list[Speaker]:
    """A selection checked against `model` (adapter layers, head numbers) and written one way: whole layers,
    then single heads, in order; a head of a whole layer, or a layer all of whose heads are named, is the whole
    layer. A text ("top 2", "28-31") is read as the command lines read it."""
    if isinstance(speakers, str):
        return parse_layers(speakers, model)
    if not isinstance(speakers, Iterable):  # a number was "'int' object is not iterable"
        raise ValueError(f"gate_layers: expected layer numbers or (layer, head) pairs (or a text such as 'top 2'), "
                         f"got {speakers!r}")
    whole, heads = _split(speakers)
    _require_adapter_layers(whole | set(heads), adapter_layers(model))
    n_heads = model.args.n_heads
    outside = sorted({head for chosen in heads.values() for head in chosen if not 0 <= head < n_heads})
    if outside:
        raise _no_such_heads(_runs(outside), n_heads)
    whole |= {layer for layer, chosen in heads.items() if len(chosen) == n_heads}
    return [*sorted(whole), *sorted((layer, head) for layer, chosen in heads.items() if layer not in whole
                                    for head in chosen)]


def layer_mask(model: Transformer, speakers: Iterable[Speaker]) -> torch.Tensor:
    """1 for each speaker, 0 for the rest: [prompt_layers] float32 for whole layers, [prompt_layers, n_heads]
    when single heads are chosen."""
    own = adapter_layers(model)
    chosen = normalized(model, speakers)
    if all(isinstance(speaker, int) for speaker in chosen):
        return torch.tensor([1.0 if layer in chosen else 0.0 for layer in own])
    mask = torch.zeros(len(own), model.args.n_heads)
    for speaker in chosen:
        if isinstance(speaker, int):
            mask[own.index(speaker)] = 1.0
        else:
            mask[own.index(speaker[0]), speaker[1]] = 1.0
    return mask


def gate_scale_rows(model: Transformer, scales: Sequence[float],
                    layers: Iterable[Speaker] | None = None) -> list[float] | torch.Tensor:
    """The gate scale of a batch whose row i is at `scales[i]` with only `layers` speaking: [rows, prompt_layers]
    ([rows, prompt_layers, n_heads] with single heads; the scales as they are when `layers` is None: every
    layer speaks)."""
    if layers is None:
        return [float(scale) for scale in scales]
    mask = layer_mask(model, layers)
    return torch.tensor([float(scale) for scale in scales]).view(-1, *[1] * mask.dim()) * mask[None]


def _require_adapter_layers(chosen: set[int], own: list[int]) -> None:
    outside = sorted(chosen - set(own))
    if outside:
        raise _no_prompt(_runs(outside), own)


def layers_from_flag(spec: str | None, model: Transformer) -> list[Speaker] | None:
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


def speaking(model: Transformer, layers: Iterable[Speaker] | None) -> str:
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
