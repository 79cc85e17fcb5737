"""The peer: transformers LlamaForCausalLM + peft `adaption_prompt`, built from the very tensors we load.

`write_weights` writes one random base twice: as a Meta folder (what `adapter.load` reads) and, from the
model `adapter.load` made of it, as an HF folder (q/k rows in HF's rotate-half order). Each precision is
then reached the way its users reach it: ours through `adapter.load(quantize=, dtype=)`, the peer through
`from_pretrained(dtype=, quantization_config=BitsAndBytesConfig(...))`, which works on CPU too.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from adapter.config import AdapterArgs, ModelArgs
from adapter.loading import load
from adapter.model import Transformer
from bench.args import positive_int
from bench.load import write_checkpoint

if TYPE_CHECKING:
    import transformers

# precision -> (dtype of the model, bitsandbytes mode of the frozen linears)
PRECISIONS: dict[str, tuple[torch.dtype, str | None]] = {
    "fp32": (torch.float32, None), "bf16": (torch.bfloat16, None),
    "nf4": (torch.float32, "nf4"), "int8": (torch.float32, "int8")}


def fresh_process_flags(parser: argparse.ArgumentParser, repeats_help: str, worker_choices: Sequence[str]) -> None:
    """The flags of a benchmark that measures each figure in fresh processes of its own: --threads, --repeats,
    --precisions, --smoke, --write, and the hidden --worker/--folder its workers are started with."""
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=3, help=repeats_help)
    parser.add_argument("--precisions", help="comma-separated, from " + ", ".join(PRECISIONS) +
                        " (default fp32,nf4; fp32 with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one process each: checks the harness")
    parser.add_argument("--write", help="replace this section of the markdown file (e.g. BENCHMARKS.md)")
    parser.add_argument("--worker", choices=worker_choices, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)


def chosen_precisions(parser: argparse.ArgumentParser, options: argparse.Namespace) -> list[str]:
    """--precisions as a list (default fp32,nf4; fp32 with --smoke), each one known."""
    precisions = (options.precisions or ("fp32" if options.smoke else "fp32,nf4")).split(",")
    if sorted(set(precisions) - set(PRECISIONS)):
        parser.error(f"--precisions: choose from {list(PRECISIONS)}")
    return precisions


HF_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
            "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
            "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm"}


@dataclass(frozen=True)
class Weights:
    """Where one random base lives in both layouts, and its shape."""

    meta: Path
    hf: Path
    args: ModelArgs

    @classmethod
    def at(cls, folder: str | Path, args: ModelArgs) -> Weights:
        """The weights `write_weights(folder, args)` wrote (e.g. read again by a worker process)."""
        return cls(Path(folder) / "meta", Path(folder) / "hf", args)


def quiet() -> None:
    """bitsandbytes logs a warning on every int8 matmul from float32 inputs (both sides do the same cast), and
    peft/transformers warn about their own deprecations and draw progress bars: none of it is about the
    benchmark."""
    import transformers

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.disable_progress_bar()


def hf_config(args: ModelArgs) -> transformers.LlamaConfig:
    import transformers

    return transformers.LlamaConfig(
        hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab_size,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=False)


def hf_llama(model: Transformer) -> nn.Module:
    """A transformers LlamaForCausalLM holding our (unquantized) base tensors, shared where the layout allows
    (q/k rows are permuted into HF's order, so those are copies), on our model's device."""
    import transformers

    from adapter.formats.hf import meta_to_hf_rows

    a = model.args
    state = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.output.weight}
    for i, layer in enumerate(model.layers):
        for meta, hf in HF_NAMES.items():
            w = layer.get_parameter(f"{meta}.weight")
            if meta in ("attention.wq", "attention.wk"):
                w = meta_to_hf_rows(w, a.n_heads if meta == "attention.wq" else a.kv_heads)
            state[f"model.layers.{i}.{hf}.weight"] = w
    config = hf_config(a)
    with torch.device("meta"):
        hf_model = transformers.LlamaForCausalLM(config)
    hf_model.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True, assign=True)
    with torch.device(model.tok_embeddings.weight.device):  # the rotary buffers, off the meta device
        hf_model.model.rotary_emb = type(hf_model.model.rotary_emb)(config=config)
    return hf_model


def peft_wrap(hf_model: nn.Module, adapter: AdapterArgs) -> nn.Module:
    """peft's adaption_prompt on the top `prompt_layers` layers (fresh: peft's own prompts, zero gates); with
    no prompt layers, the bare transformers model (peft cannot adapt zero layers)."""
    import peft

    if not adapter.has_prompts:
        return hf_model
    config = peft.AdaptionPromptConfig(adapter_len=adapter.prompt_len, adapter_layers=adapter.prompt_layers,
                                       task_type="CAUSAL_LM")
    return peft.get_peft_model(hf_model, config)


def copy_adapter(ours: Transformer, peer: nn.Module) -> None:
    """Our prompts and effective gates into the peer. PEFT has one raw gate per layer, so all heads of each of
    our layers must share one value (v2 parts have no place in PEFT: they must be zero, as fresh ones are)."""
    a, dim = ours.adapter_args, ours.args.dim
    if not a.has_prompts:
        return
    prompts = ours.adapter_query.weight.detach().view(a.prompt_layers, a.prompt_len, dim)
    layers = peer.get_base_model().model.layers
    with torch.no_grad():
        for i, n in enumerate(range(ours.first_prompt_layer, ours.args.n_layers)):
            gate = ours.layers[n].attention.effective_gate().detach().flatten()
            if not torch.all(gate == gate[0]):
                raise ValueError(f"copy_adapter: layer {n} has one gate per head; PEFT has one per layer")
            attention = layers[n].self_attn
            attention.adaption_prompt.copy_(prompts[i].unsqueeze(0))
            attention.adaption_gate.fill_(float(gate[0]))


def write_weights(folder: str | Path, args: ModelArgs) -> Weights:
    """A random base in `folder/meta` (Meta layout) and `folder/hf` (HF layout) with the same tensors."""
    weights = Weights.at(folder, args)
    write_checkpoint(weights.meta, args)
    loaded = load(weights.meta, max_seq_len=args.max_seq_len, device="cpu")
    hf_llama(loaded).save_pretrained(weights.hf)
    return weights


def load_ours(weights: Weights, precision: str, adapter: AdapterArgs | None = None) -> Transformer:
    """Our model at `precision` through adapter.load, with a fresh adapter (zero gates, random prompts)."""
    dtype, quantize = PRECISIONS[precision]
    return load(weights.meta, adapter=adapter, quantize=quantize, dtype=dtype,
                     max_seq_len=weights.args.max_seq_len, device="cpu")


def load_peer(weights: Weights, precision: str, adapter: AdapterArgs) -> nn.Module:
    """The peer at `precision` through from_pretrained (+ BitsAndBytesConfig), wrapped by peft."""
    import transformers

    dtype, quantize = PRECISIONS[precision]
    options = {}
    if quantize == "nf4":
        options["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    elif quantize == "int8":
        options["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(weights.hf, dtype=dtype, device_map="cpu", **options)
    return peft_wrap(hf_model, adapter)


def pair(weights: Weights, precision: str, adapter: AdapterArgs,
         gate: float | None = 0.1) -> tuple[Transformer, nn.Module]:
    """(ours, peer) at `precision` in eval mode, the peer holding our prompts; with `gate`, every gate of ours
    set to it (as bench.decode does), so that the prompts act."""
    model = load_ours(weights, precision, adapter)
    if gate is not None:
        with torch.no_grad():
            for block in model.layers[model.first_prompt_layer:]:
                block.attention.gate.fill_(gate)
    peer = load_peer(weights, precision, adapter)
    copy_adapter(model, peer)
    return model.eval(), peer.eval()
