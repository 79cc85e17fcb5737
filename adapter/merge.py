"""`python -m adapter.merge BASE ADAPTER OUT`: what of an adapter a LLaMA's own weights can hold, merged into them.

An adapter's LoRA, input or output scales and tuned norms change the frozen linears and norms at a fixed
delta scale of 1; merged, they cost nothing at run time, and an adapter of them alone (a `--mode lora` run, a
PEFT LoRA, the V2 dialog release but for its biases) becomes a plain LLaMA that transformers, vLLM or
llama.cpp's converter read as any other. The rest has no place in a LLaMA's weights and is written beside it as
an adapter of its own, `OUT/adapter`, to serve on the merged base (`--base OUT --adapter OUT/adapter`) with the
same answers: the adaption prompts, gates and visual prompt, and the biases (a LLaMA has none; an output scale's
part of them folded in).

Where the adaption prompts are read through the frozen wk and wv (the official formula), their deltas stay in
the adapter: merged, they would change the prompts' keys and values. An input scale then stays on all seven
linears (it is one setting), as ones on those merged.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .arg_types import unicode_output
from .config import LORA_TARGETS, AdapterArgs
from .convert import adapter_on_meta_base
from .footprint import size_text
from .formats import BASE_HELP
from .formats.common import atomic_folder
from .formats.native import save_adapter
from .hf_folder import (
    SHARD_GB,
    hf_config,
    hf_tensors,
    open_base_to_rewrite,
    push_folder,
    write_hf_folder,
)
from .interrupts import stoppable
from .layout import column_major_wide
from .loading import DTYPES
from .model import LinearDelta, Transformer
from .paths import require_path
from .push import hub_target
from .tokenizer import open_tokenizer

ADAPTER_FOLDER = "adapter"  # OUT/adapter: what stays an adapter
NORMS = ("attention_norm", "ffn_norm")
PROMPT_READ = ("wk", "wv")  # the linears the official formula reads the adaption prompts through


@dataclass(frozen=True)
class Merged:
    """What `merge` wrote: the base folder, and the adapter of what did not merge (None where all did)."""

    base: Path
    adapter: Path | None
    merged: list[str]  # the parts merged, for people ("LoRA", "input scales", "tuned norms", ...)
    sees: bool  # the adapter left has a visual prompt (served with --clip, as the whole one was)


def merge(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bfloat16",
          shard_gb: float = SHARD_GB) -> Merged:
    """Write `base` with `adapter`'s LoRA, scales and tuned norms merged in to the new HF folder `out`, and what
    does not merge as the adapter `out/adapter`."""
    require_path(out, "out", "a folder's path")
    out = Path(out)
    checkpoint = open_base_to_rewrite(base, out, dtype, shard_gb, "merge into the 16-bit base it was made from "
                                      "(then python -m adapter.quantize_base the merged folder)")
    model = adapter_on_meta_base(base, adapter, "adapter")
    plan = _Plan(model, str(adapter))
    if plan.head_scaled and checkpoint.tied_output:
        raise ValueError(f"adapter: {adapter} scales the vocabulary head, which this base ties to its embeddings; "
                         "a merged head would no longer be the embedding matrix")
    args = checkpoint.model_args(open_tokenizer(checkpoint.tokenizer_path).n_words)
    rest = plan.rest_model()
    stored = DTYPES[dtype]

    def tensors(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return hf_tensors(name, plan.merged(name, weight), args, dtype=stored)

    def card(size: int) -> str:
        return _card(str(base), str(adapter), plan.parts, rest, checkpoint.family, size, dtype)

    def write(folder: Path) -> None:
        write_hf_folder(folder, checkpoint, args, tensors, hf_config(checkpoint, args, dtype), card,
                        int(shard_gb * 2**30))
        if rest is not None:
            save_adapter(rest, folder / ADAPTER_FOLDER)

    written = atomic_folder(out, write)
    return Merged(written, written / ADAPTER_FOLDER if rest is not None else None, plan.parts,
                  plan.rest_args.visual != "none")


def merged_model(model: Transformer) -> Transformer:
    """`model` (its base in memory, not quantized) with its adapter's LoRA, scales and tuned norms merged into new
    base weights and the rest as its adapter: the same answers with fewer operations a token (bench.v2_parts).
    It shares nothing learnt with `model`; its tokenizer, CLIP tower and prompt format are `model`'s."""
    if model.quantization:
        raise ValueError(f"model: its base is quantized ({model.quantization}); merge into a 16-bit base")
    plan = _Plan(model, "the model's adapter")
    merged = plan.rest_model()
    if merged is None:
        with torch.device("meta"):
            merged = Transformer(model.args)
    base = {name: plan.merged(name, value).to(value.dtype) for name, value in model.state_dict().items()
            if not model.is_adapter_parameter(name) and not name.startswith("image_encoder.")}  # the tower: shared
    merged.load_state_dict(base, strict=False, assign=True)
    merged.freeze_base()
    column_major_wide(merged)
    merged.to(next(model.parameters()).device).eval()
    merged.tokenizer, merged.image_encoder = model.tokenizer, model.image_encoder
    merged.prompt_format = model.prompt_format
    return merged


class _Plan:
    """Which of the adapter's parts merge into which base tensors, and the adapter of the rest."""

    def __init__(self, model: Transformer, source: str) -> None:
        self.model, a = model, model.adapter_args
        # linears whose deltas stay in the adapter: the prompts read them frozen
        self.kept = PROMPT_READ if a.has_prompts and a.prompt_projection == "frozen" else ()
        self.keep_scale = a.scale and bool(self.kept)  # one setting for all seven linears: ones where merged
        kept_lora = tuple(t for t in a.lora_targets if t in self.kept) if a.lora_rank else ()
        self.rest_args = dataclasses.replace(
            a, scale=self.keep_scale, norm=False, lora_rank=a.lora_rank if kept_lora else 0,
            lora_targets=kept_lora or LORA_TARGETS, head_delta=a.head_delta and (a.bias or self.keep_scale))
        self.head_scaled = a.head_delta and a.scale
        merged_lora = a.lora_rank > 0 and any(t not in self.kept for t in a.lora_targets)
        scale = f"{a.scale_at} scales" + (" (but wk's and wv's)" if self.keep_scale else "")
        self.parts = [name for name, on in (("LoRA", merged_lora), (scale, a.scale), ("tuned norms", a.norm)) if on]
        if not self.parts:
            but = ", but on wk and wv, which its prompts read" if kept_lora else ""
            raise ValueError(f"adapter: nothing in {source} merges into a LLaMA's weights (it has "
                             f"{', '.join(_has(a)) or 'nothing learnt'}; merging takes LoRA, scales and tuned "
                             f"norms{but}); serve it as it is with --adapter")

    def merged(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """A base tensor (Meta name and rows) with its part of the adapter merged in, in float32."""
        weight = weight.float()
        module_name = name.removesuffix(".weight")
        leaf = module_name.rsplit(".", 1)[-1]
        if leaf in NORMS or module_name == "norm":
            delta = self.model.get_submodule(module_name).delta
            return weight if delta is None else weight + delta.detach().float()
        delta = self._delta(module_name)
        if delta is None or leaf in self.kept:
            return weight
        scale = None if delta.scale is None else delta.scale.detach().float()
        if scale is not None and delta.scale_at == "input":
            weight = weight * scale  # W(s * x)
        if delta.lora_down is not None:  # + LoRA(x), of the unscaled input
            weight = weight + delta.lora_up.weight.detach().float() @ delta.lora_down.weight.detach().float()
        if scale is not None and delta.scale_at == "output":
            weight = scale[:, None] * weight  # s * (Wx + LoRA(x))
        return weight

    def _delta(self, module_name: str) -> LinearDelta | None:
        if module_name == "output":
            return self.model.output_delta
        parent, _, leaf = module_name.rpartition(".")
        return getattr(self.model.get_submodule(parent), f"{leaf}_delta", None)

    def rest_model(self) -> Transformer | None:
        """The adapter of what does not merge, on a base of `meta` tensors; None where nothing is left."""
        if self.rest_args.learns_nothing:
            return None
        with torch.device("meta"):
            rest = Transformer(self.model.args, self.rest_args)
        rest.reset_adapter("cpu")
        tensors = {}
        for name, value in self.model.adapter_state_dict().items():
            if name.endswith(".delta"):  # a tuned norm: merged
                continue
            if "_delta." not in name:  # prompts, gates, the visual prompt
                tensors[name] = value
                continue
            linear, _, part = name.partition("_delta.")
            delta = self.model.get_submodule(linear + "_delta")
            if linear.rsplit(".", 1)[-1] in self.kept:
                tensors[name] = value
            elif part == "bias":  # an output scale's part folded in: s * (W'x + b)
                tensors[name] = value * delta.scale.detach() if delta.scale_at == "output" and delta.scale is not None \
                    else value
            elif part == "scale" and self.keep_scale:
                tensors[name] = torch.ones_like(value)
        rest.load_adapter_state(tensors, "the adapter left after merging")
        rest.prompt_format = self.model.prompt_format
        return rest


def _has(args: AdapterArgs) -> list[str]:
    return (["adaption prompts and gates"] if args.has_prompts else []) + args.v2_parts


def _card(base: str, adapter: str, parts: list[str], rest: Transformer | None, family: str, size: int,
          dtype: str) -> str:
    """README.md: what was merged into what, and how to serve it."""
    serve = "python app.py --base hf:OWNER/NAME" + (f" --adapter hf:OWNER/NAME/{ADAPTER_FOLDER}" if rest else "") \
        + (" --clip CLIP" if rest and rest.visual_prompt is not None else "") + "   # or this folder's path"
    return "\n".join([
        "---", "tags:", "- llama-adapter", "- merged", "library_name: transformers",
        "pipeline_tag: text-generation", "---", "",
        f"# {family} base with an adapter merged in", "",
        f"`{Path(base).name}` with the {', '.join(parts)} of `{Path(adapter).name}` merged into its weights by "
        f"`python -m adapter.merge` ({size_text(size)} of weights in {dtype})."
        + (f" The rest of that adapter (what a {family}'s weights cannot hold) is the adapter in "
           f"`{ADAPTER_FOLDER}/`, which answers on this base as the whole adapter did on the original." if rest
           else " Nothing of it is left: this is a plain model."), "",
        "```bash", serve, "```", "",
        "```python", "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(\"OWNER/NAME\")"
        + ("  # without the adaption prompts and biases of adapter/" if rest else ""), "```", ""])


def main(argv: Sequence[str] | None = None) -> int:
    unicode_output()
    parser = argparse.ArgumentParser(prog="python -m adapter.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help=BASE_HELP + " (not one stored quantized)")
    parser.add_argument("adapter", help="an adapter in any supported format (ours, official, PEFT, litgpt; "
                                        "hf:owner/name, official:NAME, tiny-text, tiny-image)")
    parser.add_argument("out", help="the new folder to write (must not exist): the merged base, in HF's layout")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                        help="what the merged weights are stored in (merged in float32)")
    parser.add_argument("--shard-gb", type=float, default=SHARD_GB, help="the largest weights file, in GiB")
    parser.add_argument("--push-to-hub", metavar="OWNER/NAME",
                        help="then push the folder (the adapter left in its adapter/ folder, its README.md the card) "
                             "to this Hugging Face hub repository (token: HF_TOKEN or `hf auth login`; checked before "
                             "merging)")
    parser.add_argument("--hub-private", action="store_true", help="--push-to-hub: create the repository private")
    options = parser.parse_args(argv)

    def run() -> None:
        repo = hub_target(options.push_to_hub, options.hub_private)
        written = merge(options.base, options.adapter, options.out, dtype=options.dtype, shard_gb=options.shard_gb)
        print(f"wrote {written.base} ({', '.join(written.merged)} merged"
              + (f"; the rest of the adapter in {written.adapter}" if written.adapter else
                 "; nothing left of the adapter")
              + f"); serve it with {_serving(str(written.base), written)}")
        if repo:
            url = push_folder(written.base, repo, options.hub_private,
                              "Upload a base with an adapter merged in (python -m adapter.merge)")
            print(f"pushed {url}; serve it with {_serving(f'hf:{repo}', written)}")

    return stoppable(run, f"{options.out} is written whole or not at all (no half-written folder is left)", parser)


def _serving(base: str, written: Merged) -> str:
    """The app's command line that serves what `merge` wrote, where `base` names the merged folder."""
    rest = f" --adapter {base}/{ADAPTER_FOLDER}" if written.adapter else ""
    return f"python app.py --base {base}{rest}" + (" --clip CLIP (the tower it read before)" if written.sees else "")


if __name__ == "__main__":
    sys.exit(main())
