"""`python -m adapter.quantize_base BASE OUT --mode nf4`: write a base once as a pre-quantized HF folder.

Quantizing while loading reads every 16-bit weight (13.5 GB for LLaMA-7B) each time the app starts; the folder
written here holds the bitsandbytes codes themselves (3.9 GB in nf4), in the layout transformers saves a
`BitsAndBytesConfig` model in (adapter.formats.bnb), so it loads faster and in less host memory, here and in
transformers, and fits a Space's or a small machine's disk. Any base we read can be written (Meta, HF, Mistral,
litgpt, GGUF, the tiny one); the tokenizer (and the files that say the chat template) come along (a GGUF file's
written as the files an HF folder keeps them in).

The weights are quantized exactly as `adapter.load(..., quantize=mode)` quantizes them (bitsandbytes' own
functions, blocks of 64, double quantization unless `--no-double-quant`), from the tensors as stored (the rest
cast to `--dtype`):
wq/wk in Meta's row order, their rows then moved whole into HF's with their block scales in float32 (second-level
blocks would span the moved rows), so the folder loads bit for bit as the base quantized while loading.
The folder appears whole or not at all: it is written beside OUT under a temporary name, then renamed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .arg_types import unicode_output
from .config import ModelArgs
from .footprint import size_text
from .formats import BASE_HELP
from .formats.bnb import QuantizedWeight
from .formats.common import atomic_folder
from .hf_folder import (
    SHARD_GB,
    hf_config,
    hf_tensors,
    open_base_to_rewrite,
    push_folder,
    write_hf_folder,
)
from .hub import PREFIX, is_remote, repo_of
from .interrupts import stoppable
from .loading import DTYPES, resolve_device
from .paths import require_path
from .push import hub_target
from .quantize import BLOCK_SIZE, INT8_OUTLIER_THRESHOLD, QUANTIZE_MODES, bitsandbytes, check_mode
from .tiny.assets import BASE_NAME
from .tokenizer import open_tokenizer

BITS = {"nf4": "4-bit", "int8": "8-bit"}


def quantize_base(base: str | os.PathLike, out: str | os.PathLike, mode: str = "nf4", *, dtype: str = "bfloat16",
                  double_quant: bool = True, device: str | None = None, shard_gb: float = SHARD_GB) -> Path:
    """Write `base` quantized in `mode` ("nf4", "int8") to the new folder `out` (HF layout); returns its path."""
    if check_mode(mode) is None:
        raise ValueError(f"mode: choose from {QUANTIZE_MODES}")
    if not isinstance(double_quant, bool):
        raise ValueError(f"double_quant: must be True or False, got {double_quant!r}")
    bitsandbytes()  # its clear error, before anything is read, where it is missing
    require_path(out, "out", "a folder's path")
    out = Path(out)
    checkpoint = open_base_to_rewrite(base, out, dtype, shard_gb, "load it as it is")
    args = checkpoint.model_args(open_tokenizer(checkpoint.tokenizer_path).n_words)
    writer = _Writer(checkpoint, args, mode, DTYPES[dtype], double_quant, resolve_device(device), shard_gb, str(base))
    return atomic_folder(out, writer.write)


class _Writer:
    """The base's tensors, quantized linears and plain rest, as an HF folder (adapter.hf_folder)."""

    def __init__(self, checkpoint, args: ModelArgs, mode: str, dtype: torch.dtype, double_quant: bool,
                 device: torch.device, shard_gb: float, base: str) -> None:
        self.checkpoint, self.args, self.mode, self.dtype, self.base = checkpoint, args, mode, dtype, base
        self.double_quant, self.device, self.shard_bytes = double_quant, device, int(shard_gb * 2**30)

    def write(self, folder: Path) -> None:
        write_hf_folder(folder, self.checkpoint, self.args, self._converted, self._config(), self._card,
                        self.shard_bytes)

    def _converted(self, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """HF name -> tensor(s) for one of the base's tensors: a frozen linear as codes and statistics."""
        return hf_tensors(name, weight, self.args,
                          lambda weight: QuantizedWeight.quantize(weight.to(self.device), self.mode,
                                                                  self.double_quant, BLOCK_SIZE), self.dtype)

    def _card(self, size: int) -> str:
        """README.md: what the folder is and how to load it, for people and for the hub when it is pushed."""
        a, family, stored = self.args, self.checkpoint.family, f"{self.mode} ({BITS[self.mode]})"
        base_model = [f"base_model: {repo_of(self.base)}", "base_model_relation: quantized"] \
            if self.base.startswith(PREFIX) else []
        source = "`tiny`, the model embedded in llama-adapter" if self.base == BASE_NAME else \
            f"`{self.base if is_remote(self.base) else Path(self.base).name}`"
        return "\n".join([
            "---", "tags:", "- llama-adapter", "- bitsandbytes", f"- {BITS[self.mode]}", *base_model,
            "library_name: transformers", "pipeline_tag: text-generation", "---", "",
            f"# {family} base in {self.mode}", "",
            f"{source} ({family}: dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads, vocabulary {a.vocab_size}), "
            f"its linears stored {stored} by `python -m adapter.quantize_base` in transformers' bitsandbytes layout "
            f"({size_text(size)} of weights; the rest in {str(self.dtype).removeprefix('torch.')}"
            + (", block scales double-quantized" if self.mode == "nf4" and self.double_quant else "") + "). It "
            "loads as stored, without reading or quantizing 16-bit weights, and exactly as the base quantized while "
            "loading.", "",
            "```bash", "# with llama-adapter: the app (and every command line) serve adapters on it",
            "python app.py --base hf:OWNER/NAME --adapter hf:OWNER/ADAPTER   # or --base this/folder", "```", "",
            "```python", "from transformers import AutoModelForCausalLM  # bitsandbytes installed",
            "model = AutoModelForCausalLM.from_pretrained(\"OWNER/NAME\")", "```", ""])

    def _config(self) -> dict:
        """config.json as transformers writes it for this shape and quantization."""
        dtype = str(self.dtype).removeprefix("torch.")
        return {**hf_config(self.checkpoint, self.args, dtype), "quantization_config": self._quantization_config(dtype)}

    def _quantization_config(self, dtype: str) -> dict:
        four_bit = self.mode != "int8"
        return {"quant_method": "bitsandbytes", "load_in_4bit": four_bit, "load_in_8bit": not four_bit,
                "bnb_4bit_quant_type": self.mode if four_bit else "fp4", "bnb_4bit_compute_dtype": dtype,
                "bnb_4bit_use_double_quant": four_bit and self.double_quant, "bnb_4bit_quant_storage": "uint8",
                "llm_int8_threshold": INT8_OUTLIER_THRESHOLD, "llm_int8_has_fp16_weight": False,
                "llm_int8_skip_modules": None, "llm_int8_enable_fp32_cpu_offload": False}


def main(argv: Sequence[str] | None = None) -> int:
    unicode_output()
    parser = argparse.ArgumentParser(prog="python -m adapter.quantize_base", description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help=BASE_HELP)
    parser.add_argument("out", help="the new folder to write (must not exist)")
    parser.add_argument("--mode", default="nf4", choices=QUANTIZE_MODES)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                        help="the dtype the rest (embeddings, norms, head) is stored in, and the compute dtype "
                             "transformers reads (the linears are quantized from their stored dtype, as --quantize "
                             "does while loading)")
    parser.add_argument("--no-double-quant", action="store_true",
                        help="nf4: keep the block scales in float32 (0.37 bits per weight more)")
    parser.add_argument("--device", help="where to quantize (default: cuda if available, else cpu)")
    parser.add_argument("--shard-gb", type=float, default=SHARD_GB, help="the largest weights file, in GiB")
    parser.add_argument("--push-to-hub", metavar="OWNER/NAME",
                        help="then push the folder (its README.md the card) to this Hugging Face hub repository "
                             "(token: HF_TOKEN or `hf auth login`; checked before quantizing)")
    parser.add_argument("--hub-private", action="store_true", help="--push-to-hub: create the repository private")
    options = parser.parse_args(argv)

    def run() -> None:
        repo = hub_target(options.push_to_hub, options.hub_private)
        path = quantize_base(options.base, options.out, options.mode, dtype=options.dtype,
                             double_quant=not options.no_double_quant, device=options.device,
                             shard_gb=options.shard_gb)
        size = size_text(sum(f.stat().st_size for f in path.glob("*.safetensors")))
        print(f"wrote {path} ({options.mode}, {size} of weights); serve it with python app.py --base {path}")
        if repo:
            url = push_folder(path, repo, options.hub_private,
                              "Upload a pre-quantized base (python -m adapter.quantize_base)")
            print(f"pushed {url}; serve it with python app.py --base hf:{repo}")

    return stoppable(run, f"{options.out} is written whole or not at all (no half-written folder is left)", parser)


if __name__ == "__main__":
    sys.exit(main())
