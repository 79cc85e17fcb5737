"""`python -m adapter.convert SRC DST --to {native,peft,official-v1} --base DIR`: rewrite an adapter in
another format.

The base is needed for its shape (and, for the official v2 files, for its norms: tuned norms are stored
as deltas against them), but its large weights are never loaded: the model is built on the `meta`
device and only the adapter (and the norms) get real memory.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .arg_types import refused, unicode_output
from .formats import BASE_HELP, read_adapter
from .formats.common import check_writable, unrecorded_format_note
from .formats.native import save_adapter
from .formats.official import write_official_v1
from .hub import resolve
from .loading import open_base_shape, open_named_base
from .model import Transformer
from .paths import BASE_NAMES, require_path
from .tiny.assets import resolve as resolve_tiny
from .tokenizer import open_tokenizer

TARGETS = ("native", "peft", "official-v1")


def adapter_on_meta_base(base: str | Path, source: str | Path, what: str = "source") -> Transformer:
    """The adapter of `source` in a model whose frozen weights stay on `meta` (no memory); a base on the hub is
    fetched without its weights unless the adapter's tuned norms need the base's (the official v2 files). The
    embedded adapters are named as everywhere (tiny-text, tiny-image); `what` names the argument in errors."""
    require_path(base, "base", BASE_NAMES)
    require_path(source, what, "a path or a name (tiny-text, hf:owner/name, official:NAME)")
    _, source, _, _ = resolve_tiny("", source, None, None)
    found = read_adapter(resolve(source, what))
    checkpoint = open_named_base(base) if found.norm_weights else open_base_shape(base)
    args = checkpoint.model_args(open_tokenizer(checkpoint.tokenizer_path).n_words)
    found.check_base(args)
    with torch.device("meta"):
        model = Transformer(args, found.args)
    model.base_family = checkpoint.family
    for name in found.norm_weights:
        module_name, _, leaf = name.rpartition(".")
        weight = torch.nn.Parameter(checkpoint.tensor(name).float().clone(), requires_grad=False)
        setattr(model.get_submodule(module_name), leaf, weight)
    model.reset_adapter("cpu")
    found.apply_to(model)
    return model


def convert(source: str | Path, target: str | Path, to: str, base: str | Path) -> Path:
    """Write `source` as `to` into `target`, a new file or folder (an existing one would be replaced, or get a
    second adapter beside its own, which readers might take instead); only our format records a prompt format
    other than Alpaca, so an adapter in another one is converted with a note on stderr saying how to ask it."""
    check_target(to)
    require_path(target, "target")
    target = Path(target)
    if target.is_file() or (target.is_dir() and any(target.iterdir())):
        raise ValueError(f"target: {target} already exists; name a new file or folder (or remove it)")
    check_writable(target, "target: ")
    model = adapter_on_meta_base(base, source)
    written = write_adapter(model, target, to, str(base))
    note = unrecorded_format_note(model, to)
    if note:
        print(note, file=sys.stderr)
    return written


def check_target(to: str) -> None:
    if not isinstance(to, str) or to not in TARGETS:
        raise ValueError(f"to: unknown target format {to!r}; choose from {TARGETS}")


def write_adapter(model: Transformer, target: str | Path, to: str, base_name: str | None = None) -> Path:
    """`model`'s adapter written in format `to` (TARGETS): a folder for native and peft, a .pth file for
    official-v1; ValueError where the format cannot hold it (its writer names why)."""
    check_target(to)
    if to == "native":
        return save_adapter(model, target)
    if to == "peft":
        from .formats.peft import write_peft

        return write_peft(model, target, base_model_name_or_path=base_name)
    return write_official_v1(model, target)


def main(argv: Sequence[str] | None = None) -> int:
    unicode_output()
    parser = argparse.ArgumentParser(prog="python -m adapter.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="adapter file/folder in any supported format")
    parser.add_argument("target", help="where to write (a folder for native and peft, a .pth for official-v1)")
    parser.add_argument("--to", required=True, choices=TARGETS)
    parser.add_argument("--base", required=True, help="the base the adapter belongs to: " + BASE_HELP)
    options = parser.parse_args(argv)
    try:
        path = convert(options.source, options.target, options.to, options.base)
    except (ValueError, OSError) as error:
        return refused(error, parser)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
